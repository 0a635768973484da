package haproxycfg

import (
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
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

// TestParseState reads HAProxy 2.6's answer to `show info;show servers
// state` (testdata: captured from haproxy 2.6.12 with one slot set to
// 127.0.0.2:8080 and made ready) and refuses answers that are not two
// whole parts.
func TestParseState(t *testing.T) {
	b, err := os.ReadFile("testdata/show-info-servers-state.txt")
	if err != nil {
		t.Fatal(err)
	}
	pid, live, err := parseState(string(b))
	if err != nil {
		t.Fatal(err)
	}
	want := Live{"be_x": {ap("127.0.0.2:8080"), {}}}
	if diff := cmp.Diff(want, live, cmp.Comparer(func(a, b netip.AddrPort) bool { return a == b })); pid != 16419 || diff != "" {
		t.Errorf("pid %d, want 16419; live (-want +got):\n%s", pid, diff)
	}
	info, servers, _ := strings.Cut(string(b), "\n\n")
	for name, bad := range map[string]string{
		"no end of show info":  info,
		"no Pid":               strings.Replace(string(b), "Pid: ", "Pidx: ", 1),
		"bad Pid":              strings.Replace(string(b), "Pid: 16419", "Pid: x", 1),
		"servers state format": info + "\n\n" + strings.Replace(servers, "1\n", "2\n", 1),
		"no servers state":     info + "\n\nUnknown command.\n",
	} {
		if _, _, err := parseState(bad); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}

// TestParseBatch reads HAProxy 2.6's answer to `show info` followed by
// four slot commands on one connection (testdata: captured from haproxy
// 2.6.12; the fourth names a slot that does not exist) and refuses
// answers that end inside one.
func TestParseBatch(t *testing.T) {
	b, err := os.ReadFile("testdata/show-info-set-server.txt")
	if err != nil {
		t.Fatal(err)
	}
	pid, answers, err := parseBatch(string(b))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"IP changed from '0.0.0.0' to '127.0.0.2', port changed from '+0' to '8080' by 'stats socket command'",
		"", "", "No such server.",
	}
	if diff := cmp.Diff(want, answers); pid != 21141 || diff != "" {
		t.Errorf("pid %d, want 21141; answers (-want +got):\n%s", pid, diff)
	}
	cmds := []string{"set server be_x/s1 addr 127.0.0.2 port 8080", "set server be_x/s1 state ready", "set server be_x/s2 state maint", "set server be_x/s9 state ready"}
	for i, cmd := range cmds {
		if err := checkAnswer(cmd, answers[i]); (err != nil) != (i == 3) {
			t.Errorf("%s: %q: error %v", cmd, answers[i], err)
		}
	}
	info, _, _ := strings.Cut(string(b), "\n\n")
	for name, bad := range map[string]string{
		"no end of show info": info,
		"no Pid":              strings.Replace(string(b), "Pid: ", "Pidx: ", 1),
		"cut in a line":       strings.TrimSuffix(string(b), "\n\n") + "\nNo such",
		"cut before its end":  strings.TrimSuffix(string(b), "\n"),
	} {
		if _, _, err := parseBatch(bad); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
}
