package e2e

import (
	"runtime"
	"sync/atomic"
	"testing"
	"time"
)

// reconvergeBound is how soon after etcd's return every node must have
// applied a change made while it was away, on a loaded two-core machine
// (startHog adds one busy core on top of whatever else runs). With every
// retry towards etcd capped at 250 ms and CutEtcd restoring the hub's side
// first, seven runs on a two-core machine shared with other test runs
// measured 0.05-0.7 s for nodes that only re-register and 0.3-1.1 s for a
// consumer that must reload HAProxy for the changed app (haproxy -c, then
// the master's re-exec and a new worker).
const reconvergeBound = 1500 * time.Millisecond

// startHog keeps one core busy (a spinning goroutine on its own thread)
// until the returned stop is called or limit has passed, whichever comes
// first: the re-convergence bound must hold on a loaded machine, not
// only on a quiet one.
func startHog(t *testing.T, limit time.Duration) (stop func()) {
	var done atomic.Bool
	exited := make(chan struct{})
	deadline := time.Now().Add(limit)
	go func() {
		defer close(exited)
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		x := uint64(1)
		for !done.Load() && time.Now().Before(deadline) {
			for range 1 << 16 {
				x = x*6364136223846793005 + 1442695040888963407
			}
		}
		_ = x
	}()
	stop = func() {
		done.Store(true)
		<-exited
	}
	t.Cleanup(stop)
	t.Logf("CPU hog: one core busy for at most %v", limit)
	return stop
}
