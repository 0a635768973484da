package etcdtest

import (
	"context"
	"sync"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// FakeEndingWatcher stands in for etcd's gRPC proxy cancelling a client's
// watch stream: it passes a client's watches through, but ends the first
// stream after After events the way the client then sees it, with one
// last response that carries an error (Canceled) and a closed channel,
// while the connection stays up. The proxy (server/proxy/grpcproxy,
// watcher.post) cancels a client's whole stream when it cannot queue a
// response for it within 50 ms, and the client reports that as a
// cancellation of its own. Install it in place of a client's watcher:
//
//	cli.Watcher = &etcdtest.FakeEndingWatcher{Watcher: cli.Watcher, After: 1}
type FakeEndingWatcher struct {
	clientv3.Watcher
	After int

	mu    sync.Mutex
	opens []clientv3.Op
}

// Watch opens a watch; the first one ends after After events.
func (f *FakeEndingWatcher) Watch(ctx context.Context, key string, opts ...clientv3.OpOption) clientv3.WatchChan {
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
			select {
			case out <- wr:
			case <-ctx.Done():
				return
			}
			if n += len(wr.Events); n >= f.After {
				select {
				case out <- clientv3.WatchResponse{Canceled: true}:
				case <-ctx.Done():
				}
				return
			}
		}
	}()
	return out
}

// Opens returns each watch opened so far, as an Op (key and options: its
// Rev is the revision it started from, 0 for etcd's head).
func (f *FakeEndingWatcher) Opens() []clientv3.Op {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]clientv3.Op(nil), f.opens...)
}
