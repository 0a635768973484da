package haproxycfg

import (
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/meshd/meshd/pkg/registry"
)

var keydb = registry.AppID{Group: registry.GroupServices, Name: "keydb"}

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

func oneBackend(slots ...Server) Desired {
	return Desired{Listeners: []Listener{{App: keydb, Port: 6380, Slots: slots}}}
}

func srv(node, addr string) Server { return Server{Node: node, Addr: ap(addr)} }

func TestPlaceKeepsInstancesInTheirSlots(t *testing.T) {
	d := oneBackend(srv("a", "10.0.0.1:1"), srv("b", "10.0.0.2:1"), srv("c", "10.0.0.3:1"), Server{})
	live := Live{"be_services_keydb": {{}, ap("10.0.0.3:1"), ap("10.0.0.9:1"), ap("10.0.0.1:1")}}
	got := Place(d, live).Listeners[0].Slots
	want := []Server{srv("b", "10.0.0.2:1"), srv("c", "10.0.0.3:1"), {}, srv("a", "10.0.0.1:1")}
	if diff := cmp.Diff(want, got, cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })); diff != "" {
		t.Errorf("placement (-want +got):\n%s", diff)
	}
	changes, ok := Diff(Place(d, live), live)
	if !ok {
		t.Fatal("Diff says reload for a same-shape backend")
	}
	wantChanges := []SlotChange{
		{Backend: "be_services_keydb", Slot: "s1", To: srv("b", "10.0.0.2:1")},
		{Backend: "be_services_keydb", Slot: "s3"},
	}
	if diff := cmp.Diff(wantChanges, changes, cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })); diff != "" {
		t.Errorf("changes (-want +got):\n%s", diff)
	}
}

func TestDiffNeedsReloadWhenShapeDiffers(t *testing.T) {
	d := oneBackend(srv("a", "10.0.0.1:1"), Server{})
	for name, live := range map[string]Live{
		"missing backend":  {},
		"other slot count": {"be_services_keydb": {{}, {}, {}}},
	} {
		if _, ok := Diff(Place(d, live), live); ok {
			t.Errorf("%s: Diff allowed a runtime update", name)
		}
	}
}

// TestPlaceStates moves between random instance sets in random order and
// checks that applying the diff to live always reaches exactly the wanted
// set, touching only slots whose occupant changed (any state can move to
// any other).
func TestPlaceStates(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	pool := []Server{
		srv("a", "10.0.0.1:1"), srv("b", "10.0.0.2:1"), srv("c", "10.0.0.3:1"), srv("d", "10.0.0.4:1"),
		srv("e", "10.0.0.5:1"), srv("f", "10.0.0.6:1"), srv("g", "10.0.0.7:1"),
	}
	// At most 7 instances: with the spare slot they always fit 8 slots.
	live := Live{"be_services_keydb": make([]netip.AddrPort, 8)}
	for step := 0; step < 500; step++ {
		var want []Server
		for _, s := range pool {
			if r.IntN(2) == 0 {
				want = append(want, s)
			}
		}
		d := oneBackend(padSlots(want, 8)...)
		placed := Place(d, live)
		changes, ok := Diff(placed, live)
		if !ok {
			t.Fatal("Diff wants a reload")
		}
		before := map[netip.AddrPort]bool{}
		for _, a := range live["be_services_keydb"] {
			if a.IsValid() {
				before[a] = true
			}
		}
		next := append([]netip.AddrPort(nil), live["be_services_keydb"]...)
		for _, c := range changes {
			i := int(c.Slot[1] - '1')
			if c.To.Addr.IsValid() && before[c.To.Addr] {
				t.Fatalf("step %d: %v moved slots although it was already placed", step, c.To.Addr)
			}
			next[i] = c.To.Addr
		}
		live["be_services_keydb"] = next
		got := map[netip.AddrPort]bool{}
		for _, a := range next {
			if a.IsValid() {
				got[a] = true
			}
		}
		if len(got) != len(want) {
			t.Fatalf("step %d: live has %d servers, want %d", step, len(got), len(want))
		}
		for _, s := range want {
			if !got[s.Addr] {
				t.Fatalf("step %d: %v missing", step, s.Addr)
			}
		}
		if Hash(placed) != Hash(d) {
			t.Fatalf("step %d: placement changed the hash", step)
		}
	}
}
