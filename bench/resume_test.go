package bench

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/etcdtest"
)

// fakeEndingWatcher passes a real client's watches through, but ends the
// first stream after `after` events the way a client sees etcd's gRPC
// proxy cancel its stream: one last response carrying an error
// (Canceled), then a closed channel, while the client stays connected.
type fakeEndingWatcher struct {
	clientv3.Watcher
	after int
	mu    sync.Mutex
	opens []clientv3.Op // each Watch call's key and options, for the test
}

func (f *fakeEndingWatcher) Watch(ctx context.Context, key string, opts ...clientv3.OpOption) clientv3.WatchChan {
	f.mu.Lock()
	f.opens = append(f.opens, clientv3.OpGet(key, opts...))
	first := len(f.opens) == 1
	f.mu.Unlock()
	if !first {
		return f.Watcher.Watch(ctx, key, opts...)
	}
	ictx, cancel := context.WithCancel(ctx)
	in := f.Watcher.Watch(ictx, key, opts...)
	out := make(chan clientv3.WatchResponse)
	go func() {
		defer close(out)
		defer cancel()
		n := 0
		for wr := range in {
			out <- wr
			if n += len(wr.Events); n >= f.after {
				out <- clientv3.WatchResponse{Canceled: true}
				return
			}
		}
	}()
	return out
}

// TestWatchResumingLosesNothing: a harness watcher whose stream ends
// mid-way opens a new one from the revision after the last it saw, and
// receives every event exactly once, in order.
func TestWatchResumingLosesNothing(t *testing.T) {
	s := etcdtest.New(t)
	cli := etcdtest.NewClient(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	fake := &fakeEndingWatcher{Watcher: cli.Watcher, after: 3}
	var (
		mu      sync.Mutex
		got     []string
		created = make(chan struct{})
		resumes int
	)
	wctx, stop := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		watchResuming(wctx, fake, "/r/", true, func(wr clientv3.WatchResponse) {
			if wr.Created {
				close(created)
			}
			mu.Lock()
			defer mu.Unlock()
			for _, ev := range wr.Events {
				got = append(got, string(ev.Kv.Key))
			}
		}, func() { resumes++ })
	}()
	<-created
	var want []string
	for i := range 10 {
		k := fmt.Sprintf("/r/%d", i)
		want = append(want, k)
		if _, err := cli.Put(ctx, k, "v"); err != nil {
			t.Fatal(err)
		}
	}
	for {
		mu.Lock()
		n := len(got)
		mu.Unlock()
		if n >= len(want) || ctx.Err() != nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // room for a duplicate to show
	stop()
	<-done
	if !slices.Equal(got, want) {
		t.Errorf("events %v, want %v", got, want)
	}
	if resumes != 1 || len(fake.opens) != 2 {
		t.Errorf("%d resumptions, %d streams opened; want 1 and 2", resumes, len(fake.opens))
	}
	if rev := fake.opens[1].Rev(); rev == 0 {
		t.Errorf("the second stream opened at etcd's head, not after the last revision seen")
	}
}
