package etcdauth

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/registry"
)

// TestNodeCannotOverwriteOtherNodeEntry: node A's certificate can neither
// overwrite, nor delete, nor take over by transaction node B's entry or
// member record.
func TestNodeCannotOverwriteOtherNodeEntry(t *testing.T) {
	f, b := setup(t)
	a := f.client(t, nodeA)
	ctx := ctxT(t)
	before := get(t, f.root, registry.NodeKey(nodeB))
	memberBefore := get(t, f.root, registry.MemberKey(nodeB))

	_, err := a.Put(ctx, registry.NodeKey(nodeB), `{"name":"worker002","ipv4":"203.0.113.66"}`)
	wantDenied(t, "put B's entry", err)
	_, err = a.Txn(ctx).If(clientv3.Compare(clientv3.Version(registry.NodeKey(nodeB)), ">", 0)).
		Then(clientv3.OpPut(registry.NodeKey(nodeB), "hijacked")).Commit()
	wantDenied(t, "txn put B's entry", err)
	_, err = a.Delete(ctx, registry.NodeKey(nodeB))
	wantDenied(t, "delete B's entry", err)
	_, err = a.Delete(ctx, registry.NodesPrefix, clientv3.WithPrefix())
	wantDenied(t, "delete every entry", err)
	_, err = a.Put(ctx, registry.MemberKey(nodeB), `{"name":"worker002","publicKey":"`+wgKey(9)+`"}`)
	wantDenied(t, "put B's member record (re-key B's WireGuard peer)", err)
	_, err = a.Revoke(ctx, b.lease)
	wantDenied(t, "revoke B's lease", err)

	if got := get(t, f.root, registry.NodeKey(nodeB)); got != before {
		t.Errorf("B's entry changed: %q -> %q", before, got)
	}
	if got := get(t, f.root, registry.MemberKey(nodeB)); got != memberBefore {
		t.Errorf("B's member record changed: %q -> %q", memberBefore, got)
	}
}

// TestNodeCannotDeleteOtherNodesInstances: A can neither delete B's
// instance (one key, the app's prefix, or by revoking or renewing B's
// lease) nor advertise an instance in B's name.
func TestNodeCannotDeleteOtherNodesInstances(t *testing.T) {
	f, b := setup(t)
	a := f.client(t, nodeA)
	ctx := ctxT(t)
	inst := registry.InstanceKey(testApp.Group, testApp.Name, nodeB)
	before := get(t, f.root, inst)
	if before == "" {
		t.Fatal("B has no instance")
	}

	_, err := a.Delete(ctx, inst)
	wantDenied(t, "delete B's instance", err)
	_, err = a.Delete(ctx, registry.AppPrefix(testApp.Group, testApp.Name)+"instances/", clientv3.WithPrefix())
	wantDenied(t, "delete every instance of the app", err)
	_, err = a.Put(ctx, inst, `{"ipv4":"10.10.66.0","node":"worker002","port":8080}`)
	wantDenied(t, "redirect B's instance", err)
	_, err = a.Revoke(ctx, b.lease)
	wantDenied(t, "revoke B's lease", err)
	_, err = a.KeepAliveOnce(ctx, b.lease)
	wantDenied(t, "keep B's lease alive (a dead node's instances would never expire)", err)

	if got := get(t, f.root, inst); got != before {
		t.Errorf("B's instance changed: %q -> %q", before, got)
	}
}

// TestNodeCannotReadOtherNodesSecrets: A cannot read, list or watch B's
// sealed secrets, nor anything under /meshd/ that is not its own.
func TestNodeCannotReadOtherNodesSecrets(t *testing.T) {
	f, _ := setup(t)
	a := f.client(t, nodeA)
	ctx := ctxT(t)

	_, err := a.Get(ctx, registry.SecretKey(nodeB, "db"))
	wantDenied(t, "get B's secret", err)
	_, err = a.Get(ctx, registry.SecretsNodePrefix(nodeB), clientv3.WithPrefix())
	wantDenied(t, "list B's secrets", err)
	_, err = a.Get(ctx, registry.SecretsPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	wantDenied(t, "list every secret", err)
	_, err = a.Get(ctx, registry.MeshdPrefix, clientv3.WithPrefix())
	wantDenied(t, "read /meshd/", err)
	_, err = a.Get(ctx, "", clientv3.WithFromKey())
	wantDenied(t, "read the whole keyspace", err)

	wctx, cancel := clientv3.WithRequireLeader(ctx), func() {}
	defer cancel()
	select {
	case wr, ok := <-a.Watch(wctx, registry.SecretsNodePrefix(nodeB), clientv3.WithPrefix()):
		if ok && wr.Err() == nil && !wr.Canceled {
			t.Errorf("watch on B's secrets delivered %+v", wr)
		}
	case <-time.After(10 * time.Second):
		t.Error("watch on B's secrets neither refused nor answered")
	}

	// Its own secret it can read.
	if got := get(t, a, registry.SecretKey(nodeA, "db")); !strings.Contains(got, "sealed-to-a") {
		t.Errorf("A reads its own secret: %q", got)
	}
}

// TestNodeWritesOwnKeysAndReadsCluster: everything meshd does as a node
// works under the node's role: claim a subnet, register on a lease,
// advertise and withdraw an instance, publish status, renew and revoke the
// lease, list and watch /cluster/, read its own secrets.
func TestNodeWritesOwnKeysAndReadsCluster(t *testing.T) {
	f, b := setup(t)
	a := join(t, f, nodeA, "192.0.2.1")
	ctx := ctxT(t)
	if a.member.Subnet == b.member.Subnet || !registry.DefaultPool.Contains(a.member.Subnet) {
		t.Fatalf("subnets A %v B %v", a.member.Subnet, b.member.Subnet)
	}
	// Restart path: ClaimMember again keeps the subnet.
	m, err := registry.ClaimMember(ctx, a.cli, registry.Member{Name: nodeA, PublicKey: wgKey('1'), Endpoint: "192.0.2.1:51820"}, registry.DefaultPool, "192.0.2.1")
	if err != nil || m.Subnet != a.member.Subnet {
		t.Fatalf("A re-claims: %v %v", m, err)
	}

	resp, err := a.cli.Get(ctx, registry.ClusterPrefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatalf("A lists /cluster/: %v", err)
	}
	var keys []string
	for _, kv := range resp.Kvs {
		keys = append(keys, string(kv.Key))
	}
	for _, k := range []string{registry.NodeKey(nodeB), registry.MemberKey(nodeB), registry.InstanceKey(testApp.Group, testApp.Name, nodeB)} {
		if !slices.Contains(keys, k) {
			t.Errorf("A's view lacks %s", k)
		}
	}

	wch := a.cli.Watch(clientv3.WithRequireLeader(ctx), registry.ClusterPrefix, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
	put(t, b.cli, registry.NodeKey(nodeB), `{"name":"worker002","ipv4":"192.0.2.2","services":["services"]}`, clientv3.WithLease(b.lease))
	select {
	case wr := <-wch:
		if wr.Err() != nil || len(wr.Events) == 0 || string(wr.Events[0].Kv.Key) != registry.NodeKey(nodeB) {
			t.Errorf("A's watch got %+v (err %v)", wr.Events, wr.Err())
		}
	case <-time.After(10 * time.Second):
		t.Error("A's watch saw nothing")
	}

	inst := registry.InstanceKey(testApp.Group, testApp.Name, nodeA)
	tr, err := a.cli.Txn(ctx).If(clientv3.Compare(clientv3.LeaseValue(inst), "=", a.lease)).Then(clientv3.OpDelete(inst)).Commit()
	if err != nil || !tr.Succeeded {
		t.Errorf("A withdraws its instance: %v", err)
	}
	put(t, a.cli, registry.StatusKey(nodeA), `{"node":"worker001","revision":2}`, clientv3.WithLease(a.lease))
	if got := get(t, a.cli, registry.StatusKey(nodeA)); !strings.Contains(got, `"revision":2`) {
		t.Errorf("A reads its status: %q", got)
	}
	if _, err := a.cli.Revoke(ctx, a.lease); err != nil {
		t.Errorf("A revokes its own lease: %v", err)
	}
	if get(t, f.root, registry.NodeKey(nodeA)) != "" {
		t.Error("A's entry survived its lease")
	}
}

// TestNodeCannotWriteOutsideOwnKeys: app metadata, other nodes' status
// and claims, free subnets, flannel's keys and foreign keys are all
// refused; so is reading other nodes' status.
func TestNodeCannotWriteOutsideOwnKeys(t *testing.T) {
	f, b := setup(t)
	a := join(t, f, nodeA, "192.0.2.1")
	ctx := ctxT(t)
	freeSubnet := netip.MustParsePrefix("10.10.50.0/24")
	for _, k := range []string{
		registry.MetaKey(testApp.Group, testApp.Name),
		registry.MetaKey(registry.GroupFrontends, "evil"),
		registry.InstanceKey(registry.GroupFrontends, "evil", nodeA), // no such app
		registry.StatusKey(nodeB),
		registry.SubnetKey(b.member.Subnet),
		registry.SubnetKey(freeSubnet),
		registry.SecretKey(nodeA, "forged"),
		registry.FlannelConfigKey,
		registry.FlannelSubnetKey(freeSubnet),
		"/cluster/other-tool/key",
		"/unrelated",
	} {
		_, err := a.cli.Put(ctx, k, "x")
		wantDenied(t, "put "+k, err)
	}
	_, err := a.cli.Delete(ctx, registry.SubnetKey(b.member.Subnet))
	wantDenied(t, "release B's subnet", err)
	_, err = a.cli.Get(ctx, registry.StatusKey(nodeB))
	wantDenied(t, "read B's status", err)
	if got := get(t, f.root, registry.SubnetKey(b.member.Subnet)); !strings.Contains(got, nodeB) {
		t.Errorf("B's claim changed: %q", got)
	}
}
