package registry

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Pool is the range node subnets are carved from: every Bits-long prefix
// whose first address lies in [Min, Max]. The default (10.10.0.0 to
// 10.99.0.0, /24) is flannel's, so nix-infra overlay addresses survive a
// migration.
type Pool struct {
	Min, Max netip.Addr
	Bits     int
}

// DefaultPool is nix-infra's flannel range.
var DefaultPool = Pool{Min: netip.MustParseAddr("10.10.0.0"), Max: netip.MustParseAddr("10.99.0.0"), Bits: 24}

// ErrPoolExhausted is returned when no subnet is free.
var ErrPoolExhausted = errors.New("no free subnet in the pool")

// Contains reports whether p is one of the pool's subnets.
func (pool Pool) Contains(p netip.Prefix) bool {
	return p.IsValid() && p.Bits() == pool.Bits && p == p.Masked() &&
		!p.Addr().Less(pool.Min) && !pool.Max.Less(p.Addr())
}

// PickSubnet chooses a subnet for a node, purely: prefer if it is in the
// pool and not used, otherwise the lowest free one.
func PickSubnet(pool Pool, used map[netip.Prefix]bool, prefer netip.Prefix) (netip.Prefix, error) {
	return pickSubnet(pool, used, prefer, 1)
}

// pickSubnet is PickSubnet choosing, when prefer is not available, at
// random among the spread lowest free subnets.
func pickSubnet(pool Pool, used map[netip.Prefix]bool, prefer netip.Prefix, spread int) (netip.Prefix, error) {
	if pool.Contains(prefer) && !used[prefer] {
		return prefer, nil
	}
	free, err := freeSubnets(pool, used, max(spread, 1))
	if err != nil {
		return netip.Prefix{}, err
	}
	return free[rand.IntN(len(free))], nil
}

// freeSubnets returns the n lowest free subnets of the pool (fewer when
// the pool has fewer), or ErrPoolExhausted.
func freeSubnets(pool Pool, used map[netip.Prefix]bool, n int) ([]netip.Prefix, error) {
	if !pool.Min.Is4() || pool.Bits < 1 || pool.Bits > 32 {
		return nil, fmt.Errorf("invalid pool %v-%v/%d", pool.Min, pool.Max, pool.Bits)
	}
	step := uint32(1) << (32 - pool.Bits)
	start, _ := netip.AddrFrom4(pool.Min.As4()).Prefix(pool.Bits)
	var free []netip.Prefix
	for a := u32(start.Addr()); len(free) < n; a += step {
		p := netip.PrefixFrom(addrOf(a), pool.Bits)
		if pool.Max.Less(p.Addr()) {
			break
		}
		if pool.Contains(p) && !used[p] {
			free = append(free, p)
		}
		if a > ^uint32(0)-step {
			break
		}
	}
	if len(free) == 0 {
		return nil, ErrPoolExhausted
	}
	return free, nil
}

func u32(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

func addrOf(v uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// ClaimMember makes sure the node has a subnet and an up-to-date member
// record, and returns it. A node keeps the subnet it has (across restarts
// and etcd outages: the claim has no lease); a new node adopts the subnet
// of its flannel lease (matched by public IPv4) when one exists, otherwise
// takes the lowest free subnet. The claim is a create-only transaction, so
// two nodes asking at once never get the same subnet: the loser re-reads
// and picks again, at random among the lowest few free subnets (more each
// time it loses), so that a fleet booting at once does not queue up for
// one subnet after another. A node that holds its subnet already reads
// only its own keys to take it back, not every claim (ClaimMemberWith).
//
// want carries Name, PublicKey, Endpoint and Recipient; Subnet and
// OverlayIP are filled in.
func ClaimMember(ctx context.Context, cli *clientv3.Client, want Member, pool Pool, publicIPv4 string) (Member, error) {
	return ClaimMemberWith(ctx, cli, want, pool, publicIPv4, nil)
}

// ClaimEntry is a leased key written in the claim's own transaction: the
// node entry, which names the member's overlay address and key. Peers then
// see the member record and the entry at one revision (one pass each, not
// two), and a process that may not hold the entry (May refuses) changes
// nothing, not even a member record it would have rewritten first.
type ClaimEntry struct {
	Key   string
	Lease clientv3.LeaseID
	// Value is the entry's value for the claimed member.
	Value func(Member) []byte
	// May reports whether the claim may replace the key's current value
	// (nil: there is none). Its error stops the claim and is returned
	// unchanged.
	May func(ctx context.Context, cur *mvccpb.KeyValue) error
}

// ClaimMemberWith is ClaimMember that also writes entry (nil: none) in the
// claim's transaction, unless it already holds that value on that lease.
//
// A node that holds a subnet already (a restart, a re-registration after
// its lease was lost) reads only its own keys, its member record and entry:
// every subnet claim and flannel lease is needed only to pick a subnet,
// and is megabytes at 10,000 nodes, while after an etcd outage longer than
// the lease TTL every node registers again at once. Its first read is one
// transaction that reads its own keys if its member record exists and
// everything otherwise; the write that keeps the subnet holds only while
// the subnet's claim names the node. When it does not, or the record does
// not decode, the next attempt reads everything.
func ClaimMemberWith(ctx context.Context, cli *clientv3.Client, want Member, pool Pool, publicIPv4 string, entry *ClaimEntry) (Member, error) {
	if err := ValidName(want.Name); err != nil {
		return Member{}, err
	}
	own := []clientv3.Op{clientv3.OpGet(MemberKey(want.Name))}
	if entry != nil {
		own = append(own, clientv3.OpGet(entry.Key))
	}
	resp, err := cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(MemberKey(want.Name)), ">", 0)).
		Then(own...).Else(readAll(want.Name, entry)...).Commit()
	if err != nil {
		return Member{}, fmt.Errorf("claim subnet: %w", err)
	}
	if resp.Succeeded {
		m, kept, err := keep(ctx, cli, want, entry, resp)
		if err != nil || kept {
			return m, err
		}
		resp = nil // read everything
	}
	for attempt := 0; attempt < 64; attempt++ {
		spread := min(1<<(3*min(attempt, 4)), 1024)
		var (
			m    Member
			done bool
		)
		if resp != nil {
			m, done, err = claimFrom(ctx, cli, want, pool, publicIPv4, entry, spread, resp)
			resp = nil
		} else {
			m, done, err = claimOnce(ctx, cli, want, pool, publicIPv4, entry, spread)
		}
		if err != nil || done {
			return m, err
		}
	}
	return Member{}, fmt.Errorf("claim subnet for %s: too much contention", want.Name)
}

// keep takes back the subnet of the member record resp read (with the
// entry, if any), writing (or, when nothing changes, only checking) under
// a compare that the subnet's claim still names the node. done is false,
// with nothing written, when the record does not decode or a compare did
// not hold.
func keep(ctx context.Context, cli *clientv3.Client, want Member, entry *ClaimEntry, resp *clientv3.TxnResponse) (m Member, done bool, err error) {
	kvs := resp.Responses[0].GetResponseRange().Kvs
	if len(kvs) != 1 {
		return Member{}, false, nil
	}
	old, err := DecodeMember(want.Name, kvs[0].Value)
	if err != nil {
		return Member{}, false, nil
	}
	put := claimWrite{
		memberCmp: clientv3.Compare(clientv3.ModRevision(MemberKey(want.Name)), "=", kvs[0].ModRevision),
		held:      true,
	}
	if err := put.takeEntry(ctx, entry, resp, 1); err != nil {
		return Member{}, false, err
	}
	want.Subnet, want.OverlayIP = old.Subnet, old.OverlayIP
	put.member = old != want
	ok, err := put.commit(ctx, cli, want)
	return want, ok, err
}

// readAll reads what claimFrom needs: the member record, every subnet
// claim and flannel lease, and the entry (if any).
func readAll(name string, entry *ClaimEntry) []clientv3.Op {
	reads := []clientv3.Op{
		clientv3.OpGet(MemberKey(name)),
		clientv3.OpGet(SubnetsPrefix, clientv3.WithPrefix()),
		clientv3.OpGet(FlannelSubnetPrefix, clientv3.WithPrefix()),
	}
	if entry != nil {
		reads = append(reads, clientv3.OpGet(entry.Key))
	}
	return reads
}

// claimOnce reads everything (readAll) and makes one attempt from it
// (claimFrom).
func claimOnce(ctx context.Context, cli *clientv3.Client, want Member, pool Pool, publicIPv4 string, entry *ClaimEntry, spread int) (Member, bool, error) {
	resp, err := cli.Txn(ctx).Then(readAll(want.Name, entry)...).Commit()
	if err != nil {
		return Member{}, false, fmt.Errorf("claim subnet: %w", err)
	}
	return claimFrom(ctx, cli, want, pool, publicIPv4, entry, spread, resp)
}

// claimFrom makes one attempt from resp, as readAll read it; a new subnet
// is picked among the spread lowest free ones.
func claimFrom(ctx context.Context, cli *clientv3.Client, want Member, pool Pool, publicIPv4 string, entry *ClaimEntry, spread int, resp *clientv3.TxnResponse) (Member, bool, error) {
	memberKVs := resp.Responses[0].GetResponseRange().Kvs
	claims := map[netip.Prefix]string{}
	used := map[netip.Prefix]bool{}
	for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
		pk, err := ParseKey(string(kv.Key))
		if err != nil || pk.Kind != KindSubnet {
			continue
		}
		used[pk.Subnet] = true // even an undecodable claim blocks its subnet
		if c, err := DecodeSubnetClaim(kv.Value); err == nil {
			claims[pk.Subnet] = c.Node
		}
	}
	var prefer netip.Prefix
	for _, kv := range resp.Responses[2].GetResponseRange().Kvs {
		pk, err := ParseKey(string(kv.Key))
		if err != nil || pk.Kind != KindFlannelLease {
			continue
		}
		p := pk.Subnet
		if AdoptsFlannelLease(p, kv.Value, publicIPv4) && claims[p] == "" {
			prefer = p
			continue
		}
		used[p] = true // a flannel node still running there
	}
	var put claimWrite
	if err := put.takeEntry(ctx, entry, resp, 3); err != nil {
		return Member{}, false, err
	}

	put.memberCmp = clientv3.Compare(clientv3.CreateRevision(MemberKey(want.Name)), "=", 0)
	if len(memberKVs) == 1 {
		put.memberCmp = clientv3.Compare(clientv3.ModRevision(MemberKey(want.Name)), "=", memberKVs[0].ModRevision)
		if old, err := DecodeMember(want.Name, memberKVs[0].Value); err == nil && claims[old.Subnet] == want.Name {
			// Keep the subnet we have; refresh key, endpoint, recipient.
			want.Subnet, want.OverlayIP = old.Subnet, old.OverlayIP
			put.member = old != want
			ok, err := put.commit(ctx, cli, want)
			return want, ok, err
		}
	}
	// Allocate. A claim already ours (member record lost) is reused.
	for p, owner := range claims {
		if owner == want.Name && pool.Contains(p) {
			prefer = p
			delete(used, p)
		}
	}
	p, err := pickSubnet(pool, used, prefer, spread)
	if err != nil {
		return Member{}, false, fmt.Errorf("claim subnet for %s: %w", want.Name, err)
	}
	want.Subnet, want.OverlayIP = p, p.Addr()
	put.member = true
	put.claim = true
	put.claimCmp = clientv3.Compare(clientv3.CreateRevision(SubnetKey(p)), "=", 0)
	if claims[p] == want.Name {
		put.claimCmp = clientv3.Compare(clientv3.Value(SubnetKey(p)), "=", string(claimValue(want.Name)))
	}
	ok, err := put.commit(ctx, cli, want)
	return want, ok, err
}

// claimWrite is what one claim attempt writes, each under the compare that
// keeps it from overwriting what another process wrote since the read.
type claimWrite struct {
	member    bool // the member record changes
	memberCmp clientv3.Cmp
	claim     bool // the subnet claim is (re)written
	claimCmp  clientv3.Cmp
	entry     *ClaimEntry
	cur       *mvccpb.KeyValue // the entry as read
	// held: m's subnet claim, which the attempt did not read, must name
	// m's node; the transaction is sent (a compare only) even when there
	// is nothing to write.
	held bool
}

// takeEntry sets the entry (nil: none) the attempt writes, as read by
// resp's i-th operation, once entry.May allows taking it.
func (w *claimWrite) takeEntry(ctx context.Context, entry *ClaimEntry, resp *clientv3.TxnResponse, i int) error {
	if entry == nil {
		return nil
	}
	var cur *mvccpb.KeyValue
	if kvs := resp.Responses[i].GetResponseRange().Kvs; len(kvs) == 1 {
		cur = kvs[0]
	}
	if err := entry.May(ctx, cur); err != nil {
		return err
	}
	w.entry, w.cur = entry, cur
	return nil
}

func claimValue(node string) []byte {
	b, _ := json.Marshal(SubnetClaim{Node: node})
	return b
}

// commit writes m (its subnet claim and member record, as far as they
// change) and the entry, in one transaction that holds only if none of
// them changed since the attempt read them. Nothing to write is success.
func (w claimWrite) commit(ctx context.Context, cli *clientv3.Client, m Member) (bool, error) {
	var cmps []clientv3.Cmp
	var ops []clientv3.Op
	if w.claim {
		cmps = append(cmps, w.claimCmp)
		ops = append(ops, clientv3.OpPut(SubnetKey(m.Subnet), string(claimValue(m.Name))))
	}
	if w.member {
		b, err := json.Marshal(m)
		if err != nil {
			return false, err
		}
		ops = append(ops, clientv3.OpPut(MemberKey(m.Name), string(b)))
	}
	// The member record's compare holds even when it is not written: the
	// entry names its key and address.
	cmps = append(cmps, w.memberCmp)
	if e := w.entry; e != nil {
		v := e.Value(m)
		if w.cur == nil {
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(e.Key), "=", 0))
		} else {
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(e.Key), "=", w.cur.ModRevision))
		}
		if w.cur == nil || !bytes.Equal(w.cur.Value, v) || clientv3.LeaseID(w.cur.Lease) != e.Lease {
			ops = append(ops, clientv3.OpPut(e.Key, string(v), clientv3.WithLease(e.Lease)))
		}
	}
	if w.held {
		cmps = append(cmps, clientv3.Compare(clientv3.Value(SubnetKey(m.Subnet)), "=", string(claimValue(m.Name))))
	} else if len(ops) == 0 {
		return true, nil
	}
	tr, err := cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
	if err != nil {
		return false, fmt.Errorf("claim subnet %v for %s: %w", m.Subnet, m.Name, err)
	}
	return tr.Succeeded, nil
}

// AdoptsFlannelLease reports whether the flannel lease for p (value b)
// belongs to the node with public IPv4 publicIPv4, so that the node may
// adopt its subnet: flannel's own rule for reusing a lease
// (pkg/subnet/etcd/local_manager.go, tryAcquireLease: the lease whose
// PublicIP is the node's, whatever its backend).
func AdoptsFlannelLease(p netip.Prefix, b []byte, publicIPv4 string) bool {
	l, err := decodeFlannelAttrs(p, b)
	return err == nil && publicIPv4 != "" && l.PublicIP == publicIPv4
}
