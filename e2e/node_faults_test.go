package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshd/meshd/pkg/haproxycfg"
	"github.com/meshd/meshd/pkg/registry"
	"github.com/meshd/meshd/pkg/sandbox"
)

// ghostSubnet is the subnet of the fake member the state-directory fault
// adds to make every node change (and cache) its overlay.
var ghostSubnet = netip.MustParsePrefix("10.10.200.0/24")

// putGhost writes a valid member record and subnet claim for a node that
// does not exist, so that every node adds a WireGuard peer; it returns the
// revision and the peer's public key.
func putGhost(ctx context.Context, t *testing.T, c *sandbox.Cluster) (int64, string) {
	t.Helper()
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	pub := k.PublicKey().String()
	if _, _, err := c.Put(ctx, registry.SubnetKey(ghostSubnet), `{"node":"ghost"}`); err != nil {
		t.Fatal(err)
	}
	m, _ := json.Marshal(registry.Member{Name: "ghost", PublicKey: pub, Endpoint: "172.31.213.250:51820",
		Subnet: ghostSubnet, OverlayIP: ghostSubnet.Addr()})
	rev, _, err := c.Put(ctx, registry.MemberKey("ghost"), string(m))
	if err != nil {
		t.Fatal(err)
	}
	return rev, pub
}

// stateDirFaults is fault 6: n3's state directory goes read-only and n4's
// fills up (each only in its meshd's mount namespace), then the overlay
// changes on every node. Both must keep applying (the new peer is there),
// report the failed cache write, and leave the key and the cache intact;
// restarted on the healthy directory, they come back with the same key.
func stateDirFaults(ctx context.Context, t *testing.T, c *sandbox.Cluster) {
	type victim struct {
		n          *sandbox.Node
		dir        string
		key, cache []byte
	}
	var vs []*victim
	for _, f := range []struct {
		node  string
		fault sandbox.StateDirFault
	}{{"n3", sandbox.StateReadOnly}, {"n4", sandbox.StateFull}} {
		n := c.Node(f.node)
		dir, err := n.BreakStateDir(ctx, f.fault)
		if err != nil {
			t.Fatal(err)
		}
		v := &victim{n: n, dir: dir}
		if v.key, err = os.ReadFile(filepath.Join(dir, "wireguard.key")); err != nil {
			t.Fatal(err)
		}
		if v.cache, err = os.ReadFile(filepath.Join(dir, "overlay.json")); err != nil {
			t.Fatal(err)
		}
		vs = append(vs, v)
	}
	logBefore := map[string]int{}
	for _, v := range vs {
		logBefore[v.n.Name] = len(v.n.LogTail(1 << 30))
	}
	pids := meshdPids(c)
	rev, ghost := putGhost(ctx, t, c)
	if _, err := waitAll(ctx, c, rev, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	for _, n := range c.Nodes() {
		p, err := peerKeys(ctx, n)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := p[ghost]; !ok {
			t.Errorf("%s did not add the new peer", n.Name)
		}
	}
	sts, _, err := c.Statuses(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range vs {
		newLog := v.n.LogTail(1 << 30)[logBefore[v.n.Name]:]
		if !strings.Contains(newLog, "cannot write overlay cache") {
			t.Errorf("%s did not report the failed cache write; log since the fault:\n%s", v.n.Name, newLog)
		}
		for _, line := range strings.Split(newLog, "\n") {
			if strings.Contains(line, "cannot write overlay cache") {
				t.Logf("%s reports: %s", v.n.Name, line)
				break
			}
		}
		// The overlay is applied (no component error), and the status
		// says that its boot cache could not be written.
		st := sts[v.n.Name]
		if st.Revision < rev || len(st.Errors) > 0 {
			t.Errorf("%s's status: revision %d (want >= %d), errors %v", v.n.Name, st.Revision, rev, st.Errors)
		}
		if ce := overlayCacheError(st); ce == "" {
			t.Errorf("%s's status does not report the failed cache write: %s", v.n.Name, st.Components["overlay"])
		} else {
			t.Logf("%s's status: components.overlay.cacheError %q", v.n.Name, ce)
		}
		key, err := os.ReadFile(filepath.Join(v.dir, "wireguard.key"))
		if err != nil || !bytes.Equal(key, v.key) {
			t.Errorf("%s's WireGuard key changed or unreadable under the fault: %v", v.n.Name, err)
		}
		cache, err := os.ReadFile(filepath.Join(v.dir, "overlay.json"))
		if err != nil || !bytes.Equal(cache, v.cache) {
			t.Errorf("%s's overlay cache changed under the fault (%d bytes, was %d): %v", v.n.Name, len(cache), len(v.cache), err)
		}
		if !json.Valid(cache) {
			t.Errorf("%s's overlay cache is not valid JSON", v.n.Name)
		}
		ents, _ := os.ReadDir(v.dir)
		for _, e := range ents {
			if strings.Contains(e.Name(), ".tmp-") {
				t.Errorf("%s: temporary file %s left in the state directory", v.n.Name, e.Name())
			}
		}
	}
	// A new lease must be recorded in the state directory: revoke the
	// victims' leases so that they re-register; each must say in its
	// status that it could not record the lease, and carry on.
	for _, v := range vs {
		resp, err := c.Client().Get(ctx, registry.NodeKey(v.n.Name))
		if err != nil || len(resp.Kvs) != 1 {
			t.Fatalf("%s's node entry: %v", v.n.Name, err)
		}
		if _, err := c.Client().Revoke(ctx, clientv3.LeaseID(resp.Kvs[0].Lease)); err != nil {
			t.Fatal(err)
		}
	}
	for _, v := range vs {
		if _, err := eventually(10*time.Second, 50*time.Millisecond, func() error {
			sts, _, err := c.Statuses(ctx)
			if err != nil {
				return err
			}
			if e := sts[v.n.Name].Errors["state"]; e == "" {
				return fmt.Errorf("%s's status errors: %v", v.n.Name, sts[v.n.Name].Errors)
			} else {
				t.Logf("%s re-registered; its status: errors.state %q", v.n.Name, e)
			}
			return nil
		}); err != nil {
			t.Errorf("lease not recordable, not reported: %v", err)
		}
	}
	for name, pid := range pids {
		if c.Node(name).Pid() != pid {
			t.Errorf("%s's meshd exited under the state directory fault", name)
		}
	}
	// Restart on the healthy directory: same key, the overlay comes up.
	ms, err := c.Members(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range vs {
		if err := v.n.KillMeshd(ctx); err != nil {
			t.Fatal(err)
		}
		if err := v.n.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := c.Delete(ctx, registry.MemberKey("ghost")); err != nil {
		t.Fatal(err)
	}
	rev, _, err = c.Delete(ctx, registry.SubnetKey(ghostSubnet))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := waitAll(ctx, c, rev, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	after, err := c.Members(ctx)
	if err != nil {
		t.Fatal(err)
	}
	sts, _, err = c.Statuses(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, v := range vs {
		if ce := overlayCacheError(sts[v.n.Name]); ce != "" || len(sts[v.n.Name].Errors) > 0 {
			t.Errorf("%s still reports a state directory error on a healthy directory: cache %q, errors %v", v.n.Name, ce, sts[v.n.Name].Errors)
		}
		if after[v.n.Name].PublicKey != ms[v.n.Name].PublicKey {
			t.Errorf("%s's public key changed after the restart", v.n.Name)
		}
		if err := pingAll(ctx, v.n, after, 5*time.Second); err != nil {
			t.Error(err)
		}
	}
}

// normalizedConfig is a node's rendered haproxy.cfg without what differs
// between nodes by design: comments naming the node, its socket paths, and
// which slot of a backend holds which instance (meshd keeps an instance in
// the slot HAProxy already has it in, so the order depends on history).
func normalizedConfig(t *testing.T, n *sandbox.Node) string {
	b, err := os.ReadFile(n.Config.HAProxy.ConfigPath)
	if err != nil {
		t.Fatal(err)
	}
	var out, servers []string
	flush := func() {
		for i := range servers {
			servers[i] = strings.Join(strings.Fields(servers[i])[2:], " ") // drop "server sN"
		}
		slices.Sort(servers)
		out = append(out, servers...)
		servers = nil
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "#") || strings.Contains(line, n.Dir) || strings.Contains(line, n.RunDir) {
			continue
		}
		if strings.HasPrefix(strings.TrimSpace(line), "server ") {
			servers = append(servers, line)
			continue
		}
		flush()
		out = append(out, line)
	}
	flush()
	return strings.Join(out, "\n")
}

// compactionCut is how long fault 4 keeps n4's link down.
const compactionCut = 10 * time.Second

// compaction is fault 4: n4 is cut off (its link down) longer than its
// lease, the others see many changes including the deletion of an app n4
// had rendered, etcd compacts its history, and n4 comes back. n4 must
// re-list (its watch revision is gone) and converge to the same HAProxy
// configuration and runtime state as n3.
func compaction(ctx context.Context, t *testing.T, c *sandbox.Cluster) {
	n3, n4 := c.Node("n3"), c.Node("n4")
	rev, _, err := c.RegisterApp(ctx, sandbox.DemoGroup, "old", registry.AppMeta{Publish: registry.Publish{Port: 18090}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := waitAll(ctx, c, rev, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	logBefore := len(n4.LogTail(1 << 30))
	if err := n4.CutLink(ctx, true); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = n4.CutLink(context.Background(), false) })
	for i := range 60 {
		meta := registry.AppMeta{Publish: registry.Publish{Port: 18100 + i%6},
			Env: registry.Env{"ROUND": json.RawMessage(fmt.Sprint(i))}}
		if _, _, err := c.RegisterApp(ctx, sandbox.DemoGroup, fmt.Sprintf("churn%d", i%6), meta); err != nil {
			t.Fatal(err)
		}
	}
	if _, _, err := c.Delete(ctx, registry.MetaKey(sandbox.DemoGroup, "old")); err != nil {
		t.Fatal(err)
	}
	compacted, err := c.Compact(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// Longer than the lease (n4's entry expires) and than the client's
	// gRPC keepalive (5 s + 3 s: the stream breaks, so n4 must resume from
	// its old revision, which is compacted, rather than receive the events
	// still queued on a stalled stream).
	time.Sleep(compactionCut)
	back := time.Now()
	if err := n4.CutLink(ctx, false); err != nil {
		t.Fatal(err)
	}
	cv, err := waitAll(ctx, c, compacted, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("n4 back after a %v disconnection, history compacted at %d: n4 applied it %v after its link came back",
		compactionCut, compacted, time.Since(back).Round(time.Millisecond))
	_ = cv
	newLog := n4.LogTail(1 << 30)[logBefore:]
	if !strings.Contains(newLog, "compacted, re-listing") {
		t.Errorf("n4 did not re-list after the compaction; log since the cut:\n%s", newLog)
	}
	// The rendered configurations and HAProxy's runtime state agree.
	if a, b := normalizedConfig(t, n3), normalizedConfig(t, n4); a != b {
		t.Errorf("n4's haproxy.cfg differs from n3's after the re-list:\n--- n3\n%s\n--- n4\n%s", a, b)
	}
	if strings.Contains(normalizedConfig(t, n4), "_old") {
		t.Error("n4 still renders the app deleted while it was away")
	}
	_, err = eventually(5*time.Second, 100*time.Millisecond, func() error {
		s3, err := n3.HAProxyServers(ctx)
		if err != nil {
			return err
		}
		s4, err := n4.HAProxyServers(ctx)
		if err != nil {
			return err
		}
		if fmt.Sprint(sortedServers(s3)) != fmt.Sprint(sortedServers(s4)) {
			return fmt.Errorf("HAProxy runtime state differs: n3 %v, n4 %v", sortedServers(s3), sortedServers(s4))
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
	if _, _, err := n4.HTTPGet(ctx, demoURL); err != nil {
		t.Errorf("n4 cannot reach the demo app after the re-list: %v", err)
	}
}

func sortedServers(m map[string][]netip.AddrPort) []string {
	var out []string
	for be, ss := range m {
		for _, s := range ss {
			out = append(out, be+"="+s.String())
		}
		if len(ss) == 0 {
			out = append(out, be+"=")
		}
	}
	slices.Sort(out)
	return out
}

// powerOff is fault 3: n2 (serving the demo app) loses power. Its instance
// must leave n3's and n4's HAProxy (their runtime API, not meshd's view)
// within lease TTL + 2 s, the load through n3 and n4 must go on through
// n1's instance, and n2's WireGuard peer stays everywhere (members are
// durable: only `meshctl node remove` removes it).
func powerOff(ctx context.Context, t *testing.T, c *sandbox.Cluster) {
	ms, err := c.Members(ctx)
	if err != nil {
		t.Fatal(err)
	}
	be := haproxycfg.BackendName(registry.AppID{Group: sandbox.DemoGroup, Name: sandbox.DemoApp})
	n2addr := ms["n2"].OverlayIP.String()
	consumers := []*sandbox.Node{c.Node("n3"), c.Node("n4")}
	for _, n := range consumers {
		s, err := n.HAProxyServers(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if len(s[be]) != 2 {
			t.Fatalf("%s's HAProxy has %v in %s before the fault, want n1 and n2", n.Name, s[be], be)
		}
	}
	var loads []*load
	for _, n := range consumers {
		loads = append(loads, startLoad(n, demoURL, 2, 20*time.Millisecond, 15*time.Second))
	}
	time.Sleep(time.Second)
	off := time.Now()
	if err := c.Node("n2").PowerOff(ctx); err != nil {
		t.Fatal(err)
	}
	bound := faultTTL + 2*time.Second
	for _, n := range consumers {
		_, err := eventually(bound+5*time.Second, 50*time.Millisecond, func() error {
			s, err := n.HAProxyServers(ctx)
			if err != nil {
				return err
			}
			if len(s[be]) != 1 || strings.HasPrefix(s[be][0].String(), n2addr+":") {
				return fmt.Errorf("%s's HAProxy still has %v", n.Name, s[be])
			}
			return nil
		})
		gone := time.Since(off)
		if err != nil {
			t.Errorf("n2's instance did not leave %s's HAProxy: %v", n.Name, err)
			continue
		}
		t.Logf("n2's instance left %s's HAProxy %v after the power-off (bound: TTL %v + 2s)", n.Name, gone.Round(time.Millisecond), faultTTL)
		if gone > bound {
			t.Errorf("n2's instance left %s's HAProxy after %v, want <= %v", n.Name, gone.Round(time.Millisecond), bound)
		}
	}
	time.Sleep(2 * time.Second)
	for i, l := range loads {
		r := l.stop()
		t.Logf("load through %s across the power-off: %s", consumers[i].Name, r)
		if r.Failed > 0 {
			t.Errorf("load through %s failed across the power-off: %s %v", consumers[i].Name, r, r.Errors)
		}
	}
	for _, n := range []*sandbox.Node{c.Node("n1"), c.Node("n3"), c.Node("n4")} {
		p, err := peerKeys(ctx, n)
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := p[ms["n2"].PublicKey]; !ok {
			t.Errorf("%s removed n2's peer when n2 only lost its lease", n.Name)
		}
	}
}

// overlayCacheError is components.overlay.cacheError of a node's status.
func overlayCacheError(st registry.Status) string {
	var ov struct {
		CacheError string `json:"cacheError"`
	}
	_ = json.Unmarshal(st.Components["overlay"], &ov)
	return ov.CacheError
}
