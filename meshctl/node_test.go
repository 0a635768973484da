package main

import (
	"bytes"
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/agent"
	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/registry"
)

func ctlRun(t *testing.T, endpoint string, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	getenv := func(k string) string {
		if k == "MESHCTL_ENDPOINTS" {
			return endpoint
		}
		return ""
	}
	code := run(context.Background(), args, strings.NewReader(""), &out, &errb, getenv)
	return code, out.String(), errb.String()
}

// startAgent runs an in-process meshd agent (no kernel parts) so that
// --wait has a node to wait for. stop stops it cleanly (lease revoked).
func startAgent(t *testing.T, srv *etcdtest.Server, name, id string, comps ...agent.Component) (stop func()) {
	t.Helper()
	cli := etcdtest.NewClient(t, srv)
	a, err := agent.New(agent.Options{Client: cli, Node: name, ID: id, LeaseTTL: 3 * time.Second,
		Coalesce: time.Millisecond, StateDir: t.TempDir(), Components: comps})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { a.Run(ctx); close(done) }()
	stop = func() { cancel(); <-done }
	t.Cleanup(stop)
	return stop
}

func TestAppRegisterListUnregisterWait(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	startAgent(t, srv, "node-a", "0123456789abcdef0123456789abcdef")
	ep := srv.Endpoint()

	code, out, errs := ctlRun(t, ep, "app", "register", "app-mongodb-pod", "--group", "services", "--port", "11311", "--wait", "--timeout", "10s")
	if code != 0 {
		t.Fatalf("register: %d %s %s", code, out, errs)
	}
	r, _ := cli.Get(context.Background(), registry.MetaKey("services", "app-mongodb-pod"))
	var got map[string]any
	json.Unmarshal(r.Kvs[0].Value, &got)
	want := `{"env":{"HOST":"127.0.0.1","PATH":"","PORT":11311,"PROTOCOL":"http"},"env_prefix":"APP_APP_MONGODB_POD","publish":{"port":11311}}`
	var wantM map[string]any
	json.Unmarshal([]byte(want), &wantM)
	if gb, _ := json.Marshal(got); string(gb) != mustJSON(wantM) {
		t.Errorf("meta_data = %s, want nix-infra's shape %s", r.Kvs[0].Value, want)
	}
	if !strings.Contains(errs, "applied by every node") {
		t.Errorf("--wait did not report convergence: %q", errs)
	}

	// Port collisions and hostile names are refused before anything is written.
	if code, _, errs := ctlRun(t, ep, "app", "register", "other", "--group", "backends", "--port", "11311"); code != exitFailed || !strings.Contains(errs, "already published by services/app-mongodb-pod") {
		t.Errorf("collision: %d %q", code, errs)
	}
	if code, _, errs := ctlRun(t, ep, "app", "register", "x\n  server evil 1.2.3.4:80", "--group", "backends", "--port", "9999"); code != exitUsage || !strings.Contains(errs, "invalid name") {
		t.Errorf("hostile name: %d %q", code, errs)
	}
	if code, _, _ := ctlRun(t, ep, "app", "register", "ok", "--group", "nope", "--port", "9999"); code != exitUsage {
		t.Errorf("bad group: %d", code)
	}
	if code, _, _ := ctlRun(t, ep, "app", "register", "ok", "--group", "backends", "--port", "0"); code != exitUsage {
		t.Errorf("bad port: %d", code)
	}
	r, _ = cli.Get(context.Background(), "/cluster/backends/", clientOptPrefix()...)
	if r.Count != 0 {
		t.Errorf("refused registrations wrote %d keys", r.Count)
	}

	code, out, _ = ctlRun(t, ep, "app", "list", "-o", "json")
	var rows []appRow
	if code != 0 || json.Unmarshal([]byte(out), &rows) != nil || len(rows) != 1 || rows[0].Port != 11311 {
		t.Errorf("app list: %d %s", code, out)
	}
	if code, _, errs := ctlRun(t, ep, "app", "unregister", "app-mongodb-pod", "--group", "services", "--wait"); code != 0 {
		t.Errorf("unregister: %d %s", code, errs)
	}
	if code, _, _ := ctlRun(t, ep, "app", "unregister", "app-mongodb-pod", "--group", "services"); code != exitFailed {
		t.Errorf("unregister of a missing app: %d", code)
	}
}

// stuck is a component that never applies: its node never converges.
type stuck struct{}

func (stuck) Name() string                                    { return "stuck" }
func (stuck) Apply(context.Context, *registry.Snapshot) error { return errFake }
func (stuck) Status() any                                     { return nil }

var errFake = &fakeErr{}

type fakeErr struct{}

func (*fakeErr) Error() string { return "cannot apply" }

func TestWaitTimesOutNamingLaggard(t *testing.T) {
	srv := etcdtest.New(t)
	startAgent(t, srv, "node-ok", "0123456789abcdef0123456789abcdef")
	startAgent(t, srv, "node-stuck", "fedcba9876543210fedcba9876543210", stuck{})
	cli := etcdtest.NewClient(t, srv)
	deadline := time.Now().Add(10 * time.Second)
	for {
		s, _ := registry.ReadSnapshot(context.Background(), cli)
		if s != nil && len(registry.LiveMeshdNodes(s)) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("nodes did not register")
		}
		time.Sleep(50 * time.Millisecond)
	}
	code, _, errs := ctlRun(t, srv.Endpoint(), "app", "register", "web", "--group", "backends", "--port", "8080", "--wait", "--timeout", "1s")
	if code != exitTimeout || !strings.Contains(errs, "node-stuck") || strings.Contains(errs, "node-ok") || !strings.Contains(errs, "cannot apply") {
		t.Fatalf("code %d, stderr %q: want exit 3 naming only node-stuck and its error", code, errs)
	}
	code, out, _ := ctlRun(t, srv.Endpoint(), "status")
	if code != exitFailed || !strings.Contains(out, "node-stuck") || !strings.Contains(out, "stuck failing: cannot apply") {
		t.Errorf("status exit %d, want %d showing the failing component:\n%s", code, exitFailed, out)
	}
}

func TestNodeListAndRemove(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ctx := context.Background()
	m, err := registry.ClaimMember(ctx, cli, registry.Member{Name: "worker003", PublicKey: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}, registry.DefaultPool, "")
	if err != nil {
		t.Fatal(err)
	}
	cli.Put(ctx, registry.NodeKey("worker003"), `{"name":"worker003","ipv4":"65.108.1.4","services":["backends"]}`)
	cli.Put(ctx, registry.InstanceKey("backends", "web", "worker003"), `{"ipv4":"`+m.OverlayIP.String()+`","node":"worker003","port":8080}`)
	cli.Put(ctx, registry.InstanceKey("backends", "web", "worker004"), `{"ipv4":"10.10.4.0","node":"worker004","port":8080}`)
	cli.Put(ctx, registry.SecretKey("worker003", "db"), `{"version":1,"ciphertext":"x"}`)
	cli.Put(ctx, registry.SeenKey("worker003"), `{"node":"worker003","registeredAt":"2026-12-03T12:00:00Z"}`)

	code, out, _ := ctlRun(t, srv.Endpoint(), "node", "list")
	if code != 0 || !strings.Contains(out, "worker003") || !strings.Contains(out, m.Subnet.String()) {
		t.Errorf("node list:\n%s", out)
	}
	if code, _, errs := ctlRun(t, srv.Endpoint(), "node", "remove", "nosuch"); code != exitFailed || !strings.Contains(errs, "no node") {
		t.Errorf("remove unknown: %d %q", code, errs)
	}
	if code, _, errs := ctlRun(t, srv.Endpoint(), "node", "remove", "worker003"); code != 0 {
		t.Fatalf("remove: %d %s", code, errs)
	}
	r, _ := cli.Get(ctx, "/", clientOptPrefix()...)
	for _, kv := range r.Kvs {
		if strings.Contains(string(kv.Key), "worker003") || strings.Contains(string(kv.Value), `"worker003"`) {
			t.Errorf("left behind: %s = %s", kv.Key, kv.Value)
		}
	}
	if r2, _ := cli.Get(ctx, registry.InstanceKey("backends", "web", "worker004")); r2.Count != 1 {
		t.Error("another node's instance was removed")
	}
}

func mustJSON(v any) string { b, _ := json.Marshal(v); return string(b) }

func clientOptPrefix() []clientv3.OpOption { return []clientv3.OpOption{clientv3.WithPrefix()} }
