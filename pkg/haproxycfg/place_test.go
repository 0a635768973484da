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

func TestParseShowProc(t *testing.T) {
	out := `#<PID>          <type>          <reloads>       <uptime>        <version>      
12757           master          2 [failed: 1]   0d00h00m11s     2.6.12-1+deb12u4
# workers
12901           worker          0               0d00h00m01s     2.6.12-1+deb12u4
12858           worker          1               0d00h00m04s     2.6.12-1+deb12u4
# programs

`
	p, err := parseShowProc(out)
	if err != nil {
		t.Fatal(err)
	}
	want := Procs{Master: Proc{PID: 12757, Type: "master", Reloads: 2, Failed: 1},
		Workers: []Proc{{PID: 12901, Type: "worker"}, {PID: 12858, Type: "worker", Reloads: 1}}}
	if diff := cmp.Diff(want, p); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	if cur, _ := p.Current(); cur.PID != 12901 {
		t.Errorf("current worker %d, want 12901", cur.PID)
	}
	if _, err := parseShowProc("Unknown command.\n"); err == nil {
		t.Error("garbage parsed without error")
	}
}

func TestParseServersState(t *testing.T) {
	out := `1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port
3 be_x 1 s1 127.0.0.1 0 0 1 1 1 8 2 0 6 0 0 0 - 39101 - 0 0 - - 0
3 be_x 2 s2 127.0.0.1 2 4 1 1 0 1 0 2 6 0 0 0 - 39102 - 0 0 - - 0
3 be_x 3 s3 127.0.0.1 0 5 1 1 1 1 0 0 14 0 0 0 - 39103 - 0 0 - - 0
4 other 1 web1 10.0.0.1 2 0 1 1 1 1 0 2 6 0 0 0 - 80 - 0 0 - - 0
`
	live, err := parseServersState(out)
	if err != nil {
		t.Fatal(err)
	}
	want := Live{"be_x": {ap("127.0.0.1:39101"), ap("127.0.0.1:39102"), {}}}
	if diff := cmp.Diff(want, live, cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}
