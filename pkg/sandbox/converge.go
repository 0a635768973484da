package sandbox

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/registry"
)

// Put writes one key and returns the revision of the write and the time
// the write was issued (convergence is measured from there, etcd's commit
// included).
func (c *Cluster) Put(ctx context.Context, key, value string, opts ...clientv3.OpOption) (int64, time.Time, error) {
	start := time.Now()
	resp, err := c.cli.Put(ctx, key, value, opts...)
	if err != nil {
		return 0, time.Time{}, fmt.Errorf("put %s: %w", key, err)
	}
	return resp.Header.Revision, start, nil
}

// Delete deletes one key and returns the revision of the deletion and the
// time it was issued.
func (c *Cluster) Delete(ctx context.Context, key string) (int64, time.Time, error) {
	start := time.Now()
	resp, err := c.cli.Delete(ctx, key)
	if err != nil {
		return 0, time.Time{}, fmt.Errorf("delete %s: %w", key, err)
	}
	return resp.Header.Revision, start, nil
}

// RegisterApp writes an app's meta_data the way `meshctl app register`
// does (registry.AppMeta JSON).
func (c *Cluster) RegisterApp(ctx context.Context, g registry.Group, app string, meta registry.AppMeta) (int64, time.Time, error) {
	if err := registry.ValidName(app); err != nil {
		return 0, time.Time{}, err
	}
	b, err := json.Marshal(meta)
	if err != nil {
		return 0, time.Time{}, err
	}
	return c.Put(ctx, registry.MetaKey(g, app), string(b))
}

// Statuses reads every node's published status and the revision read at.
func (c *Cluster) Statuses(ctx context.Context) (map[string]registry.Status, int64, error) {
	resp, err := c.cli.Get(ctx, registry.StatusPrefix, clientv3.WithPrefix())
	if err != nil {
		return nil, 0, fmt.Errorf("read statuses: %w", err)
	}
	out := map[string]registry.Status{}
	for _, kv := range resp.Kvs {
		name := strings.TrimPrefix(string(kv.Key), registry.StatusPrefix)
		if s, err := registry.DecodeStatus(name, kv.Value); err == nil {
			out[name] = s
		}
	}
	return out, resp.Header.Revision, nil
}

// Members reads every node's durable overlay record.
func (c *Cluster) Members(ctx context.Context) (map[string]registry.Member, error) {
	resp, err := c.cli.Get(ctx, registry.MembersPrefix, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("read members: %w", err)
	}
	out := map[string]registry.Member{}
	for _, kv := range resp.Kvs {
		name := strings.TrimPrefix(string(kv.Key), registry.MembersPrefix)
		if m, err := registry.DecodeMember(name, kv.Value); err == nil {
			out[name] = m
		}
	}
	return out, nil
}

// Convergence is how long each node took to apply one revision, measured
// from Start (usually the etcd write's acknowledgement) to the moment the
// harness saw the node's status reach the revision.
type Convergence struct {
	Revision int64
	Start    time.Time
	PerNode  map[string]time.Duration
}

// Max is the slowest node's time: the cluster's convergence time.
func (cv Convergence) Max() time.Duration {
	var m time.Duration
	for _, d := range cv.PerNode {
		m = max(m, d)
	}
	return m
}

// WaitApplied waits until every named node publishes a status revision >=
// rev, and returns when each did, from the harness's record of every
// status change (so a node that applied rev before the call is timed
// correctly). On ctx's end it returns an error naming the nodes that had
// not.
func (c *Cluster) WaitApplied(ctx context.Context, rev int64, start time.Time, nodes []string) (Convergence, error) {
	cv := Convergence{Revision: rev, Start: start, PerNode: map[string]time.Duration{}}
	for {
		changed := c.track.changed()
		var lag []string
		for _, n := range nodes {
			if _, ok := cv.PerNode[n]; ok {
				continue
			}
			if t, ok := c.track.appliedAt(n, rev); ok {
				cv.PerNode[n] = t.Sub(start)
			} else {
				lag = append(lag, n)
			}
		}
		if len(lag) == 0 {
			return cv, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			slices.SortFunc(lag, compareNodeNames)
			return cv, fmt.Errorf("nodes %v did not apply revision %d: %w", lag, rev, ctx.Err())
		}
	}
}

// WaitKey waits until key exists (or, with gone, no longer exists) and
// returns the revision at which it did and when the harness saw it. With
// gone and a key already absent, the deletion's revision is unknown and
// the current revision is returned instead; nodes reach that only if it is
// a write under /cluster/, so call WaitKey before the key can vanish.
func (c *Cluster) WaitKey(ctx context.Context, key string, gone bool) (int64, time.Time, error) {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	resp, err := c.cli.Get(wctx, key)
	if err != nil {
		return 0, time.Time{}, err
	}
	if (len(resp.Kvs) == 0) == gone {
		if gone {
			return resp.Header.Revision, time.Now(), nil
		}
		return resp.Kvs[0].ModRevision, c.track.seenAt(resp.Kvs[0].ModRevision, time.Now()), nil
	}
	for wr := range c.cli.Watch(wctx, key, clientv3.WithRev(resp.Header.Revision+1)) {
		if err := wr.Err(); err != nil {
			return 0, time.Time{}, err
		}
		for _, ev := range wr.Events {
			if (ev.Type == clientv3.EventTypeDelete) == gone {
				return ev.Kv.ModRevision, c.track.seenAt(ev.Kv.ModRevision, time.Now()), nil
			}
		}
	}
	return 0, time.Time{}, fmt.Errorf("wait for %s: %w", key, ctx.Err())
}

// NodeNames returns the names of the nodes whose meshd is running.
func (c *Cluster) NodeNames() []string {
	var out []string
	for _, n := range c.Nodes() {
		if n.Pid() != 0 {
			out = append(out, n.Name)
		}
	}
	return out
}

// tracker follows the registry from the harness's side: when it first
// saw each revision under /cluster/, and when each node's published status
// first reached each revision. Convergence is read from this record, so a
// step is timed from the write even when the harness starts waiting later.
type tracker struct {
	mu      sync.Mutex
	writes  map[int64]time.Time
	applied map[string][]point
	notify  chan struct{}
}

type point struct {
	rev int64
	at  time.Time
}

func newTracker() *tracker {
	return &tracker{writes: map[int64]time.Time{}, applied: map[string][]point{}, notify: make(chan struct{})}
}

func (t *tracker) run(ctx context.Context, cli *clientv3.Client, from int64) {
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		for wr := range cli.Watch(ctx, registry.ClusterPrefix, clientv3.WithPrefix(), clientv3.WithRev(from)) {
			now := time.Now()
			t.mu.Lock()
			for _, ev := range wr.Events {
				if _, ok := t.writes[ev.Kv.ModRevision]; !ok {
					t.writes[ev.Kv.ModRevision] = now
				}
			}
			t.mu.Unlock()
		}
	}()
	go func() {
		defer wg.Done()
		for wr := range cli.Watch(ctx, registry.StatusPrefix, clientv3.WithPrefix(), clientv3.WithRev(from)) {
			now := time.Now()
			t.mu.Lock()
			for _, ev := range wr.Events {
				if ev.Type != clientv3.EventTypePut {
					continue
				}
				name := strings.TrimPrefix(string(ev.Kv.Key), registry.StatusPrefix)
				s, err := registry.DecodeStatus(name, ev.Kv.Value)
				if err != nil {
					continue
				}
				h := t.applied[name]
				if len(h) == 0 || s.Revision > h[len(h)-1].rev {
					t.applied[name] = append(h, point{s.Revision, now})
				}
			}
			close(t.notify)
			t.notify = make(chan struct{})
			t.mu.Unlock()
		}
	}()
	wg.Wait()
}

// changed returns a channel closed at the next status change.
func (t *tracker) changed() <-chan struct{} {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.notify
}

// appliedAt returns when node's status first reached rev.
func (t *tracker) appliedAt(node string, rev int64) (time.Time, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	h := t.applied[node]
	i, _ := slices.BinarySearchFunc(h, rev, func(p point, r int64) int { return cmp.Compare(p.rev, r) })
	if i == len(h) {
		return time.Time{}, false
	}
	return h[i].at, true
}

// seenAt returns when the harness saw the write at rev, or def if it did
// not (or saw it later than def).
func (t *tracker) seenAt(rev int64, def time.Time) time.Time {
	t.mu.Lock()
	defer t.mu.Unlock()
	if w, ok := t.writes[rev]; ok && w.Before(def) {
		return w
	}
	return def
}
