package haproxycfg

import (
	"os"
	"os/user"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestWorkerRunsAsOwnUser: with haproxy.user/group set, the HAProxy
// worker that handles traffic runs as that user (it drops root after the
// listeners are bound, a port below 1024 included), still serves, and
// keeps doing so across a reload.
func TestWorkerRunsAsOwnUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: HAProxy can only change user when started as root")
	}
	u, err := user.Lookup("nobody")
	if err != nil {
		t.Skip("no user nobody on this machine")
	}
	g, err := user.LookupGroupId(u.Gid)
	if err != nil {
		t.Skip("nobody's group is unknown")
	}
	opts := testOptions(testDir(t))
	opts.User, opts.Group = u.Username, g.Name
	opts.AllowLowPorts = []int{81}
	c := newComponent(t, opts)
	a := startBackend(t, "a")
	port := freePort(t)
	apps := map[string]appSpec{"web": {port, []*backend{a}}}
	if !portBusy(81) {
		apps["low"] = appSpec{81, []*backend{a}}
	}
	if err := c.Apply(t.Context(), snapshot(apps)); err != nil {
		t.Fatal(err)
	}
	check := func(when string) {
		t.Helper()
		w, ok := procs(t, c).Current()
		if !ok {
			t.Fatalf("%s: no worker", when)
		}
		if uid := procUID(t, w.PID); uid != u.Uid {
			t.Errorf("%s: worker %d runs as uid %s, want %s (%s)", when, w.PID, uid, u.Uid, u.Username)
		}
		askUntil(t, port, "a", 5*time.Second)
		if _, ok := apps["low"]; ok {
			askUntil(t, 81, "a", 5*time.Second)
		}
	}
	check("first start")
	b := startBackend(t, "b")
	apps["other"] = appSpec{freePort(t), []*backend{b}}
	if err := c.Apply(t.Context(), snapshot(apps)); err != nil {
		t.Fatal(err)
	}
	check("after a reload")
}

func portBusy(port int) bool { return ProbeLoopback(port) != nil }

// procUID reads the real uid of pid from /proc.
func procUID(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "Uid:"); ok {
			return strings.Fields(rest)[0]
		}
	}
	t.Fatalf("no Uid line for %d", pid)
	return ""
}
