package bench

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/haproxycfg"
	"github.com/meshd/meshd/pkg/overlay/desired"
	"github.com/meshd/meshd/pkg/registry"
)

// clusterStore is a registry store holding an n-node cluster as agents
// write it (node entries, member records, subnet claims) and one app with
// one instance.
func clusterStore(n int) *registry.Store {
	s := registry.NewStore()
	rev := int64(1)
	put := func(k string, v any) {
		raw, _ := json.Marshal(v)
		s.Put(registry.KV{Key: k, Value: raw, Lease: 1}, rev)
		rev++
	}
	for i := range n {
		name := fmt.Sprintf("s%04d", i)
		sub := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(10 + i/256), byte(i % 256), 0}), 24)
		key := randomKey()
		put(registry.MemberKey(name), registry.Member{Name: name, PublicKey: key, Endpoint: "192.0.2.1:51820", Subnet: sub, OverlayIP: sub.Addr()})
		put(registry.SubnetKey(sub), registry.SubnetClaim{Node: name})
		put(registry.NodeKey(name), registry.Node{Name: name, IPv4: "192.0.2.1", Services: []registry.Group{registry.GroupBackends},
			Meshd: &registry.NodeMeshd{ID: randomHex(16), PublicKey: key, OverlayIP: sub.Addr().String()}})
	}
	put(registry.MetaKey(registry.GroupBackends, "benchapp"), registry.AppMeta{Publish: registry.Publish{Port: 19999}})
	put(registry.InstanceKey(registry.GroupBackends, "benchapp", "s0000"), registry.Instance{IPv4: "10.10.0.0", Node: "s0000", Port: 8080})
	return s
}

// RecomputeRow is what one agent spends on one reconcile pass of an
// N-node cluster, by part. An instance change rebuilds only the apps part
// of the snapshot and leaves the overlay untouched (its member generation
// is unchanged); a member change (a node joining, moving or leaving)
// rebuilds members and apps and recomputes the overlay.
type RecomputeRow struct {
	N int
	// SnapshotInstance and SnapshotMember are the snapshot after one
	// instance change and after one member change.
	SnapshotInstance, SnapshotMember time.Duration
	// HAProxy and Overlay are the full computations (desired.Compute);
	// OverlayIncremental is what meshd runs: a desired.Computer given a
	// snapshot in which one member changed since its previous call.
	HAProxy, Overlay, OverlayIncremental time.Duration
}

// recomputeParts are the measured parts of one pass.
func recomputeParts(s *registry.Store) map[string]func() {
	snap := s.Snapshot()
	rev := snap.Revision
	member := snap.Members["s0000"]
	instance := registry.InstanceKey(registry.GroupBackends, "benchapp", "s0000")
	port := 8080
	change := func(key string, v any) {
		raw, _ := json.Marshal(v)
		rev++
		s.Put(registry.KV{Key: key, Value: raw, Lease: 1}, rev)
	}
	return map[string]func(){
		"snapshot-instance": func() {
			port ^= 1 // a new value each time, so the part really changes
			change(instance, registry.Instance{IPv4: "10.10.0.0", Node: "s0000", Port: port})
			s.Snapshot()
		},
		"snapshot-member": func() {
			port ^= 1
			member.Endpoint = fmt.Sprintf("192.0.2.1:%d", 50000+port)
			change(registry.MemberKey("s0000"), member)
			s.Snapshot()
		},
		"haproxy": func() {
			haproxycfg.Compute(snap, haproxycfg.Params{Self: "s0001", Consume: []registry.Group{registry.GroupBackends}})
		},
		"overlay": func() {
			_, _ = desired.Compute(snap, "s0001", overlayParams)
		},
		"overlay-incremental": overlayIncremental(s),
	}
}

var overlayParams = desired.Params{Network: netip.MustParsePrefix("10.0.0.0/8")}

// overlayIncremental returns a pass of a desired.Computer over two
// snapshots of s that differ in one member's endpoint, alternately: every
// call sees exactly one changed member.
func overlayIncremental(s *registry.Store) func() {
	a := s.Snapshot()
	m := a.Members["s0000"]
	m.Endpoint = "192.0.2.1:50000"
	raw, _ := json.Marshal(m)
	s.Put(registry.KV{Key: registry.MemberKey("s0000"), Value: raw, Lease: 1}, a.Revision+1)
	b := s.Snapshot()
	c, err := desired.NewComputer("s0001", overlayParams)
	if err != nil {
		panic(err) // constant, valid params
	}
	snaps := [2]*registry.Snapshot{a, b}
	i := 0
	return func() {
		i ^= 1
		_, _ = c.Compute(snaps[i])
	}
}

// Recompute measures (with testing.Benchmark) where one agent's time per
// change goes at each cluster size: bringing the snapshot up to date, and
// the two pure desired-state computations.
func Recompute(ns []int) []RecomputeRow {
	var rows []RecomputeRow
	for _, n := range ns {
		parts := recomputeParts(clusterStore(n))
		per := func(f func()) time.Duration {
			r := testing.Benchmark(func(b *testing.B) {
				for b.Loop() {
					f()
				}
			})
			return time.Duration(r.NsPerOp())
		}
		rows = append(rows, RecomputeRow{N: n, SnapshotInstance: per(parts["snapshot-instance"]),
			SnapshotMember: per(parts["snapshot-member"]), HAProxy: per(parts["haproxy"]), Overlay: per(parts["overlay"]),
			OverlayIncremental: per(parts["overlay-incremental"])})
	}
	return rows
}
