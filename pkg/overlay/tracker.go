package overlay

import (
	"errors"
	"slices"
	"sync"

	"github.com/meshd/meshd/pkg/overlay/desired"
	"github.com/meshd/meshd/pkg/registry"
)

// tracker is the desired-state tracker: it turns registry snapshots into
// the target state (desired.Computer, pure) and keeps the bookkeeping of
// which target is the newest and whether it is applied. It touches
// neither the kernel nor the disk.
type tracker struct {
	// computer is desired.Compute with memory: a change of k members costs
	// O(k log N) plus one cheap pass, not a full recomputation. cmu
	// serialises it (the agent calls Apply from one goroutine; cmu keeps
	// that an implementation detail).
	cmu      sync.Mutex
	computer *desired.Computer

	mu       sync.Mutex
	target   *desired.State // newest desired state (applied or being retried)
	gen      uint64         // bumped whenever target is replaced
	applied  bool           // target is fully applied
	revision int64          // snapshot revision of target
	lastErr  error          // of the last compute, apply or repair
	waiting  bool           // no member record for Self yet
	// gens are the snapshot generations target was computed from. The
	// overlay reads members and flannel's leases and config, nothing
	// else, so unchanged generations with target applied mean there is
	// nothing to do (an app or status change costs the overlay nothing,
	// however large the cluster). Both parts count: one txn that deletes
	// a node's member record and its flannel lease reaches the store
	// through two watches, so the lease's deletion can come in a pass of
	// its own.
	gens     InputGens
	problems []desired.Problem
}

// upToDate reports whether snap changes nothing the overlay reads while
// the target is applied; it then only notes snap's revision.
func (t *tracker) upToDate(snap *registry.Snapshot) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	if g := InputsOf(snap); g.Members != 0 && g == t.gens && t.applied && t.lastErr == nil {
		t.revision = snap.Revision
		return true
	}
	return false
}

// InputGens are the generations of the snapshot parts the overlay's
// desired state is computed from: equal InputGens, equal input.
type InputGens struct{ Members, Flannel uint64 }

// InputsOf returns snap's InputGens.
func InputsOf(snap *registry.Snapshot) InputGens {
	return InputGens{Members: snap.Gen.Members, Flannel: snap.Gen.Flannel}
}

// compute makes the state computed from snap the target and returns it
// with its generation. ok is false while the node has no member record
// (the target stays as it was). newProblems says whether the skipped
// members differ from the previous computation's (worth logging).
// unchanged says that the previous target is applied and st would change
// nothing on the device (desired.Unchanged): a change of something the
// overlay reads that leaves its result alone (a node's flannel lease next
// to its member record, a skipped member's record).
func (t *tracker) compute(snap *registry.Snapshot) (st desired.State, gen uint64, newProblems, unchanged, ok bool, err error) {
	t.cmu.Lock()
	st, err = t.computer.Compute(snap)
	t.cmu.Unlock()
	t.mu.Lock()
	defer t.mu.Unlock()
	t.gens = InputsOf(snap)
	if errors.Is(err, desired.ErrNoSelf) {
		t.waiting = true
		return desired.State{}, 0, false, false, false, nil
	}
	if err != nil {
		t.lastErr = err
		return desired.State{}, 0, false, false, false, err
	}
	newProblems = !slices.Equal(st.Problems, t.problems)
	unchanged = t.target != nil && t.applied && t.lastErr == nil && !t.waiting && desired.Unchanged(*t.target, st)
	t.waiting, t.problems = false, st.Problems
	t.gen++
	t.target, t.revision = &st, snap.Revision
	return st, t.gen, newProblems, unchanged, true, nil
}

// adopt makes st (read from the boot cache) the target unless the
// registry already gave one (ok false: the registry wins).
func (t *tracker) adopt(st desired.State, revision int64) (gen uint64, ok bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.target != nil {
		return 0, false
	}
	t.gen++
	t.target, t.revision = &st, revision
	return t.gen, true
}

// newest returns the target and its generation (nil: none yet).
func (t *tracker) newest() (*desired.State, uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.target, t.gen
}

// record notes the outcome of applying generation gen. current says
// whether gen is still the newest target; revision is the target's.
func (t *tracker) record(gen uint64, err error) (current bool, revision int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	current = gen == t.gen
	t.lastErr = err
	if current {
		t.applied = err == nil
	}
	return current, t.revision
}

// drop forgets the target (the interface was destroyed).
func (t *tracker) drop() {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.target = nil
	t.gen++
}

// ready reports whether there is a target for this node.
func (t *tracker) ready() bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.target != nil && !t.waiting
}

// trackerView is a copy of the tracker's state for the status.
type trackerView struct {
	target   *desired.State
	revision int64
	applied  bool
	waiting  bool
	problems []desired.Problem
	lastErr  error
}

func (t *tracker) view() trackerView {
	t.mu.Lock()
	defer t.mu.Unlock()
	return trackerView{target: t.target, revision: t.revision, applied: t.applied, waiting: t.waiting, problems: t.problems, lastErr: t.lastErr}
}
