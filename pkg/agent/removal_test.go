package agent_test

import (
	"context"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/agent"
	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/registry"
)

// instanceSeer is a Component that records, for each pass, whether the
// app's instance on node was in the snapshot it was given.
type instanceSeer struct {
	id   registry.AppID
	node string

	mu   sync.Mutex
	seen bool
}

func (s *instanceSeer) Name() string { return "seer" }
func (s *instanceSeer) Apply(_ context.Context, snap *registry.Snapshot) error {
	ok := false
	if app := snap.Apps[s.id]; app != nil {
		_, ok = app.Instances[s.node]
	}
	s.mu.Lock()
	s.seen = ok
	s.mu.Unlock()
	return nil
}
func (s *instanceSeer) Status() any { return nil }
func (s *instanceSeer) has() bool   { s.mu.Lock(); defer s.mu.Unlock(); return s.seen }

var webApp = registry.AppID{Group: "backends", Name: "web"}

func putWebInstance(t *testing.T, cli *clientv3.Client) {
	t.Helper()
	ctx := context.Background()
	if _, err := cli.Put(ctx, registry.MetaKey("backends", "web"), `{"publish":{"port":18080}}`); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctx, registry.InstanceKey("backends", "web", "elsewhere"), `{"ipv4":"10.10.7.0","node":"elsewhere","port":80}`); err != nil {
		t.Fatal(err)
	}
}

// The removal grace exists for the reconnect skew after an outage; a node
// that never lost its lease applies a removal at once, and its status
// says so only once it has.
func TestRemovalAfterFirstRegistrationHasNoGrace(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	seer := &instanceSeer{id: webApp, node: "elsewhere"}
	b := startNode(t, srv, "node-b", id2, t.TempDir(), func(o *agent.Options) {
		o.Components = []agent.Component{seer}
		o.RemovalGrace = time.Minute
	})
	putWebInstance(t, cli)
	eventually(t, 10*time.Second, "instance applied", seer.has)
	del, err := cli.Delete(context.Background(), registry.InstanceKey("backends", "web", "elsewhere"))
	if err != nil {
		t.Fatal(err)
	}
	// Well under the removal grace (a minute): the removal has no grace.
	eventually(t, 10*time.Second, "removal applied right after the first registration", func() bool {
		return !seer.has() && b.a.Status().Revision >= del.Header.Revision
	})
}

// After a lease loss, removals seen on reconnecting wait out the removal
// grace, and the published applied revision does not claim them
// meanwhile (meshctl --wait must not report them done).
func TestRemovalGraceAfterLeaseLoss(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	proxy := etcdtest.NewProxy(t, srv.Addr())
	pcli, err := clientv3.New(clientv3.Config{Endpoints: []string{proxy.Endpoint()}, DialTimeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pcli.Close() })
	seer := &instanceSeer{id: webApp, node: "elsewhere"}
	const grace = 8 * time.Second // outlasts seeing the deletion after the reconnect, on a busy machine too
	b := startNode(t, srv, "node-b", id2, t.TempDir(), func(o *agent.Options) {
		o.Client = pcli
		o.Components = []agent.Component{seer}
		o.RemovalGrace = grace
	})
	putWebInstance(t, cli)
	eventually(t, 10*time.Second, "instance applied", seer.has)
	eventually(t, 10*time.Second, "registered", func() bool { return b.a.Status().Revision > 0 })

	proxy.Cut()
	del, err := cli.Delete(context.Background(), registry.InstanceKey("backends", "web", "elsewhere"))
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(4 * time.Second) // longer than the 2 s lease TTL: the lease expires
	proxy.Restore()

	// Back: the node sees the deletion but keeps the instance for the
	// removal grace, and does not claim the deletion's revision.
	eventually(t, 15*time.Second, "node saw the deletion", func() bool {
		return b.a.Status().Seen >= del.Header.Revision
	})
	if !seer.has() {
		t.Fatal("instance dropped at once after the lease loss; want it kept for the removal grace")
	}
	if rev := b.a.Status().Revision; rev >= del.Header.Revision {
		t.Fatalf("status claims revision %d (the deletion is %d) while the removal grace runs", rev, del.Header.Revision)
	}
	eventually(t, grace+5*time.Second, "removal applied after the grace", func() bool {
		return !seer.has() && b.a.Status().Revision >= del.Header.Revision
	})
}
