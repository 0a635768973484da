package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshd/meshd/pkg/config"
	"github.com/meshd/meshd/pkg/registry"
	"github.com/meshd/meshd/pkg/sandbox"
)

// migrationPort is meshd's WireGuard port in the migration: not
// flanneld's 51820, so both overlays run side by side for a moment.
const migrationPort = 51821

// TestMigration moves a running cluster of four legacy nodes (the
// legacyFlannelNode test fixture: flanneld's WireGuard backend and
// confd's HAProxy, followed step by step) to meshd one node at a time,
// under a steady request load through every node's 127.0.0.1 listener,
// then rolls one node back. After every step: no request failed, every
// node's overlay address is the one it started with, and nix-infra's
// overlay-IP lookup (the flannel lease whose PublicIP is the node's)
// returns it.
func TestMigration(t *testing.T) {
	c, b := startCluster(t, "m", 3*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	groups := []registry.Group{sandbox.DemoGroup}
	if _, err := c.Client().Put(ctx, registry.FlannelConfigKey, flannelNetworkConfig); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.RegisterApp(ctx, sandbox.DemoGroup, sandbox.DemoApp, sandbox.DemoMeta()); err != nil {
		t.Fatal(err)
	}

	const nodes = 4
	var legacy []*legacyFlannelNode
	for range nodes {
		n, err := c.AddNode(ctx, sandbox.NodeOptions{
			Consume:   groups,
			Instances: []config.Instance{{App: sandbox.DemoApp, Group: sandbox.DemoGroup, Port: sandbox.DemoPort}},
			NoStart:   true,
			Edit: func(cfg *config.Config) {
				// flanneld's key, imported on meshd's first start.
				cfg.Overlay.ImportKeyFile = legacyKeyFile(strings.TrimSuffix(cfg.StateDir, "/state"))
				// Another port than flanneld's, so that meshd's overlay
				// comes up before flanneld's goes (docs/migration.md).
				cfg.Overlay.ListenPort = migrationPort
				cfg.Overlay.Endpoint = netip.AddrPortFrom(netip.MustParseAddr(cfg.PublicIPv4), migrationPort).String()
			},
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := n.ServeDemo(sandbox.DemoPort); err != nil {
			t.Fatal(err)
		}
		l := newLegacyFlannelNode(t, c, n, b.meshd)
		if err := l.startOverlay(ctx); err != nil {
			t.Fatalf("%s: legacy overlay: %v", n.Name, err)
		}
		legacy = append(legacy, l)
	}
	t.Cleanup(func() {
		for _, l := range legacy {
			l.stopOverlay(context.Background())
			l.stopHAProxy()
		}
	})
	// nix-infra's units register each instance, unleased, at the node's
	// overlay address.
	for _, l := range legacy {
		v := fmt.Sprintf(`{"ipv4":%q,"node":%q,"port":%d}`, l.subnet.Addr(), l.n.Name, sandbox.DemoPort)
		if _, err := c.Client().Put(ctx, registry.InstanceKey(sandbox.DemoGroup, sandbox.DemoApp, l.n.Name), v); err != nil {
			t.Fatal(err)
		}
	}
	for _, l := range legacy {
		if err := l.startHAProxy(ctx, groups); err != nil {
			t.Fatalf("%s: %v", l.n.Name, err)
		}
	}
	addrs := map[string]netip.Addr{}
	for _, l := range legacy {
		addrs[l.n.Name] = l.subnet.Addr()
	}
	// Every node reaches the app through its HAProxy and the overlay.
	for _, l := range legacy {
		if _, err := eventually(30*time.Second, 100*time.Millisecond, func() error {
			for range 8 { // roundrobin over every instance
				if _, _, err := l.n.HTTPGet(ctx, demoURL); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			t.Fatalf("legacy cluster: %s cannot reach the app: %v", l.n.Name, err)
		}
	}

	loads := map[string]*load{}
	for _, l := range legacy {
		loads[l.n.Name] = startLoad(l.n, demoURL, 2, 20*time.Millisecond, 20*time.Second)
	}
	check := func(step string) {
		t.Helper()
		time.Sleep(2 * time.Second) // steady load across the step's aftermath
		for _, l := range legacy {
			ok, failed := loads[l.n.Name].counts()
			if failed != 0 {
				t.Errorf("%s: %s: %d requests failed (%d ok): %v", step, l.n.Name, failed, ok, loads[l.n.Name].errs)
			}
			if ok == 0 {
				t.Errorf("%s: %s: no request succeeded", step, l.n.Name)
			}
			got, err := lookupOverlayIP(ctx, c.Client(), l.n.Addr)
			if err != nil || got != addrs[l.n.Name].String() {
				t.Errorf("%s: nix-infra lookup for %s = %q, %v; want %v", step, l.n.Name, got, err, addrs[l.n.Name])
			}
		}
		ms, err := c.Members(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for name, m := range ms {
			if m.OverlayIP != addrs[name] {
				t.Errorf("%s: %s's overlay address is %v, was %v", step, name, m.OverlayIP, addrs[name])
			}
		}
		if t.Failed() {
			t.FailNow()
		}
		t.Logf("%s: ok", step)
	}
	check("all legacy")

	for _, l := range legacy {
		step := "migrate " + l.n.Name
		// The rebuild starts meshd (on its own port, next to flanneld)...
		if err := l.n.Start(ctx); err != nil {
			t.Fatal(err)
		}
		rev, _, err := c.WaitKey(ctx, registry.MemberKey(l.n.Name), false)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := waitAll(ctx, c, rev, 60*time.Second); err != nil {
			t.Fatalf("%s: %v\n%s", step, err, logTail(l.n, 30))
		}
		// Its WireGuard key is flanneld's.
		key, _ := os.ReadFile(l.keyFile)
		ms, _ := c.Members(ctx)
		if want := wgPublic(t, string(key)); ms[l.n.Name].PublicKey != want {
			t.Errorf("%s: member key %s, flanneld's was %s", step, ms[l.n.Name].PublicKey, want)
		}
		// ...then stops flanneld (its link, address and route go; meshd's
		// are there) and confd's HAProxy (meshd's listens on the port too).
		l.stopOverlay(ctx)
		l.stopHAProxy()
		check(step)
		out, err := meshctl(ctx, b, c, "migrate", "status")
		t.Logf("meshctl migrate status:\n%s", out)
		if err != nil {
			t.Errorf("migrate status: %v", err)
		}
	}

	results := map[string]loadResult{}
	for name, ld := range loads {
		results[name] = ld.stop()
		t.Logf("%s: %v", name, results[name])
	}
}

func wgPublic(t *testing.T, private string) string {
	t.Helper()
	k, err := wgtypes.ParseKey(strings.TrimSpace(private))
	if err != nil {
		t.Fatal(err)
	}
	return k.PublicKey().String()
}
