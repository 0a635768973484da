// Package backoff is the one exponential retry delay that meshd's retry
// loops share (the agent's reconcile loop and registration, the registry's
// watcher): each has its own base and cap, and the same doubling. The
// same doubling bounds attempts that can run out of time (Next): the
// registry's list and the agent's registration.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Backoff counts consecutive failures and says how long to wait after the
// latest one: Base after the first, doubled after each further one, never
// more than Max (no Max: always Base). With Jitter the wait is a uniformly random point between
// half of that and all of it, so that nodes which failed together do not
// retry together. The zero failure count is the state after a success.
type Backoff struct {
	Base   time.Duration
	Max    time.Duration
	Jitter bool

	failures int
}

// Delay is the wait after n consecutive failures (n ≥ 1), before jitter.
func (b *Backoff) Delay(n int) time.Duration {
	if b.Base <= 0 || n < 1 {
		return 0
	}
	limit := b.Max
	if limit <= 0 {
		limit = b.Base
	}
	d := b.Base
	for i := 1; i < n && d < limit; i++ {
		d *= 2
	}
	return min(d, limit)
}

// Fail records one more failure and returns how long to wait before the
// next attempt.
func (b *Backoff) Fail() time.Duration {
	b.failures++
	d := b.Delay(b.failures)
	if b.Jitter && d > 0 {
		d = d/2 + rand.N(d/2+1)
	}
	return d
}

// Wait records one more failure and sleeps for its delay, or until ctx
// ends.
func (b *Backoff) Wait(ctx context.Context) { Sleep(ctx, b.Fail()) }

// Sleep waits d, or until ctx ends: then it returns ctx's error.
func Sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// Next is the delay the next failure would return, before jitter. A
// loop whose attempts can run out of time uses it as the attempt's bound:
// Fail after an attempt that timed out, Reset after one that succeeded,
// so the bound doubles from Base up to Max and starts over.
func (b *Backoff) Next() time.Duration { return b.Delay(b.failures + 1) }

// Reset forgets the failures after a success.
func (b *Backoff) Reset() { b.failures = 0 }

// Failures is the number of consecutive failures recorded.
func (b *Backoff) Failures() int { return b.failures }
