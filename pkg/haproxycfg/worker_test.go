package haproxycfg

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshd/meshd/pkg/registry"
)

// TestOldWorkerOnStatsSocket: right after a reload, the old and the new
// worker both hold the stats socket's listener (the new one inherits it,
// "expose-fd listeners") until the master stops the old one, and the
// kernel hands each connection to either. meshd must neither trust the
// old worker's slots (they may already look as desired, and the pass
// would change nothing in the worker that serves) nor count commands the
// old worker took as applied.
//
// The old worker is a real HAProxy started from the same file with its
// own stats socket; splitSocket stands in for the kernel's choice, routing
// chosen connections to it.
func TestOldWorkerOnStatsSocket(t *testing.T) {
	dir := testDir(t)
	opts := testOptions(dir)
	c := newComponent(t, opts)
	ctx := t.Context()
	port := freePort(t)
	a, b := startBackend(t, "a"), startBackend(t, "b")
	if err := c.Apply(ctx, snapshot(map[string]appSpec{"web": {port, []*backend{a}}})); err != nil { // reload
		t.Fatal(err)
	}
	old := startOldWorker(t, opts, port, dir)
	// The old worker already has what the next change asks for.
	oldPID, _, err := old.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	web := BackendName(registry.AppID{Group: registry.GroupServices, Name: "web"})
	if err := old.Apply(ctx, oldPID, []SlotChange{{Backend: web, Slot: SlotName(0), To: Server{Addr: b.instance().Addr()}}}); err != nil {
		t.Fatal(err)
	}

	split := startSplitSocket(t, opts.StatsSocket, old.Socket)

	// The slots are read from the old worker, three times.
	split.toOld(0, 1, 2)
	if err := c.Apply(ctx, snapshot(map[string]appSpec{"web": {port, []*backend{b}}})); err != nil {
		t.Fatal(err)
	}
	if got, err := ask(port); err != nil || got != "b" {
		t.Fatalf("after the slots were read from the old worker: %q, %v; want b", got, err)
	}
	// The commands reach the old worker: the pass before left the slots
	// known, so the pass's first connection carries the commands, and its
	// `show info` names the old worker.
	n := split.count()
	split.toOld(n)
	if err := c.Apply(ctx, snapshot(map[string]appSpec{"web": {port, []*backend{a}}})); err != nil {
		t.Fatal(err)
	}
	if got, err := ask(port); err != nil || got != "a" {
		t.Fatalf("after the commands went to the old worker: %q, %v; want a", got, err)
	}
	if got := split.count() - n; got != 3 {
		t.Errorf("the pass opened %d connections, want 3 (commands to the old worker, then slots and commands from the current one)", got)
	}
	// Someone else reloaded since meshd's last update: the worker meshd
	// knows the slots of is the old one now, and still answers. It takes
	// the commands under its own pid; the master, asked at the same time,
	// names another worker, so the slots are read again from the current
	// one and the change made there.
	a2 := c.Applier()
	a2.setMu.Lock()
	oldPID, oldLive, err := old.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	a2.view = &slotView{pid: oldPID, live: oldLive}
	a2.setMu.Unlock()
	n = split.count()
	split.toOld(n)
	if err := c.Apply(ctx, snapshot(map[string]appSpec{"web": {port, []*backend{b}}})); err != nil {
		t.Fatal(err)
	}
	if got, err := ask(port); err != nil || got != "b" {
		t.Fatalf("after the known worker was replaced: %q, %v; want b", got, err)
	}
	if got := split.oldServed(); got != 5 {
		t.Errorf("old worker answered %d connections, want 5 (the test did not exercise what it names)", got)
	}
	if st := status(c); st.RuntimeUpdates != 3 || st.Reloads != 1 {
		t.Errorf("counters %+v, want 3 runtime updates and 1 reload", st.Counters)
	}
}

// TestRuntimeChangesFromKnownSlots: once a pass has read the slots, the
// next instance changes go over one connection to the worker each (the
// commands, opened by `show info`), the slots are not read again, and
// every change is served.
func TestRuntimeChangesFromKnownSlots(t *testing.T) {
	dir := testDir(t)
	opts := testOptions(dir)
	c := newComponent(t, opts)
	ctx := t.Context()
	port := freePort(t)
	a, b := startBackend(t, "a"), startBackend(t, "b")
	if err := c.Apply(ctx, snapshot(map[string]appSpec{"web": {port, []*backend{a}}})); err != nil { // reload
		t.Fatal(err)
	}
	split := startSplitSocket(t, opts.StatsSocket, opts.StatsSocket+".unused")
	for i := 0; i < 10; i++ {
		to := []*backend{a, b}[(i+1)%2]
		if err := c.Apply(ctx, snapshot(map[string]appSpec{"web": {port, []*backend{to}}})); err != nil {
			t.Fatal(err)
		}
		if got, err := ask(port); err != nil || got != to.name {
			t.Fatalf("change %d: got %q, %v; want %s", i, got, err, to.name)
		}
	}
	// The first change reads the slots (the reload left them unknown),
	// the other nine only send their commands.
	if got := split.count(); got != 2+9 {
		t.Errorf("%d connections to the stats socket for 10 changes, want 11", got)
	}
	if st := status(c); st.RuntimeUpdates != 10 || st.Reloads != 1 {
		t.Errorf("counters %+v, want 10 runtime updates and 1 reload", st.Counters)
	}
}

// startOldWorker runs a second, real HAProxy from the component's file,
// with its own stats socket and its frontend moved off port: it plays a
// worker the master replaced but that still answers on the stats socket.
func startOldWorker(t *testing.T, opts Options, port int, dir string) Runtime {
	t.Helper()
	cfg, err := os.ReadFile(opts.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	sock := dir + "/old.sock"
	s := strings.ReplaceAll(string(cfg), opts.StatsSocket, sock)
	s = strings.ReplaceAll(s, fmt.Sprintf("127.0.0.1:%d\n", port), fmt.Sprintf("127.0.0.1:%d\n", freePort(t)))
	path := dir + "/old.cfg"
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(requireHAProxy(t), "-f", path)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	r := Runtime{Socket: sock}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, _, err := r.State(t.Context()); err == nil {
			return r
		} else if time.Now().After(deadline) {
			t.Fatalf("stand-in old worker: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// splitSocket stands in for the kernel handing connections on a
// listener two processes share: it takes the stats socket's path (the
// current worker keeps listening on its socket, moved aside) and relays
// each connection to the current worker, or to the old one for the
// connection numbers toOld named (counting from 0).
type splitSocket struct {
	mu        sync.Mutex
	n, served int
	old       map[int]bool
}

func startSplitSocket(t *testing.T, path, oldPath string) *splitSocket {
	t.Helper()
	cur := path + ".cur"
	if err := os.Rename(path, cur); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	s := &splitSocket{old: map[int]bool{}}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s.mu.Lock()
			to := cur
			if s.old[s.n] {
				to = oldPath
				s.served++
			}
			s.n++
			s.mu.Unlock()
			go relay(c, to)
		}
	}()
	return s
}

func (s *splitSocket) toOld(conns ...int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, i := range conns {
		s.old[i] = true
	}
}

func (s *splitSocket) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.n
}

func (s *splitSocket) oldServed() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.served
}

// relay copies c to the unix socket at path and back, passing on the
// half-close after the command that HAProxy's CLI answers.
func relay(c net.Conn, path string) {
	defer c.Close()
	u, err := net.Dial("unix", path)
	if err != nil {
		return
	}
	defer u.Close()
	go func() {
		io.Copy(u, c)
		u.(*net.UnixConn).CloseWrite()
	}()
	io.Copy(c, u)
}

// TestVerifyPutsBackDrift: servers changed behind meshd's back on the
// stats socket are put back within VerifyEvery, with no registry change;
// while HAProxy runs what meshd applied, Verify changes and writes
// nothing.
func TestVerifyPutsBackDrift(t *testing.T) {
	opts := testOptions(testDir(t))
	opts.VerifyEvery = 50 * time.Millisecond
	reg := prometheus.NewRegistry()
	c := newComponentReg(t, opts, reg)
	ctx := t.Context()
	port := freePort(t)
	a, b := startBackend(t, "a"), startBackend(t, "b")
	if err := c.Apply(ctx, snapshot(map[string]appSpec{"web": {port, []*backend{a}}})); err != nil {
		t.Fatal(err)
	}
	before, err := os.Stat(opts.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(10 * opts.VerifyEvery)
	after, err := os.Stat(opts.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	if st := status(c); st.RuntimeUpdates != 0 || st.Reloads != 1 || !after.ModTime().Equal(before.ModTime()) {
		t.Fatalf("with nothing to put back: counters %+v, file modified %v → %v", st.Counters, before.ModTime(), after.ModTime())
	}

	rt := Runtime{Socket: opts.StatsSocket}
	web := BackendName(registry.AppID{Group: registry.GroupServices, Name: "web"})
	for i, change := range []SlotChange{
		{Backend: web, Slot: SlotName(0), To: Server{Addr: b.instance().Addr()}}, // another server
		{Backend: web, Slot: SlotName(0)},                                        // none
	} {
		pid, _, err := rt.State(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := rt.Apply(ctx, pid, []SlotChange{change}); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(5 * time.Second)
		for status(c).RuntimeUpdates < int64(i+1) && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if st := status(c); st.RuntimeUpdates != int64(i+1) || st.Reloads != 1 {
			t.Fatalf("change %d not put back: counters %+v, want %d runtime updates and no reload", i, st.Counters, i+1)
		}
		if got, err := ask(port); err != nil || got != "a" {
			t.Errorf("change %d put back: %q, %v; want a", i, got, err)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for counter(t, reg, "meshd_haproxy_drift_corrections_total", "", "") < 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := counter(t, reg, "meshd_haproxy_drift_corrections_total", "", ""); got != 2 {
		t.Errorf("meshd_haproxy_drift_corrections_total %v, want 2", got)
	}
}
