package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"syscall"
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

// maxOverlayGap is the longest a node may go without a ping reply from
// the node a migration step moves, or the other way round; a rollback
// may take maxRollbackGap (docs/migration.md, "What to expect at each
// step": flanneld's and meshd's devices both hold the node's key for a
// moment, and one pair of nodes was once measured at 2.3 s).
const (
	maxOverlayGap  = 2 * time.Second
	maxRollbackGap = 3 * time.Second
)

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
		l := newLegacyFlannelNode(c, n, b.meshd)
		if err := l.startOverlay(ctx); err != nil {
			t.Fatalf("%s: legacy overlay: %v", n.Name, err)
		}
		legacy = append(legacy, l)
	}
	t.Cleanup(func() {
		for _, l := range legacy {
			if b, err := os.ReadFile(l.ConfdHAProxyLog()); t.Failed() && err == nil && len(b) > 0 {
				t.Logf("%s confd HAProxy's log (last 3000 bytes):\n%s", l.n.Name, b[max(0, len(b)-3000):])
			}
			l.stopOverlay(context.Background())
			l.stopHAProxy()
		}
	})
	// nix-infra's CLI wrote each node's entry, and its units register
	// each instance, unleased, at the node's overlay address.
	for _, l := range legacy {
		v := fmt.Sprintf(`{"name":%q,"ipv4":%q,"services":[%q]}`, l.n.Name, l.n.Addr, sandbox.DemoGroup)
		if _, err := c.Client().Put(ctx, registry.NodeKey(l.n.Name), v); err != nil {
			t.Fatal(err)
		}
	}
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
	// probe pings, both ways, between the node a step moves and every
	// other node, over the overlay.
	probe := func(m *legacyFlannelNode) *gapProbe {
		var tg []probeTarget
		for _, o := range legacy {
			if o != m {
				tg = append(tg, probeTarget{o.n, m.n.Name, addrs[m.n.Name]}, probeTarget{m.n, o.n.Name, addrs[o.n.Name]})
			}
		}
		return startGapProbe(tg)
	}
	var summary []string
	mark := func(step, what string) { t.Logf("%s %s: %s", time.Now().Format("15:04:05.000"), step, what) }
	check := func(step string, g *gapProbe) {
		t.Helper()
		time.Sleep(2 * time.Second) // steady load across the step's aftermath
		if g != nil {
			r := g.stop()
			var lat []string
			for _, l := range legacy {
				lat = append(lat, fmt.Sprintf("%s %v", l.n.Name, loads[l.n.Name].takeMaxLatency().Round(time.Millisecond)))
			}
			t.Logf("%s: %v\n  slowest request per node: %s", step, r, strings.Join(lat, ", "))
			bound := maxOverlayGap
			if strings.HasPrefix(step, "roll back") {
				bound = maxRollbackGap
			}
			if r.Max > bound {
				t.Errorf("%s: the overlay to or from the node was cut for %v (%s), want at most %v", step, r.Max.Round(time.Millisecond), r.Pair, bound)
			}
			summary = append(summary, fmt.Sprintf("%s: longest overlay gap %v (%s); slowest request %s",
				step, r.Max.Round(time.Millisecond), r.Pair, strings.Join(lat, ", ")))
		}
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
	check("all legacy", nil)

	for _, l := range legacy {
		step := "migrate " + l.n.Name
		g := probe(l)
		// The rebuild starts meshd (on its own port, next to flanneld)...
		mark(step, "start meshd")
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
		mark(step, "meshd converged; stop the legacy overlay")
		l.stopOverlay(ctx)
		mark(step, "stop confd's HAProxy")
		l.stopHAProxy()
		check(step, g)
		migrateStatusClear(ctx, t, b, c, step)
	}

	// Roll n1 back to the legacy overlay and HAProxy, as docs/migration.md
	// says: confd's HAProxy comes up next to meshd's; then meshd stops
	// (its device stays), flanneld starts with meshd's key and meshd's
	// device is deleted right after; then meshd's keys (not the flannel
	// lease) are removed. While both devices exist they hold the same key:
	// the peers' sessions are flanneld's from its first handshake on, but
	// the node's packets still leave through meshd's device, so the
	// overlay to the node is cut until that device goes.
	{
		l := legacy[0]
		step := "roll back " + l.n.Name
		g := probe(l)
		key, err := os.ReadFile(l.n.Config.StateDir + "/wireguard.key")
		if err != nil {
			t.Fatal(err)
		}
		os.Remove(l.keyFile)
		if err := os.WriteFile(l.keyFile, []byte(strings.TrimSpace(string(key))), 0o400); err != nil {
			t.Fatal(err)
		}
		mark(step, "start confd's HAProxy")
		if err := l.startHAProxy(ctx, groups); err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		hapPid, hapErr := l.n.HAProxyMasterPID()
		mark(step, "stop meshd")
		if err := l.n.StopMeshd(ctx, 10*time.Second); err != nil {
			t.Fatal(err)
		}
		// The app unit registers its instance again (meshd's leased one
		// went with meshd's lease).
		v := fmt.Sprintf(`{"ipv4":%q,"node":%q,"port":%d}`, l.subnet.Addr(), l.n.Name, sandbox.DemoPort)
		if _, err := c.Client().Put(ctx, registry.InstanceKey(sandbox.DemoGroup, sandbox.DemoApp, l.n.Name), v); err != nil {
			t.Fatal(err)
		}
		nv := fmt.Sprintf(`{"name":%q,"ipv4":%q,"services":[%q]}`, l.n.Name, l.n.Addr, sandbox.DemoGroup)
		if _, err := c.Client().Put(ctx, registry.NodeKey(l.n.Name), nv); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Second) // every HAProxy has the re-registered instance
		if hapErr == nil {
			syscall.Kill(hapPid, syscall.SIGUSR1) // meshd's HAProxy goes with its unit
		}
		// flanneld starts (meshd's device still carries the node's
		// packets: its routes shadow flanneld's), and meshd's device goes
		// right after it: from flanneld's first handshakes on, the peers'
		// sessions are flanneld's.
		mark(step, "start the legacy overlay")
		if err := l.startOverlay(ctx); err != nil {
			t.Fatalf("%s: %v", step, err)
		}
		mark(step, "delete meshd's device")
		if out, err := l.n.Exec(ctx, "ip", "link", "del", l.n.Config.Overlay.Interface); err != nil {
			t.Fatalf("delete meshd's device: %v %s", err, out)
		}
		mark(step, "meshctl node remove")
		if out, err := meshctl(ctx, b, c, "node", "remove", l.n.Name, "--keep-flannel-lease"); err != nil {
			t.Fatalf("%s: node remove: %v\n%s", step, err, out)
		}
		nv2, _ := c.Client().Get(ctx, registry.NodeKey(l.n.Name))
		if len(nv2.Kvs) == 0 {
			// node remove took nix-infra's entry too; nix-infra's CLI has it.
			c.Client().Put(ctx, registry.NodeKey(l.n.Name), nv) // checked by migrate status
		}
		mark(step, "done")
		check(step, g)
		migrateStatusClear(ctx, t, b, c, step)
	}
	t.Logf("per step:\n%s", strings.Join(summary, "\n"))

	results := map[string]loadResult{}
	for name, ld := range loads {
		results[name] = ld.stop()
		t.Logf("%s: %v", name, results[name])
	}
}

// migrateStatusClear waits until `meshctl migrate status -o json` names
// no blocker.
func migrateStatusClear(ctx context.Context, t *testing.T, b bins, c *sandbox.Cluster, step string) {
	t.Helper()
	var last string
	if _, err := eventually(60*time.Second, 500*time.Millisecond, func() error {
		out, err := meshctl(ctx, b, c, "migrate", "status", "-o", "json")
		last = out
		if err != nil {
			return err
		}
		var rep struct {
			Blockers []string `json:"blockers"`
		}
		if err := json.Unmarshal([]byte(out), &rep); err != nil {
			return err
		}
		if len(rep.Blockers) > 0 {
			return fmt.Errorf("blocked: %v", rep.Blockers)
		}
		return nil
	}); err != nil {
		t.Errorf("%s: migrate status: %v\n%s", step, err, last)
	}
	out, _ := meshctl(ctx, b, c, "migrate", "status")
	t.Logf("%s: meshctl migrate status:\n%s", step, out)
}

func wgPublic(t *testing.T, private string) string {
	t.Helper()
	k, err := wgtypes.ParseKey(strings.TrimSpace(private))
	if err != nil {
		t.Fatal(err)
	}
	return k.PublicKey().String()
}
