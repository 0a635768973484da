package registry

import (
	"context"
	"fmt"
	"slices"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/etcdtest"
)

// changingKV is a KV that, after the first Get, changes keys the next pages
// would hold: as another node's writes between a list's reads.
type changingKV struct {
	clientv3.KV
	gets  int
	after func()
}

func (k *changingKV) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	resp, err := k.KV.Get(ctx, key, opts...)
	k.gets++
	if k.gets == 1 && k.after != nil {
		k.after()
	}
	return resp, err
}

// TestListReadsPagesAtOneRevision: a list reads ListPage keys at a time and
// every page at the first read's revision, so that writes between the
// pages neither appear nor remove a key from the list: it is the registry
// as of one revision, which the watch continues from.
func TestListReadsPagesAtOneRevision(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ctx := t.Context()
	var want []string
	for i := range 25 {
		key := MetaKey("backends", fmt.Sprintf("app%02d", i))
		if _, err := cli.Put(ctx, key, fmt.Sprintf(`{"publish":{"port":%d}}`, 8000+i)); err != nil {
			t.Fatal(err)
		}
		want = append(want, key)
	}
	head, err := cli.Get(ctx, "/", clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	kv := &changingKV{KV: cli.KV, after: func() {
		// Keys the later pages hold: one deleted, one added, one changed.
		_, err1 := cli.Delete(ctx, MetaKey("backends", "app20"))
		_, err2 := cli.Put(ctx, MetaKey("backends", "app99"), `{"publish":{"port":9999}}`)
		_, err3 := cli.Put(ctx, MetaKey("backends", "app21"), `{"publish":{"port":1}}`)
		if err1 != nil || err2 != nil || err3 != nil {
			t.Error(err1, err2, err3)
		}
	}}
	cli.KV = kv
	w := &Watcher{Client: cli, Prefix: ClusterPrefix, ListPage: 10}
	kvs, rev, err := w.read(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if kv.gets != 3 {
		t.Errorf("25 keys read in %d reads; want 3 of at most 10", kv.gets)
	}
	if rev != head.Header.Revision {
		t.Errorf("list at revision %d, want the first read's %d", rev, head.Header.Revision)
	}
	var got []string
	for _, kv := range kvs {
		got = append(got, kv.Key)
		if kv.Key == MetaKey("backends", "app21") && string(kv.Value) != `{"publish":{"port":8021}}` {
			t.Errorf("app21 is %s, changed after the list's revision", kv.Value)
		}
	}
	if !slices.Equal(got, want) {
		t.Errorf("list holds %q\nwant the keys at its revision %q", got, want)
	}
}

// TestListDefaultPage: without ListPage a list reads 1,000 keys at a time
// (docs/registry.md): 1,000 keys in one read, 1,001 in two.
func TestListDefaultPage(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ctx := t.Context()
	kv := &changingKV{KV: cli.KV}
	cli.KV = kv
	for _, c := range []struct{ n, want int }{{1000, 1}, {1001, 2}} { // in this order: the keys add up
		n, want := c.n, c.want
		for i := range n {
			if _, err := cli.Put(ctx, fmt.Sprintf("%sbig/k%04d", ClusterPrefix, i), "x"); err != nil {
				t.Fatal(err)
			}
		}
		kv.gets = 0
		kvs, _, err := (&Watcher{Client: cli, Prefix: ClusterPrefix}).read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(kvs) != n || kv.gets != want {
			t.Errorf("%d keys: read %d in %d reads; want all in %d", n, len(kvs), kv.gets, want)
		}
	}
}
