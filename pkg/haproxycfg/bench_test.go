package haproxycfg

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/registry"
)

// The benchmark goes through etcd, whose decoders refuse loopback
// instances, so it runs HAProxy, backends and client in a network
// namespace (root only).

// follow feeds etcd events under /cluster/ into a store and applies every
// new snapshot to c: the reconcile loop's path, without coalescing.
func follow(ctx context.Context, tb testing.TB, cli *clientv3.Client, c *Component) {
	store := registry.NewStore()
	resp, err := cli.Get(ctx, registry.ClusterPrefix, clientv3.WithPrefix())
	if err != nil {
		tb.Fatal(err)
	}
	var kvs []registry.KV
	for _, kv := range resp.Kvs {
		kvs = append(kvs, registry.KV{Key: string(kv.Key), Value: kv.Value, Lease: kv.Lease})
	}
	store.Replace(registry.ClusterPrefix, kvs, resp.Header.Revision)
	if err := c.Apply(ctx, store.Snapshot()); err != nil {
		tb.Fatal(err)
	}
	wch := cli.Watch(ctx, registry.ClusterPrefix, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
	go func() {
		for wr := range wch {
			for _, ev := range wr.Events {
				if ev.Type == clientv3.EventTypeDelete {
					store.Delete(string(ev.Kv.Key), ev.Kv.ModRevision)
				} else {
					store.Put(registry.KV{Key: string(ev.Kv.Key), Value: ev.Kv.Value, Lease: ev.Kv.Lease}, ev.Kv.ModRevision)
				}
			}
			if err := c.Apply(ctx, store.Snapshot()); err != nil && ctx.Err() == nil {
				tb.Errorf("apply: %v", err)
			}
		}
	}()
}

func putJSON(ctx context.Context, tb testing.TB, cli *clientv3.Client, ops ...clientv3.Op) {
	if _, err := cli.Txn(ctx).Then(ops...).Commit(); err != nil {
		tb.Fatal(err)
	}
}

func jsonOp(key string, v any) clientv3.Op {
	b, _ := json.Marshal(v)
	return clientv3.OpPut(key, string(b))
}

// BenchmarkEventToServing measures how long a registry change takes from
// the etcd write to HAProxy serving it, for the two paths side by side:
//
//	runtime: the app's only instance moves to another backend (slots, no reload)
//	reload:  the app's published port changes (validate + master reload)
func BenchmarkEventToServing(b *testing.B) {
	requireHAProxy(b)
	srv := etcdtest.New(b)
	cli := etcdtest.NewClient(b, srv)
	ctx, cancel := context.WithCancel(context.Background())
	b.Cleanup(cancel)
	ns := newNetns(b, "10.254.0.1", "10.254.0.2")
	opts := testOptions(testDir(b))
	opts.Binary = ns.binary()
	c := newComponent(b, opts)
	const g = registry.GroupServices
	ba, bb := ns.backendAt(b, "a", "10.254.0.1"), ns.backendAt(b, "b", "10.254.0.2")
	ports := [2]int{ns.freePort(b), ns.freePort(b)}
	meta := func(port int) registry.AppMeta { return registry.AppMeta{Publish: registry.Publish{Port: port}} }
	putJSON(ctx, b, cli, jsonOp(registry.MetaKey(g, "web"), meta(ports[0])),
		jsonOp(registry.InstanceKey(g, "web", "a"), ba.instance()))
	follow(ctx, b, cli, c)
	ns.askUntil(b, ports[0], "a", 10*time.Second)

	b.Run("runtime", func(b *testing.B) {
		before := status(c).Reloads
		backends := [2]*backend{ba, bb}
		cur := 0
		for b.Loop() {
			from, to := backends[cur], backends[1-cur]
			putJSON(ctx, b, cli, clientv3.OpDelete(registry.InstanceKey(g, "web", from.name)),
				jsonOp(registry.InstanceKey(g, "web", to.name), to.instance()))
			ns.askUntil(b, ports[0], to.name, 10*time.Second)
			cur = 1 - cur
		}
		if got := status(c).Reloads - before; got != 0 {
			b.Errorf("runtime path reloaded %d times", got)
		}
		// Leave instance a in place for the reload benchmark.
		if cur == 1 {
			putJSON(ctx, b, cli, clientv3.OpDelete(registry.InstanceKey(g, "web", "b")),
				jsonOp(registry.InstanceKey(g, "web", "a"), ba.instance()))
			ns.askUntil(b, ports[0], "a", 10*time.Second)
		}
	})
	b.Run("reload", func(b *testing.B) {
		cur := 0
		for b.Loop() {
			next := ports[1-cur]
			putJSON(ctx, b, cli, jsonOp(registry.MetaKey(g, "web"), meta(next)))
			ns.askUntil(b, next, "a", 10*time.Second)
			cur = 1 - cur
		}
		if st := status(c); st.LastError != "" {
			b.Errorf("last error: %s", st.LastError)
		}
	})
}
