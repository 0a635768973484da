package agent_test

import (
	"context"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/agent"
	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/registry"
)

// A clean stop that keeps the lease (a restart under systemd) leaves the
// node's entry and instances in place, and the next process resumes the
// same lease: no other node sees the node leave and come back.
func TestCleanStopCanKeepLease(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	dir := t.TempDir()
	keep := func(o *agent.Options) {
		withInstance(o)
		o.KeepLeaseOnStop = func() bool { return true }
	}
	a := startNode(t, srv, "node-a", id1, dir, keep)
	inst := registry.InstanceKey("backends", "web", "node-a")
	var lease int64
	eventually(t, 10*time.Second, "instance advertised", func() bool {
		r, err := cli.Get(context.Background(), inst)
		if err == nil && len(r.Kvs) == 1 {
			lease = r.Kvs[0].Lease
		}
		return lease != 0
	})
	r, _ := cli.Get(context.Background(), inst)
	w := cli.Watch(context.Background(), "/cluster/", clientv3.WithPrefix(), clientv3.WithRev(r.Header.Revision+1))
	if err := a.stop(); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{registry.NodeKey("node-a"), inst} {
		r, _ := cli.Get(context.Background(), k)
		if len(r.Kvs) != 1 || r.Kvs[0].Lease != lease {
			t.Fatalf("%s after a clean stop that keeps the lease: %v, want it on lease %x", k, r.Kvs, lease)
		}
	}
	startNode(t, srv, "node-a", id1, dir, keep)
	eventually(t, 10*time.Second, "restarted node re-publishes its status", func() bool {
		r, _ := cli.Get(context.Background(), registry.StatusKey("node-a"))
		return len(r.Kvs) == 1
	})
	time.Sleep(500 * time.Millisecond)
	for _, k := range []string{registry.NodeKey("node-a"), inst} {
		r, _ := cli.Get(context.Background(), k)
		if len(r.Kvs) != 1 || r.Kvs[0].Lease != lease {
			t.Fatalf("%s after the restart: %v, want the resumed lease %x", k, r.Kvs, lease)
		}
	}
	select {
	case ev := <-w:
		for _, e := range ev.Events {
			if e.Type == clientv3.EventTypeDelete {
				t.Errorf("stop and restart deleted %s: peers saw the node leave", e.Kv.Key)
			}
		}
	default:
	}
}
