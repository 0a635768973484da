package desired

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/meshd/meshd/pkg/registry"
)

// key returns a deterministic public key for test member i, as random
// looking as a real one (sorting cost depends on it).
func key(i int) string {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], uint32(i))
	sum := sha256.Sum256(b[:])
	return base64.StdEncoding.EncodeToString(sum[:])
}

// member returns node n<i> with subnet 10.10.<i>.0/24 (nix-infra layout).
func member(i int) registry.Member {
	subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(10 + i/256), byte(i % 256), 0}), 24)
	return registry.Member{
		Name:      fmt.Sprintf("n%d", i),
		PublicKey: key(i),
		Endpoint:  fmt.Sprintf("192.0.2.%d:51820", i%250+1),
		Subnet:    subnet,
		OverlayIP: subnet.Addr(),
	}
}

func snapOf(ms ...registry.Member) *registry.Snapshot {
	s := &registry.Snapshot{Members: map[string]registry.Member{}, Nodes: map[string]registry.Node{}}
	for _, m := range ms {
		s.Members[m.Name] = m
	}
	return s
}

func peerOf(m registry.Member, keepalive time.Duration) Peer {
	return Peer{
		Name:       m.Name,
		PublicKey:  m.PublicKey,
		Endpoint:   netip.MustParseAddrPort(m.Endpoint),
		AllowedIPs: []netip.Prefix{m.Subnet},
		Keepalive:  keepalive,
	}
}

var defaultParams = Params{Keepalive: 25 * time.Second, Network: netip.MustParsePrefix("10.0.0.0/8")}

func TestCompute(t *testing.T) {
	m0, m1, m2 := member(0), member(1), member(2)
	noEndpoint := member(3)
	noEndpoint.Endpoint = ""
	badKey := member(4)
	badKey.PublicKey = "AAAA"
	dupA, dupB := member(5), member(6)
	dupB.PublicKey = dupA.PublicKey
	selfKey := member(7)
	selfKey.PublicKey = m0.PublicKey
	overlapSelf := member(8)
	overlapSelf.Subnet = netip.MustParsePrefix("10.10.0.0/16")
	overlapSelf.OverlayIP = netip.MustParseAddr("10.10.0.1")
	outside := member(9)
	outside.Subnet = netip.MustParsePrefix("0.0.0.0/0")
	outside.OverlayIP = netip.MustParseAddr("0.0.0.1")
	ovA, ovB := member(20), member(21)
	ovB.Subnet, ovB.OverlayIP = ovA.Subnet, ovA.Subnet.Addr().Next()

	sorted := func(ps ...Peer) []Peer { // by public key, as Compute sorts
		out := append([]Peer(nil), ps...)
		for i := range out {
			for j := i + 1; j < len(out); j++ {
				if out[j].PublicKey < out[i].PublicKey {
					out[i], out[j] = out[j], out[i]
				}
			}
		}
		return out
	}
	base := func() State {
		return State{
			Addresses:  []netip.Prefix{netip.MustParsePrefix("10.10.0.0/32")},
			ListenPort: DefaultListenPort,
			RouteTable: DefaultRouteTable,
			Network:    defaultParams.Network,
		}
	}
	tests := []struct {
		name    string
		snap    *registry.Snapshot
		params  Params
		want    func() State
		wantErr error
	}{
		{
			name: "three nodes", snap: snapOf(m0, m1, m2), params: defaultParams,
			want: func() State {
				s := base()
				s.Peers = sorted(peerOf(m1, 25*time.Second), peerOf(m2, 25*time.Second))
				s.Routes = []netip.Prefix{m1.Subnet, m2.Subnet}
				return s
			},
		},
		{
			name: "alone", snap: snapOf(m0), params: defaultParams,
			want: base,
		},
		{
			name: "lease lost keeps peer", params: defaultParams,
			// m1 has a member record but no node entry (its lease expired).
			snap: func() *registry.Snapshot {
				s := snapOf(m0, m1)
				s.Nodes["n0"] = registry.Node{Name: "n0"}
				return s
			}(),
			want: func() State {
				s := base()
				s.Peers = []Peer{peerOf(m1, 25*time.Second)}
				s.Routes = []netip.Prefix{m1.Subnet}
				return s
			},
		},
		{
			name: "node entry without member is no peer", params: defaultParams,
			snap: func() *registry.Snapshot {
				s := snapOf(m0)
				s.Nodes["n1"] = registry.Node{Name: "n1", Meshd: &registry.NodeMeshd{PublicKey: m1.PublicKey}}
				return s
			}(),
			want: base,
		},
		{
			name: "no endpoint", snap: snapOf(m0, noEndpoint), params: defaultParams,
			want: func() State {
				s := base()
				p := Peer{Name: noEndpoint.Name, PublicKey: noEndpoint.PublicKey, AllowedIPs: []netip.Prefix{noEndpoint.Subnet}, Keepalive: 25 * time.Second}
				s.Peers = []Peer{p}
				s.Routes = []netip.Prefix{noEndpoint.Subnet}
				return s
			},
		},
		{
			name: "route network and explicit settings", snap: snapOf(m0, m1),
			params: Params{RouteNetwork: true, Network: netip.MustParsePrefix("10.0.0.0/8"), MTU: 1380, ListenPort: 4000, RouteTable: 100},
			want: func() State {
				s := base()
				s.MTU, s.ListenPort, s.RouteTable = 1380, 4000, 100
				s.Peers = []Peer{peerOf(m1, 0)}
				s.Routes = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
				return s
			},
		},
		{
			name: "bad members skipped and reported", params: defaultParams,
			snap: snapOf(m0, m1, badKey, dupA, dupB, selfKey, overlapSelf, outside, ovA, ovB),
			want: func() State {
				s := base()
				s.Peers = []Peer{peerOf(m1, 25*time.Second)}
				s.Routes = []netip.Prefix{m1.Subnet}
				s.Problems = []Problem{
					{"n20", "subnet 10.10.20.0/24 overlaps another member's"},
					{"n21", "subnet 10.10.20.0/24 overlaps another member's"},
					{"n4", "public key: 4 characters, want 44"},
					{"n5", "public key shared by members [n5 n6]"},
					{"n6", "public key shared by members [n5 n6]"},
					{"n7", "public key is this node's own"},
					{"n8", "subnet 10.10.0.0/16 overlaps this node's 10.10.0.0/24"},
					{"n9", "subnet 0.0.0.0/0 is outside the overlay network 10.0.0.0/8"},
				}
				return s
			},
		},
		{
			name: "overlap between subnets of different lengths", params: defaultParams,
			snap: func() *registry.Snapshot {
				wide := member(32)
				wide.Subnet = netip.MustParsePrefix("10.10.32.0/20")
				return snapOf(m0, m1, wide, member(33), ovA, ovB)
			}(),
			want: func() State {
				s := base()
				s.Peers = []Peer{peerOf(m1, 25*time.Second)}
				s.Routes = []netip.Prefix{m1.Subnet}
				s.Problems = []Problem{
					{"n20", "subnet 10.10.20.0/24 overlaps another member's"},
					{"n21", "subnet 10.10.20.0/24 overlaps another member's"},
					{"n32", "subnet 10.10.32.0/20 overlaps another member's"},
					{"n33", "subnet 10.10.33.0/24 overlaps another member's"},
				}
				return s
			},
		},
		{name: "no self", snap: snapOf(m1), params: defaultParams, wantErr: ErrNoSelf},
		{name: "no network", snap: snapOf(m0), params: Params{}, wantErr: errAny},
		{name: "bad mtu", snap: snapOf(m0), params: Params{Network: defaultParams.Network, MTU: 100}, wantErr: errAny},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Compute(tt.snap, "n0", tt.params)
			if tt.wantErr != nil {
				if err == nil || (tt.wantErr != errAny && !errors.Is(err, tt.wantErr)) {
					t.Fatalf("Compute error = %v, want %v", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Compute: %v", err)
			}
			if diff := cmp.Diff(tt.want(), got, cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }),
				cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })); diff != "" {
				t.Errorf("Compute mismatch (-want +got):\n%s", diff)
			}
		})
	}
}

var errAny = errors.New("any error")

// TestComputeDeterministic checks that map iteration order never leaks
// into the result.
func TestComputeDeterministic(t *testing.T) {
	var ms []registry.Member
	for i := 0; i < 50; i++ {
		ms = append(ms, member(i))
	}
	first, err := Compute(snapOf(ms...), "n0", defaultParams)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		got, _ := Compute(snapOf(ms...), "n0", defaultParams)
		if diff := cmp.Diff(first, got, cmpOpts...); diff != "" {
			t.Fatalf("run %d differs:\n%s", i, diff)
		}
	}
}

var cmpOpts = []cmp.Option{
	cmp.Comparer(func(a, b netip.Prefix) bool { return a == b }),
	cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b }),
}

func BenchmarkCompute(b *testing.B) {
	for _, n := range []int{10, 100, 1000} {
		var ms []registry.Member
		for i := 0; i < n; i++ {
			ms = append(ms, member(i))
		}
		snap := snapOf(ms...)
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			cpu := startCPU()
			for b.Loop() {
				if _, err := Compute(snap, "n0", defaultParams); err != nil {
					b.Fatal(err)
				}
			}
			cpu.report(b)
		})
	}
}

// BenchmarkComputeAndDiff is one reconcile pass after one peer changed:
// recompute the whole state and diff it against the previous one.
func BenchmarkComputeAndDiff(b *testing.B) {
	for _, n := range []int{10, 100, 1000} {
		var ms []registry.Member
		for i := 0; i < n; i++ {
			ms = append(ms, member(i))
		}
		snap := snapOf(ms...)
		live, _ := Compute(snap, "n0", defaultParams)
		changed := member(n / 2)
		changed.Endpoint = "198.51.100.1:51820"
		snap.Members[changed.Name] = changed
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			cpu := startCPU()
			for b.Loop() {
				want, _ := Compute(snap, "n0", defaultParams)
				if p := Diff(live, want); len(p.Peers) != 1 {
					b.Fatalf("plan %v", p)
				}
			}
			cpu.report(b)
		})
	}
}

// cpuClock measures the CPU time the process used, GC included. On a
// shared machine wall-clock ns/op mostly measures the other tenants;
// cpu-ns/op is what the computation costs.
type cpuClock struct{ start time.Duration }

func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func startCPU() cpuClock { return cpuClock{processCPU()} }

func (c cpuClock) report(b *testing.B) {
	if b.N > 0 {
		b.ReportMetric(float64(processCPU()-c.start)/float64(b.N), "cpu-ns/op")
	}
}

// TestBeforeClaim: before its claim a node gets the peers Compute gives it
// once it has claimed a free subnet, with its listen port, and neither an
// address nor a route; members it must skip are skipped the same way.
func TestBeforeClaim(t *testing.T) {
	bad := member(5)
	bad.PublicKey = "not a key"
	ownKey := member(6)
	ownKey.PublicKey = key(0) // claims self's key
	overlapA, overlapB := member(7), member(8)
	overlapB.Subnet, overlapB.OverlayIP = overlapA.Subnet, overlapA.OverlayIP
	ms := []registry.Member{member(1), member(2), member(3), bad, ownKey, overlapA, overlapB}

	before, err := BeforeClaim(snapOf(ms...), "n0", key(0), defaultParams)
	if err != nil {
		t.Fatal(err)
	}
	after, err := Compute(snapOf(append(ms, member(0))...), "n0", defaultParams)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(after.Peers, before.Peers, cmpOpts...); diff != "" {
		t.Errorf("peers before the claim differ from after it (-after +before):\n%s", diff)
	}
	if len(before.Peers) != 3 {
		t.Errorf("%d peers, want n1..n3: %+v (problems %v)", len(before.Peers), before.Peers, before.Problems)
	}
	if diff := cmp.Diff(after.Problems, before.Problems, cmpOpts...); diff != "" {
		t.Errorf("problems differ (-after +before):\n%s", diff)
	}
	if before.Addresses != nil || before.Routes != nil {
		t.Errorf("before the claim: addresses %v, routes %v; want none", before.Addresses, before.Routes)
	}
	if before.ListenPort != after.ListenPort || before.ListenPort == 0 || before.MTU != after.MTU {
		t.Errorf("listen port %d, MTU %d; want %d, %d", before.ListenPort, before.MTU, after.ListenPort, after.MTU)
	}
	rp := defaultParams
	rp.RouteNetwork = true
	if st, err := BeforeClaim(snapOf(ms...), "n0", key(0), rp); err != nil || st.Routes != nil {
		t.Errorf("route-network mode: routes %v (%v); want none before the claim", st.Routes, err)
	}
	if _, err := BeforeClaim(snapOf(ms...), "n0", "not a key", defaultParams); err == nil {
		t.Error("an invalid own key: no error")
	}
	if st, err := BeforeClaim(snapOf(), "n0", key(0), defaultParams); err != nil || st.Peers != nil {
		t.Errorf("the first node: peers %v (%v); want none", st.Peers, err)
	}
}
