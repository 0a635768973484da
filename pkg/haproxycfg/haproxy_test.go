package haproxycfg

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

func TestClientReachesAppAfterRegistration(t *testing.T) {
	c := newComponent(t, testOptions(testDir(t)))
	ctx := t.Context()
	// An empty mesh still starts HAProxy (stats socket only).
	if err := c.Apply(ctx, snapshot(nil)); err != nil {
		t.Fatal(err)
	}
	port := freePort(t)
	if _, err := ask(port); err == nil {
		t.Fatal("port answers before the app is registered")
	}
	a := startBackend(t, "a")
	if err := c.Apply(ctx, snapshot(map[string]appSpec{"web": {port, []*backend{a}}})); err != nil {
		t.Fatal(err)
	}
	if got, err := ask(port); err != nil || got != "a" {
		t.Fatalf("through haproxy: got %q, %v; want a", got, err)
	}
	st := status(c)
	if st.Listeners != 1 || st.Servers != 1 || st.LastError != "" || st.MasterPID == 0 {
		t.Errorf("status %+v", st)
	}
}

func TestAppWithoutInstancesKeepsListener(t *testing.T) {
	c := newComponent(t, testOptions(testDir(t)))
	port := freePort(t)
	if err := c.Apply(t.Context(), snapshot(map[string]appSpec{"db": {port, nil}})); err != nil {
		t.Fatal(err)
	}
	// The port is bound (connect succeeds) and the connection is closed
	// at once instead of being refused or hanging.
	conn, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), time.Second)
	if err != nil {
		t.Fatalf("listener of an app without instances: %v", err)
	}
	conn.SetDeadline(time.Now().Add(6 * time.Second))
	if n, err := conn.Read(make([]byte, 1)); err == nil || n != 0 {
		t.Errorf("read %d bytes, err %v: want the connection closed", n, err)
	}
	conn.Close()
}

func TestInstanceChangeNeedsNoReload(t *testing.T) {
	c := newComponent(t, testOptions(testDir(t)))
	ctx := t.Context()
	port := freePort(t)
	a, b := startBackend(t, "a"), startBackend(t, "b")
	if err := c.Apply(ctx, snapshot(map[string]appSpec{"web": {port, []*backend{a}}})); err != nil {
		t.Fatal(err)
	}
	before := procs(t, c)
	cfgBefore, _ := os.ReadFile(c.opts.ConfigPath)

	if err := c.Apply(ctx, snapshot(map[string]appSpec{"web": {port, []*backend{b}}})); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 10; i++ {
		if got, err := ask(port); err != nil || got != "b" {
			t.Fatalf("request %d after the change: %q, %v; want b", i, got, err)
		}
	}
	after := procs(t, c)
	if after.Master.Reloads != before.Master.Reloads || after.Master.PID != before.Master.PID {
		t.Errorf("master reloads %d -> %d (pid %d -> %d): an instance change reloaded haproxy",
			before.Master.Reloads, after.Master.Reloads, before.Master.PID, after.Master.PID)
	}
	cb, _ := before.Current()
	ca, _ := after.Current()
	if cb.PID != ca.PID {
		t.Errorf("worker changed %d -> %d", cb.PID, ca.PID)
	}
	st := status(c)
	if st.RuntimeUpdates != 1 || st.Reloads != 1 { // the one reload is the first start
		t.Errorf("runtime updates %d, reloads %d; want 1 and 1", st.RuntimeUpdates, st.Reloads)
	}
	// The file follows, so that the next reload starts from b.
	cfg, _ := os.ReadFile(c.opts.ConfigPath)
	if string(cfg) == string(cfgBefore) || !strings.Contains(string(cfg), "127.0.0.1:"+strconv.Itoa(b.port)+" check # b") {
		t.Errorf("config file not rewritten for the runtime change:\n%s", cfg)
	}
	// Same snapshot again: nothing at all.
	if err := c.Apply(ctx, snapshot(map[string]appSpec{"web": {port, []*backend{b}}})); err != nil {
		t.Fatal(err)
	}
	if st2 := status(c); st2.RuntimeUpdates != 1 || st2.Reloads != 1 {
		t.Errorf("identical snapshot changed something: %+v", st2.Counters)
	}
	// A reload now (structural change) keeps b.
	other := freePort(t)
	if err := c.Apply(ctx, snapshot(map[string]appSpec{"web": {port, []*backend{b}}, "x": {other, nil}})); err != nil {
		t.Fatal(err)
	}
	if got, err := ask(port); err != nil || got != "b" {
		t.Fatalf("after reload: %q, %v; want b", got, err)
	}
}

func TestHitlessUnderLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("load test")
	}
	c := newComponent(t, testOptions(testDir(t)))
	ctx := t.Context()
	port, extra := freePort(t), freePort(t)
	bs := []*backend{startBackend(t, "a"), startBackend(t, "b"), startBackend(t, "c")}
	valid := map[string]bool{"a": true, "b": true, "c": true}
	sets := [][]*backend{{bs[0]}, {bs[0], bs[1]}, {bs[1]}, {bs[1], bs[2]}, {bs[2]}, {bs[0], bs[1], bs[2]}, {bs[0], bs[2]}}
	apps := func(i int, withExtra bool) map[string]appSpec {
		m := map[string]appSpec{"web": {port, sets[i%len(sets)]}}
		if withExtra {
			m["extra"] = appSpec{extra, nil}
		}
		return m
	}
	if err := c.Apply(ctx, snapshot(apps(0, false))); err != nil {
		t.Fatal(err)
	}
	askUntil(t, port, "a", 5*time.Second)
	before := status(c)

	l := startLoad(port, 4, 200000, valid)
	deadline := time.Now().Add(90 * time.Second)
	for i := 1; i <= 50 && time.Now().Before(deadline); i++ {
		if err := c.Apply(ctx, snapshot(apps(i, false))); err != nil {
			t.Fatalf("instance change %d: %v", i, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	for i := 1; i <= 20 && time.Now().Before(deadline); i++ {
		if err := c.Apply(ctx, snapshot(apps(50, i%2 == 1))); err != nil {
			t.Fatalf("structural change %d: %v", i, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	ok, fail, errs := l.finish()
	t.Logf("%d requests, %d failed", ok+fail, fail)
	if fail != 0 {
		t.Errorf("%d of %d requests failed during 50 instance changes and 20 reloads; first: %v", fail, ok+fail, errs)
	}
	if ok < 100 {
		t.Errorf("only %d requests went through: the load did not run", ok)
	}
	st := status(c)
	if got := st.RuntimeUpdates - before.RuntimeUpdates; got != 50 {
		t.Errorf("runtime updates %d, want 50", got)
	}
	if got := st.Reloads - before.Reloads; got != 20 {
		t.Errorf("reloads %d, want 20", got)
	}
	// Old workers drain and go: one master, one worker.
	var p Procs
	for end := time.Now().Add(15 * time.Second); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		p = procs(t, c)
		if len(p.Workers) == 1 && childrenOf(p.Master.PID) == 1 {
			return
		}
	}
	t.Errorf("processes did not settle to one master and one worker: show proc %+v, children %d", p, childrenOf(p.Master.PID))
}

func TestRejectedConfigKeepsServing(t *testing.T) {
	dir := testDir(t)
	opts := testOptions(dir)
	c := newComponent(t, opts)
	ctx := t.Context()
	port := freePort(t)
	a := startBackend(t, "a")
	snap := snapshot(map[string]appSpec{"web": {port, []*backend{a}}})
	if err := c.Apply(ctx, snap); err != nil {
		t.Fatal(err)
	}
	good, _ := os.ReadFile(opts.ConfigPath)
	pid := procs(t, c).Master.PID
	stopMeshd(c)

	// meshd restarts with a typo in an operator-supplied global option:
	// the renderer passes it through, haproxy -c rejects it.
	opts.GlobalExtra = []string{"maxconnn 20000"}
	reg := prometheus.NewRegistry()
	c2 := newComponentReg(t, opts, reg)
	err := c2.Apply(ctx, snap)
	if !errors.Is(err, ErrRejected) {
		t.Fatalf("Apply: %v, want ErrRejected", err)
	}
	if got, err := ask(port); err != nil || got != "a" {
		t.Errorf("running config stopped serving: %q, %v", got, err)
	}
	if now, _ := os.ReadFile(opts.ConfigPath); string(now) != string(good) {
		t.Error("the rejected config replaced the running one on disk")
	}
	rejected, err := os.ReadFile(c2.applier.RejectedPath())
	if err != nil || !strings.Contains(string(rejected), "maxconnn 20000") {
		t.Errorf("rejected config not kept aside: %v", err)
	}
	if p := procs(t, c2); p.Master.PID != pid || p.Master.Reloads != 0 {
		t.Errorf("master %d reloads %d; want the original %d, never reloaded", p.Master.PID, p.Master.Reloads, pid)
	}
	st := status(c2)
	if !strings.Contains(st.LastError, "maxconnn") || st.RejectedConfig != c2.applier.RejectedPath() || st.ValidationFailures != 1 {
		t.Errorf("status does not show the rejection: %+v", st)
	}
	// The same content is not validated again (no hot loop).
	if err := c2.Apply(ctx, snap); !errors.Is(err, ErrRejected) {
		t.Errorf("second Apply: %v", err)
	}
	if n := status(c2).ValidationFailures; n != 1 {
		t.Errorf("validated the same rejected config again: %d failures", n)
	}
	if v := counter(t, reg, "meshd_haproxy_validation_failures_total", "", ""); v != 1 {
		t.Errorf("validation failures metric %v, want 1", v)
	}
	if v := counter(t, reg, "meshd_haproxy_reloads_total", "", ""); v != 0 {
		t.Errorf("reloads metric %v, want 0", v)
	}
	// The registry moves on (a new app): still rejected, since the typo is
	// in the global section, and validated once more (new content).
	port2 := freePort(t)
	snap2 := snapshot(map[string]appSpec{"web": {port, []*backend{a}}, "db": {port2, nil}})
	if err := c2.Apply(ctx, snap2); !errors.Is(err, ErrRejected) {
		t.Errorf("Apply of new content: %v", err)
	}
	if n := status(c2).ValidationFailures; n != 2 {
		t.Errorf("validation failures %d, want 2", n)
	}
	// The operator fixes the option (meshd restarts with it): applies, and
	// the status no longer points at a rejected file.
	stopMeshd(c2)
	opts.GlobalExtra = []string{"maxconn 2000"}
	c3 := newComponent(t, opts)
	if err := c3.Apply(ctx, snap2); err != nil {
		t.Fatalf("fixed config: %v", err)
	}
	if st := status(c3); st.LastError != "" || st.RejectedConfig != "" || st.Reloads != 1 {
		t.Errorf("after the fix: %+v", st)
	}
	if got, err := ask(port); err != nil || got != "a" {
		t.Errorf("after the fix: %q, %v", got, err)
	}
}

func TestReloadFailureKeepsServing(t *testing.T) {
	c := newComponent(t, testOptions(testDir(t)))
	ctx := t.Context()
	port := freePort(t)
	a := startBackend(t, "a")
	if err := c.Apply(ctx, snapshot(map[string]appSpec{"web": {port, []*backend{a}}})); err != nil {
		t.Fatal(err)
	}
	good, _ := os.ReadFile(c.opts.ConfigPath)
	// Something else holds the new app's port: haproxy -c passes (it does
	// not bind), the reload fails.
	squat, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer squat.Close()
	busy := squat.Addr().(*net.TCPAddr).Port
	// The applier alone (the component would leave the busy listener out,
	// see TestBusyPortLeftOutRestApplies).
	err = c.applier.Set(ctx, Compute(snapshot(map[string]appSpec{"web": {port, []*backend{a}}, "db": {busy, nil}}), c.params))
	if !errors.Is(err, ErrReloadFailed) {
		t.Fatalf("Apply: %v, want ErrReloadFailed", err)
	}
	if !strings.Contains(err.Error(), "cannot bind socket") {
		t.Errorf("the error does not carry haproxy's reason: %v", err)
	}
	if got, err := ask(port); err != nil || got != "a" {
		t.Errorf("old worker stopped serving: %q, %v", got, err)
	}
	if now, _ := os.ReadFile(c.opts.ConfigPath); string(now) != string(good) {
		t.Error("config on disk is not the one haproxy runs")
	}
	if st := status(c); st.ReloadFailures != 1 || st.LastError == "" {
		t.Errorf("status: %+v", st)
	}
	// Once the port is free the same desired state applies.
	squat.Close()
	if err := c.applier.Set(ctx, Compute(snapshot(map[string]appSpec{"web": {port, []*backend{a}}, "db": {busy, nil}}), c.params)); err != nil {
		t.Fatalf("retry after the port was freed: %v", err)
	}
}

func TestMasterSurvivesMeshdRestart(t *testing.T) {
	opts := testOptions(testDir(t))
	c, port, _, snap := runningApp(t, opts)
	ctx := t.Context()
	before := procs(t, c)
	stopMeshd(c) // meshd exits (or dies): haproxy stays

	c2 := newComponent(t, opts)
	if err := c2.Apply(ctx, snap); err != nil {
		t.Fatal(err)
	}
	after := procs(t, c2)
	if after.Master.PID != before.Master.PID || after.Master.Reloads != before.Master.Reloads {
		t.Errorf("master %d/%d reloads -> %d/%d: a meshd restart restarted or reloaded haproxy",
			before.Master.PID, before.Master.Reloads, after.Master.PID, after.Master.Reloads)
	}
	if st := status(c2); st.Reloads != 0 || st.RuntimeUpdates != 0 || st.MasterPID != before.Master.PID {
		t.Errorf("restarted component did something: %+v", st)
	}
	// And an instance change right after the restart is still a runtime one.
	b := startBackend(t, "b")
	if err := c2.Apply(ctx, snapshot(map[string]appSpec{"web": {port, []*backend{b}}})); err != nil {
		t.Fatal(err)
	}
	if st := status(c2); st.Reloads != 0 || st.RuntimeUpdates != 1 {
		t.Errorf("after restart: %+v", st.Counters)
	}
	if got, err := ask(port); err != nil || got != "b" {
		t.Errorf("got %q, %v; want b", got, err)
	}
}

func TestSupervisorRestartsDeadMaster(t *testing.T) {
	opts := testOptions(testDir(t))
	opts.SuperviseEvery = 100 * time.Millisecond
	c := newComponent(t, opts)
	port := freePort(t)
	a := startBackend(t, "a")
	if err := c.Apply(t.Context(), snapshot(map[string]appSpec{"web": {port, []*backend{a}}})); err != nil {
		t.Fatal(err)
	}
	old := procs(t, c).Master.PID
	if err := syscall.Kill(old, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	// The bound is the supervisor's reaction, not a performance claim.
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if p, err := c.applier.Master.Procs(context.Background()); err == nil && p.Master.PID != old {
			if got, err := ask(port); err == nil && got == "a" {
				return
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatal("killed master was not restarted within 10s")
}

func TestNewRejectsBadOptions(t *testing.T) {
	requireHAProxy(t)
	dir := testDir(t)
	for name, mut := range map[string]func(*Options){
		"etc haproxy.cfg":   func(o *Options) { o.ConfigPath = "/etc/haproxy.cfg" },
		"relative config":   func(o *Options) { o.ConfigPath = "haproxy.cfg" },
		"socket with space": func(o *Options) { o.StatsSocket = dir + "/a b" },
		"socket host name":  func(o *Options) { o.MasterSocket = "ipv4@localhost:99" },
		"bad self":          func(o *Options) { o.Self = "a b" },
		"global newline":    func(o *Options) { o.GlobalExtra = []string{"maxconn 1\nlisten x"} },
		"missing binary":    func(o *Options) { o.Binary = dir + "/no-haproxy" },
		"slots":             func(o *Options) { o.ServerSlots = -1 },
	} {
		o := testOptions(dir)
		mut(&o)
		if _, err := New(o, nil, nil); err == nil {
			t.Errorf("%s: New accepted it", name)
		}
	}
}

// TestServiceManagerMode runs HAProxy the way a systemd unit does (meshd
// does not supervise it): meshd writes the file, the "unit" starts
// haproxy from it, meshd then only talks to the master socket.
func TestServiceManagerMode(t *testing.T) {
	bin := requireHAProxy(t)
	opts := testOptions(testDir(t))
	opts.Supervise = false
	c := newComponent(t, opts)
	ctx := t.Context()
	port := freePort(t)
	a, b := startBackend(t, "a"), startBackend(t, "b")
	snap := snapshot(map[string]appSpec{"web": {port, []*backend{a}}})
	if err := c.Apply(ctx, snap); !errors.Is(err, ErrMasterDown) {
		t.Fatalf("Apply without a master: %v, want ErrMasterDown", err)
	}
	if _, err := os.Stat(opts.ConfigPath); err != nil {
		t.Fatalf("config not written for the unit to start from: %v", err)
	}

	// The unit's ExecStart (-Ws under systemd; -W here, there is no
	// NOTIFY_SOCKET).
	unit := exec.Command(bin, "-W", "-S", opts.MasterSocket, "-f", opts.ConfigPath)
	if err := unit.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		unit.Process.Signal(syscall.SIGTERM)
		unit.Wait()
	})
	askUntil(t, port, "a", 5*time.Second)

	if err := c.Apply(ctx, snap); err != nil {
		t.Fatalf("Apply with the unit running: %v", err)
	}
	if err := c.Apply(ctx, snapshot(map[string]appSpec{"web": {port, []*backend{b}}})); err != nil {
		t.Fatal(err)
	}
	if got, err := ask(port); err != nil || got != "b" {
		t.Errorf("after runtime change: %q, %v", got, err)
	}
	other := freePort(t)
	if err := c.Apply(ctx, snapshot(map[string]appSpec{"web": {port, []*backend{b}}, "db": {other, []*backend{a}}})); err != nil {
		t.Fatal(err)
	}
	if got, err := ask(other); err != nil || got != "a" {
		t.Errorf("after reload: %q, %v", got, err)
	}
	p := procs(t, c)
	if p.Master.PID != unit.Process.Pid || p.Master.Reloads != 1 {
		t.Errorf("master %d with %d reloads; want the unit's %d with 1", p.Master.PID, p.Master.Reloads, unit.Process.Pid)
	}
	if st := status(c); st.Supervised || st.RuntimeUpdates != 1 || st.Reloads != 1 {
		t.Errorf("status %+v", st)
	}
}

// TestRuntimeChangeRightAfterReload interleaves reloads and instance
// changes with no pause: every runtime update must reach the new worker
// (not a draining one), or its change would be lost.
func TestRuntimeChangeRightAfterReload(t *testing.T) {
	c := newComponent(t, testOptions(testDir(t)))
	ctx := t.Context()
	port, extra := freePort(t), freePort(t)
	a, b := startBackend(t, "a"), startBackend(t, "b")
	for i := 0; i < 10; i++ {
		apps := map[string]appSpec{"web": {port, []*backend{a}}}
		if i%2 == 1 {
			apps["extra"] = appSpec{extra, nil}
		}
		if err := c.Apply(ctx, snapshot(apps)); err != nil { // reload
			t.Fatal(err)
		}
		apps["web"] = appSpec{port, []*backend{b}}
		if err := c.Apply(ctx, snapshot(apps)); err != nil { // runtime, at once
			t.Fatal(err)
		}
		for j := 0; j < 5; j++ {
			if got, err := ask(port); err != nil || got != "b" {
				t.Fatalf("round %d: got %q, %v; want b", i, got, err)
			}
		}
	}
	if st := status(c); st.RuntimeUpdates != 10 || st.Reloads != 10 {
		t.Errorf("runtime updates %d, want 10 (counters %+v)", st.RuntimeUpdates, st.Counters)
	}
}
