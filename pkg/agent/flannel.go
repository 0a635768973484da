package agent

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/registry"
)

// FlannelLeaseOptions makes the agent keep a flannel-format lease for its
// own subnet at /coreos.com/network/subnets/<subnet>, as flanneld's
// WireGuard backend does for its node: nodes still running flanneld then
// peer with this node, and nix-infra's overlay-IP lookup (the lease whose
// PublicIP is the node's) finds it.
type FlannelLeaseOptions struct {
	// Port is the WireGuard port written into BackendData.
	Port uint16
	// TTL of the etcd lease (0: flannel's 24 h) and RenewMargin, how long
	// before expiry it is renewed (0: flanneld's default of one hour).
	TTL, RenewMargin time.Duration
}

// flannelRetry is how long a failed write waits, as flanneld's
// LocalManager.leaseRenewer does ("trying again in 1 min"), bounded by
// the TTL for short test leases.
func (o FlannelLeaseOptions) retry() time.Duration { return min(time.Minute, o.TTL/10) }

func (o FlannelLeaseOptions) withDefaults() FlannelLeaseOptions {
	if o.TTL <= 0 {
		o.TTL = registry.FlannelLeaseTTL
	}
	if o.RenewMargin <= 0 || o.RenewMargin >= o.TTL {
		o.RenewMargin = min(registry.FlannelRenewMargin, o.TTL/2)
	}
	return o
}

// flannelKeeper is the agent's part that owns the flannel lease. Like
// flanneld (pkg/subnet/etcd/local_manager.go: createSubnet/updateSubnet
// grant a fresh TTL lease and put the value on it; leaseRenewer renews
// RenewMargin before expiry and retries a failure a minute later), it
// never revokes the lease: a stopped meshd stays a peer of the flannel
// nodes until the lease expires or `meshctl node remove` deletes it.
type flannelKeeper struct {
	a *Agent
	o FlannelLeaseOptions

	lease    clientv3.LeaseID
	expires  time.Time
	value    []byte
	subnet   netip.Prefix
	writeRev int64 // revision of the last write; older snapshots cannot show it
}

// want returns the lease value for this node's current member record, or
// ok false when there is nothing to write yet (no subnet claimed) or the
// node has no public IPv4 to put in it.
func (k *flannelKeeper) want() (netip.Prefix, []byte, error) {
	a := k.a
	a.mu.Lock()
	m := a.member
	a.mu.Unlock()
	if m == nil {
		return netip.Prefix{}, nil, nil
	}
	ip, err := netip.ParseAddr(a.o.PublicIPv4)
	if err != nil || !ip.Is4() {
		return netip.Prefix{}, nil, fmt.Errorf("flannel lease: node has no public IPv4 (%q) to publish", a.o.PublicIPv4)
	}
	v, err := registry.EncodeFlannelLease(ip, m.PublicKey, k.o.Port)
	return m.Subnet, v, err
}

// run keeps the lease until ctx ends.
func (k *flannelKeeper) run(ctx context.Context) error {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	var lastErr string
	for {
		next, err := k.step(ctx)
		if err != nil && ctx.Err() == nil {
			if err.Error() != lastErr {
				k.a.log.Warn("flannel lease", "err", err)
			}
			lastErr = err.Error()
		} else if err == nil {
			lastErr = ""
		}
		timer.Reset(next)
		select {
		case <-ctx.Done():
			return nil
		case <-timer.C:
		case <-k.a.flannelChg:
		}
	}
}

// step reads, decides and writes once; it returns when to look again.
func (k *flannelKeeper) step(ctx context.Context) (time.Duration, error) {
	subnet, value, err := k.want()
	if err != nil || value == nil {
		return time.Hour, err // woken again when the member record is known
	}
	if subnet != k.subnet {
		k.subnet, k.lease, k.value = subnet, 0, nil
	}
	if k.lease == 0 {
		// First look after a start: resume a lease a previous process
		// left that still has time, instead of granting another.
		if ok, err := k.resume(ctx, value); err != nil {
			return k.o.retry(), err
		} else if ok {
			return time.Until(k.expires.Add(-k.o.RenewMargin)), nil
		}
	}
	stale := k.lease == 0 || !bytes.Equal(value, k.value) || time.Until(k.expires) <= k.o.RenewMargin
	if !stale && k.a.store.Listed(registry.FlannelSubnetPrefix) {
		// Someone else changed or deleted the key (an operator, a
		// flanneld that was started again): put it back.
		snap := k.a.store.Snapshot()
		if snap.Revision >= k.writeRev {
			l, ok := snap.FlannelLeases[subnet]
			if !ok || l.Lease != int64(k.lease) || !sameFlannelLease(l, value) {
				// The snapshot's revision may come from another prefix's
				// watch, ahead of the flannel one: ask etcd before writing.
				var err error
				if stale, err = k.changed(ctx, subnet, value); err != nil {
					return k.o.retry(), err
				}
			}
		}
	}
	if !stale {
		return time.Until(k.expires.Add(-k.o.RenewMargin)), nil
	}
	if err := k.write(ctx, subnet, value); err != nil {
		return k.o.retry(), err
	}
	return time.Until(k.expires.Add(-k.o.RenewMargin)), nil
}

// changed reports whether the key no longer holds value on our lease.
func (k *flannelKeeper) changed(ctx context.Context, subnet netip.Prefix, value []byte) (bool, error) {
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	resp, err := k.a.o.Client.Get(rctx, registry.FlannelSubnetKey(subnet))
	if err != nil {
		return false, fmt.Errorf("read flannel lease: %w", err)
	}
	return len(resp.Kvs) != 1 || clientv3.LeaseID(resp.Kvs[0].Lease) != k.lease || !bytes.Equal(resp.Kvs[0].Value, value), nil
}

// resume adopts the lease the key is on when it holds exactly value and
// has more than RenewMargin left.
func (k *flannelKeeper) resume(ctx context.Context, value []byte) (bool, error) {
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	resp, err := k.a.o.Client.Get(rctx, registry.FlannelSubnetKey(k.subnet))
	if err != nil {
		return false, fmt.Errorf("read flannel lease: %w", err)
	}
	if len(resp.Kvs) != 1 || resp.Kvs[0].Lease == 0 || !bytes.Equal(resp.Kvs[0].Value, value) {
		return false, nil
	}
	ttl, err := k.a.o.Client.TimeToLive(rctx, clientv3.LeaseID(resp.Kvs[0].Lease))
	if err != nil || time.Duration(ttl.TTL)*time.Second <= k.o.RenewMargin {
		return false, nil
	}
	k.lease, k.value = clientv3.LeaseID(resp.Kvs[0].Lease), value
	k.expires = time.Now().Add(time.Duration(ttl.TTL) * time.Second)
	k.writeRev = resp.Kvs[0].ModRevision
	return true, nil
}

// write grants a fresh lease and puts the value on it, as flannel's
// updateSubnet does. The previous lease is left to expire, like
// flannel's: revoking it first would delete the key in between.
func (k *flannelKeeper) write(ctx context.Context, subnet netip.Prefix, value []byte) error {
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	g, err := k.a.o.Client.Grant(wctx, int64(k.o.TTL/time.Second))
	if err != nil {
		return fmt.Errorf("grant flannel lease: %w", err)
	}
	resp, err := k.a.o.Client.Put(wctx, registry.FlannelSubnetKey(subnet), string(value), clientv3.WithLease(g.ID))
	if err != nil {
		k.a.o.Client.Revoke(wctx, g.ID) // best effort, it expires anyway
		return fmt.Errorf("write flannel lease: %w", err)
	}
	k.lease, k.value, k.writeRev = g.ID, value, resp.Header.Revision
	k.expires = time.Now().Add(time.Duration(g.TTL) * time.Second)
	k.a.log.Info("flannel lease written", "subnet", subnet, "expires", k.expires.UTC().Format(time.RFC3339))
	return nil
}

// sameFlannelLease reports whether the decoded lease l is value.
func sameFlannelLease(l registry.FlannelLease, value []byte) bool {
	if l.WireGuard == nil {
		return false
	}
	b, err := registry.EncodeFlannelLease(l.Addr(), l.WireGuard.PublicKey, l.WireGuard.Port)
	return err == nil && bytes.Equal(b, value) && l.PublicIPv6 == nil && len(l.BackendV6Data) == 0
}
