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

// Watcher keeps the keys under one prefix of a Store current: one prefix
// watch, resumed at the last revision + 1 after an interruption. A list
// (the first, and one after etcd compacted past the revision to resume at)
// opens the watch at etcd's head first and reads the prefix after the
// watch is confirmed, skipping the watch's events the read already holds:
// a watch opened at an older revision would wait for etcd's catch-up
// loop, which runs every 100 ms, and a node's own first writes (its member
// claim, just after it starts) would reach its store that much later. A
// re-list replaces what the store holds (a deletion it missed is still
// seen); it never skips ahead silently. When etcd is unreachable it backs
// off instead of spinning.
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
	// ListTimeout bounds a list's read (default 5 s). A read that runs
	// out of it is retried with twice the time, up to MaxListTimeout, and
	// the next list after a success starts from ListTimeout again: a
	// fixed bound would fail forever once a large prefix takes longer to
	// read than it (a busy etcd, thousands of nodes restarting at once),
	// and every retry would load etcd with the same read again.
	ListTimeout time.Duration
	// ListPage is how many keys one read of a list returns (default
	// 1,000); the reads after the first are at the first one's revision,
	// so the list is one consistent view. etcd builds a read's whole
	// answer in memory: at 10,000 nodes /cluster/ is megabytes, and a
	// fleet restarting at once would have etcd hold one such answer per
	// node.
	ListPage int64

	// listBound is the next list's bound (Next), doubled after a list ran
	// out of it; Run's goroutine only.
	listBound backoff.Backoff
}

// MaxListTimeout is the longest a list's read is given.
const MaxListTimeout = 2 * time.Minute

// Run lists and watches until ctx ends.
func (w *Watcher) Run(ctx context.Context) error {
	log := w.logger()
	maxBackoff := w.MaxBackoff
	if maxBackoff == 0 {
		maxBackoff = 250 * time.Millisecond
	}
	var (
		rev    int64 // last revision applied to the store
		listed bool
		retry  = backoff.Backoff{Base: 100 * time.Millisecond, Max: maxBackoff, Jitter: true}
	)
	first := w.ListTimeout
	if first <= 0 {
		first = listTimeout
	}
	w.listBound = backoff.Backoff{Base: first, Max: max(first, MaxListTimeout)}
	for ctx.Err() == nil {
		err := w.watch(ctx, &rev, &listed, &retry)
		switch {
		case ctx.Err() != nil:
		case errors.Is(err, rpctypes.ErrCompacted):
			log.Warn("watch revision compacted, re-listing", "prefix", w.Prefix, "rev", rev+1)
			w.Store.Relisting(w.Prefix)
			listed = false
		case errors.Is(err, errList):
			if errors.Is(err, context.DeadlineExceeded) {
				w.listBound.Fail()
			}
			log.Warn("list failed, retrying", "prefix", w.Prefix, "err", err, "timeout", w.listBound.Next())
			retry.Wait(ctx)
		case err != nil:
			log.Warn("watch interrupted, resuming", "prefix", w.Prefix, "rev", rev+1, "err", err)
			retry.Wait(ctx)
		}
	}
	return ctx.Err()
}

var errList = errors.New("list")

// listTimeout is ListTimeout's default, and how often a watcher waiting
// for etcd to confirm its watch says so.
const listTimeout = 5 * time.Second

// warnWhileWaiting logs a warning every listTimeout until the returned
// function is called.
func (w *Watcher) warnWhileWaiting() (stop func()) {
	done := make(chan struct{})
	go func() {
		t := time.NewTicker(listTimeout)
		defer t.Stop()
		for waited := listTimeout; ; waited += listTimeout {
			select {
			case <-done:
				return
			case <-t.C:
				w.logger().Warn("list waiting for etcd to confirm the watch", "prefix", w.Prefix, "waited", waited)
			}
		}
	}()
	return func() { close(done) }
}

func (w *Watcher) logger() *slog.Logger {
	if w.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return w.Log
}

// watch runs one watch stream until it fails: from rev+1 when the store is
// listed, else from etcd's head, listing once the watch is confirmed. It
// advances *rev only past events that reached the store.
func (w *Watcher) watch(ctx context.Context, rev *int64, listed *bool, retry *backoff.Backoff) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	opts := []clientv3.OpOption{clientv3.WithPrefix(), clientv3.WithProgressNotify()}
	var ch clientv3.WatchChan
	if *listed {
		ch = w.Client.Watch(wctx, w.Prefix, append(opts, clientv3.WithRev(*rev+1))...)
	} else {
		var err error
		if ch, err = w.list(ctx, wctx, opts, rev); err != nil {
			return err
		}
		*listed = true
	}
	// Events at or below the list's revision are in the store already; a
	// transaction's events share one revision, so the bound stays fixed.
	listedAt := *rev
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
		applied := false
		for _, ev := range wr.Events {
			if ev.Kv.ModRevision <= listedAt {
				continue
			}
			switch ev.Type {
			case clientv3.EventTypePut:
				w.Store.Put(KV{Key: string(ev.Kv.Key), Value: ev.Kv.Value, Lease: ev.Kv.Lease, Created: ev.Kv.CreateRevision}, ev.Kv.ModRevision)
			case clientv3.EventTypeDelete:
				w.Store.Delete(string(ev.Kv.Key), ev.Kv.ModRevision)
			}
			*rev = ev.Kv.ModRevision
			applied = true
		}
		if applied {
			w.notify()
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return errors.New("watch channel closed")
}

// list opens the watch at etcd's head (under wctx, with opts), waits
// until etcd confirms it, so that every later change comes on it, then
// reads the prefix into the store: the read's revision is at or past the
// watch's start, so nothing falls between the two. It returns the watch.
func (w *Watcher) list(ctx, wctx context.Context, opts []clientv3.OpOption, rev *int64) (clientv3.WatchChan, error) {
	// Until etcd answers, the client keeps trying in silence (Watch itself
	// blocks until its stream connects): say so meanwhile.
	stopWarn := w.warnWhileWaiting()
	defer stopWarn()
	ch := w.Client.Watch(wctx, w.Prefix, append(opts, clientv3.WithCreatedNotify())...)
	select {
	case wr, ok := <-ch:
		if !ok {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			return nil, errors.New("watch channel closed before it was created")
		}
		if err := wr.Err(); err != nil {
			return nil, err
		}
		if !wr.Created {
			return nil, fmt.Errorf("watch on %s: first answer is not its creation", w.Prefix)
		}
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	bound := w.listBound.Next()
	lctx, cancel := context.WithTimeout(ctx, bound)
	kvs, at, err := w.read(lctx)
	cancel()
	if err != nil {
		if lctx.Err() != nil && ctx.Err() == nil {
			err = fmt.Errorf("not read within %v: %w", bound, context.DeadlineExceeded)
		}
		return nil, fmt.Errorf("%w %s: %w", errList, w.Prefix, err)
	}
	w.listBound.Reset()
	w.Store.Replace(w.Prefix, kvs, at)
	*rev = at
	if w.Relisted != nil {
		w.Relisted()
	}
	w.notify()
	return ch, nil
}

// read reads every key under the prefix, ListPage keys at a time, all at
// the revision of the first read, which it returns.
func (w *Watcher) read(ctx context.Context) ([]KV, int64, error) {
	page := w.ListPage
	if page <= 0 {
		page = defaultListPage
	}
	end := clientv3.GetPrefixRangeEnd(w.Prefix)
	var kvs []KV
	var rev int64
	for from := w.Prefix; ; {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(page)}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		resp, err := w.Client.Get(ctx, from, opts...)
		if err != nil {
			return nil, 0, err
		}
		if rev == 0 {
			rev = resp.Header.Revision
		}
		kvs = append(kvs, kvsOf(resp)...)
		if !resp.More || len(resp.Kvs) == 0 {
			return kvs, rev, nil
		}
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
	}
}

// defaultListPage is ListPage's default.
const defaultListPage = 1000

func (w *Watcher) notify() {
	if w.Notify != nil {
		w.Notify()
	}
}
