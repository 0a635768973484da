package agent_test

import (
	"context"
	"fmt"
	"net/netip"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/agent"
	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/registry"
)

const flannelKey = "2Hn1xnfYqRRsbqbFkCMcE1Hh+Ru7zx8LRvJahO+BLkE="

// flannelKey2 is a second node's key.
const flannelKey2 = "YNsWiB0bYLvpcvxPI/PnHouFpu3+NYrCgjCwDLV6U3w="

// TestFlannelLeaseKeptRenewedAndRemoved: a meshd node with an overlay
// keeps a flannel-format lease for its subnet on an etcd lease of the
// configured TTL, renews it RenewMargin before expiry (a fresh lease, as
// flannel's updateSubnet), puts it back when someone deletes it, leaves
// it in place on stop, and `meshctl node remove` (registry.RemoveNode)
// deletes it.
func TestFlannelLeaseKeptRenewedAndRemoved(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ctx := context.Background()
	// The node ran flanneld: its old lease names its public IP, so meshd
	// adopts the subnet (and then overwrites the lease with its own key).
	old, _ := registry.EncodeFlannelLease(netip.MustParseAddr("198.51.100.1"), "x"+flannelKey[1:], 51820)
	if _, err := cli.Put(ctx, "/coreos.com/network/subnets/10.10.42.0-24", string(old)); err != nil {
		t.Fatal(err)
	}
	n := startNode(t, srv, "node-a", id1, t.TempDir(), func(o *agent.Options) {
		o.PublicIPv4 = "198.51.100.1"
		o.Member = &agent.MemberOptions{PublicKey: flannelKey, Endpoint: "198.51.100.1:51820", Pool: registry.DefaultPool}
		o.FlannelLease = &agent.FlannelLeaseOptions{Port: 51820, TTL: 8 * time.Second, RenewMargin: 4 * time.Second}
	})
	key := "/coreos.com/network/subnets/10.10.42.0-24"
	want, _ := registry.EncodeFlannelLease(netip.MustParseAddr("198.51.100.1"), flannelKey, 51820)
	get := func() (string, clientv3.LeaseID) {
		resp, err := cli.Get(ctx, key)
		if err != nil || len(resp.Kvs) != 1 {
			return "", 0
		}
		return string(resp.Kvs[0].Value), clientv3.LeaseID(resp.Kvs[0].Lease)
	}
	var first clientv3.LeaseID
	eventually(t, 15*time.Second, "meshd's lease for its adopted subnet", func() bool {
		v, l := get()
		first = l
		return v == string(want) && l != 0
	})
	ttl, err := cli.TimeToLive(ctx, first)
	if err != nil || ttl.GrantedTTL != 8 {
		t.Fatalf("lease TTL %+v, %v; want 8 s granted", ttl, err)
	}
	// After the member record, never in its transaction: every node
	// watches /cluster/ and flannel's prefix on two streams, and one that
	// saw the lease first would take the node for a flannel node (a
	// flannel-only peer, a full overlay computation) until the member
	// record arrived (docs/overlay.md).
	fl, err1 := cli.Get(ctx, key)
	mem, err2 := cli.Get(ctx, registry.MemberKey("node-a"))
	if err1 != nil || err2 != nil || len(fl.Kvs) != 1 || len(mem.Kvs) != 1 {
		t.Fatalf("flannel lease %v, member record %v (%v, %v)", fl.Kvs, mem.Kvs, err1, err2)
	}
	if fl.Kvs[0].ModRevision <= mem.Kvs[0].ModRevision {
		t.Errorf("flannel lease written at revision %d, the member record at %d; want it after", fl.Kvs[0].ModRevision, mem.Kvs[0].ModRevision)
	}
	// nix-infra's overlay-IP lookup: the lease whose PublicIP is the node's.
	if got := lookupOverlayIP(t, cli, "198.51.100.1"); got != "10.10.42.0" {
		t.Errorf("nix-infra lookup = %q, want 10.10.42.0", got)
	}
	// Changes elsewhere in the registry wake the keeper but cause no write.
	before, _ := cli.Get(ctx, key)
	for i := range 20 {
		cli.Put(ctx, "/cluster/backends/churn/meta_data", fmt.Sprintf(`{"publish":{"port":%d}}`, 1000+i))
	}
	time.Sleep(300 * time.Millisecond)
	after, _ := cli.Get(ctx, key)
	if after.Kvs[0].Lease == before.Kvs[0].Lease && after.Kvs[0].ModRevision != before.Kvs[0].ModRevision {
		t.Errorf("flannel lease rewritten on unrelated changes (mod revision %d -> %d)", before.Kvs[0].ModRevision, after.Kvs[0].ModRevision)
	}
	// Renewed before the 8 s lease runs out: a new lease, the key never gone.
	deadline := time.Now().Add(20 * time.Second)
	for {
		v, l := get()
		if v != string(want) {
			t.Fatalf("lease value %q gone or changed while renewing", v)
		}
		if l != first {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("lease not renewed")
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Deleted by someone else: put back.
	if _, err := cli.Delete(ctx, key); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "lease put back after a delete", func() bool { v, _ := get(); return v == string(want) })
	// A clean stop leaves it (flannel peers keep the node as a peer).
	if err := n.stop(); err != nil {
		t.Fatal(err)
	}
	if v, _ := get(); v != string(want) {
		t.Fatalf("lease gone after stop: %q", v)
	}
	// Rolled back to flanneld, which took the lease over: the meshd keys
	// go, the lease stays.
	if _, err := registry.RemoveNodeWith(ctx, cli, "node-a", registry.RemoveOptions{KeepFlannelLease: true}); err != nil {
		t.Fatal(err)
	}
	if v, _ := get(); v != string(want) {
		t.Fatalf("lease gone despite KeepFlannelLease: %q", v)
	}
	if r, _ := cli.Get(ctx, registry.MemberKey("node-a")); len(r.Kvs) != 0 {
		t.Fatal("member record survives node remove")
	}
	// A plain remove takes the lease too (the claim is gone now, so put
	// one back to say whose subnet it is).
	cli.Put(ctx, registry.SubnetKey(netip.MustParsePrefix("10.10.42.0/24")), `{"node":"node-a"}`)
	if _, err := registry.RemoveNode(ctx, cli, "node-a"); err != nil {
		t.Fatal(err)
	}
	if v, _ := get(); v != "" {
		t.Errorf("lease survives node remove: %q", v)
	}
}

// lookupOverlayIP is nix-infra's CLI lookup of a node's overlay address:
// list /coreos.com/network/subnets/*, take the lease whose PublicIP is
// the node's IP, and return the address part of its key.
func lookupOverlayIP(t *testing.T, cli *clientv3.Client, publicIP string) string {
	t.Helper()
	resp, err := cli.Get(context.Background(), registry.FlannelSubnetPrefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range resp.Kvs {
		p, err := registry.ParsePrefixName(string(kv.Key[len(registry.FlannelSubnetPrefix):]))
		if err != nil {
			continue
		}
		if l, err := registry.DecodeFlannelLease(p, kv.Value); err == nil && l.PublicIP == publicIP {
			return p.Addr().String()
		}
	}
	return ""
}
