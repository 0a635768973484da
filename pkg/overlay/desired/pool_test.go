package desired

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/meshd/meshd/pkg/registry"
)

// TestWideClaimOutsidePoolIsNotRouted: in open-subnets mode a node can
// claim any width, e.g. 10.0.0.0-16 (the Hetzner private network where
// etcd lives), and write a member record that matches its claim, so the
// registry accepts both. With the pool in Params the member is skipped
// and reported by Compute and by the Computer: nothing routes that
// prefix into WireGuard. Members of the pool's subnets are kept.
func TestWideClaimOutsidePoolIsNotRouted(t *testing.T) {
	kvs := []registry.KV{}
	add := func(name, subnet string, k int) {
		p := netip.MustParsePrefix(subnet)
		kvs = append(kvs,
			registry.KV{Key: registry.SubnetKey(p), Value: []byte(`{"node":"` + name + `"}`)},
			registry.KV{Key: registry.MemberKey(name), Value: []byte(`{"name":"` + name + `","publicKey":"` + key(k) + `","endpoint":"192.0.2.` + string(rune('0'+k)) + `:51820","subnet":"` + subnet + `","overlayIp":"` + p.Addr().String() + `"}`)})
	}
	add("n0", "10.10.0.0/24", 0)
	add("n1", "10.10.1.0/24", 1)
	add("evil", "10.0.0.0/16", 2)
	add("odd", "10.10.8.0/25", 3)
	add("far", "10.200.0.0/24", 4)
	snap := registry.SnapshotOf(kvs, 1)
	for _, n := range []string{"n0", "n1", "evil", "odd", "far"} {
		if _, ok := snap.Members[n]; !ok {
			t.Fatalf("registry dropped %s (%v): the test needs it to reach Compute", n, snap.Problems)
		}
	}
	p := defaultParams
	p.Pool = registry.DefaultPool
	c, err := NewComputer("n0", p)
	if err != nil {
		t.Fatal(err)
	}
	incr, err := c.Compute(snap)
	if err != nil {
		t.Fatal(err)
	}
	full, err := Compute(snap, "n0", p)
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range []State{full, incr} {
		if !slices.Equal(st.Routes, []netip.Prefix{netip.MustParsePrefix("10.10.1.0/24")}) {
			t.Errorf("routes %v, want only n1's subnet", st.Routes)
		}
		var skipped []string
		for _, pr := range st.Problems {
			if strings.Contains(pr.Err, "not a /24 of the pool") {
				skipped = append(skipped, pr.Member)
			}
		}
		if !slices.Equal(skipped, []string{"evil", "far", "odd"}) {
			t.Errorf("skipped for the pool: %v, want evil, far, odd (problems %v)", skipped, st.Problems)
		}
	}
}
