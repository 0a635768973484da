package registry_test

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/registry"
	"github.com/meshd/meshd/pkg/testlog"
)

// startWatcher runs a watcher on /cluster/ through endpoint and returns its
// store and a channel that receives after every batch.
func startWatcher(t *testing.T, endpoint string) (*registry.Store, <-chan struct{}, *int) {
	t.Helper()
	return startWatcherLog(t, endpoint, nil)
}

// startWatcherLog is startWatcher with the watcher logging to log.
func startWatcherLog(t *testing.T, endpoint string, log *slog.Logger) (*registry.Store, <-chan struct{}, *int) {
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
	w := &registry.Watcher{Client: cli, Prefix: registry.ClusterPrefix, Store: store, MaxBackoff: 200 * time.Millisecond, Log: log,
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

// TestWatchStartsWhileWriting starts watchers while another client keeps
// changing the prefix, so writes fall before, between and after each
// watcher's watch creation and its list: every store must end equal to
// etcd, with no change lost or applied twice out of order, including
// transactions whose events share one revision.
func TestWatchStartsWhileWriting(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ctx := context.Background()
	const apps = 8
	stop := make(chan struct{})
	writerDone := make(chan error, 1)
	go func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				writerDone <- nil
				return
			default:
			}
			key := registry.MetaKey("backends", fmt.Sprintf("a%d", i%apps))
			var err error
			switch {
			case i%7 == 6: // one revision, several events
				other := registry.MetaKey("backends", fmt.Sprintf("a%d", (i+1)%apps))
				_, err = cli.Txn(ctx).Then(clientv3.OpPut(key, meta(1000+i)), clientv3.OpPut(other, meta(1000+i))).Commit()
			case i%11 == 10:
				other := registry.MetaKey("backends", fmt.Sprintf("a%d", (i+3)%apps))
				_, err = cli.Txn(ctx).Then(clientv3.OpDelete(key), clientv3.OpDelete(other)).Commit()
			case i%5 == 4:
				_, err = cli.Delete(ctx, key)
			default:
				_, err = cli.Put(ctx, key, meta(1000+i))
			}
			if err != nil {
				writerDone <- err
				return
			}
		}
	}()
	type started struct {
		store *registry.Store
		ch    <-chan struct{}
	}
	var ws []started
	for range 12 {
		s, ch, _ := startWatcher(t, srv.Endpoint())
		ws = append(ws, started{s, ch})
		time.Sleep(5 * time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond)
	close(stop)
	if err := <-writerDone; err != nil {
		t.Fatal(err)
	}
	// Last, one transaction changes every key.
	var ops []clientv3.Op
	for i := range apps {
		ops = append(ops, clientv3.OpPut(registry.MetaKey("backends", fmt.Sprintf("a%d", i)), meta(5000+i)))
	}
	if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
		t.Fatal(err)
	}
	resp, err := cli.Get(ctx, registry.ClusterPrefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int{}
	for _, kv := range resp.Kvs {
		pk, err := registry.ParseKey(string(kv.Key))
		if err != nil {
			t.Fatal(err)
		}
		var port int
		fmt.Sscanf(string(kv.Value), `{"publish":{"port":%d}}`, &port)
		want[pk.App] = port
	}
	for i, w := range ws {
		waitFor(t, w.ch, fmt.Sprintf("watcher %d at revision %d", i, resp.Header.Revision), func() bool {
			return w.store.Revision() >= resp.Header.Revision
		})
		got := map[string]int{}
		for id, app := range w.store.Snapshot().Apps {
			if app.Meta.Publish.Port != 0 {
				got[id.Name] = app.Meta.Publish.Port
			}
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("watcher %d: store %v, etcd %v", i, got, want)
		}
	}
}

// TestWatchStartWithoutEtcdSaysSo: a watcher started while etcd is
// unreachable logs that it waits for etcd (the client alone would retry in
// silence), and lists once etcd is back.
func TestWatchStartWithoutEtcdSaysSo(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ctx := context.Background()
	cli.Put(ctx, registry.MetaKey("backends", "a"), meta(1000))
	proxy := etcdtest.NewProxy(t, srv.Addr())
	proxy.Cut()
	var logs testlog.Buffer
	store, _, _ := startWatcherLog(t, proxy.Endpoint(), slog.New(slog.NewTextHandler(&logs, nil)))

	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(logs.String(), `msg="list waiting for etcd to confirm the watch" prefix=/cluster/`) {
		if time.Now().After(deadline) {
			t.Fatalf("no wait for etcd logged within 20 s of starting without it; log:\n%s", logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if n := len(store.Snapshot().Apps); n != 0 {
		t.Fatalf("store holds %d apps without etcd", n)
	}
	proxy.Restore()
	deadline = time.Now().Add(20 * time.Second)
	for len(store.Snapshot().Apps) != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("not listed within 20 s of etcd's return; log:\n%s", logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestSlowListGetsMoreTime: a list whose read cannot finish within its
// timeout (a large prefix on a busy etcd) is retried with twice the time
// until it finishes, instead of failing at the same bound forever.
func TestSlowListGetsMoreTime(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ctx := context.Background()
	val := strings.Repeat("x", 1000)
	for i := range 1000 {
		if _, err := cli.Put(ctx, fmt.Sprintf("%sbig/k%04d", registry.ClusterPrefix, i), val); err != nil {
			t.Fatal(err)
		}
	}
	cli.Put(ctx, registry.MetaKey("backends", "a"), meta(1000))
	var logs testlog.Buffer
	wcli, err := clientv3.New(clientv3.Config{Endpoints: []string{srv.Endpoint()}, DialTimeout: time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { wcli.Close() })
	store := registry.NewStore()
	w := &registry.Watcher{Client: wcli, Prefix: registry.ClusterPrefix, Store: store, MaxBackoff: 50 * time.Millisecond,
		ListTimeout: 50 * time.Microsecond, Log: slog.New(slog.NewTextHandler(&logs, nil))}
	wctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { w.Run(wctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })

	deadline := time.Now().Add(30 * time.Second)
	for len(store.Snapshot().Apps) != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("not listed within 30 s; log:\n%s", logs.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(logs.String(), `msg="list failed, retrying" prefix=/cluster/`) || !strings.Contains(logs.String(), "timeout=100µs") {
		t.Errorf("no list ran out of its 50 µs and was retried with 100 µs (the test read nothing slow); log:\n%s", logs.String())
	}
}

// TestWatchResumesWhenTheStreamEnds: etcd's gRPC proxy cancels a client's
// watch stream when it cannot keep up with it (docs/grpc-proxy.md; the
// fake stands in for the proxy at the client's interface). The watcher
// opens a new stream from the revision after the last one it applied and
// loses no change, without listing again.
func TestWatchResumesWhenTheStreamEnds(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	fake := &etcdtest.FakeEndingWatcher{Watcher: cli.Watcher, After: 1}
	cli.Watcher = fake
	writer := etcdtest.NewClient(t, srv)
	store := registry.NewStore()
	ch := make(chan struct{}, 1)
	relists := 0
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	w := &registry.Watcher{Client: cli, Prefix: registry.ClusterPrefix, Store: store, MaxBackoff: 200 * time.Millisecond,
		Notify: func() {
			select {
			case ch <- struct{}{}:
			default:
			}
		},
		Relisted: func() { relists++ },
	}
	go func() { w.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	waitFor(t, ch, "the first list", func() bool { return store.Snapshot().Revision > 0 })

	first, err := writer.Put(ctx, registry.MetaKey("backends", "a"), meta(1000))
	if err != nil {
		t.Fatal(err)
	}
	for i, name := range []string{"b", "c", "d"} {
		if _, err := writer.Put(ctx, registry.MetaKey("backends", name), meta(1001+i)); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, ch, "every change", func() bool { return len(store.Snapshot().Apps) == 4 })
	opens := fake.Opens()
	if len(opens) != 2 {
		t.Fatalf("%d watch streams opened, want 2 (the first ended after one event)", len(opens))
	}
	if got, want := opens[1].Rev(), first.Header.Revision+1; got != want {
		t.Errorf("the second stream started at revision %d, want %d (the one after the last applied)", got, want)
	}
	if relists != 1 {
		t.Errorf("%d lists, want 1: resuming needs no list", relists)
	}
}
