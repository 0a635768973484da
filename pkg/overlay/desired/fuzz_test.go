package desired

import (
	"encoding/base64"
	"fmt"
	"net/netip"
	"testing"

	"github.com/meshd/meshd/pkg/registry"
)

// FuzzCompute feeds Compute arbitrary member records (as a snapshot built
// by hand could hold, bypassing the registry's decoders) and checks the
// safety properties the data plane relies on: no panic, no peer with this
// node's key, no two peers with one key, every AllowedIP inside the
// network, no AllowedIPs overlapping each other or this node's subnet.
func FuzzCompute(f *testing.F) {
	f.Add([]byte{0, 10, 10, 1, 0, 24, 1, 10, 10, 2, 0, 24, 2, 10, 10, 2, 0, 25})
	f.Add([]byte{0, 10, 10, 1, 0, 24, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{3, 10, 0, 0, 0, 8, 3, 10, 10, 1, 0, 24})
	f.Fuzz(func(t *testing.T, data []byte) {
		snap := &registry.Snapshot{Members: map[string]registry.Member{}}
		self := member(1000)
		snap.Members[self.Name] = self
		for i := 0; i+6 <= len(data) && i < 6*64; i += 6 {
			d := data[i : i+6]
			addr := netip.AddrFrom4([4]byte{d[1], d[2], d[3], d[4]})
			subnet := netip.PrefixFrom(addr, int(d[5]%33))
			m := registry.Member{
				Name:      fmt.Sprintf("m%d", i),
				PublicKey: key(int(d[0] % 8)), // few distinct keys: duplicates happen
				Subnet:    subnet,
				OverlayIP: addr,
				Endpoint:  fmt.Sprintf("%v:%d", addr, int(d[4])<<8|int(d[3])),
			}
			if d[0] == 7 {
				m.PublicKey = self.PublicKey
			}
			if d[0] == 6 {
				m.PublicKey = base64.StdEncoding.EncodeToString(d)
			}
			snap.Members[m.Name] = m
		}
		st, err := Compute(snap, self.Name, defaultParams)
		if err != nil {
			t.Fatal(err)
		}
		keys := map[string]bool{self.PublicKey: true}
		var all []netip.Prefix
		for _, p := range st.Peers {
			if keys[p.PublicKey] {
				t.Fatalf("key %s used twice (or is self's)", p.PublicKey)
			}
			keys[p.PublicKey] = true
			for _, a := range p.AllowedIPs {
				if !defaultParams.Network.Contains(a.Addr()) || a.Bits() < defaultParams.Network.Bits() {
					t.Fatalf("allowed IP %v outside the network", a)
				}
				if a.Overlaps(self.Subnet) {
					t.Fatalf("allowed IP %v overlaps self", a)
				}
				for _, b := range all {
					if a.Overlaps(b) {
						t.Fatalf("allowed IPs %v and %v overlap", a, b)
					}
				}
				all = append(all, a)
			}
		}
		if len(st.Peers)+len(st.Problems) != len(snap.Members)-1 {
			t.Fatalf("%d peers + %d problems for %d members", len(st.Peers), len(st.Problems), len(snap.Members)-1)
		}
	})
}
