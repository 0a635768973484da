package bench

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// FloorOptions configures the physical floor: one etcd, N watchers doing
// no work, the same change as the scale benchmark.
type FloorOptions struct {
	// NewClient returns a client of the etcd under test (one per watcher,
	// like one per meshd).
	NewClient func() (*clientv3.Client, error)
	// Control, if set, is the writer's client (etcd itself, when the
	// watchers go through a proxy); nil: the first watcher's client.
	Control func() (*clientv3.Client, error)
	N       int
	Trials  int
	// Label is added to the series name (" via grpc-proxy").
	Label string
	// Prefix is where the trial keys go (default "/cluster/backends/floor/").
	Prefix string
	// Note, if set, receives what a reader of the result should know
	// (watch streams that ended and were resumed).
	Note func(format string, a ...any)
}

// Floor measures how long etcd takes to deliver one put to N watchers of
// a prefix, each in its own client: the time below which no etcd-driven
// system can converge on this machine. Each sample is the slowest
// watcher's delivery time for one put, measured from just before the put.
func Floor(ctx context.Context, o FloorOptions) (Series, error) {
	if o.Prefix == "" {
		o.Prefix = "/cluster/backends/floor/"
	}
	s := Series{Name: fmt.Sprintf("etcd watch floor N=%d%s", o.N, o.Label)}
	clients := make([]*clientv3.Client, 0, o.N)
	defer func() {
		for _, c := range clients {
			c.Close()
		}
	}()
	for range o.N {
		c, err := o.NewClient()
		if err != nil {
			return s, err
		}
		clients = append(clients, c)
	}
	writer := clients[0]
	if o.Control != nil {
		c, err := o.Control()
		if err != nil {
			return s, err
		}
		defer c.Close()
		writer = c
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type delivery struct {
		rev int64
		at  time.Time
	}
	got := make(chan delivery, o.N*4)
	var ready sync.WaitGroup
	var resumes atomic.Int64
	for _, c := range clients {
		ready.Add(1)
		go func() {
			created := false
			watchResuming(wctx, c, o.Prefix, true, func(wr clientv3.WatchResponse) {
				now := time.Now()
				if wr.Created && !created {
					created = true
					ready.Done()
					return
				}
				for _, ev := range wr.Events {
					select {
					case got <- delivery{ev.Kv.ModRevision, now}:
					case <-wctx.Done():
					}
				}
			}, func() { resumes.Add(1) })
		}()
	}
	defer func() {
		if n := resumes.Load(); n > 0 && o.Note != nil {
			o.Note("%s: %d watch streams ended and were resumed from their next revision (as meshd resumes; their deliveries count late)", s.Name, n)
		}
	}()
	// Bounded: a watcher whose creation is never confirmed (seen through
	// etcd's gRPC proxy at N=10,000) must end this scenario, not the run.
	rctx, rcancel := context.WithTimeout(ctx, 2*time.Minute+time.Duration(o.N)*10*time.Millisecond)
	err := waitGroup(rctx, &ready)
	rcancel()
	if err != nil {
		return s, fmt.Errorf("watchers did not register: %w", err)
	}
	for i := range o.Trials {
		start := time.Now()
		resp, err := writer.Put(ctx, o.Prefix+strconv.Itoa(i), strconv.Itoa(i))
		if err != nil {
			return s, err
		}
		var slowest time.Duration
		for n := 0; n < o.N; {
			select {
			case d := <-got:
				if d.rev == resp.Header.Revision {
					slowest = max(slowest, d.at.Sub(start))
					n++
				}
			case <-ctx.Done():
				return s, ctx.Err()
			}
		}
		s.Add(slowest)
	}
	_, err = writer.Delete(ctx, o.Prefix, clientv3.WithPrefix())
	return s, err
}

// waitGroup waits for wg or ctx.
func waitGroup(ctx context.Context, wg *sync.WaitGroup) error {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
