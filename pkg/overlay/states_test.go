package overlay

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshd/meshd/pkg/registry"
)

// TestApplierStates drives one real interface through random registry
// states (tailscale's TestRouterStates, on the real kernel): members
// appear, vanish, move subnet and endpoint, and the node's own address
// changes. After every apply the device, addresses and routes must match
// exactly, so any state is reachable from any other.
func TestApplierStates(t *testing.T) {
	l := newLab(t, false)
	nd := l.addNode(0)
	opts := l.options(0)
	selfKey := nd.must(t, helperCmd{Op: "new", Options: opts}).PublicKey
	var keys []string
	for range 6 {
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			t.Fatal(err)
		}
		keys = append(keys, k.PublicKey().String())
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for step := range 40 {
		self := memberOf(0, selfKey)
		if rng.IntN(4) == 0 {
			self.Subnet = netip.MustParsePrefix("10.10.200.0/24")
			self.OverlayIP = self.Subnet.Addr()
		}
		ms := []registry.Member{self}
		var wantRoutes []string
		for j, k := range keys {
			if rng.IntN(2) == 0 {
				continue
			}
			m := memberOf(j+1, k)
			if rng.IntN(3) == 0 { // moved to another subnet
				m.Subnet = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 10, byte(100 + j), 0}), 24)
				m.OverlayIP = m.Subnet.Addr()
			}
			if rng.IntN(3) == 0 {
				m.Endpoint = fmt.Sprintf("198.51.100.%d:%d", j+1, 4000+rng.IntN(3))
			}
			ms = append(ms, m)
			wantRoutes = append(wantRoutes, m.Subnet.String())
		}
		rev := int64(step + 1)
		nd.must(t, helperCmd{Op: "apply", Members: ms, Revision: rev})
		if plan := nd.must(t, helperCmd{Op: "plan", Members: ms, Revision: rev}).Plan; plan != "" {
			t.Fatalf("step %d: not converged:\n%s", step, plan)
		}
		st := nd.must(t, helperCmd{Op: "status"}).Status
		if st.Peers.Count != len(ms)-1 {
			t.Fatalf("step %d: %d peers, want %d", step, st.Peers.Count, len(ms)-1)
		}
		out, err := exec.Command("ip", "-n", nd.ns, "route", "show", "table", "51820", "proto", "77").Output()
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			if f := strings.Fields(line); len(f) > 0 {
				got = append(got, f[0])
				if !strings.Contains(line, "src "+self.OverlayIP.String()) {
					t.Errorf("step %d: route with a stale source: %s", step, line)
				}
			}
		}
		slices.Sort(got)
		slices.Sort(wantRoutes)
		if !slices.Equal(got, wantRoutes) {
			t.Fatalf("step %d: routes %v, want %v", step, got, wantRoutes)
		}
		addrs := l.ip("-n", nd.ns, "-4", "addr", "show", l.iface(0))
		if strings.Count(addrs, "inet ") != 1 || !strings.Contains(addrs, self.OverlayIP.String()+"/32") {
			t.Fatalf("step %d: addresses %s, want only %v/32", step, addrs, self.OverlayIP)
		}
	}
}
