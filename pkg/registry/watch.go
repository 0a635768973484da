package registry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/backoff"
)

// Watcher keeps the keys under one prefix of a Store current: one range
// read, then one prefix watch resumed at the last revision + 1. When etcd
// has compacted past that revision it re-lists the prefix and replaces what
// the store holds (a deletion it missed is still seen); it never skips
// ahead silently. When etcd is unreachable it backs off instead of
// spinning.
type Watcher struct {
	Client *clientv3.Client
	Prefix string
	Store  *Store
	// Notify is called after each batch of changes reached the store.
	Notify func()
	Log    *slog.Logger
	// Relisted, if set, is called after each full re-list (first list
	// included), for metrics.
	Relisted func()
	// MaxBackoff bounds the retry delay (default 250 ms: a node must see
	// etcd again within a fraction of a second of its return).
	MaxBackoff time.Duration
}

// Run lists and watches until ctx ends.
func (w *Watcher) Run(ctx context.Context) error {
	log := w.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	maxBackoff := w.MaxBackoff
	if maxBackoff == 0 {
		maxBackoff = 250 * time.Millisecond
	}
	var (
		rev    int64 // last revision applied to the store
		listed bool
		retry  = backoff.Backoff{Base: 100 * time.Millisecond, Max: maxBackoff, Jitter: true}
	)
	for ctx.Err() == nil {
		if !listed {
			lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			resp, err := w.Client.Get(lctx, w.Prefix, clientv3.WithPrefix())
			cancel()
			if err != nil {
				if ctx.Err() == nil {
					log.Warn("list failed, retrying", "prefix", w.Prefix, "err", err)
					retry.Wait(ctx)
				}
				continue
			}
			w.Store.Replace(w.Prefix, kvsOf(resp), resp.Header.Revision)
			rev, listed = resp.Header.Revision, true
			if w.Relisted != nil {
				w.Relisted()
			}
			w.notify()
		}
		err := w.watch(ctx, &rev, &retry)
		switch {
		case ctx.Err() != nil:
		case errors.Is(err, rpctypes.ErrCompacted):
			log.Warn("watch revision compacted, re-listing", "prefix", w.Prefix, "rev", rev+1)
			w.Store.Relisting(w.Prefix)
			listed = false
		case err != nil:
			log.Warn("watch interrupted, resuming", "prefix", w.Prefix, "rev", rev+1, "err", err)
			retry.Wait(ctx)
		}
	}
	return ctx.Err()
}

// watch runs one watch stream from rev+1 until it fails. It advances *rev
// only past events that reached the store.
func (w *Watcher) watch(ctx context.Context, rev *int64, retry *backoff.Backoff) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	ch := w.Client.Watch(wctx, w.Prefix, clientv3.WithPrefix(), clientv3.WithRev(*rev+1), clientv3.WithProgressNotify())
	for wr := range ch {
		if wr.CompactRevision != 0 {
			return fmt.Errorf("%w (compacted at %d)", rpctypes.ErrCompacted, wr.CompactRevision)
		}
		if err := wr.Err(); err != nil {
			return err
		}
		retry.Reset()
		if wr.IsProgressNotify() {
			continue
		}
		for _, ev := range wr.Events {
			switch ev.Type {
			case clientv3.EventTypePut:
				w.Store.Put(KV{Key: string(ev.Kv.Key), Value: ev.Kv.Value, Lease: ev.Kv.Lease, Created: ev.Kv.CreateRevision}, ev.Kv.ModRevision)
			case clientv3.EventTypeDelete:
				w.Store.Delete(string(ev.Kv.Key), ev.Kv.ModRevision)
			}
			*rev = max(*rev, ev.Kv.ModRevision)
		}
		if len(wr.Events) > 0 {
			w.notify()
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return errors.New("watch channel closed")
}

func (w *Watcher) notify() {
	if w.Notify != nil {
		w.Notify()
	}
}
