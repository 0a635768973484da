package agent

import (
	"context"
	"time"

	"github.com/meshd/meshd/pkg/registry"
)

// Component is one part of the node that follows the registry: the
// overlay, HAProxy, the credentials. The reconcile loop hands every
// component each new snapshot; a component computes its desired state from
// it (purely) and makes the system match (idempotently).
type Component interface {
	// Name is a short stable identifier ("overlay", "haproxy", "creds"),
	// used in logs, metrics and the node's status.
	Name() string
	// Apply makes the system match the state computed from snap. It must be
	// safe to call again with the same snapshot, and must do nothing when
	// nothing changed. An error makes the loop retry with backoff; a
	// problem that retrying cannot fix (an invalid key) is reported through
	// Status instead.
	Apply(ctx context.Context, snap *registry.Snapshot) error
	// Status returns a JSON-encodable summary of what is applied, published
	// in the node's status for meshctl.
	Status() any
}

// Runner is implemented by a component with long-running parts (the
// overlay's route repairer, the HAProxy supervisor). The agent runs Run in
// its errgroup next to the loop, so start, stop and errors have one owner:
// Run must return when ctx ends (nil then); an error it returns before
// stops the agent. The component's Close is called after Run returned.
type Runner interface {
	Run(ctx context.Context) error
}

// StatusNotifier is implemented by a component whose status can change
// outside a pass (a write it finished in the background): New hands it a
// function to call then, and the loop rebuilds the node's status at once
// instead of at its next refresh.
type StatusNotifier interface {
	NotifyStatus(changed func())
}

// StatusRefresher is implemented by a component whose status reuses what
// it read of the system: the overlay's peer summary, whose device read is
// O(peers). The loop's periodic status refresh calls RefreshStatus before
// it builds the status, so that what ages on its own is read again there;
// the status built after a reconcile pass reuses the last reading, so a
// registry change costs no such read.
type StatusRefresher interface {
	RefreshStatus()
}

// ClaimPreparer is implemented by a component with work to do before the
// node first claims its member record: the overlay configures its device
// and peers, so that the nodes that add the new node reach a device that
// knows them; HAProxy starts (Preparer), so that its start does not
// compete with theirs. The agent claims once every such component's
// channel is closed (they close it after their first Apply or Prepare,
// whatever its outcome), or after ClaimPrepareTimeout (or half the lease
// TTL, if shorter).
type ClaimPreparer interface {
	PreparedForClaim() <-chan struct{}
}

// Preparer is implemented by a component with work it can do while a
// Gate before it holds it back: HAProxy starts its master with every
// server slot empty while the overlay of a new node is not ready, so that
// its first apply after the gate opens changes servers at runtime instead
// of validating a configuration and starting HAProxy. Prepare must not
// take away anything that runs; the agent calls it at every pass the gate
// holds, and logs its error only at debug level (the apply after the gate
// does the work then).
type Preparer interface {
	Prepare(ctx context.Context, snap *registry.Snapshot) error
}

// ClaimPrepareTimeout bounds the wait for ClaimPreparers: a component
// that cannot get ready must not keep the node from joining.
const ClaimPrepareTimeout = 5 * time.Second

// Gate is implemented by a component that the components after it depend
// on: while Ready is false after an Apply, the rest of the pass waits (and
// is retried shortly). The overlay is one: HAProxy health checks sent
// before the node has its WireGuard routes would fail and mark healthy
// servers down for seconds.
type Gate interface {
	Ready() bool
}
