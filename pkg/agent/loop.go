package agent

import (
	"context"
	"encoding/json"
	"maps"
	"time"

	"github.com/meshd/meshd/pkg/registry"
)

// compState is the loop's memory of one component.
type compState struct {
	failures int
	next     time.Time // no retry before this
	lastErr  error
}

// readyGrace is how long the agent waits for a first reconcile before it
// tells systemd it is ready anyway (etcd may be unreachable at boot, and
// the overlay already came up from its cache).
const readyGrace = 15 * time.Second

// statusRefresh is how often the loop rebuilds the status without a
// registry change, so that what ages on its own (handshake buckets, a
// component's health) reaches etcd; it is written only when it changed.
const statusRefresh = 30 * time.Second

// loop is the reconcile loop: wait for a change, recompute every
// component from the whole snapshot (one revision), record the result.
//
// Coalescing is leading-edge: a change after a quiet period is applied at
// once. Changes that arrive while a pass runs, or within the Coalesce
// window after it ends, wait for the window to close and are applied
// together by the next pass, so a burst costs one or two passes, not one
// per event, and an isolated change costs no wait at all.
func (a *Agent) loop(ctx context.Context) {
	states := make([]compState, len(a.o.Components))
	var (
		applied      int64
		lastApplied  *registry.Snapshot
		lastSnap     *registry.Snapshot // the snapshot of the last pass
		lastPass     time.Time          // when the last pass ended
		ready        bool
		lastProblems = map[string]string{}
	)
	markReady := func() {
		if !ready {
			ready = true
			if a.o.Ready != nil {
				a.o.Ready()
			}
		}
	}
	heartbeat := time.NewTicker(time.Second)
	defer heartbeat.Stop()
	refresh := time.NewTicker(statusRefresh)
	defer refresh.Stop()
	readyTimer := time.NewTimer(readyGrace)
	defer readyTimer.Stop()
	retry := time.NewTimer(time.Hour)
	retry.Stop()
	defer retry.Stop()
	prefixes := []string{registry.ClusterPrefix}
	if a.o.Secrets {
		prefixes = append(prefixes, registry.SecretsNodePrefix(a.o.Node))
	}
	if a.o.Member != nil {
		// Without the flannel leases a snapshot would drop every
		// flannel peer. flannel's network config is not waited for: it
		// only tunes those peers, and a role from before meshd read it
		// may not grant it.
		prefixes = append(prefixes, registry.FlannelSubnetPrefix)
	}
	for {
		if a.o.Heartbeat != nil {
			a.o.Heartbeat()
		}
		select {
		case <-ctx.Done():
			return
		case <-heartbeat.C:
			continue
		case <-readyTimer.C:
			markReady()
			continue
		case <-refresh.C:
			if lastSnap != nil {
				a.setStatus(a.buildStatus(lastSnap, applied, states))
			}
			continue
		case <-a.notify:
		case <-retry.C:
		}
		if wait := time.Until(lastPass.Add(a.o.Coalesce)); a.o.Coalesce > 0 && wait > 0 {
			// Within the window after a pass: let the burst gather.
			t := time.NewTimer(wait)
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
		select { // this pass's snapshot includes these
		case <-a.notify:
		default:
		}
		listed := true
		for _, p := range prefixes {
			listed = listed && a.store.Listed(p)
		}
		if !listed {
			continue // an empty view would tear the node down
		}
		snap := a.store.Snapshot()
		signal(a.flannelChg)
		a.reportProblems(snap, lastProblems)
		holdUntil := a.holdRemovalsUntil()
		held := false
		if !holdUntil.IsZero() && lastApplied != nil {
			// Back from an outage longer than the lease: every lease,
			// ours and the serving nodes', expired meanwhile. Nodes
			// reconnect within about a second of each other; dropping
			// their instances in between would fail requests to servers
			// that are fine. Keep what was applied until they had time to
			// re-register.
			view := withHeldInstances(snap, lastApplied)
			held = view != snap
			snap = view
		} else {
			holdUntil = time.Time{}
		}
		start := time.Now()
		allOK := true
		nextRetry := holdUntil // recompute without the held instances then
		for i, c := range a.o.Components {
			st := &states[i]
			if start.Before(st.next) {
				allOK = false
				nextRetry = earliest(nextRetry, st.next)
				continue
			}
			if err := c.Apply(ctx, snap); err != nil {
				if ctx.Err() != nil {
					return
				}
				st.failures++
				st.lastErr = err
				st.next = time.Now().Add(min(30*time.Second, 100*time.Millisecond<<min(st.failures-1, 9)))
				nextRetry = earliest(nextRetry, st.next)
				allOK = false
				a.metrics.reconciles.WithLabelValues(c.Name(), "error").Inc()
				a.metrics.failures.WithLabelValues(c.Name()).Set(float64(st.failures))
				a.log.Warn("apply failed, will retry", "part", c.Name(), "rev", snap.Revision, "attempt", st.failures, "err", err)
				continue
			}
			if st.failures > 0 {
				a.log.Info("apply recovered", "part", c.Name(), "rev", snap.Revision)
			}
			st.failures, st.lastErr, st.next = 0, nil, time.Time{}
			a.metrics.reconciles.WithLabelValues(c.Name(), "ok").Inc()
			a.metrics.failures.WithLabelValues(c.Name()).Set(0)
			a.metrics.lastSuccess.WithLabelValues(c.Name()).Set(float64(time.Now().UnixMilli()) / 1e3)
			if g, ok := c.(Gate); ok && !g.Ready() {
				allOK = false
				nextRetry = earliest(nextRetry, time.Now().Add(gateRetry))
				break // the components after this one depend on it
			}
		}
		a.metrics.duration.Observe(time.Since(start).Seconds())
		a.log.Debug("reconcile pass", "rev", snap.Revision, "members", len(snap.Members), "took", time.Since(start), "ok", allOK)
		if allOK {
			lastApplied = snap
			// A pass that kept removed instances has not applied its
			// revision: --wait and WaitApplied must not report it done.
			if !held {
				applied = snap.Revision
				a.metrics.applied.Set(float64(applied))
				a.mu.Lock()
				a.lastApply = time.Now()
				a.mu.Unlock()
			}
		}
		a.metrics.seen.Set(float64(snap.Revision))
		a.metrics.nodes.Set(float64(len(snap.Nodes)))
		if !nextRetry.IsZero() {
			retry.Reset(time.Until(nextRetry))
		}
		a.setStatus(a.buildStatus(snap, applied, states))
		lastSnap, lastPass = snap, time.Now()
		if allOK {
			markReady()
		}
	}
}

func earliest(a, b time.Time) time.Time {
	if a.IsZero() || b.Before(a) {
		return b
	}
	return a
}

func (a *Agent) buildStatus(snap *registry.Snapshot, applied int64, states []compState) registry.Status {
	st := registry.Status{
		Revision:   applied,
		Seen:       snap.Revision,
		Components: map[string]json.RawMessage{},
		Problems:   len(snap.Problems),
	}
	a.mu.Lock()
	if a.stateErr != nil {
		st.Errors = map[string]string{"state": registry.StatusText(a.stateErr.Error())}
	}
	a.mu.Unlock()
	for i, c := range a.o.Components {
		if b, err := json.Marshal(c.Status()); err == nil {
			st.Components[c.Name()] = b
		}
		if err := states[i].lastErr; err != nil {
			if st.Errors == nil {
				st.Errors = map[string]string{}
			}
			st.Errors[c.Name()] = registry.StatusText(err.Error())
		}
	}
	return st
}

func (a *Agent) setStatus(st registry.Status) {
	a.mu.Lock()
	a.status = st
	a.mu.Unlock()
	signal(a.statusChg)
}

// reportProblems logs each invalid key once, when it appears.
func (a *Agent) reportProblems(snap *registry.Snapshot, last map[string]string) {
	now := make(map[string]string, len(snap.Problems))
	for _, p := range snap.Problems {
		now[p.Key] = p.Err
		if last[p.Key] != p.Err {
			a.log.Warn("skipping invalid registry key", "key", registry.Quoted([]byte(p.Key)), "err", p.Err)
		}
	}
	for k := range last {
		if _, ok := now[k]; !ok {
			a.log.Info("registry key no longer invalid", "key", registry.Quoted([]byte(k)))
		}
	}
	clear(last)
	for k, v := range now {
		last[k] = v
	}
	a.metrics.problems.Set(float64(len(snap.Problems)))
	a.metrics.rejectedKeys(snap.Problems)
}

// gateRetry is how soon a pass stopped at a Gate is tried again.
const gateRetry = 100 * time.Millisecond

// removalSettle is how long after (re-)registering the loop keeps
// instances it had applied but no longer sees.
const removalSettle = 2 * time.Second

// holdRemovalsUntil returns when instance removals may be applied again,
// or zero when they may be applied now. Only after this node lost a lease:
// while it has no lease (it is cut off from etcd, its view is stale) and
// for removalSettle after it registers again. A node's first registration
// holds nothing: there is no outage whose skew to ride out, and holding
// would delay every removal just after a start.
func (a *Agent) holdRemovalsUntil() time.Time {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.leaseLost {
		return time.Time{}
	}
	if a.registeredAt.IsZero() {
		return time.Now().Add(removalSettle)
	}
	if until := a.registeredAt.Add(removalSettle); time.Now().Before(until) {
		return until
	}
	return time.Time{}
}

// withHeldInstances returns snap with the instances of prev that snap
// lacks put back, for apps snap still has. It copies only what it changes:
// snapshots are shared and read-only.
func withHeldInstances(snap, prev *registry.Snapshot) *registry.Snapshot {
	var out *registry.Snapshot
	for id, old := range prev.Apps {
		cur, ok := snap.Apps[id]
		if !ok || cur.Meta == nil {
			continue // the app itself was unregistered: nothing to hold
		}
		var missing []registry.Instance
		for node, in := range old.Instances {
			if _, ok := cur.Instances[node]; !ok {
				missing = append(missing, in)
			}
		}
		if len(missing) == 0 {
			continue
		}
		if out == nil {
			c := *snap
			c.Apps = maps.Clone(snap.Apps)
			c.Gen.Apps = 0 // a view of its own: never equal to a store generation
			out = &c
		}
		app := *cur
		app.Instances = maps.Clone(cur.Instances)
		for _, in := range missing {
			app.Instances[in.Node] = in
		}
		out.Apps[id] = &app
	}
	if out == nil {
		return snap
	}
	return out
}
