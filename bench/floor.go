package bench

import (
	"context"
	"fmt"
	"strconv"
	"sync"
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
	for _, c := range clients {
		ready.Add(1)
		go func() {
			wch := c.Watch(clientv3.WithRequireLeader(wctx), o.Prefix, clientv3.WithPrefix(), clientv3.WithCreatedNotify())
			created := false
			for wr := range wch {
				now := time.Now()
				if wr.Created && !created {
					created = true
					ready.Done()
					continue
				}
				for _, ev := range wr.Events {
					got <- delivery{ev.Kv.ModRevision, now}
				}
			}
		}()
	}
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
