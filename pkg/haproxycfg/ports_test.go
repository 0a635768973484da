package haproxycfg

import (
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/registry"
)

// TestBusyPortLeftOutRestApplies: an app published on a port something
// else on the node listens on (here a plain listener, as etcd's 2379 or
// sshd's 22 would be) is left out and reported; the other apps apply,
// later changes (instance and structural) keep applying, the app comes
// in once the port is free, and a restarted meshd does not mistake
// HAProxy's own ports for busy ones.
func TestBusyPortLeftOutRestApplies(t *testing.T) {
	opts := testOptions(testDir(t))
	c := newComponent(t, opts)
	ctx := t.Context()
	squat, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer squat.Close()
	busy := squat.Addr().(*net.TCPAddr).Port
	web, other := freePort(t), freePort(t)
	a, b := startBackend(t, "a"), startBackend(t, "b")
	if err := c.Apply(ctx, snapshot(map[string]appSpec{"web": {web, []*backend{a}}, "db": {busy, nil}})); err != nil {
		t.Fatalf("one busy port failed the whole apply: %v", err)
	}
	if got, err := ask(web); err != nil || got != "a" {
		t.Fatalf("web: %q, %v", got, err)
	}
	st := status(c)
	if st.Listeners != 1 || !hasProblem(st.Problems, "services/db", "cannot be bound") {
		t.Errorf("listeners %d, problems %v: want web only and db reported", st.Listeners, st.Problems)
	}
	// Failover of an unrelated app, and a new app, still apply.
	if err := c.Apply(ctx, snapshot(map[string]appSpec{"web": {web, []*backend{b}}, "db": {busy, nil}, "other": {other, []*backend{a}}})); err != nil {
		t.Fatal(err)
	}
	askUntil(t, web, "b", 5*time.Second)
	askUntil(t, other, "a", 5*time.Second)
	squat.Close()
	if err := c.Apply(ctx, snapshot(map[string]appSpec{"web": {web, []*backend{b}}, "db": {busy, []*backend{a}}, "other": {other, []*backend{a}}})); err != nil {
		t.Fatal(err)
	}
	askUntil(t, busy, "a", 5*time.Second)

	before := procs(t, c)
	c.Close()
	c2 := newComponent(t, opts)
	if err := c2.Apply(ctx, snapshot(map[string]appSpec{"web": {web, []*backend{b}}, "db": {busy, []*backend{a}}, "other": {other, []*backend{a}}})); err != nil {
		t.Fatal(err)
	}
	if st := status(c2); st.Listeners != 3 || len(st.Problems) != 0 || st.Reloads != 0 {
		t.Errorf("after a meshd restart: %d listeners, problems %v, %d reloads", st.Listeners, st.Problems, st.Reloads)
	}
	if after := procs(t, c2); after.Master.Reloads != before.Master.Reloads {
		t.Error("the restarted component reloaded haproxy")
	}
}

func hasProblem(ps []Problem, app, text string) bool {
	for _, p := range ps {
		if p.App == app && strings.Contains(p.Reason, text) {
			return true
		}
	}
	return false
}

// TestLowPortsRefusedUnlessAllowed: an app publishing a port below 1024
// (22, 53, 80) is refused unless the node allows that port.
func TestLowPortsRefusedUnlessAllowed(t *testing.T) {
	snap := &registry.Snapshot{Apps: map[registry.AppID]*registry.App{}}
	for name, port := range map[string]int{"ssh": 22, "web": 80, "api": 8080} {
		id := registry.AppID{Group: registry.GroupServices, Name: name}
		snap.Apps[id] = &registry.App{ID: id, Meta: &registry.AppMeta{Publish: registry.Publish{Port: port}}}
	}
	p := Params{Consume: []registry.Group{registry.GroupServices}}
	d := Compute(snap, p)
	if len(d.Listeners) != 1 || d.Listeners[0].Port != 8080 || !hasProblem(d.Problems, "services/ssh", "below 1024") || !hasProblem(d.Problems, "services/web", "below 1024") {
		t.Errorf("default: listeners %v, problems %v", d.Listeners, d.Problems)
	}
	p.AllowLowPorts = []int{80}
	d = Compute(snap, p)
	if len(d.Listeners) != 2 || hasProblem(d.Problems, "services/web", "") || !hasProblem(d.Problems, "services/ssh", "below 1024") {
		t.Errorf("80 allowed: listeners %v, problems %v", d.Listeners, d.Problems)
	}
}

// TestProbeTakesNoConnection: probing a port that another HAProxy holds
// (the legacy one on a migrating node: SO_REUSEPORT, listening and
// serving) must not touch its clients. A probe that listened would join
// the port's reuseport group for a moment, be handed some of the
// incoming connections, and reset them when it closed.
func TestProbeTakesNoConnection(t *testing.T) {
	ln := listenReusePort(t, "127.0.0.1:0")
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("x"))
			c.Close()
		}
	}()
	port := ln.Addr().(*net.TCPAddr).Port
	var ok, failed atomic.Int64
	var firstErr atomic.Value
	done := make(chan struct{})
	var wg sync.WaitGroup
	for range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 1)
			for {
				select {
				case <-done:
					return
				default:
				}
				c, err := net.Dial("tcp4", ln.Addr().String())
				if err == nil {
					c.SetReadDeadline(time.Now().Add(10 * time.Second))
					_, err = io.ReadFull(c, buf)
					c.Close()
				}
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err)
				} else {
					ok.Add(1)
				}
			}
		}()
	}
	for i := 0; i < 3000 && failed.Load() == 0; i++ {
		if err := ProbeLoopback(port); err != nil {
			t.Fatalf("probe of a port held with SO_REUSEPORT: %v", err)
		}
	}
	close(done)
	wg.Wait()
	if n := failed.Load(); n != 0 {
		t.Fatalf("%d of %d connections failed while the port was probed, first: %v", n, n+ok.Load(), firstErr.Load())
	}
	if ok.Load() == 0 {
		t.Fatal("no connection got through")
	}
}
