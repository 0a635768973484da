package haproxycfg

import (
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// gauge reads a gauge with the given labels from reg (-1: no such series).
func gauge(tb testing.TB, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	tb.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		tb.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			got := map[string]string{}
			for _, l := range m.GetLabel() {
				got[l.GetName()] = l.GetValue()
			}
			for k, v := range labels {
				if got[k] != v {
					continue next
				}
			}
			return m.GetGauge().GetValue()
		}
	}
	return -1
}

// TestServersMetricFollowsHealthChecks runs the real HAProxy: an instance
// whose listener goes away is counted down once HAProxy's health check
// fails, the other stays up.
func TestServersMetricFollowsHealthChecks(t *testing.T) {
	reg := prometheus.NewRegistry()
	c := newComponentReg(t, testOptions(testDir(t)), reg)
	if got := gauge(t, reg, "meshd_haproxy_runtime_up", nil); got != 0 {
		t.Errorf("runtime up before HAProxy runs = %v, want 0", got)
	}
	a, b := startBackend(t, "a"), startBackend(t, "b")
	port := freePort(t)
	if err := c.Apply(t.Context(), snapshot(map[string]appSpec{"web": {port, []*backend{a, b}}})); err != nil {
		t.Fatal(err)
	}
	app := map[string]string{"app": "services/web"}
	state := func(s string) float64 {
		return gauge(t, reg, "meshd_haproxy_servers", map[string]string{"app": app["app"], "state": s})
	}
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s (up=%v down=%v)", what, state("up"), state("down"))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	waitFor("2 up, 0 down", func() bool { return state("up") == 2 && state("down") == 0 })
	if got := gauge(t, reg, "meshd_haproxy_runtime_up", nil); got != 1 {
		t.Errorf("runtime up = %v, want 1", got)
	}
	b.ln.Close()
	waitFor("1 up, 1 down", func() bool { return state("up") == 1 && state("down") == 1 })
}

func TestParseHealth(t *testing.T) {
	// `show servers state` of HAProxy 2.6 (columns cut after srv_admin_state
	// are kept as HAProxy prints them).
	in := `1
# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port
3 be_services_web 1 s1 10.1.0.5 2 0 1 1 12 15 3 4 6 0 0 0 - 8080 - 0 0 - - 0
3 be_services_web 2 s2 10.2.0.5 0 0 1 1 3 7 2 0 6 0 0 0 - 8080 - 0 0 - - 0
3 be_services_web 3 s3 0.0.0.0 0 1 1 1 40 1 0 0 0 0 0 0 - 0 - 0 0 - - 0
4 stats 1 s1 127.0.0.1 2 0 1 1 1 1 0 0 0 0 0 0 - 80 - 0 0 - - 0
`
	got, err := parseHealth(in)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got["be_services_web"] != (Health{Up: 1, Down: 1}) {
		t.Errorf("parseHealth = %+v, want be_services_web {Up:1 Down:1}", got)
	}
	if _, err := parseHealth("1\n# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state\n3 be_x 1 s1 1.2.3.4 x 0\n"); err == nil {
		t.Error("a non-numeric op state parsed")
	}
}
