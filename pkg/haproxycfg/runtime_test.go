package haproxycfg

import (
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/meshd/meshd/pkg/registry"
)

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

// TestParseState reads HAProxy 2.6's interactive answers to `show
// info;show servers state` (testdata: the bytes haproxy 2.6.12 sent after
// `prompt`, with one slot set to 127.0.0.2:8080 and made ready), split at
// the prompts as a Session splits them, and refuses answers that are not
// what it asked for.
func TestParseState(t *testing.T) {
	b, err := os.ReadFile("testdata/session-show-info-servers-state.txt")
	if err != nil {
		t.Fatal(err)
	}
	buf := b
	a := splitAnswers(&buf, 2)
	if len(buf) != 0 {
		t.Fatalf("%d bytes left after two answers: %q", len(buf), buf)
	}
	pid, live, err := parseState(a[0], a[1])
	if err != nil {
		t.Fatal(err)
	}
	want := Live{"be_x": {ap("127.0.0.2:8080"), {}}}
	if diff := cmp.Diff(want, live, cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })); pid != 12982 || diff != "" {
		t.Errorf("pid %d, want 12982; live (-want +got):\n%s", pid, diff)
	}
	info, servers := a[0], a[1]
	for name, bad := range map[string][2]string{
		"no Pid":               {strings.Replace(info, "Pid: ", "Pidx: ", 1), servers},
		"bad Pid":              {strings.Replace(info, "Pid: 12982", "Pid: x", 1), servers},
		"servers state format": {info, strings.Replace(servers, "1\n", "2\n", 1)},
		"no servers state":     {info, "Unknown command.\n"},
	} {
		if _, _, err := parseState(bad[0], bad[1]); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

// TestSessionApplyReadiesOnlyAfterEveryAddress runs Session.Apply against
// a real HAProxy: when one slot's address change fails, no slot of the
// same call is made ready (a ready slot with its old address would send
// traffic to the instance that left it), and the session stays usable;
// a call whose changes all work fills and frees slots in two round trips.
func TestSessionApplyReadiesOnlyAfterEveryAddress(t *testing.T) {
	c := newComponent(t, testOptions(testDir(t)))
	ctx := t.Context()
	port := freePort(t)
	a, b := startBackend(t, "a"), startBackend(t, "b")
	if err := c.Apply(ctx, snapshot(map[string]appSpec{"web": {port, []*backend{a}}})); err != nil {
		t.Fatal(err)
	}
	be := BackendName(registry.AppID{Group: registry.GroupServices, Name: "web"})
	s, err := c.applier.Runtime.Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	_, live, err := s.State()
	if err != nil {
		t.Fatal(err)
	}
	if len(live[be]) < 2 || live[be][0] != b2ap(a) || live[be][1].IsValid() {
		t.Fatalf("before: %s = %v, want a in slot 1 and slot 2 free", be, live[be])
	}
	err = s.Apply([]SlotChange{
		{Backend: be, Slot: SlotName(1), To: Server{Node: "b", Addr: b2ap(b)}},
		{Backend: be, Slot: "s999", To: Server{Node: "x", Addr: b2ap(b)}},
	})
	if err == nil || !strings.Contains(err.Error(), "s999") {
		t.Fatalf("Apply with a missing slot: %v, want an error naming it", err)
	}
	_, live, err = s.State()
	if err != nil {
		t.Fatalf("session after a failed Apply: %v", err)
	}
	if live[be][1].IsValid() {
		t.Fatalf("slot 2 is %v after a failed Apply: made ready although another address failed", live[be][1])
	}
	err = s.Apply([]SlotChange{
		{Backend: be, Slot: SlotName(1), To: Server{Node: "b", Addr: b2ap(b)}},
		{Backend: be, Slot: SlotName(0)},
	})
	if err != nil {
		t.Fatal(err)
	}
	_, live, err = s.State()
	if err != nil {
		t.Fatal(err)
	}
	if live[be][0].IsValid() || live[be][1] != b2ap(b) {
		t.Fatalf("after swapping a for b: %s = %v, want slot 1 free and b in slot 2", be, live[be])
	}
	askUntil(t, port, "b", 5*time.Second)
}

func b2ap(b *backend) netip.AddrPort {
	return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(b.port))
}
