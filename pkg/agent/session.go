package agent

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/atomicfile"
	"github.com/meshd/meshd/pkg/backoff"
	"github.com/meshd/meshd/pkg/etcdclient"
	"github.com/meshd/meshd/pkg/registry"
)

// DefaultRegisterTimeout bounds a registration attempt unless
// Options.RegisterTimeout says otherwise; MaxRegisterTimeout is the
// longest an attempt is given after attempts ran out of time.
const (
	DefaultRegisterTimeout = 10 * time.Second
	MaxRegisterTimeout     = 2 * time.Minute
)

// session holds the node's presence: it claims the member record, acquires
// a lease (resuming the previous process's lease when it is still alive, so
// a restart changes nothing that others see), registers the node entry,
// keeps the advertised instances and the status on that lease, and starts
// over when the lease is lost.
func (a *Agent) session(ctx context.Context) error {
	retry := backoff.Backoff{Base: 100 * time.Millisecond, Max: etcdclient.RetryMax, Jitter: true}
	first := cmp.Or(a.o.RegisterTimeout, DefaultRegisterTimeout)
	bound := backoff.Backoff{Base: first, Max: max(first, MaxRegisterTimeout)}
	for ctx.Err() == nil {
		timeout := bound.Next()
		lease, resumed, err := a.establish(ctx, timeout)
		if errors.Is(err, ErrNodeOwned) {
			a.log.Error("refusing to take over the node entry", "err", err)
			return err
		}
		if err != nil {
			if ctx.Err() == nil {
				a.log.Warn("registration failed, retrying", "err", err, "timeout", timeout)
				if errors.Is(err, context.DeadlineExceeded) {
					bound.Fail()
				}
				retry.Wait(ctx)
			}
			continue
		}
		retry.Reset()
		bound.Reset()
		a.log.Info("registered", "lease", fmt.Sprintf("%x", int64(lease)))
		a.metrics.registered.Set(1)
		a.mu.Lock()
		a.registeredAt = time.Now()
		a.mu.Unlock()
		a.kick() // the loop may be keeping removed instances (removal grace) until now
		a.hold(ctx, lease, resumed)
		if ctx.Err() != nil {
			return nil // Run revokes the lease on the way out
		}
		a.metrics.registered.Set(0)
		a.mu.Lock()
		a.registeredAt = time.Time{}
		a.leaseLost = true
		a.mu.Unlock()
		a.setLease(0)
		a.metrics.leaseLost.Inc()
		a.log.Warn("lease lost, re-registering")
	}
	return nil
}

// waitPrepared waits, the first time the node claims its member record
// in this process, until every ClaimPreparer component is prepared: at
// most ClaimPrepareTimeout, and half the lease's TTL (the lease is
// granted already and kept alive only once registered). It reports
// whether it had to wait.
func (a *Agent) waitPrepared(ctx context.Context) (waited bool) {
	if a.preparedForClaim {
		return false
	}
	a.preparedForClaim = true
	bound := ClaimPrepareTimeout
	if a.o.LeaseTTL > 0 {
		bound = min(bound, a.o.LeaseTTL/2)
	}
	t := time.NewTimer(bound)
	defer t.Stop()
	for _, c := range a.o.Components {
		p, ok := c.(ClaimPreparer)
		if !ok {
			continue
		}
		select {
		case <-p.PreparedForClaim():
			continue
		default:
		}
		waited = true
		select {
		case <-p.PreparedForClaim():
		case <-ctx.Done():
			return true
		case <-t.C:
			a.log.Warn("claiming the member record before a component is prepared", "component", c.Name(), "waited", bound)
			return true
		}
	}
	return waited
}

// establish acquires the lease, then claims the member record and
// registers the node entry, in one transaction when the node has a member
// record. resumed says whether the lease is a previous process's.
func (a *Agent) establish(ctx context.Context, timeout time.Duration) (lease clientv3.LeaseID, resumed bool, err error) {
	rctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	lease, resumed, err = a.acquireLease(rctx)
	if err != nil {
		return 0, false, err
	}
	if mo := a.o.Member; mo != nil {
		// The lease first, while the components prepare; the wait is not
		// the registration's time.
		if a.waitPrepared(ctx) {
			var cancelRest context.CancelFunc
			rctx, cancelRest = context.WithTimeout(ctx, timeout)
			defer cancelRest()
		}
		// The node entry is written in the claim's transaction: peers see
		// the node whole at one revision, and a process refused the entry
		// (another live meshd holds the name) rewrites no member record.
		m, err := registry.ClaimMemberWith(rctx, a.o.Client, registry.Member{
			Name: a.o.Node, PublicKey: mo.PublicKey, Endpoint: mo.Endpoint, Recipient: mo.Recipient,
		}, mo.Pool, a.o.PublicIPv4, &registry.ClaimEntry{
			Key: registry.NodeKey(a.o.Node), Lease: lease,
			Value: func(m registry.Member) []byte { return a.nodeValue(&m) },
			May:   func(ctx context.Context, cur *mvccpb.KeyValue) error { return a.mayTake(ctx, cur, lease) },
		})
		if err != nil {
			return 0, false, fmt.Errorf("claim member record and node entry: %w", err)
		}
		a.mu.Lock()
		moved := a.member == nil || a.member.OverlayIP != m.OverlayIP
		a.member = &m
		a.mu.Unlock()
		if moved {
			for _, ch := range a.checkNow {
				signal(ch)
			}
		}
		signal(a.flannelChg)
	} else if err := a.register(rctx, lease); err != nil {
		return 0, false, err
	}
	a.setLease(lease)
	return lease, resumed, nil
}

func (a *Agent) leaseFile() string { return filepath.Join(a.o.StateDir, "lease") }

// acquireLease resumes the lease a previous meshd process left alive
// (resumed), or grants a new one.
func (a *Agent) acquireLease(ctx context.Context) (lease clientv3.LeaseID, resumed bool, err error) {
	if a.o.StateDir != "" {
		if b, err := os.ReadFile(a.leaseFile()); err == nil {
			if id, err := strconv.ParseInt(strings.TrimSpace(string(b)), 16, 64); err == nil && id != 0 {
				ttl, err := a.o.Client.TimeToLive(ctx, clientv3.LeaseID(id))
				if err == nil && ttl.TTL > 0 {
					return clientv3.LeaseID(id), true, nil
				}
			}
		}
	}
	g, err := a.o.Client.Grant(ctx, int64((a.o.LeaseTTL+time.Second-1)/time.Second))
	if err != nil {
		return 0, false, fmt.Errorf("grant lease: %w", err)
	}
	if a.o.StateDir != "" {
		// Not secret, and not flushed to disk: it matters only while the
		// lease lives (seconds), and losing it costs a re-registration.
		err := atomicfile.Replace(a.leaseFile(), []byte(strconv.FormatInt(int64(g.ID), 16)+"\n"), 0o600)
		if err != nil {
			a.log.Warn("cannot record lease in state directory", "err", err)
			err = fmt.Errorf("cannot record lease in state directory (a restart will re-register): %w", err)
		}
		a.mu.Lock()
		a.stateErr = err
		a.mu.Unlock()
	}
	return g.ID, false, nil
}

// nodeValue is this node's entry: nix-infra's fields plus a "meshd" object
// that older readers ignore, which names m, the node's member record (nil:
// it has none).
func (a *Agent) nodeValue(m *registry.Member) []byte {
	n := registry.Node{
		Name: a.o.Node, IPv4: a.o.PublicIPv4, Services: a.o.Consume,
		Meshd: &registry.NodeMeshd{ID: a.o.ID, Version: a.o.Version},
	}
	if n.Services == nil {
		n.Services = []registry.Group{}
	}
	if m != nil {
		n.Meshd.PublicKey = m.PublicKey
		n.Meshd.OverlayIP = m.OverlayIP.String()
	}
	b, _ := json.Marshal(n)
	return b
}

// register writes the node entry on lease, for a node without a member
// record (a node with one writes it in its claim). The first attempt
// assumes no entry and reads the one there is in the same transaction: a
// new node registers in one round trip.
func (a *Agent) register(ctx context.Context, lease clientv3.LeaseID) error {
	key := registry.NodeKey(a.o.Node)
	val := string(a.nodeValue(nil))
	absent := clientv3.Compare(clientv3.CreateRevision(key), "=", 0)
	cmp := absent
	for range 16 {
		tr, err := a.o.Client.Txn(ctx).If(cmp).
			Then(clientv3.OpPut(key, val, clientv3.WithLease(lease))).
			Else(clientv3.OpGet(key)).Commit()
		if err != nil {
			return fmt.Errorf("write node entry: %w", err)
		}
		if tr.Succeeded {
			return nil
		}
		kvs := tr.Responses[0].GetResponseRange().Kvs
		if len(kvs) != 1 {
			cmp = absent
			continue
		}
		if err := a.mayTake(ctx, kvs[0], lease); err != nil {
			return err
		}
		cmp = clientv3.Compare(clientv3.ModRevision(key), "=", kvs[0].ModRevision)
	}
	return fmt.Errorf("write node entry: too much contention on %s", key)
}

// mayTake reports whether this process may write its node entry over cur
// (nil: there is none) on lease: it takes back an entry that carries this
// node's ID (a previous process of ours) or that has no lease (written by
// nix-infra), and refuses one held by another live meshd (ErrNodeOwned).
func (a *Agent) mayTake(ctx context.Context, cur *mvccpb.KeyValue, lease clientv3.LeaseID) error {
	if cur == nil || cur.Lease == 0 || clientv3.LeaseID(cur.Lease) == lease {
		return nil
	}
	n, err := registry.DecodeNode(a.o.Node, cur.Value)
	if err != nil || n.Meshd == nil || n.Meshd.ID == a.o.ID {
		return nil
	}
	ttl, err := a.o.Client.TimeToLive(ctx, clientv3.LeaseID(cur.Lease))
	if err != nil {
		return fmt.Errorf("check owner of node entry: %w", err)
	}
	if ttl.TTL > 0 {
		return fmt.Errorf("%w: %s is held by meshd id %s on lease %x (expires in %ds); stop that node or give this one another name",
			ErrNodeOwned, cur.Key, n.Meshd.ID, cur.Lease, ttl.TTL)
	}
	return nil
}

// hold keeps the lease alive and the leased keys current until the lease is
// lost or ctx ends.
// resumed says whether the lease is a previous process's: only such a
// lease can carry instances already.
func (a *Agent) hold(ctx context.Context, lease clientv3.LeaseID, resumed bool) {
	kctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ka, err := a.o.Client.KeepAlive(kctx, lease)
	if err != nil {
		a.log.Warn("keepalive", "err", err)
		return
	}
	written := map[string]string{}
	if resumed {
		written = a.advertisedOn(ctx, lease)
	}
	a.syncInstances(ctx, lease, written)
	done := make(chan struct{})
	go func() {
		defer close(done)
		a.publishLoop(kctx, func(ctx context.Context, value string) error {
			_, err := a.o.Client.Put(ctx, registry.StatusKey(a.o.Node), value, clientv3.WithLease(lease))
			return err
		})
	}()
	defer func() {
		cancel()
		<-done
	}()
	// After the keepalive started (a resumed lease may have little time
	// left) and after the instances: when this registration happened, for
	// meshctl status once the node is gone.
	a.mu.Lock()
	at := a.registeredAt.UTC()
	a.mu.Unlock()
	a.writeSeen(ctx, func(s *registry.Seen) { s.RegisteredAt = at })
	for {
		select {
		case <-ctx.Done():
			return
		case resp, ok := <-ka:
			if !ok || resp == nil {
				return
			}
		case <-a.instChg:
			a.syncInstances(ctx, lease, written)
		}
	}
}

// publishLoop writes the node's status with put (on the current lease)
// at start and whenever the loop sets a status that differs from the one
// last written, until ctx ends.
func (a *Agent) publishLoop(ctx context.Context, put func(ctx context.Context, value string) error) {
	// A status write that fails (etcd busy or away) is retried: --wait
	// and meshctl status must not see a stale revision until the next
	// change happens to come along.
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	publish := func(force bool) {
		if !a.publishStatus(ctx, put, force) {
			retry.Reset(etcdclient.RetryMax)
		}
	}
	publish(true)
	for {
		select {
		case <-ctx.Done():
			return
		case <-a.statusChg:
			publish(false)
		case <-retry.C:
			publish(true)
		}
	}
}

// advertiseIP is the address this node's instances are published with.
func (a *Agent) advertiseIP() netip.Addr {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.member != nil {
		return a.member.OverlayIP
	}
	if a.o.Member != nil {
		return netip.Addr{} // the overlay IP is not known yet
	}
	return a.o.AdvertiseIP
}

// advertisedOn returns this node's instance keys that lease already
// holds, with their values: what a previous process of ours advertised,
// when this one resumed its lease. syncInstances then leaves alone what is
// unchanged (no write for every node to take in) and withdraws what is no
// longer configured or healthy, which would otherwise stay advertised for
// as long as the resumed lease lives. On error it returns none: everything
// wanted is written again, and nothing else withdrawn, as on a new lease.
func (a *Agent) advertisedOn(ctx context.Context, lease clientv3.LeaseID) map[string]string {
	written := map[string]string{}
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	ttl, err := a.o.Client.TimeToLive(rctx, lease, clientv3.WithAttachedKeys())
	if err != nil {
		a.log.Warn("cannot list the keys on the lease; advertising every instance again", "err", err)
		return written
	}
	var ops []clientv3.Op
	for _, k := range ttl.Keys {
		if pk, err := registry.ParseKey(string(k)); err == nil && pk.Kind == registry.KindInstance && pk.Node == a.o.Node {
			ops = append(ops, clientv3.OpGet(string(k)))
		}
	}
	for len(ops) > 0 {
		n := min(len(ops), 64) // under etcd's default limit of operations per transaction
		resp, err := a.o.Client.Txn(rctx).Then(ops[:n]...).Commit()
		if err != nil {
			a.log.Warn("cannot read the instances on the lease; advertising every instance again", "err", err)
			return map[string]string{}
		}
		for _, r := range resp.Responses {
			for _, kv := range r.GetResponseRange().Kvs {
				if clientv3.LeaseID(kv.Lease) == lease {
					written[string(kv.Key)] = string(kv.Value)
				}
			}
		}
		ops = ops[n:]
	}
	return written
}

// syncInstances writes the healthy instances and deletes the others, on
// the lease. written is what this lease already carries.
func (a *Agent) syncInstances(ctx context.Context, lease clientv3.LeaseID, written map[string]string) {
	ip := a.advertiseIP()
	want := map[string]string{}
	unchecked := map[string]bool{} // no check result yet: keep what is advertised
	a.mu.Lock()
	for i, in := range a.o.Instances {
		k := registry.InstanceKey(in.Group, in.App, a.o.Node)
		healthy, checked := a.healthy[i]
		if healthy && ip.IsValid() {
			b, _ := json.Marshal(registry.Instance{IPv4: ip.String(), Node: a.o.Node, Port: in.Port})
			want[k] = string(b)
		} else if !checked {
			unchecked[k] = true
		}
	}
	a.mu.Unlock()
	a.metrics.advertised.Set(float64(len(want)))
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	for k, v := range want {
		if written[k] == v {
			continue
		}
		if _, err := a.o.Client.Put(wctx, k, v, clientv3.WithLease(lease)); err != nil {
			a.log.Warn("advertise instance", "key", k, "err", err)
			signal(a.instChg) // retried on the next change or status tick
			continue
		}
		written[k] = v
		a.log.Info("instance advertised", "key", k)
	}
	for k := range written {
		if _, ok := want[k]; ok || unchecked[k] {
			continue
		}
		// Delete only what is still ours.
		_, err := a.o.Client.Txn(wctx).If(clientv3.Compare(clientv3.LeaseValue(k), "=", lease)).
			Then(clientv3.OpDelete(k)).Commit()
		if err != nil {
			a.log.Warn("withdraw instance", "key", k, "err", err)
			continue
		}
		delete(written, k)
		a.log.Info("instance withdrawn", "key", k)
	}
}

// publishStatus writes the node's status with put when it changed. Only
// UpdatedAt is volatile: it is left out of the comparison, and set when
// the value is written. Everything else a status holds is there for a
// reader (the revisions for --wait, the components' bounded summaries,
// the errors), and each component's status changes only when something
// a reader cares about changes (the overlay's leaves out byte counters
// and exact handshake times). force writes even an unchanged status (a
// new lease, a failed write). It reports false when the write failed.
func (a *Agent) publishStatus(ctx context.Context, put func(ctx context.Context, value string) error, force bool) bool {
	a.mu.Lock()
	st := a.status
	a.mu.Unlock()
	st.Node = a.o.Node
	st.Version = a.o.Version
	st.UpdatedAt = time.Time{}
	b, err := json.Marshal(st)
	if err != nil {
		a.log.Error("encode status", "err", err)
		return true // not retryable
	}
	a.mu.Lock()
	same := string(b) == string(a.published)
	a.mu.Unlock()
	if same && !force {
		return true
	}
	st.UpdatedAt = time.Now().UTC()
	full, _ := json.Marshal(st)
	wctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := put(wctx, string(full)); err != nil {
		if ctx.Err() == nil {
			a.log.Warn("publish status, will retry", "err", err)
		}
		return false
	}
	a.metrics.statusWrites.Inc()
	a.metrics.statusBytes.Add(float64(len(full)))
	a.mu.Lock()
	a.published = b
	a.mu.Unlock()
	return true
}

// writeSeen updates the node's durable presence record (registry.Seen):
// only at registration and on a clean stop, never periodically. A failed
// write is logged and costs only the accuracy of meshctl status's "last
// seen" for this node.
func (a *Agent) writeSeen(ctx context.Context, set func(*registry.Seen)) {
	a.mu.Lock()
	s := a.seen
	set(&s)
	a.seen = s
	a.mu.Unlock()
	s.Node = a.o.Node
	s.LeaseTTLSeconds = int64((a.o.LeaseTTL + time.Second - 1) / time.Second)
	b, _ := json.Marshal(s)
	wctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := a.o.Client.Put(wctx, registry.SeenKey(a.o.Node), string(b)); err != nil {
		a.log.Warn("write presence record", "key", registry.SeenKey(a.o.Node), "err", err)
	}
}

func (a *Agent) setLease(l clientv3.LeaseID) {
	a.mu.Lock()
	a.lease = l
	a.mu.Unlock()
}

// revoke gives the lease back so that every peer sees at once that this
// node left (graceful stop).
func (a *Agent) revoke() {
	a.mu.Lock()
	lease := a.lease
	a.mu.Unlock()
	if lease == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if _, err := a.o.Client.Revoke(ctx, lease); err != nil {
		a.log.Warn("revoke lease on stop", "err", err)
		return
	}
	if a.o.StateDir != "" {
		os.Remove(a.leaseFile())
	}
	a.log.Info("lease revoked")
}
