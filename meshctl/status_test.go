package main

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/registry"
)

func statusJSON(t *testing.T, endpoint string) (int, statusOut, string) {
	t.Helper()
	code, out, errs := ctlRun(t, endpoint, "status", "-o", "json")
	var so statusOut
	if err := json.Unmarshal([]byte(out), &so); err != nil {
		t.Fatalf("status -o json: %v\n%s\n%s", err, out, errs)
	}
	return code, so, errs
}

func rowOf(so statusOut, node string) (statusRow, bool) {
	for _, r := range so.Nodes {
		if r.Node == node {
			return r, true
		}
	}
	return statusRow{}, false
}

// TestStatusConvergedAndDown runs two agents on a real etcd: converged,
// both report behind 0 although their own status writes moved etcd's
// revision on; a node stopped cleanly stays listed, DOWN, with when it
// stopped, and the command exits 1.
func TestStatusConvergedAndDown(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	startAgent(t, srv, "node-a", "0123456789abcdef0123456789abcdef")
	stopB := startAgent(t, srv, "node-b", "fedcba9876543210fedcba9876543210")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := cli.Put(ctx, registry.MetaKey("backends", "web"), `{"publish":{"port":18080}}`)
	if err != nil {
		t.Fatal(err)
	}
	if err := registry.WaitApplied(ctx, cli, resp.Header.Revision, []string{"node-a", "node-b"}); err != nil {
		t.Fatal(err)
	}
	var so statusOut
	deadline := time.Now().Add(20 * time.Second)
	for {
		code, s, errs := statusJSON(t, srv.Endpoint())
		so = s
		a, okA := rowOf(so, "node-a")
		b, okB := rowOf(so, "node-b")
		if code == exitOK && okA && okB && a.State == stateUp && b.State == stateUp && a.Behind == 0 && b.Behind == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("converged nodes: exit %d %s, %+v", code, errs, so)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if so.Revision <= resp.Header.Revision {
		t.Errorf("cluster revision %d: the status writes after %d should have moved it on", so.Revision, resp.Header.Revision)
	}

	// A change node-b has not applied yet (it is stopped) counts for it.
	stopped := time.Now()
	stopB()
	if _, err := cli.Put(ctx, registry.MetaKey("backends", "api"), `{"publish":{"port":18081}}`); err != nil {
		t.Fatal(err)
	}
	code, so, errs := statusJSON(t, srv.Endpoint())
	b, ok := rowOf(so, "node-b")
	if code != exitFailed || !strings.Contains(errs, "down: node-b") {
		t.Errorf("with node-b down: exit %d, stderr %q; want %d naming node-b", code, errs, exitFailed)
	}
	if !ok || b.State != stateDown || b.Live || b.LastSeen == nil || b.LastSeenAs != "stopped" ||
		b.LastSeen.Before(stopped.Add(-time.Second)) || b.LastSeen.After(time.Now()) {
		t.Errorf("node-b row %+v: want DOWN, last seen when it stopped", b)
	}
	if so.Down != 1 || so.Failing != 0 {
		t.Errorf("down %d failing %d", so.Down, so.Failing)
	}
	code, table, _ := ctlRun(t, srv.Endpoint(), "status")
	if code != exitFailed || !strings.Contains(table, "node-b") || !strings.Contains(table, "DOWN") || !strings.Contains(table, "stopped ") {
		t.Errorf("table, exit %d:\n%s", code, table)
	}
}
