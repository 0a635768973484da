package agent

import (
	"cmp"
	"maps"
	"time"

	"github.com/meshd/meshd/pkg/registry"
)

// DefaultRemovalGrace is how long after (re-)registering the loop keeps
// instances it had applied but no longer sees, unless
// Options.RemovalGrace says otherwise. (Not to be confused with keeping
// the lease: session.go's hold.)
const DefaultRemovalGrace = 2 * time.Second

// removalGraceUntil returns when the removal grace ends and instance
// removals may be applied again, or zero when they may be applied now.
// There is a grace only after this node lost a lease: while it has no
// lease (it is cut off from etcd, its view is stale) and for the removal
// grace after it registers again. A node's first registration
// has no grace: there is no outage whose skew to ride out, and a grace
// would delay every removal just after a start.
func (a *Agent) removalGraceUntil() time.Time {
	grace := cmp.Or(a.o.RemovalGrace, DefaultRemovalGrace)
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.leaseLost {
		return time.Time{}
	}
	if a.registeredAt.IsZero() {
		return time.Now().Add(grace)
	}
	if until := a.registeredAt.Add(grace); time.Now().Before(until) {
		return until
	}
	return time.Time{}
}

// withInstancesInGrace returns snap with the instances of prev that snap
// lacks put back, for apps snap still has. It copies only what it changes:
// snapshots are shared and read-only.
func withInstancesInGrace(snap, prev *registry.Snapshot) *registry.Snapshot {
	var out *registry.Snapshot
	for id, old := range prev.Apps {
		cur, ok := snap.Apps[id]
		if !ok || cur.Meta == nil {
			continue // the app itself was unregistered: nothing to keep
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
