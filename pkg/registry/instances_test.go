package registry

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
)

// TestInstanceAddressCheckedWithoutMember: an instance is checked for
// every node, not only for nodes with a member record. A node that
// deleted its own record cannot point its instances at etcd's address,
// at another node's overlay subnet or outside the pool; a legacy
// (flannel) node without a record keeps an instance inside the pool, in
// a subnet nobody else claims; a member keeps its own overlay address.
func TestInstanceAddressCheckedWithoutMember(t *testing.T) {
	kvs := []KV{
		{Key: "/cluster/backends/api/meta_data", Value: []byte(`{"publish":{"port":8080}}`)},
		{Key: SubnetKey(netip.MustParsePrefix("10.10.1.0/24")), Value: []byte(`{"node":"good"}`)},
		{Key: MemberKey("good"), Value: []byte(`{"name":"good","publicKey":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","subnet":"10.10.1.0/24","overlayIp":"10.10.1.0"}`)},
		{Key: InstanceKey(GroupBackends, "api", "good"), Value: []byte(`{"ipv4":"10.10.1.0","node":"good","port":8080}`)},
		// Deleted its member record, points at etcd on the private network.
		{Key: InstanceKey(GroupBackends, "api", "toetcd"), Value: []byte(`{"ipv4":"10.0.0.2","node":"toetcd","port":2379}`)},
		// Points into good's subnet.
		{Key: InstanceKey(GroupBackends, "api", "steal"), Value: []byte(`{"ipv4":"10.10.1.0","node":"steal","port":8080}`)},
		// A flannel node not yet migrated: its flannel subnet, unclaimed.
		{Key: InstanceKey(GroupBackends, "api", "legacy"), Value: []byte(`{"ipv4":"10.10.7.0","node":"legacy","port":8080}`)},
	}
	s := NewOverlayStore(DefaultPool)
	s.Replace("", kvs, 1)
	snap := s.Snapshot()
	var kept []string
	for n := range snap.Apps[AppID{GroupBackends, "api"}].Instances {
		kept = append(kept, n)
	}
	slices.Sort(kept)
	if !slices.Equal(kept, []string{"good", "legacy"}) {
		t.Errorf("kept instances of %v, want good and legacy (problems %v)", kept, snap.Problems)
	}
	var flagged []string
	for _, p := range snap.Problems {
		flagged = append(flagged, p.Key)
	}
	for _, n := range []string{"steal", "toetcd"} {
		if !slices.Contains(flagged, InstanceKey(GroupBackends, "api", n)) {
			t.Errorf("instance of %s not reported: %v", n, snap.Problems)
		}
	}
	// Without a pool (a one-shot reader), the claimed-subnet rule still holds.
	snap = SnapshotOf(kvs, 1)
	if _, ok := snap.Apps[AppID{GroupBackends, "api"}].Instances["steal"]; ok {
		t.Error("without a pool, an instance pointing into another node's subnet was kept")
	}
}

// TestHostileValueQuotedBounded: a 256 KiB hostile value (or key) ends
// up in a Problem, which every node logs, cut to a bounded size.
func TestHostileValueQuotedBounded(t *testing.T) {
	big := strings.Repeat("\x1b[31mX", 256<<10/6)
	snap := SnapshotOf([]KV{
		{Key: NodeKey("n1"), Value: []byte(`{"name":"` + big + `","ipv4":"192.0.2.1"}`)},
		{Key: InstanceKey(GroupBackends, "api", "n2"), Value: []byte(`{"ipv4":"` + big + `","node":"n2","port":1}`)},
		{Key: MemberKey(big), Value: []byte(`{}`)},
	}, 1)
	if len(snap.Problems) != 3 {
		t.Fatalf("problems: %d, want 3", len(snap.Problems))
	}
	for _, p := range snap.Problems {
		if len(p.Err) > 400 || strings.Contains(p.Err, "\x1b") {
			t.Errorf("problem of %d bytes (escape kept: %v): %.100q", len(p.Err), strings.Contains(p.Err, "\x1b"), p.Err)
		}
	}
}
