package desired

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestDiff(t *testing.T) {
	a, b, c := peerOf(member(1), 25*time.Second), peerOf(member(2), 25*time.Second), peerOf(member(3), 25*time.Second)
	moved := b
	moved.Endpoint = netip.MustParseAddrPort("198.51.100.7:51820")
	resized := c
	resized.AllowedIPs = []netip.Prefix{netip.MustParsePrefix("10.10.3.0/25")}
	noEndpoint := a
	noEndpoint.Endpoint = netip.AddrPort{}
	addr := []netip.Prefix{netip.MustParsePrefix("10.10.0.0/32")}
	st := func(port, mtu int, addrs []netip.Prefix, peers ...Peer) State {
		s := State{ListenPort: port, MTU: mtu, Addresses: addrs}
		for _, p := range peers {
			s.Peers = append(s.Peers, p)
			s.Routes = append(s.Routes, p.AllowedIPs...)
		}
		return s
	}
	tests := []struct {
		name       string
		live, want State
		plan       string
	}{
		{"same", st(51820, 1420, addr, a, b), st(51820, 1420, addr, b, a), ""},
		{"from nothing", State{}, st(51820, 1420, addr, a),
			"wg set listen-port 51820\nip link set mtu 1420\n" +
				"wg set peer " + a.PublicKey + " endpoint 192.0.2.2:51820 allowed-ips 10.10.1.0/24 persistent-keepalive 25\n" +
				"ip addr add 10.10.0.0/32\nip route add 10.10.1.0/24\n"},
		{"add one leaves others alone", st(51820, 1420, addr, a, b), st(51820, 1420, addr, a, b, c),
			"wg set peer " + c.PublicKey + " endpoint 192.0.2.4:51820 allowed-ips 10.10.3.0/24 persistent-keepalive 25\nip route add 10.10.3.0/24\n"},
		{"remove one", st(51820, 1420, addr, a, b, c), st(51820, 1420, addr, a, c),
			"wg set peer " + b.PublicKey + " remove\nip route del 10.10.2.0/24\n"},
		{"endpoint moved", st(51820, 1420, addr, a, b), st(51820, 1420, addr, a, moved),
			"wg set peer " + b.PublicKey + " endpoint 198.51.100.7:51820\n"},
		{"allowed ips changed", st(51820, 1420, addr, c), st(51820, 1420, addr, resized),
			"wg set peer " + c.PublicKey + " allowed-ips 10.10.3.0/25\nip route add 10.10.3.0/25\nip route del 10.10.3.0/24\n"},
		{"learnt endpoint kept", st(51820, 1420, addr, a), st(51820, 1420, addr, noEndpoint), ""},
		{"mtu 0 leaves mtu", st(51820, 1420, addr), st(51820, 0, addr), ""},
		{"address changed, add before delete", st(51820, 1420, addr), st(51820, 1420, []netip.Prefix{netip.MustParsePrefix("10.10.9.0/32")}),
			"ip addr add 10.10.9.0/32\nip addr del 10.10.0.0/32\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := Diff(tt.live, tt.want)
			if diff := cmp.Diff(tt.plan, p.String()); diff != "" {
				t.Errorf("plan mismatch (-want +got):\n%s", diff)
			}
			if p.Empty() != (tt.plan == "") {
				t.Errorf("Empty() = %v for plan %q", p.Empty(), p.String())
			}
		})
	}
}

// fakeDevice applies a Plan the way the applier does, to a State standing
// for the device and the kernel.
type fakeDevice struct {
	s       State
	touched map[string]int // public key -> number of changes
}

func (f *fakeDevice) apply(p Plan) {
	if p.ListenPort != 0 {
		f.s.ListenPort = p.ListenPort
	}
	if p.MTU != 0 {
		f.s.MTU = p.MTU
	}
	for _, c := range p.Peers {
		f.touched[c.Peer.PublicKey]++
		i := -1
		for j, lp := range f.s.Peers {
			if lp.PublicKey == c.Peer.PublicKey {
				i = j
			}
		}
		switch c.Op {
		case OpAdd:
			f.s.Peers = append(f.s.Peers, c.Peer)
		case OpRemove:
			f.s.Peers = append(f.s.Peers[:i:i], f.s.Peers[i+1:]...)
		case OpUpdate:
			lp := f.s.Peers[i]
			if c.Endpoint {
				lp.Endpoint = c.Peer.Endpoint
			}
			if c.AllowedIPs {
				lp.AllowedIPs = c.Peer.AllowedIPs
			}
			if c.Keepalive {
				lp.Keepalive = c.Peer.Keepalive
			}
			f.s.Peers[i] = lp
		}
	}
	f.s.Addresses = applyPrefixes(f.s.Addresses, p.AddAddresses, p.DelAddresses)
	f.s.Routes = applyPrefixes(f.s.Routes, p.AddRoutes, p.DelRoutes)
}

func applyPrefixes(have, add, del []netip.Prefix) []netip.Prefix {
	out := append([]netip.Prefix(nil), have...)
	out = append(out, add...)
	for _, d := range del {
		for i := 0; i < len(out); i++ {
			if out[i] == d {
				out = append(out[:i:i], out[i+1:]...)
				i--
			}
		}
	}
	return out
}

// TestStates moves a fake device through random sequences of desired
// states (tailscale's TestRouterStates idea): any state must be reachable
// from any other, the result must match, a second Diff must be empty, and
// peers that are equal in both states must never be touched.
func TestStates(t *testing.T) {
	var states []State
	for i := 0; i < 12; i++ {
		var ms = []int{0}
		for j := 1; j < 8; j++ {
			if (i>>(j%4))&1 == 1 || j == i%8 {
				ms = append(ms, j)
			}
		}
		snapMembers := snapOf()
		for _, j := range ms {
			m := member(j)
			if i%3 == 0 && j == 2 {
				m.Endpoint = "198.51.100.2:4000"
			}
			snapMembers.Members[m.Name] = m
		}
		p := defaultParams
		p.MTU = 1380 + i%2*40
		p.RouteNetwork = i == 5
		s, err := Compute(snapMembers, "n0", p)
		if err != nil {
			t.Fatal(err)
		}
		states = append(states, s)
	}
	rng := rand.New(rand.NewPCG(1, 2))
	dev := &fakeDevice{}
	for step := 0; step < 500; step++ {
		want := states[rng.IntN(len(states))]
		prev := dev.s
		prev.Peers = append([]Peer(nil), dev.s.Peers...)
		dev.touched = map[string]int{}
		dev.apply(Diff(dev.s, want))
		if p := Diff(dev.s, want); !p.Empty() {
			t.Fatalf("step %d: not converged, still:\n%s", step, p)
		}
		if diff := cmp.Diff(normalise(want), normalise(dev.s), cmpOpts...); diff != "" {
			t.Fatalf("step %d: device differs (-want +got):\n%s", step, diff)
		}
		for _, wp := range want.Peers {
			for _, pp := range prev.Peers {
				if pp.PublicKey == wp.PublicKey && cmp.Equal(pp, wp, cmpOpts...) && dev.touched[wp.PublicKey] > 0 {
					t.Fatalf("step %d: unchanged peer %s was touched", step, wp.Name)
				}
			}
		}
	}
}

// normalise sorts what the device does not keep in order and drops what
// is not applied state.
func normalise(s State) State {
	s.Problems = nil
	s.RouteTable, s.Network = 0, netip.Prefix{}
	s.Peers = append([]Peer(nil), s.Peers...)
	sortPeers(s.Peers)
	s.Routes = sortedPrefixes(s.Routes)
	s.Addresses = sortedPrefixes(s.Addresses)
	return s
}

func sortPeers(ps []Peer) {
	for i := range ps {
		for j := i + 1; j < len(ps); j++ {
			if ps[j].PublicKey < ps[i].PublicKey {
				ps[i], ps[j] = ps[j], ps[i]
			}
		}
	}
}

func sortedPrefixes(ps []netip.Prefix) []netip.Prefix {
	add, _ := prefixDiff(nil, ps)
	return add
}

func TestPrefixDiff(t *testing.T) {
	pf := func(ss ...string) []netip.Prefix {
		var out []netip.Prefix
		for _, s := range ss {
			out = append(out, netip.MustParsePrefix(s))
		}
		return out
	}
	have := pf("10.10.3.0/24", "10.10.1.0/24", "10.10.1.0/24", "10.10.2.0/24", "fd00::/64")
	want := pf("10.10.4.0/24", "10.10.2.0/24", "10.10.4.0/24", "10.10.0.0/16")
	haveCopy := append([]netip.Prefix(nil), have...)
	add, del := prefixDiff(have, want)
	if diff := cmp.Diff(pf("10.10.0.0/16", "10.10.4.0/24"), add, cmpOpts...); diff != "" {
		t.Errorf("add (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(pf("10.10.1.0/24", "10.10.3.0/24", "fd00::/64"), del, cmpOpts...); diff != "" {
		t.Errorf("del (-want +got):\n%s", diff)
	}
	if !cmp.Equal(have, haveCopy, cmpOpts...) {
		t.Error("prefixDiff modified its input")
	}
	if !samePrefixes(pf("10.1.0.0/16", "10.2.0.0/16"), pf("10.2.0.0/16", "10.1.0.0/16")) {
		t.Error("samePrefixes depends on order")
	}
}

// BenchmarkDiff is the diff step alone: one changed peer among n.
func BenchmarkDiff(b *testing.B) {
	for _, n := range []int{10, 100, 1000} {
		snap := snapOf()
		for i := 0; i < n; i++ {
			snap.Members[member(i).Name] = member(i)
		}
		live, _ := Compute(snap, "n0", defaultParams)
		changed := member(n / 2)
		changed.Endpoint = "198.51.100.1:51820"
		snap.Members[changed.Name] = changed
		want, _ := Compute(snap, "n0", defaultParams)
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			cpu := startCPU()
			for b.Loop() {
				if p := Diff(live, want); len(p.Peers) != 1 {
					b.Fatalf("plan %v", p)
				}
			}
			cpu.report(b)
		})
	}
}

func TestUnchanged(t *testing.T) {
	a, err := Compute(snapOf(member(0), member(1), member(2)), "n0", defaultParams)
	if err != nil {
		t.Fatal(err)
	}
	b := a
	b.Problems = []Problem{{Member: "n9", Err: "skipped"}}
	if !Unchanged(a, b) {
		t.Error("a state that differs in its problems only: changed")
	}
	noEndpoint := a
	noEndpoint.Peers = slices.Clone(a.Peers)
	noEndpoint.Peers[0].Endpoint = netip.AddrPort{} // keeps what WireGuard learnt
	if !Unchanged(a, noEndpoint) {
		t.Error("a peer whose endpoint is no longer published: changed (the device keeps it)")
	}
	for name, edit := range map[string]func(*State){
		"mtu":         func(s *State) { s.MTU = 1380 },
		"port":        func(s *State) { s.ListenPort = 51821 },
		"route table": func(s *State) { s.RouteTable = 7 },
		"network":     func(s *State) { s.Network = netip.MustParsePrefix("10.0.0.0/9") },
		"peer":        func(s *State) { s.Peers = s.Peers[1:] },
		"address":     func(s *State) { s.Addresses = nil },
	} {
		c := a
		edit(&c)
		if Unchanged(a, c) {
			t.Errorf("%s changed: unchanged", name)
		}
	}
}
