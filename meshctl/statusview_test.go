package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/creds"
	"github.com/meshd/meshd/pkg/haproxycfg"
	"github.com/meshd/meshd/pkg/overlay"
	"github.com/meshd/meshd/pkg/registry"
)

var update = flag.Bool("update", false, "rewrite golden files")

func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.MkdirAll("testdata", 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs (run with -update to accept):\n--- got\n%s\n--- want\n%s", path, got, want)
	}
}

var statusNow = time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)

func js(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// statusFixture is a cluster with a node in every state, read at
// revision 100.
func statusFixture(t *testing.T) statusInput {
	t.Helper()
	var kvs []registry.KV
	add := func(key string, v any, lease int64) {
		b, ok := v.([]byte)
		if !ok {
			b = js(t, v)
		}
		kvs = append(kvs, registry.KV{Key: key, Value: b, Lease: lease})
	}
	node := func(name string, lease int64, meshd bool) {
		n := registry.Node{Name: name, IPv4: "65.108.1.1", Services: []registry.Group{"backends"}}
		if meshd {
			n.Meshd = &registry.NodeMeshd{ID: "0123456789abcdef0123456789abcdef"}
		}
		add(registry.NodeKey(name), n, lease)
	}
	member := func(name, subnet string) {
		// Each member its own WireGuard key: members sharing one are
		// dropped by the registry (a key clash).
		sum := sha256.Sum256([]byte(name))
		add(registry.MemberKey(name), map[string]any{"name": name, "publicKey": base64.StdEncoding.EncodeToString(sum[:]),
			"subnet": subnet, "overlayIp": strings.TrimSuffix(subnet, "/24")}, 0)
		add(registry.SubnetKey(netip.MustParsePrefix(subnet)), registry.SubnetClaim{Node: name}, 0)
	}
	status := func(name string, rev int64, comps map[string]any, errs map[string]string, problems int) {
		st := registry.Status{Node: name, Revision: rev, Seen: rev, UpdatedAt: statusNow.Add(-42 * time.Second),
			Version: "1.0", Errors: errs, Problems: problems, Components: map[string]json.RawMessage{}}
		for k, v := range comps {
			st.Components[k] = js(t, v)
		}
		add(registry.StatusKey(name), st, 7)
	}
	okOverlay := overlay.Status{Interface: "meshd-wg", Applied: true, Peers: overlay.PeerSummary{Count: 3, Recent: 3, Oldest: "<3m"}}
	okHAProxy := haproxycfg.Status{Listeners: 1, Backends: 1, Servers: 2}

	node("worker001", 7, true)
	member("worker001", "10.10.1.0/24")
	status("worker001", 90, map[string]any{"overlay": okOverlay, "haproxy": okHAProxy, "creds": creds.Status{Delivered: map[string]int64{"db": 2}}}, nil, 0)

	node("worker002", 7, true)
	member("worker002", "10.10.2.0/24")
	status("worker002", 90, map[string]any{
		"overlay": okOverlay,
		"haproxy": haproxycfg.Status{LastError: "reload failed: \x1b[31mred\x1b[0m"},
		"creds":   creds.Status{Errors: map[string]string{"db": "systemd-creds: no host key"}},
	}, map[string]string{"haproxy": "reload failed: \x1b[31mred\x1b[0m"}, 0)

	node("worker003", 7, true)
	member("worker003", "10.10.3.0/24")
	stale := okOverlay
	stale.Peers = overlay.PeerSummary{Count: 9, Recent: 3, Oldest: "never", Stale: []string{"service001", "service002", "worker004", "worker005", "worker006", "worker007"}, StaleCount: 6}
	status("worker003", 90, map[string]any{"overlay": stale, "haproxy": haproxycfg.Status{Problems: []haproxycfg.Problem{{App: "backends/api", Reason: "port 22 is reserved"}}}}, nil, 2)

	// Stopped cleanly an hour ago.
	member("worker004", "10.10.4.0/24")
	add(registry.SeenKey("worker004"), registry.Seen{Node: "worker004", RegisteredAt: statusNow.Add(-48 * time.Hour), StoppedAt: statusNow.Add(-time.Hour)}, 0)
	// Crashed: registered two days ago, never stopped.
	member("worker005", "10.10.5.0/24")
	add(registry.SeenKey("worker005"), registry.Seen{Node: "worker005", RegisteredAt: statusNow.Add(-48 * time.Hour), StoppedAt: statusNow.Add(-72 * time.Hour)}, 0)
	// Known only from its member record.
	member("worker006", "10.10.6.0/24")
	// nix-infra's entry, no meshd.
	node("legacy01", 0, false)
	// Registered, no status yet.
	node("worker007", 7, true)
	// Registered, status published, nothing applied yet.
	node("worker008", 7, true)
	status("worker008", 0, map[string]any{"overlay": overlay.Status{Waiting: true}}, nil, 0)

	// The app and a secret, written after revision 90 for worker001.
	add(registry.MetaKey("backends", "web"), registry.AppMeta{Publish: registry.Publish{Port: 8080}}, 0)

	in := statusInput{Snap: registry.SnapshotOf(kvs, 100), Seen: map[string]registry.Seen{}}
	for _, n := range []string{"worker004", "worker005"} {
		var s registry.Seen
		for _, kv := range kvs {
			if kv.Key == registry.SeenKey(n) {
				s, _ = registry.DecodeSeen(n, kv.Value)
			}
		}
		in.Seen[n] = s
	}
	// Keys under /cluster/ last written at 80..85; worker001 has a secret
	// written at 95, after the revision it applied.
	in.Cluster = []keyRevs{{80, 10}, {81, 11}, {85, 12}}
	in.Secrets = map[string][]keyRevs{"worker001": {{95, 95}}}
	in.CountThen = map[string]int64{"worker001": 3, "worker002": 3, "worker003": 4}
	in.Problems = []registry.Problem{{Key: registry.SeenKey("worker009"), Err: "invalid value: \x07bell"}}
	return in
}

func TestStatusViewGolden(t *testing.T) {
	so := buildStatus(statusFixture(t))
	var table bytes.Buffer
	if err := printStatusTable(&table, so, statusNow, false); err != nil {
		t.Fatal(err)
	}
	golden(t, "status.txt", table.Bytes())
	var wide bytes.Buffer
	if err := printStatusTable(&wide, so, statusNow, true); err != nil {
		t.Fatal(err)
	}
	golden(t, "status-wide.txt", wide.Bytes())
	var js bytes.Buffer
	if err := printJSON(&js, so); err != nil {
		t.Fatal(err)
	}
	golden(t, "status.json", js.Bytes())
	if strings.ContainsAny(table.String(), "\x1b\x07") {
		t.Error("table carries raw control characters from etcd")
	}

	state := map[string]string{}
	for _, r := range so.Nodes {
		state[r.Node] = r.State
	}
	want := map[string]string{
		"worker001": stateUp, "worker002": stateFailing, "worker003": stateUp, "worker004": stateDown,
		"worker005": stateDown, "worker006": stateDown, "legacy01": stateUnmanaged, "worker007": stateStarting, "worker008": stateStarting,
	}
	for n, s := range want {
		if state[n] != s {
			t.Errorf("%s: state %q, want %q", n, state[n], s)
		}
	}
	if so.Down != 3 || so.Failing != 1 {
		t.Errorf("down %d failing %d, want 3 and 1", so.Down, so.Failing)
	}
	err := statusVerdict(so)
	if !errors.Is(err, errUnhealthy) || !strings.Contains(err.Error(), "worker004, worker005, worker006") || !strings.Contains(err.Error(), "failing: worker002") {
		t.Errorf("verdict %v", err)
	}
}

func TestStatusVerdictHealthy(t *testing.T) {
	in := statusFixture(t)
	for _, n := range []string{"worker002", "worker004", "worker005", "worker006"} {
		delete(in.Snap.Statuses, n)
		delete(in.Snap.Members, n)
		delete(in.Seen, n)
	}
	so := buildStatus(in)
	if err := statusVerdict(so); err != nil {
		t.Errorf("healthy cluster (up, starting, unmanaged, warnings only): %v", err)
	}
}

func TestBehindCountsOnlyWhatConcernsTheNode(t *testing.T) {
	// Keys a node reads, written at 10, 12 and 12 (one transaction).
	now := []keyRevs{{10, 10}, {12, 5}, {12, 12}}
	for _, tc := range []struct {
		name      string
		applied   int64
		countThen int64
		want      int64
	}{
		// Converged: the node applied 12 or later (status writes of
		// other nodes pushed the cluster to 40: they do not count).
		{"converged at the last change", 12, 3, 0},
		{"converged later", 40, 3, 0},
		{"one transaction missed", 11, 2, 1},
		{"two revisions missed", 9, 1, 2},
		// One key existed at 11 that is gone now: a deletion.
		{"a deletion missed", 11, 3, 2},
		{"deletions unknown", 11, -1, 1},
		{"never applied", 0, 0, 2},
	} {
		if got := behind(tc.applied, now, tc.countThen); got != tc.want {
			t.Errorf("%s: behind(%d) = %d, want %d", tc.name, tc.applied, got, tc.want)
		}
	}
}
