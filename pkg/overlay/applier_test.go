package overlay

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshd/meshd/pkg/overlay/desired"
	"github.com/meshd/meshd/pkg/registry"
)

// fakeApplier is an Applier over a fresh fakeKernel.
func fakeApplier(t *testing.T) (*Applier, *fakeKernel) {
	t.Helper()
	key, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	k := newFakeKernel()
	a := newApplierWith(ApplierOptions{Interface: "h19-wg", Mode: ModeKernel, PrivateKey: key, RulePriority: DefaultRulePriority},
		slog.New(slog.DiscardHandler), k, netlinkFake{k})
	return a, k
}

// wantKernel is what the fake kernel must hold once st is applied to
// interface dev with public key pub, in fakeKernel.String's terms,
// written from st independently of the applier.
func wantKernel(dev, pub string, st desired.State) string {
	mtu := st.MTU
	lines := []string{
		fmt.Sprintf("link %s mtu %d up", dev, mtu),
		fmt.Sprintf("wg %s listen-port %d public-key %s", dev, st.ListenPort, pub),
		fmt.Sprintf("rule to %s lookup %d pref %d proto %d", st.Network, st.RouteTable, DefaultRulePriority, RouteProtocol),
	}
	for _, a := range st.Addresses {
		lines = append(lines, fmt.Sprintf("addr %s dev %s", a, dev))
	}
	for _, p := range st.Peers {
		var ips []string
		for _, a := range p.AllowedIPs {
			ips = append(ips, a.String())
		}
		slices.Sort(ips)
		ep := "(none)"
		if p.Endpoint.IsValid() {
			ep = p.Endpoint.String()
		}
		lines = append(lines, fmt.Sprintf("peer %s endpoint %s allowed-ips %s keepalive %s", p.PublicKey, ep, strings.Join(ips, ","), p.Keepalive))
	}
	for _, r := range st.Routes {
		lines = append(lines, fmt.Sprintf("route %s dev %s table %d proto %d src %s", r, dev, st.RouteTable, RouteProtocol, st.SelfAddress()))
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}

// TestApplierStatesFake is TestApplierStates (states_test.go, the real
// kernel, root) against fakeKernel, so it runs anywhere and covers more
// steps: random registry states in random order, each reached exactly
// from the one before; applying the same state again touches nothing;
// and whatever is removed behind the applier's back (a route, the
// address, the rule, the whole interface) the next Set puts back.
func TestApplierStatesFake(t *testing.T) {
	a, k := fakeApplier(t)
	pub := a.opts.PrivateKey.PublicKey().String()
	var keys []string
	for range 8 {
		pk, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			t.Fatal(err)
		}
		keys = append(keys, pk.PublicKey().String())
	}
	rng := rand.New(rand.NewPCG(19, 1))
	ctx := context.Background()
	for step := range 300 {
		self := memberOf(0, pub)
		if rng.IntN(4) == 0 {
			self.Subnet = netip.MustParsePrefix("10.10.200.0/24")
			self.OverlayIP = self.Subnet.Addr()
		}
		ms := []registry.Member{self}
		for j, key := range keys {
			if rng.IntN(2) == 0 {
				continue
			}
			m := memberOf(j+1, key)
			if rng.IntN(3) == 0 {
				m.Subnet = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 10, byte(100 + j), 0}), 24)
				m.OverlayIP = m.Subnet.Addr()
			}
			if rng.IntN(3) == 0 {
				m.Endpoint = fmt.Sprintf("198.51.100.%d:%d", j+1, 4000+rng.IntN(3))
			}
			if j == 4 { // one peer publishes no endpoint (WireGuard cannot unset one, so it never has one)
				m.Endpoint = ""
			}
			ms = append(ms, m)
		}
		p := desired.Params{Keepalive: 25 * time.Second, Network: netip.MustParsePrefix("10.0.0.0/8"), MTU: 1380 + 40*rng.IntN(2)}
		if rng.IntN(3) == 0 {
			p.ListenPort = 51900
		}
		want, err := desired.Compute(snapshotOf(ms, int64(step+1)), "n0", p)
		if err != nil {
			t.Fatal(err)
		}
		if err := a.Set(ctx, want); err != nil {
			t.Fatalf("step %d: Set: %v", step, err)
		}
		if got, w := k.String(), wantKernel("h19-wg", pub, want); got != w {
			t.Fatalf("step %d: kernel:\n%s\nwant:\n%s", step, got, w)
		}
		writes, reads := k.writes, k.deviceReads
		if err := a.Set(ctx, want); err != nil {
			t.Fatalf("step %d: second Set: %v", step, err)
		}
		if k.writes != writes {
			t.Fatalf("step %d: applying the same state again made %d kernel writes", step, k.writes-writes)
		}
		if n := k.deviceReads - reads; n != 1 {
			t.Fatalf("step %d: a Set on an existing device read it %d times, want once", step, n)
		}
		live, err := a.Live(want.RouteTable)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(live.Routes, want.Routes) || !slices.Equal(live.Addresses, want.Addresses) {
			t.Fatalf("step %d: Live routes %v addresses %v, want %v %v", step, live.Routes, live.Addresses, want.Routes, want.Addresses)
		}
		// Something else removes part of the state; the next Set (what
		// the route repairer runs) restores exactly the same kernel.
		if rng.IntN(3) == 0 {
			vandalise(t, k, rng, "h19-wg", want)
			if err := a.Set(ctx, want); err != nil {
				t.Fatalf("step %d: repair Set: %v", step, err)
			}
			if got, w := k.String(), wantKernel("h19-wg", pub, want); got != w {
				t.Fatalf("step %d: after repair:\n%s\nwant:\n%s", step, got, w)
			}
		}
	}
}

// vandalise removes one part of the applied state as an operator or
// systemd-networkd would.
func vandalise(t *testing.T, k *fakeKernel, rng *rand.Rand, dev string, st desired.State) {
	t.Helper()
	link, err := k.LinkByName(dev)
	if err != nil {
		t.Fatal(err)
	}
	switch rng.IntN(4) {
	case 0:
		if len(st.Routes) > 0 {
			r := st.Routes[rng.IntN(len(st.Routes))]
			n := prefixToIPNet(r)
			if err := k.RouteDel(&netlink.Route{Dst: &n, Table: st.RouteTable}); err != nil {
				t.Fatal(err)
			}
		}
	case 1:
		n := prefixToIPNet(st.Addresses[0])
		n.IP = st.Addresses[0].Addr().AsSlice()
		if err := k.AddrDel(link, &netlink.Addr{IPNet: &n}); err != nil {
			t.Fatal(err)
		}
	case 2:
		rules, _ := k.RuleList(netlink.FAMILY_V4)
		for _, r := range rules {
			if err := k.RuleDel(&r); err != nil {
				t.Fatal(err)
			}
		}
	case 3:
		if err := k.LinkDel(link); err != nil {
			t.Fatal(err)
		}
	}
}

// TestApplierErrorsCollected checks that a failing kernel call does not
// stop the rest of a Set: the other changes are applied, the error names
// what failed, and the next Set completes the state.
func TestApplierErrorsCollected(t *testing.T) {
	a, k := fakeApplier(t)
	pub := a.opts.PrivateKey.PublicKey().String()
	other, _ := wgtypes.GeneratePrivateKey()
	ms := []registry.Member{memberOf(0, pub), memberOf(1, other.PublicKey().String())}
	want, err := desired.Compute(snapshotOf(ms, 1), "n0", desired.Params{Network: netip.MustParsePrefix("10.0.0.0/8"), MTU: 1420})
	if err != nil {
		t.Fatal(err)
	}
	fk := &failingRoutes{netlinkFake: netlinkFake{k}, fail: true}
	a.nl = fk
	err = a.Set(context.Background(), want)
	if err == nil || !strings.Contains(err.Error(), "add route 10.10.1.0/24") {
		t.Fatalf("Set with failing routes: %v, want an error naming the route", err)
	}
	if d, _ := k.Device("h19-wg"); len(d.Peers) != 1 {
		t.Fatalf("peers after a route failure: %d, want 1 (the rest applies)", len(d.Peers))
	}
	fk.fail = false
	if err := a.Set(context.Background(), want); err != nil {
		t.Fatal(err)
	}
	if got, w := k.String(), wantKernel("h19-wg", pub, want); got != w {
		t.Fatalf("kernel:\n%s\nwant:\n%s", got, w)
	}
}

type failingRoutes struct {
	netlinkFake
	fail bool
}

func (f *failingRoutes) RouteReplace(r *netlink.Route) error {
	if f.fail {
		return fmt.Errorf("injected")
	}
	return f.netlinkFake.RouteReplace(r)
}

func TestPeerConfig(t *testing.T) {
	k, _ := wgtypes.GeneratePrivateKey()
	pub := k.PublicKey()
	ka := 25 * time.Second
	p := desired.Peer{
		Name:       "b",
		PublicKey:  pub.String(),
		Endpoint:   netip.MustParseAddrPort("192.0.2.7:51820"),
		AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.10.7.0/24")},
		Keepalive:  ka,
	}
	allowed := []net.IPNet{{IP: net.IP{10, 10, 7, 0}, Mask: net.CIDRMask(24, 32)}}
	ep := &net.UDPAddr{IP: net.IP{192, 0, 2, 7}, Port: 51820}
	tests := []struct {
		name   string
		change desired.PeerChange
		want   wgtypes.PeerConfig
	}{
		{"add", desired.PeerChange{Op: desired.OpAdd, Peer: p},
			wgtypes.PeerConfig{PublicKey: pub, Endpoint: ep, ReplaceAllowedIPs: true, AllowedIPs: allowed, PersistentKeepaliveInterval: &ka}},
		{"remove", desired.PeerChange{Op: desired.OpRemove, Peer: p},
			wgtypes.PeerConfig{PublicKey: pub, Remove: true}},
		{"update endpoint only", desired.PeerChange{Op: desired.OpUpdate, Peer: p, Endpoint: true},
			wgtypes.PeerConfig{PublicKey: pub, UpdateOnly: true, Endpoint: ep}},
		{"update allowed ips only", desired.PeerChange{Op: desired.OpUpdate, Peer: p, AllowedIPs: true},
			wgtypes.PeerConfig{PublicKey: pub, UpdateOnly: true, ReplaceAllowedIPs: true, AllowedIPs: allowed}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := peerConfig(tt.change)
			if err != nil {
				t.Fatal(err)
			}
			if got.Endpoint != nil {
				got.Endpoint.IP = got.Endpoint.IP.To4()
			}
			for i := range got.AllowedIPs {
				got.AllowedIPs[i].IP = got.AllowedIPs[i].IP.To4()
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("peerConfig (-want +got):\n%s", diff)
			}
		})
	}
	if _, err := peerConfig(desired.PeerChange{Op: desired.OpAdd, Peer: desired.Peer{PublicKey: "bad"}}); err == nil {
		t.Error("bad key accepted")
	}
}

func TestIPNetToPrefix(t *testing.T) {
	for in, want := range map[string]string{
		"10.10.1.0/24": "10.10.1.0/24",
		"10.10.1.5/24": "10.10.1.0/24",
		"fd00::/64":    "fd00::/64",
	} {
		_, n, _ := net.ParseCIDR(in)
		got, ok := ipNetToPrefix(*n)
		if !ok || got.String() != want {
			t.Errorf("ipNetToPrefix(%s) = %v, %v; want %s", in, got, ok, want)
		}
	}
	// A v4 network in 16-byte form with a 128-bit mask, as some kernels
	// and libraries produce.
	n := net.IPNet{IP: net.ParseIP("10.10.2.0"), Mask: net.CIDRMask(96+24, 128)}
	if got, ok := ipNetToPrefix(n); !ok || got.String() != "10.10.2.0/24" {
		t.Errorf("4-in-6 form: got %v, %v", got, ok)
	}
}
