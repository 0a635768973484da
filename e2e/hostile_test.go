package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/haproxycfg"
	"github.com/meshd/meshd/pkg/registry"
	"github.com/meshd/meshd/pkg/sandbox"
)

// hostileKV is one hostile key: problem says whether the registry must
// report it as a skipped key (some are valid registry values that a
// component must refuse instead).
type hostileKV struct {
	key, value string
	problem    bool
}

// hostileKeys builds malformed JSON, wrong types, huge values and hostile
// names for every kind of key meshd reads. n1 is a real member, copied by
// one of them.
func hostileKeys(n1 registry.Member) []hostileKV {
	long := strings.Repeat("a", 300)
	huge := `{"publish":{"port":18087},"env":{"X":"` + strings.Repeat("x", 300<<10) + `"}}`
	n1copy, _ := json.Marshal(registry.Member{Name: "n9", PublicKey: n1.PublicKey, Endpoint: n1.Endpoint, Subnet: n1.Subnet, OverlayIP: n1.OverlayIP})
	bad := func(k, v string) hostileKV { return hostileKV{k, v, true} }
	inst := func(node string) string {
		return registry.AppPrefix(sandbox.DemoGroup, sandbox.DemoApp) + "instances/" + node
	}
	meta := func(app string) string { return "/cluster/backends/" + app + "/meta_data" }
	return []hostileKV{
		// Node entries.
		bad(registry.NodesPrefix+"bad node", `{"name":"bad node","ipv4":"172.31.213.99","services":[]}`),
		bad(registry.NodesPrefix+"evil#1", `{"name":"evil#1","ipv4":"172.31.213.99","services":[]}`),
		bad(registry.NodesPrefix+"x1", `{"name":`),
		bad(registry.NodesPrefix+"x2", `{"name":"x2","ipv4":42}`),
		bad(registry.NodesPrefix+long, `{}`),
		bad(registry.NodesPrefix+"n\u0430me", `{"name":"n\u0430me","services":[]}`), // Cyrillic a
		bad(registry.NodesPrefix+"../../etc/passwd", `{}`),
		bad(registry.NodesPrefix+"x3", `{"name":"x3","ipv4":"10.0.0.1","services":["backends\nfrontend evil"]}`),
		bad(registry.NodesPrefix+"x4", `{"name":"x4","meshd":{"id":"zz","publicKey":"k"}}`),
		// Member records and subnet claims.
		bad(registry.MemberKey("ghost1"), `{"name":"ghost1","publicKey":"not a key","subnet":"10.10.90.0/24","overlayIp":"10.10.90.0"}`),
		bad(registry.MemberKey("ghost3"), `{"name":"ghost3","publicKey":"`+n1.PublicKey[:43]+`=","endpoint":"1.2.3.4:51820\nAllowedIPs = 0.0.0.0/0","subnet":"10.10.91.0/24","overlayIp":"10.10.91.0"}`),
		bad(registry.MemberKey("ghost4"), `[]`),
		bad(registry.MemberKey("n9"), string(n1copy)), // n1's key and subnet: claimed by n1
		bad(registry.MemberKey("a/b"), `{}`),
		bad(registry.SubnetsPrefix+"bogus", `{"node":"n1"}`),
		bad(registry.SubnetsPrefix+"10.10.77.0-24", `{"node":"a b"}`),
		bad(registry.SubnetsPrefix+"10.10.78.1-24", `{"node":"ghost5"}`),
		// A claimed subnet of the whole IPv4 space: valid registry data the
		// overlay must refuse (it would swallow every route).
		{registry.SubnetsPrefix + "0.0.0.0-0", `{"node":"ghost2"}`, false},
		{registry.MemberKey("ghost2"), `{"name":"ghost2","publicKey":"` + strings.Repeat("A", 42) + `E=","endpoint":"172.31.213.251:51820","subnet":"0.0.0.0/0","overlayIp":"0.0.0.0"}`, false},
		// App metadata.
		bad(meta("evil app"), `{"publish":{"port":18083}}`),
		bad(meta("evil\napp"), `{"publish":{"port":18083}}`),
		bad(meta(`evil"q`), `{"publish":{"port":18083}}`),
		bad(meta("a#b"), `{"publish":{"port":18083}}`),
		bad(meta("huge"), huge),
		bad(meta("wrongtype"), `{"publish":{"port":"80"}}`),
		bad(meta("portzero"), `{"publish":{"port":0}}`),
		bad(meta("d\u0435mo"), `{"publish":{"port":18085}}`), // Cyrillic e
		bad(meta("envbad"), `{"publish":{"port":18086},"env_prefix":"X\nY"}`),
		bad(meta(long), `{"publish":{"port":18084}}`),
		bad(meta("demo")+"/extra", `{"publish":{"port":18084}}`),
		// Instances.
		bad(inst("evil"), `{"ipv4":"127.0.0.1","node":"evil","port":22}`),
		bad(inst("n3"), `{"ipv4":"10.10.5.0","node":"n3","port":8080}`), // not n3's overlay address
		bad(inst("inj"), `{"ipv4":"10.10.0.0\n    server x 1.2.3.4:80","node":"inj","port":80}`),
		bad(inst("x5"), `{"ipv4":"10.10.0.0","node":"x5","port":"80"}`),
		bad(inst("x6"), `{"ipv4":"10.10.0.0","node":"x6","port":70000}`),
		bad(inst("x7"), `{"ipv4":"10.10.0.0","node":"other","port":8080}`),
		bad(inst("a b"), `{"ipv4":"10.10.0.0","node":"a b","port":8080}`),
		bad(inst("x8"), `not json`),
	}
}

// hostileMarkers are strings from the hostile keys that must never reach a
// rendered haproxy.cfg.
var hostileMarkers = []string{"evil", "a#b", "huge", "wrongtype", "portzero", "d\u0435mo", "envbad", "inj",
	"1.2.3.4", ":22", "70000", "x5", "x6", "x7", "10.10.5.0", "ghost", "18083", "18084", "18085", "18086", "18087"}

// hostileInput writes every hostile key at once while a load runs through
// n3 and n4, and checks that each node skips and reports each bad key,
// renders nothing from any of them, keeps serving, and never restarts.
func hostileInput(ctx context.Context, t *testing.T, c *sandbox.Cluster, b bins) {
	ms, err := c.Members(ctx)
	if err != nil {
		t.Fatal(err)
	}
	pids := meshdPids(c)
	hapids := map[string]int{}
	for _, n := range c.Nodes() {
		if hapids[n.Name], err = n.HAProxyMasterPID(); err != nil {
			t.Fatal(err)
		}
	}
	loads := []*load{
		startLoad(c.Node("n3"), demoURL, 2, 20*time.Millisecond, 15*time.Second),
		startLoad(c.Node("n4"), demoURL, 2, 20*time.Millisecond, 15*time.Second),
	}
	// Secrets first (not read by sandbox nodes, which run without secrets;
	// pkg/creds has its own hostile-ciphertext tests): written all the
	// same, they must not disturb anything. The cluster keys follow, so
	// that the last write is one every node sees.
	keys := append([]hostileKV{
		{registry.SecretsPrefix + "n1/bad name", `{"version":1,"ciphertext":"x"}`, false},
		{registry.SecretKey("n1", "s1"), `{"version":"1"}`, false},
		{registry.SecretKey("n1", "s2"), `-----BEGIN AGE ENCRYPTED FILE-----`, false},
	}, hostileKeys(ms["n1"])...)
	var rev int64
	for _, kv := range keys {
		r, _, err := c.Put(ctx, kv.key, kv.value)
		if err != nil {
			t.Fatal(err)
		}
		rev = r
	}
	t.Cleanup(func() {
		for _, kv := range keys {
			_, _, _ = c.Delete(context.Background(), kv.key)
		}
	})
	if _, err := waitAll(ctx, c, rev, 20*time.Second); err != nil {
		sts, _, _ := c.Statuses(ctx)
		t.Fatalf("%v; statuses: %+v", err, sts)
	}

	// meshctl status reports every bad key; every node counts the same.
	// It exits 1: ghost2's member record is valid and names a node that
	// does not run, which status lists as down (after the JSON, on
	// stderr, which meshctl() appends).
	out, err := meshctl(ctx, b, c, "status", "--output", "json")
	var ee *exec.ExitError
	if err != nil && (!errors.As(err, &ee) || ee.ExitCode() != 1 || !strings.Contains(out, "down: ghost2")) {
		t.Fatalf("meshctl status: %v\n%s", err, out)
	}
	var st struct {
		Problems []registry.Problem `json:"problems"`
	}
	if err := json.NewDecoder(strings.NewReader(out)).Decode(&st); err != nil {
		t.Fatalf("meshctl status --output json: %v\n%.2000s", err, out)
	}
	reported := map[string]string{}
	clusterProblems := 0
	for _, p := range st.Problems {
		reported[p.Key] = p.Err
		if strings.HasPrefix(p.Key, registry.ClusterPrefix) {
			clusterProblems++
		}
	}
	want := 0
	for _, kv := range keys {
		if !kv.problem {
			continue
		}
		want++
		if _, ok := reported[kv.key]; !ok {
			t.Errorf("meshctl status does not report hostile key %q", kv.key)
		}
	}
	t.Logf("meshctl status reports %d problems (%d hostile keys written, %d expected as problems)", len(st.Problems), len(keys), want)
	if clusterProblems != want {
		t.Errorf("meshctl status reports %d problems under %s, want %d: %v", clusterProblems, registry.ClusterPrefix, want, st.Problems)
	}
	sts, _, err := c.Statuses(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range c.Nodes() {
		s := sts[n.Name]
		if s.Problems != want {
			t.Errorf("%s's status counts %d problems, want %d", n.Name, s.Problems, want)
		}
		var ov struct {
			Problems []struct {
				Member string `json:"member"`
			} `json:"problems"`
		}
		_ = json.Unmarshal(s.Components["overlay"], &ov)
		found := false
		for _, p := range ov.Problems {
			found = found || p.Member == "ghost2"
		}
		if !found {
			t.Errorf("%s's overlay does not report the member claiming 0.0.0.0/0: %s", n.Name, s.Components["overlay"])
		}
		if len(s.Errors) > 0 {
			t.Errorf("%s's components failed on hostile input: %v", n.Name, s.Errors)
		}
	}

	// Nothing from a bad key reached HAProxy, WireGuard or the routes.
	be := haproxycfg.BackendName(registry.AppID{Group: sandbox.DemoGroup, Name: sandbox.DemoApp})
	for _, n := range c.Nodes() {
		cfg, err := os.ReadFile(n.Config.HAProxy.ConfigPath)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range hostileMarkers {
			if strings.Contains(string(cfg), m) {
				t.Errorf("%s's haproxy.cfg contains %q from a hostile key", n.Name, m)
			}
		}
		if out, err := exec.CommandContext(ctx, n.Config.HAProxy.Binary, "-c", "-q", "-f", n.Config.HAProxy.ConfigPath).CombinedOutput(); err != nil {
			t.Errorf("%s's rendered haproxy.cfg fails haproxy -c: %v\n%s", n.Name, err, out)
		}
		if len(n.Config.Consume) > 0 {
			s, err := n.HAProxyServers(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if len(s) != 1 || len(s[be]) != 2 {
				t.Errorf("%s's HAProxy serves %v, want only %s with n1 and n2", n.Name, sortedServers(s), be)
			}
		}
		p, err := peerKeys(ctx, n)
		if err != nil {
			t.Fatal(err)
		}
		for name, m := range ms {
			if _, ok := p[m.PublicKey]; !ok && name != n.Name {
				t.Errorf("%s lost %s's peer under hostile input", n.Name, name)
			}
		}
		if len(p) != len(ms)-1 {
			t.Errorf("%s has %d WireGuard peers, want %d: hostile members got in", n.Name, len(p), len(ms)-1)
		}
		routes, err := n.Exec(ctx, "ip", "-4", "route", "show", "table", fmt.Sprint(n.Config.Overlay.RouteTable))
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(string(routes), "default") || strings.Count(strings.TrimSpace(string(routes)), "\n")+1 != len(ms)-1 {
			t.Errorf("%s's overlay routes under hostile input:\n%s", n.Name, routes)
		}
		if log := n.LogTail(1 << 30); strings.Contains(log, "panic") || !strings.Contains(log, "skipping invalid registry key") {
			t.Errorf("%s's log: a panic, or no report of the skipped keys", n.Name)
		}
	}
	time.Sleep(time.Second)
	for i, l := range loads {
		r := l.stop()
		t.Logf("load %d during hostile input: %s", i, r)
		if r.Failed > 0 || r.OK == 0 {
			t.Errorf("load %d failed during hostile input: %s %v", i, r, r.Errors)
		}
	}
	for name, pid := range pids {
		if c.Node(name).Pid() != pid {
			t.Errorf("%s's meshd restarted or died under hostile input", name)
		}
		if now, err := c.Node(name).HAProxyMasterPID(); err != nil || now != hapids[name] {
			t.Errorf("%s's haproxy master restarted under hostile input", name)
		}
	}

	// Removing the keys clears every report.
	for _, kv := range keys {
		if rev, _, err = c.Delete(ctx, kv.key); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := eventually(10*time.Second, 100*time.Millisecond, func() error {
		sts, _, err := c.Statuses(ctx)
		if err != nil {
			return err
		}
		for _, n := range c.Nodes() {
			if s := sts[n.Name]; s.Revision < rev || s.Problems != 0 {
				return fmt.Errorf("%s: revision %d (want %d), %d problems", n.Name, s.Revision, rev, s.Problems)
			}
		}
		return nil
	}); err != nil {
		t.Errorf("after removing the hostile keys: %v", err)
	}
}
