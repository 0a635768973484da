package haproxycfg

import (
	"context"
	"errors"
	"io/fs"
	"net"
	"os"
	"strconv"
	"testing"
	"time"
)

// prepared reports whether c's PreparedForClaim channel is closed.
func prepared(c *Component) bool {
	select {
	case <-c.PreparedForClaim():
		return true
	default:
		return false
	}
}

// TestPrepareStartsWithoutServers: on a new node, Prepare starts HAProxy
// with the app's listener bound and every slot free (no server, so no
// health check towards an instance the node cannot reach yet); the Apply
// after it fills the slot over the runtime API, without a reload; and a
// Prepare after that changes nothing (a gate that closes again later must
// not empty the slots).
func TestPrepareStartsWithoutServers(t *testing.T) {
	c := newComponent(t, testOptions(testDir(t)))
	ctx := t.Context()
	port := freePort(t)
	a := startBackend(t, "a")
	snap := snapshot(map[string]appSpec{"web": {port, []*backend{a}}})
	if prepared(c) {
		t.Fatal("prepared before Prepare or Apply ran")
	}
	if err := c.Prepare(ctx, snap); err != nil {
		t.Fatal(err)
	}
	if !prepared(c) {
		t.Fatal("not prepared after Prepare")
	}
	before := procs(t, c)
	_, live, err := c.applier.Runtime.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(live) != 1 {
		t.Fatalf("backends after Prepare: %v, want the app's one", live)
	}
	for be, addrs := range live {
		for i, ap := range addrs {
			if ap.IsValid() {
				t.Errorf("backend %s slot %d is %v after Prepare, want free", be, i, ap)
			}
		}
	}
	conn, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), time.Second)
	if err != nil {
		t.Fatalf("the app's listener is not bound after Prepare: %v", err)
	}
	conn.Close()
	if st := status(c); st.Reloads != 1 || st.RuntimeUpdates != 0 {
		t.Errorf("after Prepare: %+v, want the one start", st.Counters)
	}

	if err := c.Apply(ctx, snap); err != nil {
		t.Fatal(err)
	}
	if got, err := ask(port); err != nil || got != "a" {
		t.Fatalf("after the Apply: %q, %v; want a", got, err)
	}
	after := procs(t, c)
	if after.Master.PID != before.Master.PID || after.Master.Reloads != before.Master.Reloads {
		t.Errorf("master %d/%d reloads -> %d/%d: the Apply after Prepare reloaded haproxy",
			before.Master.PID, before.Master.Reloads, after.Master.PID, after.Master.Reloads)
	}
	if st := status(c); st.Reloads != 1 || st.RuntimeUpdates != 1 {
		t.Errorf("after the Apply: %+v, want 1 reload (the start) and 1 runtime update", st.Counters)
	}

	if err := c.Prepare(ctx, snapshot(nil)); err != nil {
		t.Fatal(err)
	}
	if got, err := ask(port); err != nil || got != "a" {
		t.Errorf("after a later Prepare: %q, %v; want a", got, err)
	}
	if st := status(c); st.Reloads != 1 || st.RuntimeUpdates != 1 {
		t.Errorf("a later Prepare changed something: %+v", st.Counters)
	}
}

// TestPrepareLeavesWhatRuns: a meshd restarted next to a running HAProxy
// prepares nothing (the master keeps its servers until the apply adopts
// it), and neither does one on a node where another HAProxy serves the
// app's port (a node migrating from confd), nor one whose HAProxy a
// service manager runs (it writes no file for the unit to start from).
func TestPrepareLeavesWhatRuns(t *testing.T) {
	opts := testOptions(testDir(t))
	c, port, a, snap := runningApp(t, opts)
	ctx := t.Context()
	if !prepared(c) {
		t.Error("not prepared after Apply")
	}
	before := procs(t, c)
	stopMeshd(c)

	c2 := newComponent(t, opts)
	if err := c2.Prepare(ctx, snapshot(nil)); err != nil {
		t.Fatal(err)
	}
	if !prepared(c2) {
		t.Error("not prepared after a Prepare that had nothing to do")
	}
	if got, err := ask(port); err != nil || got != "a" {
		t.Errorf("after Prepare next to a running HAProxy: %q, %v; want a", got, err)
	}
	if after := procs(t, c2); after.Master.PID != before.Master.PID || after.Master.Reloads != before.Master.Reloads {
		t.Errorf("master %d/%d reloads -> %d/%d", before.Master.PID, before.Master.Reloads, after.Master.PID, after.Master.Reloads)
	}
	if st := status(c2); st.Reloads != 0 || st.RuntimeUpdates != 0 {
		t.Errorf("Prepare next to a running HAProxy did something: %+v", st.Counters)
	}

	// A node migrating from confd: the legacy HAProxy listens on the
	// app's port (SO_REUSEPORT, as HAProxy binds). An empty HAProxy next
	// to it would take some of its connections and close them.
	legacyPort := freePort(t)
	listenReusePort(t, "127.0.0.1:"+strconv.Itoa(legacyPort))
	migrating := testOptions(testDir(t))
	c4 := newComponent(t, migrating)
	if err := c4.Prepare(ctx, snapshot(map[string]appSpec{"web": {legacyPort, []*backend{a}}})); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(migrating.ConfigPath); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Prepare next to a legacy listener wrote %s (%v)", migrating.ConfigPath, err)
	}
	if !prepared(c4) {
		t.Error("not prepared after a Prepare that had nothing to do")
	}

	unit := testOptions(testDir(t))
	unit.Supervise = false
	c3 := newComponent(t, unit)
	if err := c3.Prepare(ctx, snap); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(unit.ConfigPath); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Prepare without supervision wrote %s (%v)", unit.ConfigPath, err)
	}
	if _, err := (Master{Socket: unit.MasterSocket}).Procs(context.Background()); err == nil {
		t.Error("Prepare without supervision started a master")
	}
}
