package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshd/meshd/pkg/overlay"
	"github.com/meshd/meshd/pkg/overlay/desired"
	"github.com/meshd/meshd/pkg/registry"
)

// These tests run the reconcile loop and the status publisher in a
// synctest bubble: time is fake, so they measure waits exactly and can
// idle for minutes in no time. etcd cannot run in a bubble (its network
// I/O is not durable blocking), so the store is fed directly, as the
// Watcher does, and the status goes to a put function instead of a Put on
// the lease (session.go's hold passes the real one).

// pass is one Apply call as a component saw it.
type pass struct {
	at  time.Time
	rev int64
}

// timedComponent records its passes; each Apply takes took (fake time).
// Its status is "young" for the first three minutes of its life and
// "old" after, like a handshake bucket.
type timedComponent struct {
	took time.Duration
	born time.Time

	mu     sync.Mutex
	passes []pass
}

func (c *timedComponent) Name() string { return "timed" }
func (c *timedComponent) Apply(_ context.Context, s *registry.Snapshot) error {
	c.mu.Lock()
	c.passes = append(c.passes, pass{time.Now(), s.Revision})
	c.mu.Unlock()
	time.Sleep(c.took)
	return nil
}
func (c *timedComponent) Status() any {
	if time.Since(c.born) < 3*time.Minute {
		return "young"
	}
	return "old"
}
func (c *timedComponent) got() []pass {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]pass(nil), c.passes...)
}

// loopRig is an agent whose loop (and, with publish, status publisher)
// runs in the current bubble.
type loopRig struct {
	a    *Agent
	c    *timedComponent
	rev  int64
	mu   sync.Mutex
	puts []string
}

func newLoopRig(t *testing.T, took time.Duration, publish bool) *loopRig {
	t.Helper()
	c := &timedComponent{took: took, born: time.Now()}
	return startLoopRig(t, []Component{c}, c, publish)
}

// startLoopRig runs the loop over comps; c is the one the rig reads.
func startLoopRig(t *testing.T, comps []Component, c *timedComponent, publish bool) *loopRig {
	t.Helper()
	a, err := New(Options{Client: &clientv3.Client{}, Node: "node-a", ID: "0123456789abcdef0123456789abcdef",
		LeaseTTL: 10 * time.Second, Coalesce: 5 * time.Millisecond, Components: comps})
	if err != nil {
		t.Fatal(err)
	}
	r := &loopRig{a: a, c: c, rev: 1}
	a.store.Replace(registry.ClusterPrefix, nil, r.rev)
	ctx, cancel := context.WithCancel(t.Context())
	t.Cleanup(cancel)
	go a.loop(ctx)
	if publish {
		go a.publishLoop(ctx, func(_ context.Context, v string) error {
			r.mu.Lock()
			r.puts = append(r.puts, v)
			r.mu.Unlock()
			return nil
		})
	}
	a.kick() // the watcher's first list
	synctest.Wait()
	return r
}

// event puts one instance into the store at the next revision and wakes
// the loop, as the Watcher does for one watch response.
func (r *loopRig) event() {
	r.rev++
	b, _ := json.Marshal(registry.Instance{IPv4: "10.10.1.0", Node: fmt.Sprintf("n%d", r.rev), Port: 8080})
	r.a.store.Put(registry.KV{Key: registry.InstanceKey("backends", "web", fmt.Sprintf("n%d", r.rev)), Value: b}, r.rev)
	r.a.kick()
}

func (r *loopRig) writes() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.puts...)
}

// testGate is a component that holds back the ones after it until opened.
type testGate struct {
	mu   sync.Mutex
	open bool
}

func (g *testGate) Name() string                                    { return "gate" }
func (g *testGate) Apply(context.Context, *registry.Snapshot) error { return nil }
func (g *testGate) Status() any                                     { return nil }
func (g *testGate) Ready() bool                                     { g.mu.Lock(); defer g.mu.Unlock(); return g.open }

// TestGateHoldsLaterComponents: a component behind a closed gate is not
// applied however long the gate stays closed, and the status claims no
// revision meanwhile; once the gate opens, the next try (gateRetry later
// at most) applies it.
func TestGateHoldsLaterComponents(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g, rec := &testGate{}, &timedComponent{born: time.Now()}
		r := startLoopRig(t, []Component{g, rec}, rec, false)
		time.Sleep(time.Minute)
		if p := rec.got(); len(p) != 0 {
			t.Fatalf("component behind a closed gate applied %d times", len(p))
		}
		if st := r.a.Status(); st.Revision != 0 {
			t.Errorf("status revision %d while a gate is closed, want 0 (not applied)", st.Revision)
		}
		g.mu.Lock()
		g.open = true
		g.mu.Unlock()
		opened := time.Now()
		time.Sleep(gateRetry)
		synctest.Wait()
		p := rec.got()
		if len(p) != 1 || p[0].rev != 1 {
			t.Fatalf("passes after the gate opened: %v, want one at revision 1", p)
		}
		if wait := p[0].at.Sub(opened); wait > gateRetry {
			t.Errorf("applied %v after the gate opened, want within gateRetry (%v)", wait, gateRetry)
		}
		if st := r.a.Status(); st.Revision != 1 {
			t.Errorf("status revision %d once the gate opened, want 1", st.Revision)
		}
	})
}

// preparingComponent is a timedComponent that records the revisions it
// was asked to prepare (Preparer).
type preparingComponent struct {
	timedComponent
	prepMu   sync.Mutex
	prepared []int64
}

func (c *preparingComponent) Prepare(_ context.Context, s *registry.Snapshot) error {
	c.prepMu.Lock()
	defer c.prepMu.Unlock()
	c.prepared = append(c.prepared, s.Revision)
	return nil
}

func (c *preparingComponent) preps() []int64 {
	c.prepMu.Lock()
	defer c.prepMu.Unlock()
	return append([]int64(nil), c.prepared...)
}

// TestGateLetsHeldComponentsPrepare: a component a closed gate holds back
// is asked to prepare at the held passes, with their snapshot, and is not
// applied; once the gate opens it is applied and no longer prepared.
func TestGateLetsHeldComponentsPrepare(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := &testGate{}
		rec := &preparingComponent{timedComponent: timedComponent{born: time.Now()}}
		r := startLoopRig(t, []Component{g, rec}, &rec.timedComponent, false)
		if p := rec.preps(); len(p) != 1 || p[0] != 1 {
			t.Fatalf("prepared at %v after the first held pass, want [1]", p)
		}
		// Held passes retry every gateRetry: change between two of them.
		time.Sleep(time.Second + gateRetry/2)
		r.event()
		time.Sleep(10 * time.Millisecond) // the coalesce window at most
		p := rec.preps()
		i := slices.Index(p, 2)
		if i < 1 || slices.ContainsFunc(p[:i], func(r int64) bool { return r != 1 }) || slices.ContainsFunc(p[i:], func(r int64) bool { return r != 2 }) {
			t.Fatalf("prepared at %v after a change while held, want revision 1s then 2", p)
		}
		if p := rec.got(); len(p) != 0 {
			t.Fatalf("held component applied %d times", len(p))
		}
		g.mu.Lock()
		g.open = true
		g.mu.Unlock()
		time.Sleep(gateRetry)
		synctest.Wait()
		n := len(rec.preps())
		if p := rec.got(); len(p) != 1 || p[0].rev != 2 {
			t.Fatalf("passes after the gate opened: %v, want one at revision 2", p)
		}
		r.event()
		synctest.Wait()
		if got := len(rec.preps()); got != n {
			t.Errorf("prepared %d more times with the gate open", got-n)
		}
	})
}

// TestIsolatedEventNoWait: a change after a quiet period is applied at
// once, without waiting for the coalesce window.
func TestIsolatedEventNoWait(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newLoopRig(t, 0, false)
		if p := r.c.got(); len(p) != 1 || p[0].rev != 1 {
			t.Fatalf("first list: passes %v, want one at revision 1", p)
		}
		time.Sleep(time.Second) // quiet
		start := time.Now()
		r.event()
		synctest.Wait()
		p := r.c.got()
		if len(p) != 2 || p[1].rev != 2 {
			t.Fatalf("passes %v, want a second one at revision 2", p)
		}
		if wait := p[1].at.Sub(start); wait != 0 {
			t.Fatalf("an isolated event waited %v before its pass, want none", wait)
		}
	})
}

// TestBurstCoalesced: a burst of 100 events costs one or two passes, the
// last of them at the burst's final revision.
func TestBurstCoalesced(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newLoopRig(t, 0, false)
		time.Sleep(time.Second)
		for range 100 {
			r.event()
		}
		time.Sleep(time.Second)
		p := r.c.got()[1:]
		if len(p) < 1 || len(p) > 2 {
			t.Fatalf("a burst of 100 events cost %d passes, want 1 or 2: %v", len(p), p)
		}
		if last := p[len(p)-1].rev; last != r.rev {
			t.Fatalf("last pass at revision %d, want %d", last, r.rev)
		}
	})
}

// TestEventsDuringPassBatched: events that arrive while a pass runs are
// applied together by one pass, when the window after it has closed.
func TestEventsDuringPassBatched(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newLoopRig(t, 20*time.Millisecond, false)
		time.Sleep(time.Second)
		start := time.Now()
		r.event()
		time.Sleep(10 * time.Millisecond) // the pass is running
		for range 10 {
			r.event()
		}
		time.Sleep(time.Second)
		p := r.c.got()[1:]
		if len(p) != 2 {
			t.Fatalf("%d passes, want 2 (the event, then the batch): %v", len(p), p)
		}
		if p[0].at != start || p[0].rev != 2 {
			t.Errorf("first pass %v, want at once at revision 2", p[0])
		}
		// The pass ends at +20ms; the window after it at +25ms.
		if got := p[1].at.Sub(start); got != 25*time.Millisecond || p[1].rev != r.rev {
			t.Errorf("second pass at +%v revision %d, want +25ms revision %d", got, p[1].rev, r.rev)
		}
	})
}

// TestIdleNodeWritesNoStatus: a node with nothing changing writes no
// status for a minute (the periodic re-evaluation finds it unchanged);
// a status that ages on its own is written once when it changes; a
// registry change is written.
func TestIdleNodeWritesNoStatus(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := newLoopRig(t, 0, true)
		base := len(r.writes())
		if base == 0 {
			t.Fatal("no status written at start")
		}
		var st registry.Status
		if err := json.Unmarshal([]byte(r.writes()[base-1]), &st); err != nil || st.Revision != 1 {
			t.Fatalf("status %s (%v), want revision 1", r.writes()[base-1], err)
		}
		time.Sleep(time.Minute)
		if w := r.writes()[base:]; len(w) != 0 {
			t.Fatalf("an idle node wrote %d statuses in a minute: %q", len(w), w)
		}
		// The component's status ages at 3 minutes: the next periodic
		// re-evaluation (at most statusRefresh later) writes it, once.
		time.Sleep(3*time.Minute + statusRefresh)
		w := r.writes()[base:]
		if len(w) != 1 {
			t.Fatalf("%d writes after the status aged, want 1: %q", len(w), w)
		}
		if err := json.Unmarshal([]byte(w[0]), &st); err != nil || string(st.Components["timed"]) != `"old"` {
			t.Fatalf("aged status %s (%v)", w[0], err)
		}
		r.event()
		synctest.Wait()
		w = r.writes()[base:]
		if len(w) != 2 {
			t.Fatalf("%d writes after a change, want 2", len(w))
		}
		if err := json.Unmarshal([]byte(w[1]), &st); err != nil || st.Revision != r.rev {
			t.Fatalf("status after a change %s (%v), want revision %d", w[1], err, r.rev)
		}
	})
}

// failing is a component whose Apply fails with a long error, as an
// error joined over every peer of a large cluster would be.
type failing struct{}

func (failing) Name() string { return "failing" }
func (failing) Apply(context.Context, *registry.Snapshot) error {
	return errors.New(strings.Repeat("route 10.10.1.0/24: file exists; ", 5000))
}
func (failing) Status() any { return nil }

// TestStatusErrorBounded: a component's error is cut in the status.
func TestStatusErrorBounded(t *testing.T) {
	a, err := New(Options{Client: &clientv3.Client{}, Node: "node-a", ID: "0123456789abcdef0123456789abcdef",
		LeaseTTL: 10 * time.Second, Components: []Component{failing{}}})
	if err != nil {
		t.Fatal(err)
	}
	states := []compState{{lastErr: failing{}.Apply(context.Background(), nil)}}
	st := a.buildStatus(&registry.Snapshot{Revision: 3}, 0, states)
	if got := len(st.Errors["failing"]); got == 0 || got > registry.MaxStatusText+len("…") {
		t.Fatalf("error in status is %d bytes, want at most %d", got, registry.MaxStatusText+len("…"))
	}
}

// peerStatusComponent publishes what the overlay component publishes: the
// overlay status of one peer, its summary read through an overlay.PeerCache
// off an overlay.FakeDevice whose handshake time the test sets.
type peerStatusComponent struct {
	dev  *overlay.FakeDevice
	want desired.State
	pc   overlay.PeerCache
}

func (c *peerStatusComponent) Name() string                                    { return "overlay" }
func (c *peerStatusComponent) Apply(context.Context, *registry.Snapshot) error { return nil }
func (c *peerStatusComponent) RefreshStatus()                                  { c.pc.Refresh(time.Now()) }
func (c *peerStatusComponent) Status() any {
	return overlay.StatusOf("wg0", c.want, 1, c.dev, &c.pc, time.Now())
}

// TestStalePeerShowsWithin30s: with no registry change to carry it, a peer
// whose handshake grows older than overlay.RecentHandshake is in the
// published status within 30 s, in the worst case: a summary read just
// before the peer turned stale (the overlay had changed the device) that
// the next periodic refresh, just under overlay.PeerSummaryMaxAge later,
// reuses. A reconcile pass after that refresh reads no device either: its
// status keeps the last summary, however old.
func TestStalePeerShowsWithin30s(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		key, _ := wgtypes.GeneratePrivateKey()
		peer, _ := wgtypes.GeneratePrivateKey()
		want := desired.State{Peers: []desired.Peer{{Name: "n2", PublicKey: peer.PublicKey().String(),
			AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.10.2.0/24")}}}}
		pc := &peerStatusComponent{dev: overlay.NewFakeDevice(key), want: want}
		if _, err := pc.dev.Set(want); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		timed := &timedComponent{born: start}
		r := startLoopRig(t, []Component{timed, pc}, timed, true)

		// The refresh ticks at start + k*statusRefresh. Pick the tick T
		// after three minutes; a registry change at E, just under the
		// summary's maximum age before T, reads the summary (the overlay
		// changed the device), and the peer turns stale 1 s after E.
		T := start.Add(statusRefresh * time.Duration(1+overlay.RecentHandshake/statusRefresh))
		E := T.Add(-overlay.PeerSummaryMaxAge + 500*time.Millisecond)
		S := E.Add(time.Second)
		pc.dev.Traffic(peer.PublicKey().String(), S.Add(-overlay.RecentHandshake), 0, 0)

		stale := func() bool {
			w := r.writes()
			var st struct {
				Components struct {
					Overlay overlay.Status `json:"overlay"`
				} `json:"components"`
			}
			if err := json.Unmarshal([]byte(w[len(w)-1]), &st); err != nil {
				t.Fatal(err)
			}
			return st.Components.Overlay.Peers.StaleCount > 0
		}
		time.Sleep(time.Until(E))
		pc.pc.Invalidate()
		r.event()
		synctest.Wait()
		if stale() {
			t.Fatal("peer published stale before its handshake aged")
		}
		time.Sleep(time.Until(T.Add(time.Second)))
		n := len(r.writes())
		r.event() // a pass after T: its status reuses the summary read at E, older than its max age
		synctest.Wait()
		if len(r.writes()) != n+1 {
			t.Fatalf("the pass published %d statuses, want 1", len(r.writes())-n)
		}
		if stale() {
			t.Fatal("a reconcile pass read the device for its status")
		}
		time.Sleep(time.Until(S.Add(30 * time.Second)))
		synctest.Wait()
		if !stale() {
			t.Fatalf("peer stale since %v not in the published status 30 s later (refresh %v, summary reused up to %v)",
				S.Sub(start), statusRefresh, overlay.PeerSummaryMaxAge)
		}
	})
}

// notifying is a component whose status changes outside a pass, and says
// so through the function the agent gave it (StatusNotifier).
type notifying struct {
	mu      sync.Mutex
	state   string
	changed func()
}

func (c *notifying) Name() string                                    { return "notifying" }
func (c *notifying) Apply(context.Context, *registry.Snapshot) error { return nil }
func (c *notifying) NotifyStatus(f func())                           { c.changed = f }
func (c *notifying) Status() any {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state
}

// TestStatusNotifierRepublishesAtOnce: a component's status that changes
// between passes is published when the component says so, not at the
// next periodic refresh.
func TestStatusNotifierRepublishesAtOnce(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := &notifying{state: "before"}
		timed := &timedComponent{born: time.Now()}
		r := startLoopRig(t, []Component{timed, n}, timed, true)
		if n.changed == nil {
			t.Fatal("the agent did not hand the component a notify function")
		}
		last := func() string { w := r.writes(); return w[len(w)-1] }
		if !strings.Contains(last(), `"before"`) {
			t.Fatalf("first status %s", last())
		}
		time.Sleep(time.Second) // no pass, no refresh: statusRefresh is 25 s
		n.mu.Lock()
		n.state = "after"
		n.mu.Unlock()
		n.changed()
		synctest.Wait()
		if !strings.Contains(last(), `"after"`) {
			t.Errorf("status after the notification: %s", last())
		}
	})
}
