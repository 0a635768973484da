package bench

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/registry"
)

// progress records, per node, when it first reached each revision, so a
// trial can be evaluated whatever the order of the write's return and the
// nodes' reports.
type progress struct {
	mu     sync.Mutex
	hist   map[string][]point
	notify chan struct{}
}

type point struct {
	rev int64
	at  time.Time
}

func newProgress() *progress {
	return &progress{hist: map[string][]point{}, notify: make(chan struct{})}
}

func (p *progress) report(node string, rev int64) {
	now := time.Now()
	p.mu.Lock()
	defer p.mu.Unlock()
	h := p.hist[node]
	if len(h) > 0 && h[len(h)-1].rev >= rev {
		return
	}
	p.hist[node] = append(h, point{rev, now})
	close(p.notify)
	p.notify = make(chan struct{})
}

// reached returns the slowest node's time from start to rev, and how many
// of the nodes reached it.
func (p *progress) reached(nodes []string, rev int64, start time.Time) (time.Duration, int, <-chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var slowest time.Duration
	got := 0
	for _, n := range nodes {
		h := p.hist[n]
		i, _ := slices.BinarySearchFunc(h, rev, func(x point, r int64) int { return cmp.Compare(x.rev, r) })
		if i < len(h) {
			got++
			slowest = max(slowest, h[i].at.Sub(start))
		}
	}
	return slowest, got, p.notify
}

// wait waits until every node reached rev and returns the slowest time.
func (p *progress) wait(ctx context.Context, nodes []string, rev int64, start time.Time) (time.Duration, error) {
	for {
		d, got, ch := p.reached(nodes, rev, start)
		if got == len(nodes) {
			return d, nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return 0, fmt.Errorf("%d of %d nodes reached revision %d: %w", got, len(nodes), rev, ctx.Err())
		}
	}
}

// settle writes a marker key and waits until every agent applied and
// published it, so the next trial starts from a quiet cluster. An agent
// whose status write failed publishes again only on its next change, so a
// marker that is not published everywhere in 20 s is written again; each
// extra round is counted in *resent.
func settle(ctx context.Context, cli *clientv3.Client, names []string, applied, published *progress, resent *int) error {
	var last error
	for attempt := 0; attempt < 5; attempt++ {
		start := time.Now()
		r, err := cli.Put(ctx, "/cluster/backends/benchsettle/meta_data", fmt.Sprintf(`{"publish":{"port":%d}}`, 19000+attempt))
		if err != nil {
			return err
		}
		tctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		_, err = applied.wait(tctx, names, r.Header.Revision, start)
		cancel()
		if err != nil {
			return fmt.Errorf("settle: applied: %w", err)
		}
		tctx, cancel = context.WithTimeout(ctx, 20*time.Second)
		_, err = published.wait(tctx, names, r.Header.Revision, start)
		cancel()
		if err == nil {
			// Quiet period: statuses written after apply.
			time.Sleep(200 * time.Millisecond)
			return nil
		}
		last = fmt.Errorf("settle: published: %w (etcd holds %s)", err, statusCensus(ctx, cli, r.Header.Revision))
		*resent++
	}
	return last
}

// statusCensus says how many statuses in etcd have reached rev: it tells
// a node that did not publish from a harness that did not see it.
func statusCensus(ctx context.Context, cli *clientv3.Client, rev int64) string {
	resp, err := cli.Get(ctx, registry.StatusPrefix, clientv3.WithPrefix())
	if err != nil {
		return err.Error()
	}
	reached := 0
	for _, kv := range resp.Kvs {
		var st registry.Status
		if json.Unmarshal(kv.Value, &st) == nil && st.Revision >= rev {
			reached++
		}
	}
	return fmt.Sprintf("%d statuses, %d at revision >= %d", len(resp.Kvs), reached, rev)
}

// statusTally counts the node statuses etcd stored, as a watch on the
// status prefix sees them, and their bytes (key and value).
type statusTally struct {
	writes, bytes atomic.Int64
}

func (t *statusTally) read() (writes, bytes int64) { return t.writes.Load(), t.bytes.Load() }

func watchStatuses(ctx context.Context, cli *clientv3.Client, p *progress, tally *statusTally) {
	for wr := range cli.Watch(ctx, registry.StatusPrefix, clientv3.WithPrefix()) {
		for _, ev := range wr.Events {
			if ev.Type != clientv3.EventTypePut {
				continue
			}
			tally.writes.Add(1)
			tally.bytes.Add(int64(len(ev.Kv.Key) + len(ev.Kv.Value)))
			var s registry.Status
			if json.Unmarshal(ev.Kv.Value, &s) == nil {
				p.report(s.Node, s.Revision)
			}
		}
	}
}
