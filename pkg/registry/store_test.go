package registry

import (
	"net/netip"
	"testing"
)

func TestStoreReplaceDropsMissedDeletes(t *testing.T) {
	s := NewStore()
	s.Replace(ClusterPrefix, nixInfraKVs[:4], 10)
	// A re-list after compaction no longer holds the instance: it must go.
	s.Replace(ClusterPrefix, nixInfraKVs[:3], 20)
	snap := s.Snapshot()
	if n := len(snap.Apps[AppID{GroupServices, "app-mongodb-pod"}].Instances); n != 0 {
		t.Errorf("instances after re-list = %d, want 0", n)
	}
	if snap.Revision != 20 || !s.Listed(ClusterPrefix) {
		t.Errorf("revision %d listed %v", snap.Revision, s.Listed(ClusterPrefix))
	}
}

// A prefix being re-listed after a compaction is not Listed until its new
// list arrives, even though another prefix's newer list has moved the
// store's revision on: a pass in between would publish that revision as
// applied without the changes the compaction hid.
func TestStoreRelistingHidesPrefixUntilReplaced(t *testing.T) {
	s := NewStore()
	s.Replace(ClusterPrefix, nixInfraKVs[:3], 10)
	s.Replace(FlannelSubnetPrefix, nil, 10)
	s.Relisting(ClusterPrefix)
	s.Relisting(FlannelSubnetPrefix)
	s.Replace(FlannelSubnetPrefix, nil, 30)
	if s.Listed(ClusterPrefix) || !s.Listed(FlannelSubnetPrefix) {
		t.Fatalf("during the re-list: cluster listed %v, flannel listed %v; want false, true", s.Listed(ClusterPrefix), s.Listed(FlannelSubnetPrefix))
	}
	s.Replace(ClusterPrefix, nixInfraKVs[:4], 30)
	if !s.Listed(ClusterPrefix) {
		t.Fatal("cluster prefix not listed after its re-list")
	}
	if n := len(s.Snapshot().Apps[AppID{GroupServices, "app-mongodb-pod"}].Instances); n == 0 {
		t.Error("the re-listed instance is missing")
	}
}

func TestSnapshotRebuildsOnlyChangedParts(t *testing.T) {
	s := NewStore()
	s.Replace(ClusterPrefix, nixInfraKVs, 10)
	s.Put(KV{Key: "/cluster/meshd/subnets/10.10.1.0-24", Value: []byte(`{"node":"worker001"}`)}, 11)
	s.Put(KV{Key: "/cluster/meshd/members/worker001", Value: []byte(`{"name":"worker001","publicKey":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","subnet":"10.10.1.0/24","overlayIp":"10.10.1.0"}`)}, 11)
	a := s.Snapshot()
	if again := s.Snapshot(); again != a {
		t.Error("unchanged store built a new snapshot")
	}
	s.Put(KV{Key: "/cluster/backends/web/meta_data", Value: []byte(`{"publish":{"port":8080}}`)}, 12)
	b := s.Snapshot()
	if b.Gen.Members != a.Gen.Members || b.Gen.Nodes != a.Gen.Nodes || b.Gen.Apps == a.Gen.Apps {
		t.Errorf("generations %+v -> %+v: only apps should change", a.Gen, b.Gen)
	}
	if len(a.Apps) != 1 || len(b.Apps) != 2 || b.Revision != 12 {
		t.Errorf("apps %d -> %d, rev %d", len(a.Apps), len(b.Apps), b.Revision)
	}
	// A member change rebuilds the apps too (instances are checked against members).
	s.Delete("/cluster/meshd/members/worker001", 13)
	c := s.Snapshot()
	if c.Gen.Members == b.Gen.Members || c.Gen.Apps == b.Gen.Apps || len(c.Members) != 0 || len(b.Members) != 1 {
		t.Errorf("member delete: gen %+v -> %+v, members %d (old snapshot %d)", b.Gen, c.Gen, len(c.Members), len(b.Members))
	}
	// A bad subnet claim is a problem and claims nothing.
	s.Put(KV{Key: "/cluster/meshd/subnets/10.10.2.0-24", Value: []byte(`{"node":"a b"}`)}, 14)
	d := s.Snapshot()
	if _, ok := d.Subnets[netip.MustParsePrefix("10.10.2.0/24")]; ok || len(d.Problems) != 1 {
		t.Errorf("bad claim: subnets %v problems %v", d.Subnets, d.Problems)
	}
}

// TestSnapshotRebuildsEachPartAlone changes one key of each part in turn:
// only that part's generation moves (and the apps' after a member change,
// as they are checked against the members), the snapshot before keeps its
// maps as they were, and a key that does not decode becomes that part's
// problem until it is fixed.
func TestSnapshotRebuildsEachPartAlone(t *testing.T) {
	const key = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
	base := append([]KV{
		{Key: "/cluster/meshd/subnets/10.10.93.0-24", Value: []byte(`{"node":"worker001"}`)},
		{Key: "/cluster/meshd/members/worker001", Value: []byte(`{"name":"worker001","publicKey":"` + key + `","subnet":"10.10.93.0/24","overlayIp":"10.10.93.0"}`)},
		{Key: "/meshd/status/worker001", Value: []byte(`{"node":"worker001","revision":3}`)},
		{Key: "/meshd/secrets/worker001/db", Value: []byte(`{"version":1,"ciphertext":"x"}`)},
	}, nixInfraKVs...)
	type gens = Generations
	tests := []struct {
		name   string
		kv     KV
		moved  func(a, b gens) bool // the generations that must change
		count  func(s *Snapshot) int
		before int // count in the snapshot before the change
		after  int
	}{
		{"nodes", KV{Key: "/cluster/nodes/worker002", Value: []byte(`{"name":"worker002","ipv4":"65.108.1.4"}`)},
			func(a, b gens) bool { return a.Nodes != b.Nodes }, func(s *Snapshot) int { return len(s.Nodes) }, 2, 3},
		{"members", KV{Key: "/cluster/meshd/subnets/10.10.2.0-24", Value: []byte(`{"node":"worker002"}`)},
			func(a, b gens) bool { return a.Members != b.Members && a.Apps != b.Apps }, func(s *Snapshot) int { return len(s.Subnets) }, 1, 2},
		{"apps", KV{Key: "/cluster/backends/web/meta_data", Value: []byte(`{"publish":{"port":8080}}`)},
			func(a, b gens) bool { return a.Apps != b.Apps }, func(s *Snapshot) int { return len(s.Apps) }, 1, 2},
		{"statuses", KV{Key: "/meshd/status/ingress001", Value: []byte(`{"node":"ingress001","revision":4}`)},
			func(a, b gens) bool { return a.Statuses != b.Statuses }, func(s *Snapshot) int { return len(s.Statuses) }, 1, 2},
		{"secrets", KV{Key: "/meshd/secrets/worker001/api", Value: []byte(`{"version":2,"ciphertext":"y"}`)},
			func(a, b gens) bool { return a.Secrets != b.Secrets }, func(s *Snapshot) int { return len(s.Secrets) }, 1, 2},
		{"flannel", KV{Key: "/coreos.com/network/subnets/10.10.7.0-24", Value: []byte(`{"PublicIP":"198.51.100.7","PublicIPv6":null,"BackendType":"wireguard","BackendData":{"PublicKey":"` + key + `","Port":51820}}`)},
			func(a, b gens) bool { return a.Flannel != b.Flannel }, func(s *Snapshot) int { return len(s.FlannelLeases) }, 0, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := NewStore()
			s.Replace("", base, 10)
			a := s.Snapshot()
			if len(a.Problems) != 0 || a.FlannelConfig == nil {
				t.Fatalf("base snapshot: problems %v, flannel config %v", a.Problems, a.FlannelConfig)
			}
			s.Put(tt.kv, 11)
			b := s.Snapshot()
			if !tt.moved(a.Gen, b.Gen) {
				t.Errorf("generations %+v -> %+v: %s did not move", a.Gen, b.Gen, tt.name)
			}
			moved := 0
			for _, d := range [][2]uint64{{a.Gen.Nodes, b.Gen.Nodes}, {a.Gen.Members, b.Gen.Members}, {a.Gen.Apps, b.Gen.Apps},
				{a.Gen.Statuses, b.Gen.Statuses}, {a.Gen.Secrets, b.Gen.Secrets}, {a.Gen.Flannel, b.Gen.Flannel}} {
				if d[0] != d[1] {
					moved++
				}
			}
			if want := map[bool]int{true: 2, false: 1}[tt.name == "members"]; moved != want {
				t.Errorf("generations %+v -> %+v: %d parts moved, want %d", a.Gen, b.Gen, moved, want)
			}
			if got := tt.count(a); got != tt.before {
				t.Errorf("the snapshot before the change now has %d, want %d (its maps were changed)", got, tt.before)
			}
			if got := tt.count(b); got != tt.after {
				t.Errorf("after the change: %d, want %d", got, tt.after)
			}
			if b.FlannelConfig == nil || len(b.Nodes) < 2 || len(b.Members) != 1 {
				t.Errorf("other parts lost: flannel config %v, nodes %d, members %d", b.FlannelConfig, len(b.Nodes), len(b.Members))
			}
			// The same key, broken: the value goes and the key is a problem
			// of this part; fixed again, the problem goes.
			s.Put(KV{Key: tt.kv.Key, Value: []byte(`{`)}, 12)
			c := s.Snapshot()
			if got := tt.count(c); got != tt.before {
				t.Errorf("broken value: %d, want %d", got, tt.before)
			}
			if len(c.Problems) != 1 || c.Problems[0].Key != tt.kv.Key || c.Problems[0].Reason != ReasonBadValue {
				t.Errorf("broken value: problems %v", c.Problems)
			}
			s.Put(tt.kv, 13)
			if d := s.Snapshot(); len(d.Problems) != 0 || tt.count(d) != tt.after {
				t.Errorf("fixed value: problems %v, count %d", d.Problems, tt.count(d))
			}
		})
	}
}
