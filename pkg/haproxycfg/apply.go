package haproxycfg

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"time"

	"github.com/meshd/meshd/pkg/atomicfile"
)

// ErrRejected is returned (wrapped) when `haproxy -c` rejects a rendered
// configuration. The file is kept at RejectedPath and HAProxy keeps
// running the previous one.
var ErrRejected = errors.New("haproxy rejected the rendered configuration")

// ErrMasterDown is returned (wrapped) when no HAProxy master answers and
// meshd does not supervise one.
var ErrMasterDown = errors.New("haproxy master not reachable")

// Counters is what the Applier has done since it was created.
type Counters struct {
	Reloads            int64 `json:"reloads"`
	ReloadFailures     int64 `json:"reloadFailures"`
	RuntimeUpdates     int64 `json:"runtimeUpdates"`
	ValidationFailures int64 `json:"validationFailures"`
}

// Hooks lets the component count events into its metrics.
type Hooks struct {
	Reload            func(ok bool)
	RuntimeUpdate     func(slots int)
	ValidationFailure func()
}

// Applier owns the rendered file at ConfigPath and makes the running
// HAProxy match a Desired: nothing when the hash is unchanged, the runtime
// API when only slot occupants change, validate-then-reload otherwise.
type Applier struct {
	ConfigPath string
	Binary     string
	Master     Master
	Runtime    Runtime
	// Supervisor starts the master when none runs; nil when a service
	// manager (systemd) runs HAProxy.
	Supervisor *Supervisor
	Log        *slog.Logger
	Hooks      Hooks

	setMu sync.Mutex // serializes Set
	// Fields below are written under setMu and mu, read under mu.
	mu           sync.Mutex
	appliedHash  string  // Hash of the Desired HAProxy runs
	applied      Desired // that Desired, for Verify
	structure    string  // StructureHash of the config HAProxy runs
	lastGood     []byte  // the file content HAProxy runs
	rejectedHash string
	rejectedErr  error
	lastErr      error
	counters     Counters

	// view is the current worker's slots as this Applier's last runtime
	// update left them, so that the next update can skip reading them;
	// nil after a reload, a failure or Verify: the next pass reads them.
	// Under setMu.
	view *slotView
}

// slotView is what one worker runs: its pid and its slots.
type slotView struct {
	pid  int
	live Live
}

// RejectedPath is where a configuration haproxy -c refused is kept.
func (a *Applier) RejectedPath() string { return a.ConfigPath + ".rejected" }

// Set makes HAProxy run d. It is safe to call again with the same value.
func (a *Applier) Set(ctx context.Context, d Desired) error {
	a.setMu.Lock()
	defer a.setMu.Unlock()
	err := a.set(ctx, d)
	a.mu.Lock()
	a.lastErr = err
	a.mu.Unlock()
	return err
}

// Verify compares the running HAProxy with what was last applied and
// puts back what differs: slots someone changed on the stats socket, a
// master the supervisor restarted from an older file, a reload of
// another file. It changes nothing (and writes nothing) when HAProxy runs
// what meshd applied; corrected reports whether it changed anything.
// Set skips a Desired equal to the applied one, so without Verify such a
// difference would last until the next registry change.
func (a *Applier) Verify(ctx context.Context) (corrected bool, err error) {
	a.setMu.Lock()
	defer a.setMu.Unlock()
	a.mu.Lock()
	d, h, before := a.applied, a.appliedHash, a.counters
	a.mu.Unlock()
	a.view = nil // compare with what the worker says, not with the memory of it
	if h == "" {
		return false, nil // nothing applied yet: the next Set does it all
	}
	if _, err := a.Master.Procs(ctx); err != nil {
		// No master answers: the supervisor (or the service manager)
		// starts it again, and the next Set reports what is wrong.
		return false, nil
	}
	err = a.setRetrying(ctx, d, h)
	a.mu.Lock()
	after := a.counters
	a.mu.Unlock()
	return after.RuntimeUpdates != before.RuntimeUpdates || after.Reloads != before.Reloads, err
}

func (a *Applier) set(ctx context.Context, d Desired) error {
	h := Hash(d)
	a.mu.Lock()
	applied, rejected, rejectedErr := a.appliedHash, a.rejectedHash, a.rejectedErr
	a.mu.Unlock()
	if h == applied {
		return nil
	}
	if h == rejected {
		return rejectedErr // validating the same bytes again cannot help
	}
	return a.setRetrying(ctx, d, h)
}

// setRetrying is setOnce, repeated while the stats socket answers from
// another worker than the current one (ErrNotCurrentWorker): right after
// a reload the old worker may still answer until the master stops it, so
// the slots are read again, from the current worker, rather than HAProxy
// reloaded again.
func (a *Applier) setRetrying(ctx context.Context, d Desired, h string) error {
	deadline := time.Now().Add(notCurrentWait)
	for {
		err := a.setOnce(ctx, d, h)
		if !errors.Is(err, ErrNotCurrentWorker) || time.Now().After(deadline) {
			return err
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(notCurrentRetry):
		}
	}
}

// How long a pass reads the slots again while the stats socket answers
// from another worker than the current one, and how often.
const (
	notCurrentWait  = 2 * time.Second
	notCurrentRetry = 10 * time.Millisecond
)

// setOnce is one attempt of set. When the last pass left the slots known
// (a.view) and the structure is the same, it changes them from that
// memory (setFromView); otherwise, or when that fails, it reads the
// master's workers and the current worker's slots, then changes the
// slots at runtime or reloads.
func (a *Applier) setOnce(ctx context.Context, d Desired, h string) error {
	if v := a.view; v != nil {
		a.view = nil // kept only by a pass that works
		if StructureHash(d) == a.structure {
			err := a.setFromView(ctx, d, h, v)
			if err == nil {
				return nil
			}
			a.Log.Debug("runtime update from the known slots did not hold; reading them", "err", err)
		}
	}
	procs, procErr := a.Master.ProcsWait(ctx, time.Second)
	running := procErr == nil
	if running && a.Supervisor != nil {
		a.Supervisor.observe(procs.Master.PID)
	}
	if running && a.structure == "" {
		a.adoptFile() // meshd restarted: HAProxy runs what the file says
	}

	placed := d
	var live Live
	var workerPID int
	var liveErr error = errors.New("haproxy not running")
	if running {
		workerPID, live, liveErr = a.Runtime.State(ctx)
		if liveErr == nil {
			// The slots of any other worker than the current one are not
			// what the next connection is served by: even "nothing to
			// change" would be a wrong answer.
			if cur, ok := procs.Current(); !ok || cur.PID != workerPID {
				return fmt.Errorf("%w: worker %d answered, the current worker is %d", ErrNotCurrentWorker, workerPID, cur.PID)
			}
			placed = Place(d, live)
		}
	}
	if running && liveErr == nil && StructureHash(d) == a.structure {
		if changes, ok := Diff(placed, live); ok {
			err := a.Runtime.Apply(ctx, workerPID, changes)
			if err == nil {
				return a.ranRuntime(d, h, placed, changes, workerPID)
			}
			if errors.Is(err, ErrNotCurrentWorker) {
				return err
			}
			a.Log.Warn("runtime update failed; reloading instead", "err", err)
		}
	}
	return a.reload(ctx, d, placed, h, running)
}

// setFromView changes the slots from the view the last pass left, over
// one connection to the worker instead of three (master, slots, changes):
// the worker's own answer (Runtime.Apply) says whether it is still the
// process the view is of, and the master, asked at the same time, says
// whether that process is still its current worker. Right after a reload
// someone else started, the old worker may take the changes while the new
// one runs the file: then the master names another worker and the caller
// reads the slots again and applies them there.
func (a *Applier) setFromView(ctx context.Context, d Desired, h string, v *slotView) error {
	placed := Place(d, v.live)
	changes, ok := Diff(placed, v.live)
	if !ok {
		return errors.New("the known slots do not fit the desired backends")
	}
	if len(changes) == 0 {
		return a.ranRuntime(d, h, placed, nil, v.pid)
	}
	type answer struct {
		procs Procs
		err   error
	}
	master := make(chan answer, 1)
	go func() {
		p, err := a.Master.Procs(ctx)
		master <- answer{p, err}
	}()
	err := a.Runtime.Apply(ctx, v.pid, changes)
	m := <-master
	if err != nil {
		return err
	}
	if m.err != nil {
		return m.err
	}
	if cur, ok := m.procs.Current(); !ok || cur.PID != v.pid {
		return fmt.Errorf("%w: the changes went to worker %d, the current worker is %d", ErrNotCurrentWorker, v.pid, cur.PID)
	}
	return a.ranRuntime(d, h, placed, changes, v.pid)
}

// ranRuntime records that worker pid runs placed after the slot changes
// (none, if HAProxy already did), and rewrites the file so that the next
// reload starts from the same servers.
func (a *Applier) ranRuntime(d Desired, h string, placed Desired, changes []SlotChange, pid int) error {
	if len(changes) > 0 {
		a.Log.Info("applied instance changes at runtime", "slots", len(changes))
	}
	content := Render(placed)
	if !bytes.Equal(content, a.lastGood) {
		// Not flushed to disk: HAProxy runs these servers already, the file
		// only has to be whole for the next reload, and after a crash of
		// the machine HAProxy is not running and reload writes the file
		// again, flushed, before it starts the master.
		if err := atomicfile.Replace(a.ConfigPath, content, 0o644); err != nil {
			return fmt.Errorf("rewrite config: %w", err)
		}
		a.lastGood = content
	}
	a.mu.Lock()
	if len(changes) > 0 {
		a.counters.RuntimeUpdates++
	}
	a.appliedHash, a.applied, a.rejectedHash, a.rejectedErr = h, d, "", nil
	a.mu.Unlock()
	if len(changes) > 0 && a.Hooks.RuntimeUpdate != nil {
		a.Hooks.RuntimeUpdate(len(changes))
	}
	a.view = &slotView{pid: pid, live: liveOf(placed)}
	return nil
}

// liveOf is the slot occupancy a worker reports once it runs placed.
func liveOf(placed Desired) Live {
	live := make(Live, len(placed.Listeners))
	for _, l := range placed.Listeners {
		addrs := make([]netip.AddrPort, len(l.Slots))
		for i, s := range l.Slots {
			addrs[i] = s.Addr
		}
		live[BackendName(l.App)] = addrs
	}
	return live
}

// reload validates the new file, puts it in place and reloads (or starts)
// the master. On any failure the file HAProxy runs is put back.
func (a *Applier) reload(ctx context.Context, d, placed Desired, h string, running bool) error {
	content := Render(placed)
	tmp, err := atomicfile.Create(a.ConfigPath, content, 0o644)
	if err != nil {
		return err
	}
	start := time.Now()
	if err := a.validate(ctx, tmp.Name()); err != nil {
		if rerr := tmp.CommitTo(a.RejectedPath()); rerr != nil {
			a.Log.Error("keep rejected config", "err", rerr)
		}
		err = fmt.Errorf("%w (kept at %s): %v", ErrRejected, a.RejectedPath(), err)
		a.mu.Lock()
		a.rejectedHash, a.rejectedErr = h, err
		a.counters.ValidationFailures++
		a.mu.Unlock()
		if a.Hooks.ValidationFailure != nil {
			a.Hooks.ValidationFailure()
		}
		a.Log.Error("rendered config rejected; haproxy keeps the running one", "hash", h[:12], "path", a.RejectedPath(), "err", err)
		return err
	}
	if err := tmp.Commit(); err != nil {
		return err
	}
	validated := time.Now()
	if !running && a.Supervisor == nil {
		// The service manager starts HAProxy from this file once it exists
		// (and restarts it); the next Set adopts it.
		a.lastGood = content
		return fmt.Errorf("%w: config written to %s, but no master answers on %s (is the haproxy unit running?)",
			ErrMasterDown, a.ConfigPath, a.Master.Socket)
	}
	if !running {
		// Start the master on the new file; if one appeared meanwhile
		// (adopted), it still runs an older file and needs the reload.
		var started bool
		if started, err = a.Supervisor.Ensure(ctx); err == nil && !started {
			running = true
		}
	}
	if running {
		_, err = a.Master.Reload(ctx)
	}
	a.mu.Lock()
	if err == nil {
		a.counters.Reloads++
	} else {
		a.counters.ReloadFailures++
	}
	a.mu.Unlock()
	if a.Hooks.Reload != nil {
		a.Hooks.Reload(err == nil)
	}
	if err != nil {
		if a.lastGood != nil {
			if rerr := atomicfile.WriteFile(a.ConfigPath, a.lastGood, 0o644); rerr != nil {
				a.Log.Error("restore previous config", "err", rerr)
			}
		}
		if a.Supervisor != nil && errors.Is(err, ErrReloadFailed) {
			return fmt.Errorf("reload: %w (haproxy log: %s)", err, a.Supervisor.logTail())
		}
		return fmt.Errorf("reload: %w (see the haproxy unit's journal)", err)
	}
	a.Log.Info("reloaded haproxy", "hash", h[:12], "listeners", len(d.Listeners),
		"validate", validated.Sub(start).Round(time.Millisecond), "reload", time.Since(validated).Round(time.Millisecond))
	a.mu.Lock()
	a.appliedHash, a.applied, a.structure, a.lastGood = h, d, StructureHash(d), content
	a.rejectedHash, a.rejectedErr = "", nil // the operator fixed it
	a.mu.Unlock()
	return nil
}

// validate runs `haproxy -c -f path`. Exit status 2 ("no error but will
// not start: no listener") is accepted: an empty mesh still runs its
// stats socket in master-worker mode.
func (a *Applier) validate(ctx context.Context, path string) error {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, a.Binary, "-c", "-f", path).CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) && ee.ExitCode() == 2 && bytes.Contains(out, []byte("has no error")) {
		return nil
	}
	if err != nil {
		msg := strings.TrimSpace(string(out))
		if len(msg) > 2000 {
			msg = msg[:2000] + "…"
		}
		return fmt.Errorf("%s -c: %w: %s", a.Binary, err, msg)
	}
	return nil
}

// adoptFile takes the structure of the file on disk as what HAProxy runs.
func (a *Applier) adoptFile() {
	b, err := os.ReadFile(a.ConfigPath)
	if err != nil {
		return
	}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for i := 0; i < 3 && sc.Scan(); i++ {
		if s, ok := strings.CutPrefix(sc.Text(), "# structure "); ok {
			a.mu.Lock()
			a.structure, a.lastGood = strings.TrimSpace(s), b
			a.mu.Unlock()
			return
		}
	}
}

// AppliedHash returns the Hash of the configuration HAProxy runs.
func (a *Applier) AppliedHash() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.appliedHash
}

// Counters returns what the applier has done so far.
func (a *Applier) Counters() Counters {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.counters
}

// LastError returns the error of the last Set, nil if it succeeded.
func (a *Applier) LastError() error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.lastErr
}

// Rejected returns the hash and error of the last rejected configuration.
func (a *Applier) Rejected() (hash string, err error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.rejectedHash, a.rejectedErr
}
