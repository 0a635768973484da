package haproxycfg

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/agent"
	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/registry"
)

// confdTemplateFixture renders what nix-infra's confd template renders
// for a node (../shared/NIX-INFRA.md, "The HAProxy config confd
// renders"), from the raw etcd keys as confd reads them: a stats socket;
// defaults mode tcp with 5 s / 50 s / 50 s timeouts; for each consumed
// group, for each app with meta_data, a listener tcp-in-<group>-<app> on
// 127.0.0.1:<publish.port> and a backend <app>, balance roundrobin, one
// "server <node> <ipv4>:<port> check" per instance key. It is a test
// fixture standing in for confd (which cannot be built here), not confd.
func confdTemplateFixture(t *testing.T, cli *clientv3.Client, consume []registry.Group) string {
	t.Helper()
	var b strings.Builder
	b.WriteString("global\n    stats socket /tmp/confd-fixture.sock mode 600 level admin expose-fd listeners\n")
	b.WriteString("defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 50s\n    timeout server 50s\n")
	for _, g := range consume {
		resp, err := cli.Get(context.Background(), registry.ClusterPrefix+string(g)+"/", clientv3.WithPrefix())
		if err != nil {
			t.Fatal(err)
		}
		metas := map[string]registry.AppMeta{}
		instances := map[string][]registry.Instance{}
		for _, kv := range resp.Kvs {
			parts := strings.Split(strings.TrimPrefix(string(kv.Key), registry.ClusterPrefix+string(g)+"/"), "/")
			switch {
			case len(parts) == 2 && parts[1] == "meta_data":
				var m registry.AppMeta
				if json.Unmarshal(kv.Value, &m) == nil {
					metas[parts[0]] = m
				}
			case len(parts) == 3 && parts[1] == "instances":
				var in registry.Instance
				if json.Unmarshal(kv.Value, &in) == nil {
					instances[parts[0]] = append(instances[parts[0]], in)
				}
			}
		}
		for _, app := range slices.Sorted(maps.Keys(metas)) {
			fmt.Fprintf(&b, "frontend tcp-in-%s-%s\n    bind 127.0.0.1:%d\n    default_backend %s\n", g, app, metas[app].Publish.Port, app)
			fmt.Fprintf(&b, "backend %s\n    balance roundrobin\n", app)
			for _, in := range instances[app] {
				fmt.Fprintf(&b, "    server %s %s:%d check\n", in.Node, in.IPv4, in.Port)
			}
		}
	}
	return b.String()
}

// TestConfdAndMeshdShareInstances runs both directions in one cluster: a
// meshd node advertises its instance of an app (leased, as meshd writes
// it) while a nix-infra node's unit registered another instance of the
// same app (unleased, as nix-infra's etcdctl calls write it). meshd's
// HAProxy desired state holds both; the config confd's template renders
// holds both too, and haproxy accepts it.
func TestConfdAndMeshdShareInstances(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ctx := context.Background()
	put := func(k, v string) {
		if _, err := cli.Put(ctx, k, v); err != nil {
			t.Fatal(err)
		}
	}
	put("/cluster/backends/web/meta_data", `{"env":{"HOST":"127.0.0.1","PATH":"","PORT":11311,"PROTOCOL":"http"},"env_prefix":"APP_WEB","publish":{"port":11311}}`)
	put("/cluster/nodes/legacy001", `{"name":"legacy001","ipv4":"198.51.100.2","services":["backends","services"]}`)
	put("/cluster/backends/web/instances/legacy001", `{"ipv4":"10.10.2.0","node":"legacy001","port":11311}`)

	a, err := agent.New(agent.Options{
		Client: etcdtest.NewClient(t, srv), Node: "meshd001", ID: "0123456789abcdef0123456789abcdef",
		LeaseTTL: 3 * time.Second, Coalesce: time.Millisecond, StateDir: t.TempDir(),
		AdvertiseIP: netip.MustParseAddr("10.10.1.0"),
		Instances:   []agent.Instance{{Group: "backends", App: "web", Port: 11311, Interval: 50 * time.Millisecond}},
		Log:         slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatal(err)
	}
	actx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { a.Run(actx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })

	want := map[string]netip.AddrPort{
		"meshd001":  netip.MustParseAddrPort("10.10.1.0:11311"),
		"legacy001": netip.MustParseAddrPort("10.10.2.0:11311"),
	}
	// meshd reads the unleased nix-infra instance.
	deadline := time.Now().Add(20 * time.Second)
	for {
		d := Compute(a.Snapshot(), Params{Self: "meshd001", Consume: []registry.Group{"backends"}})
		got := map[string]netip.AddrPort{}
		for _, l := range d.Listeners {
			for _, s := range l.Slots {
				if !s.Empty() {
					got[s.Node] = s.Addr
				}
			}
		}
		if len(got) == 2 && got["meshd001"] == want["meshd001"] && got["legacy001"] == want["legacy001"] {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("meshd's HAProxy servers %v, want %v", got, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
	// confd's template reads the leased meshd instance.
	cfg := confdTemplateFixture(t, cli, []registry.Group{"backends", "services"})
	for _, line := range []string{"server meshd001 10.10.1.0:11311 check", "server legacy001 10.10.2.0:11311 check", "bind 127.0.0.1:11311"} {
		if !strings.Contains(cfg, line) {
			t.Errorf("confd-rendered config lacks %q:\n%s", line, cfg)
		}
	}
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		t.Skip("haproxy not installed: the confd-rendered config was checked by content only")
	}
	path := filepath.Join(t.TempDir(), "confd.cfg")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(bin, "-c", "-q", "-f", path).CombinedOutput(); err != nil {
		t.Errorf("haproxy -c rejects the confd-rendered config: %v\n%s\n%s", err, out, cfg)
	}
}
