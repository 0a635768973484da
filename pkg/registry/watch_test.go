package registry_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/registry"
)

// startWatcher runs a watcher on /cluster/ through endpoint and returns its
// store and a channel that receives after every batch.
func startWatcher(t *testing.T, endpoint string) (*registry.Store, <-chan struct{}, *int) {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	store := registry.NewStore()
	ch := make(chan struct{}, 1)
	relists := new(int)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	w := &registry.Watcher{Client: cli, Prefix: registry.ClusterPrefix, Store: store, MaxBackoff: 200 * time.Millisecond,
		Notify: func() {
			select {
			case ch <- struct{}{}:
			default:
			}
		},
		Relisted: func() { *relists++ },
	}
	go func() { w.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return store, ch, relists
}

// waitFor polls cond on every store change until it holds or 10s pass.
func waitFor(t *testing.T, ch <-chan struct{}, what string, cond func() bool) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for !cond() {
		select {
		case <-ch:
		case <-time.After(50 * time.Millisecond):
		case <-deadline:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

func meta(port int) string { return fmt.Sprintf(`{"publish":{"port":%d}}`, port) }

func TestWatchSurvivesCompaction(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	proxy := etcdtest.NewProxy(t, srv.Addr())
	ctx := context.Background()
	cli.Put(ctx, registry.MetaKey("backends", "keep"), meta(1000))
	cli.Put(ctx, registry.MetaKey("backends", "gone"), meta(1001))
	store, ch, relists := startWatcher(t, proxy.Endpoint())
	waitFor(t, ch, "initial list", func() bool { return len(store.Snapshot().Apps) == 2 })

	// Partition the watcher, change history behind its back, compact it
	// away, then heal: the watcher must re-list and see the deletion.
	proxy.Cut()
	cli.Delete(ctx, registry.MetaKey("backends", "gone"))
	for i := range 20 {
		cli.Put(ctx, registry.MetaKey("backends", "new"), meta(2000+i))
	}
	resp, _ := cli.Put(ctx, registry.MetaKey("services", "late"), meta(3000))
	if _, err := cli.Compact(ctx, resp.Header.Revision); err != nil {
		t.Fatal(err)
	}
	proxy.Restore()
	waitFor(t, ch, "re-list after compaction", func() bool {
		s := store.Snapshot()
		_, gone := s.Apps[registry.AppID{Group: "backends", Name: "gone"}]
		n := s.Apps[registry.AppID{Group: "backends", Name: "new"}]
		return !gone && n != nil && n.Meta.Publish.Port == 2019 && s.Apps[registry.AppID{Group: "services", Name: "late"}] != nil
	})
	if *relists < 2 {
		t.Errorf("relists = %d, want a re-list after the compaction", *relists)
	}
	// And it keeps watching afterwards.
	cli.Put(ctx, registry.MetaKey("backends", "after"), meta(4000))
	waitFor(t, ch, "event after re-list", func() bool { return store.Snapshot().Apps[registry.AppID{Group: "backends", Name: "after"}] != nil })
}

func TestWatchResumesAfterServerRestart(t *testing.T) {
	srv := etcdtest.New(t)
	store, ch, _ := startWatcher(t, srv.Endpoint())
	cli := etcdtest.NewClient(t, srv)
	ctx := context.Background()
	cli.Put(ctx, registry.MetaKey("backends", "a"), meta(1000))
	waitFor(t, ch, "first event", func() bool { return len(store.Snapshot().Apps) == 1 })
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	cli2 := etcdtest.NewClient(t, srv)
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	resp, err := cli2.Put(rctx, registry.MetaKey("backends", "b"), meta(1001))
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, ch, "event after restart", func() bool {
		s := store.Snapshot()
		return len(s.Apps) == 2 && s.Revision >= resp.Header.Revision
	})
}
