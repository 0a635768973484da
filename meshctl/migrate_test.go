package main

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/overlay"
	"github.com/meshd/meshd/pkg/registry"
)

func testKey(i int) string {
	b := make([]byte, 32)
	b[0], b[31] = byte(i), 1
	return base64.StdEncoding.EncodeToString(b)
}

// migrationKVs is a cluster half way through a migration: worker001
// migrated (member record, its lease rewritten by meshd), worker002 still
// on flannel, plus a lease of a node that is gone.
func migrationKVs(t *testing.T, w1Stale []string) []registry.KV {
	t.Helper()
	lease := func(ip string, k int) []byte {
		b, err := registry.EncodeFlannelLease(netip.MustParseAddr(ip), testKey(k), 51820)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	ov := overlay.Status{Interface: "meshd-wg", PublicKey: testKey(1), Applied: true,
		Peers: overlay.PeerSummary{Count: 2, Recent: 2 - len(w1Stale), Stale: w1Stale, StaleCount: len(w1Stale)}}
	ovb, _ := json.Marshal(ov)
	st, _ := json.Marshal(registry.Status{Node: "worker001", Revision: 9, Components: map[string]json.RawMessage{"overlay": ovb}})
	member, _ := json.Marshal(registry.Member{Name: "worker001", PublicKey: testKey(1), Endpoint: "198.51.100.1:51820",
		Subnet: netip.MustParsePrefix("10.10.1.0/24"), OverlayIP: netip.MustParseAddr("10.10.1.0")})
	return []registry.KV{
		{Key: "/cluster/nodes/worker001", Value: []byte(`{"name":"worker001","ipv4":"198.51.100.1","services":["backends"],"meshd":{"id":"0123456789abcdef0123456789abcdef"}}`), Lease: 5},
		{Key: "/cluster/nodes/worker002", Value: []byte(`{"name":"worker002","ipv4":"198.51.100.2","services":["backends"]}`)},
		{Key: "/cluster/meshd/members/worker001", Value: member},
		{Key: "/cluster/meshd/subnets/10.10.1.0-24", Value: []byte(`{"node":"worker001"}`)},
		{Key: "/meshd/status/worker001", Value: st},
		{Key: "/coreos.com/network/config", Value: []byte(`{"Backend":{"PersistentKeepaliveInterval":60,"Type":"wireguard"},"Network":"10.0.0.0/8","SubnetLen":24}`)},
		{Key: "/coreos.com/network/subnets/10.10.1.0-24", Value: lease("198.51.100.1", 1)},
		{Key: "/coreos.com/network/subnets/10.10.2.0-24", Value: lease("198.51.100.2", 2)},
	}
}

func TestMigrationReport(t *testing.T) {
	// worker001 reaches worker002: nothing blocks, worker002 is next.
	rep := migrationReport(registry.SnapshotOf(migrationKVs(t, nil), 10))
	want := []migrateNode{
		{Name: "worker001", Mode: modeMeshd, IPv4: "198.51.100.1", Subnet: "10.10.1.0/24", Handshakes: map[string]string{"flannel:10.10.2.0-24": hsRecent}},
		{Name: "worker002", Mode: modeFlannel, IPv4: "198.51.100.2", Subnet: "10.10.2.0/24", Peer: "flannel:10.10.2.0-24"},
	}
	if diff := cmp.Diff(want, rep.Nodes); diff != "" {
		t.Errorf("nodes (-want +got):\n%s", diff)
	}
	if len(rep.Blockers) != 0 || !strings.Contains(rep.Next, "worker002") {
		t.Errorf("blockers %v next %q", rep.Blockers, rep.Next)
	}

	// No handshake with worker002, and a lease of a node that is gone.
	kvs := migrationKVs(t, []string{"flannel:10.10.2.0-24"})
	gone, _ := registry.EncodeFlannelLease(netip.MustParseAddr("198.51.100.9"), testKey(9), 51820)
	kvs = append(kvs, registry.KV{Key: "/coreos.com/network/subnets/10.10.9.0-24", Value: gone})
	rep = migrationReport(registry.SnapshotOf(kvs, 11))
	var w1 migrateNode
	for _, n := range rep.Nodes {
		if n.Name == "worker001" {
			w1 = n
		}
	}
	if got := w1.Handshakes["flannel:10.10.2.0-24"]; got != hsStale {
		t.Errorf("handshake = %q, want stale (nodes %+v)", got, rep.Nodes)
	}
	if got := w1.Handshakes["flannel:10.10.9.0-24"]; got != hsRecent {
		t.Errorf("handshake with the gone node's lease = %q", got)
	}
	if len(rep.StaleLeases) != 1 || rep.StaleLeases[0].Subnet != "10.10.9.0-24" {
		t.Errorf("stale leases %+v", rep.StaleLeases)
	}
	joined := strings.Join(rep.Blockers, "\n")
	for _, want := range []string{"no recent handshake with flannel:10.10.2.0-24", "stale flannel lease 10.10.9.0-24"} {
		if !strings.Contains(joined, want) {
			t.Errorf("blockers lack %q:\n%s", want, joined)
		}
	}

	// Every node migrated: next is the etcd roles.
	kvs = migrationKVs(t, nil)[:5]
	rep = migrationReport(registry.SnapshotOf(kvs, 12))
	if len(rep.Blockers) != 0 || !strings.Contains(rep.Next, "etcd roles apply") {
		t.Errorf("all migrated: blockers %v next %q", rep.Blockers, rep.Next)
	}
}

func TestMigrateStatusCommand(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	for _, kv := range migrationKVs(t, nil) {
		if _, err := cli.Put(context.Background(), kv.Key, string(kv.Value)); err != nil {
			t.Fatal(err)
		}
	}
	code, out, errs := ctlRun(t, srv.Endpoint(), "migrate", "status", "-o", "json")
	if code != 0 {
		t.Fatalf("exit %d: %s %s", code, out, errs)
	}
	var rep migrateReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if len(rep.Nodes) != 2 || rep.Nodes[1].Mode != modeFlannel {
		t.Errorf("report %+v", rep)
	}
	code, out, _ = ctlRun(t, srv.Endpoint(), "migrate", "status")
	if code != 0 || !strings.Contains(out, "worker002  flannel") || !strings.Contains(out, "next: migrate the next flannel node, e.g. worker002") {
		t.Errorf("table (exit %d):\n%s", code, out)
	}
	if code, _, _ := ctlRun(t, srv.Endpoint(), "migrate", "go"); code != exitUsage {
		t.Errorf("unknown subcommand: exit %d, want %d", code, exitUsage)
	}
}
