package agent

import (
	"context"
	"encoding/json"
	"time"

	"github.com/meshd/meshd/pkg/backoff"
	"github.com/meshd/meshd/pkg/registry"
)

// compState is the loop's memory of one component.
type compState struct {
	retry   backoff.Backoff // the failures in a row and the delay after each
	next    time.Time       // no retry before this
	lastErr error
}

// applyBackoff is how long the loop waits before it applies a component
// again after failures in a row.
func applyBackoff() backoff.Backoff {
	return backoff.Backoff{Base: 100 * time.Millisecond, Max: 30 * time.Second}
}

// readyGrace is how long the agent waits for a first reconcile before it
// tells systemd it is ready anyway (etcd may be unreachable at boot, and
// the overlay already came up from its cache).
const readyGrace = 15 * time.Second

// statusRefresh is how often the loop rebuilds the status without a
// registry change, so that what ages on its own (handshake buckets, a
// component's health) reaches etcd; it is written only when it changed.
// The refresh has the overlay read its peer summary again unless it is
// younger than overlay.PeerSummaryMaxAge (StatusRefresher), so a peer
// going stale shows within 30 s.
const statusRefresh = 25 * time.Second

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
	for i := range states {
		states[i].retry = applyBackoff()
	}
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
				for _, c := range a.o.Components {
					if r, ok := c.(StatusRefresher); ok {
						r.RefreshStatus()
					}
				}
				a.setStatus(a.buildStatus(lastSnap, applied, states))
			}
			continue
		case <-a.statusPoke:
			if lastSnap != nil {
				a.setStatus(a.buildStatus(lastSnap, applied, states))
			}
			continue
		case <-a.notify:
		case <-retry.C:
		}
		if wait := time.Until(lastPass.Add(a.o.Coalesce)); a.o.Coalesce > 0 && wait > 0 {
			// Within the window after a pass: let the burst gather.
			if backoff.Sleep(ctx, wait) != nil {
				return
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
		if since := a.pendingSince.Swap(0); since != 0 {
			a.metrics.wait.Observe(time.Since(time.Unix(0, since)).Seconds())
		}
		snap := a.store.Snapshot()
		signal(a.flannelChg)
		a.reportProblems(snap, lastProblems)
		graceUntil := a.removalGraceUntil()
		inGrace := false
		if !graceUntil.IsZero() && lastApplied != nil {
			// Back from an outage longer than the lease: every lease,
			// ours and the serving nodes', expired meanwhile. Nodes
			// reconnect within about a second of each other; dropping
			// their instances in between would fail requests to servers
			// that are fine. Keep what was applied until they had time to
			// re-register.
			view := withInstancesInGrace(snap, lastApplied)
			inGrace = view != snap
			snap = view
		} else {
			graceUntil = time.Time{}
		}
		start := time.Now()
		allOK := true
		nextRetry := graceUntil // recompute without the kept instances then
		for i, c := range a.o.Components {
			st := &states[i]
			if start.Before(st.next) {
				allOK = false
				nextRetry = earliest(nextRetry, st.next)
				continue
			}
			applyStart := time.Now()
			err := c.Apply(ctx, snap)
			a.metrics.applyTime.WithLabelValues(c.Name()).Observe(time.Since(applyStart).Seconds())
			if err != nil {
				if ctx.Err() != nil {
					return
				}
				st.lastErr = err
				st.next = time.Now().Add(st.retry.Fail())
				nextRetry = earliest(nextRetry, st.next)
				allOK = false
				a.metrics.reconciles.WithLabelValues(c.Name(), "error").Inc()
				a.metrics.failures.WithLabelValues(c.Name()).Set(float64(st.retry.Failures()))
				a.log.Warn("apply failed, will retry", "part", c.Name(), "rev", snap.Revision, "attempt", st.retry.Failures(), "err", err)
				continue
			}
			if st.retry.Failures() > 0 {
				a.log.Info("apply recovered", "part", c.Name(), "rev", snap.Revision)
			}
			st.retry.Reset()
			st.lastErr, st.next = nil, time.Time{}
			a.metrics.reconciles.WithLabelValues(c.Name(), "ok").Inc()
			a.metrics.failures.WithLabelValues(c.Name()).Set(0)
			a.metrics.lastSuccess.WithLabelValues(c.Name()).Set(float64(time.Now().UnixMilli()) / 1e3)
			if g, ok := c.(Gate); ok && !g.Ready() {
				allOK = false
				nextRetry = earliest(nextRetry, time.Now().Add(gateRetry))
				a.prepare(ctx, snap, a.o.Components[i+1:])
				break // the components after this one depend on it
			}
		}
		a.metrics.duration.Observe(time.Since(start).Seconds())
		a.log.Debug("reconcile pass", "rev", snap.Revision, "members", len(snap.Members), "took", time.Since(start), "ok", allOK)
		if allOK {
			lastApplied = snap
			// A pass that kept removed instances has not applied its
			// revision: --wait and WaitApplied must not report it done.
			if !inGrace {
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

// prepare lets the components a closed Gate holds back do what they can
// meanwhile (Preparer).
func (a *Agent) prepare(ctx context.Context, snap *registry.Snapshot, held []Component) {
	for _, c := range held {
		p, ok := c.(Preparer)
		if !ok {
			continue
		}
		if err := p.Prepare(ctx, snap); err != nil && ctx.Err() == nil {
			a.log.Debug("prepare failed; the apply after the gate does the work", "part", c.Name(), "rev", snap.Revision, "err", err)
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
