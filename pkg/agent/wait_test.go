package agent_test

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/agent"
	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/registry"
)

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }

func TestWaitAppliedAndLaggard(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ctx := context.Background()
	badKey := registry.MetaKey("backends", "poison")
	for _, n := range []struct{ name, id string }{{"node-a", id1}, {"node-b", id2}} {
		rec := &recorder{}
		if n.name == "node-b" {
			rec.fail = func(s *registry.Snapshot) bool {
				return s.Apps[registry.AppID{Group: "backends", Name: "poison"}] != nil
			}
		}
		startNode(t, srv, n.name, n.id, t.TempDir(), func(o *agent.Options) { o.Components = []agent.Component{rec} })
	}
	eventually(t, 10*time.Second, "both nodes live", func() bool {
		s, err := registry.ReadSnapshot(ctx, cli)
		return err == nil && len(registry.LiveMeshdNodes(s)) == 2
	})

	resp, err := cli.Put(ctx, registry.MetaKey("backends", "web"), `{"publish":{"port":8080}}`)
	if err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := registry.WaitApplied(wctx, cli, resp.Header.Revision, nil); err != nil {
		t.Fatalf("wait: %v", err)
	}

	resp, _ = cli.Put(ctx, badKey, `{"publish":{"port":8081}}`)
	wctx2, cancel2 := context.WithTimeout(ctx, 1500*time.Millisecond)
	defer cancel2()
	err = registry.WaitApplied(wctx2, cli, resp.Header.Revision, nil)
	if !errors.Is(err, registry.ErrLagging) || !strings.Contains(err.Error(), "node-b") || strings.Contains(err.Error(), "node-a") ||
		!strings.Contains(err.Error(), "injected failure") {
		t.Fatalf("wait = %v, want a timeout naming only node-b and its error", err)
	}
}

func TestReregistersAfterEtcdRestart(t *testing.T) {
	srv := etcdtest.New(t)
	rec := &recorder{}
	startNode(t, srv, "node-a", id1, t.TempDir(), func(o *agent.Options) {
		withInstance(o)
		o.Components = []agent.Component{rec}
	})
	cli := etcdtest.NewClient(t, srv)
	eventually(t, 10*time.Second, "registered", func() bool {
		r, _ := cli.Get(context.Background(), registry.InstanceKey("backends", "web", "node-a"))
		return len(r.Kvs) == 1
	})
	srv.Stop()
	time.Sleep(3 * time.Second) // longer than the lease TTL
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	cli2 := etcdtest.NewClient(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	resp, err := cli2.Put(ctx, registry.MetaKey("backends", "web"), `{"publish":{"port":8080}}`)
	if err != nil {
		t.Fatal(err)
	}
	if err := registry.WaitApplied(ctx, cli2, resp.Header.Revision, []string{"node-a"}); err != nil {
		t.Fatalf("node did not converge after etcd came back: %v", err)
	}
	r, _ := cli2.Get(ctx, registry.InstanceKey("backends", "web", "node-a"))
	if len(r.Kvs) != 1 {
		t.Fatal("instance not re-registered")
	}
}
