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

// TestWatchResumingLosesNothing: a harness watcher whose stream ends
// mid-way opens a new one from the revision after the last it saw, and
// receives every event exactly once, in order.
func TestWatchResumingLosesNothing(t *testing.T) {
	s := etcdtest.New(t)
	cli := etcdtest.NewClient(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	fake := &etcdtest.FakeEndingWatcher{Watcher: cli.Watcher, After: 3}
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
	opens := fake.Opens()
	if resumes != 1 || len(opens) != 2 {
		t.Fatalf("%d resumptions, %d streams opened; want 1 and 2", resumes, len(opens))
	}
	if opens[1].Rev() == 0 {
		t.Errorf("the second stream opened at etcd's head, not after the last revision seen")
	}
}
