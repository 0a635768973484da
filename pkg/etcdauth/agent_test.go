package etcdauth

import (
	"context"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/agent"
	"github.com/meshd/meshd/pkg/registry"
	"github.com/meshd/meshd/pkg/testlog"
)

// TestMeshdAgentUnderNodeRole runs meshd's real agent (subnet claim,
// member record, leased entry, instance, status, watches of /cluster/ and
// its own secrets, lease revoke on exit) with node A's certificate against
// an etcd with auth on, and checks that it converges without a single
// permission error: the roles are not only tight but sufficient.
func TestMeshdAgentUnderNodeRole(t *testing.T) {
	f, _ := setup(t)
	a := f.client(t, nodeA)
	var logs testlog.Buffer
	ag, err := agent.New(agent.Options{
		Client: a, Node: nodeA, ID: "test-id-a", PublicIPv4: "192.0.2.1",
		Consume:  []registry.Group{registry.GroupBackends},
		LeaseTTL: 5 * time.Second, Coalesce: 10 * time.Millisecond, StateDir: t.TempDir(),
		Member:      &agent.MemberOptions{PublicKey: wgKey('a'), Endpoint: "192.0.2.1:51820", Pool: registry.DefaultPool},
		AdvertiseIP: netip.MustParseAddr("192.0.2.1"),
		Instances:   []agent.Instance{{Group: testApp.Group, App: testApp.Name, Port: 8080}},
		Secrets:     true,
		Log:         slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ag.Run(ctx) }()
	defer func() {
		cancel()
		<-done
	}()

	rev, err := f.root.Get(ctxT(t), "/")
	if err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(ctxT(t), 15*time.Second)
	defer wcancel()
	if err := registry.WaitApplied(wctx, f.root, rev.Header.Revision, []string{nodeA}); err != nil {
		t.Fatalf("agent under its role did not converge: %v\nlogs:\n%s", err, logs.String())
	}
	for _, k := range []string{registry.NodeKey(nodeA), registry.MemberKey(nodeA), registry.InstanceKey(testApp.Group, testApp.Name, nodeA), registry.SeenKey(nodeA)} {
		if get(t, f.root, k) == "" {
			t.Errorf("agent did not write %s", k)
		}
	}
	snap := ag.Snapshot()
	if _, ok := snap.Secrets["db"]; !ok {
		t.Errorf("agent did not receive its own secret; secrets %v", snap.Secrets)
	}
	if _, ok := snap.Nodes[nodeB]; !ok {
		t.Errorf("agent does not see node B")
	}

	cancel()
	if err := <-done; err != nil && ctx.Err() == nil {
		t.Errorf("agent: %v", err)
	}
	done <- nil
	if get(t, f.root, registry.NodeKey(nodeA)) != "" {
		t.Error("agent's entry survived its exit (lease revoke refused?)")
	}
	if seen, err := registry.DecodeSeen(nodeA, []byte(get(t, f.root, registry.SeenKey(nodeA)))); err != nil || !seen.StoppedAt.After(seen.RegisteredAt) {
		t.Errorf("presence record after a clean stop: %+v %v", seen, err)
	}
	if strings.Contains(logs.String(), "permission denied") {
		t.Errorf("agent hit permission errors:\n%s", logs.String())
	}
}
