package etcdauth

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/pki"
	"github.com/meshd/meshd/pkg/registry"
)

// TestClaimValueCannotInjectNames: a node that rewrites its own claim's
// value to an operator's name, or to a made-up name, gets neither turned
// into a node user by the next apply (which runs without --operator, as
// the refresh after `meshctl app register` does): the operator keeps
// root, no user or role is created, the claim stays with its holder and
// the mismatch is reported.
func TestClaimValueCannotInjectNames(t *testing.T) {
	f := newFixture(t)
	ctx := ctxT(t)
	put(t, f.root, registry.MetaKey(testApp.Group, testApp.Name), `{"publish":{"port":8080}}`)
	if _, err := Apply(ctx, f.root, Options{Nodes: []string{nodeA, nodeB}, Operators: []string{"alice"}}); err != nil {
		t.Fatal(err)
	}
	a := join(t, f, nodeA, "192.0.2.1")
	join(t, f, nodeB, "192.0.2.2")
	claim := registry.SubnetKey(a.member.Subnet)
	for _, name := range []string{"alice", "mallory"} {
		put(t, a.cli, claim, `{"node":"`+name+`"}`)
		res, err := Apply(ctx, f.root, Options{})
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(res.Nodes, []string{nodeA, nodeB}) {
			t.Errorf("claim naming %s: nodes set up %v, want only A and B", name, res.Nodes)
		}
		if !strings.Contains(strings.Join(res.Problems, "\n"), "names node "+name+" but is held by node "+nodeA) {
			t.Errorf("claim naming %s not reported: %q", name, res.Problems)
		}
		if !slices.Contains(roleOf(t, f.root, nodeA), Exact(claim, Write)) {
			t.Errorf("claim naming %s: A lost its own claim key", name)
		}
		rl, _ := f.root.RoleList(ctx)
		if slices.Contains(rl.Roles, NodeRole(name)) {
			t.Errorf("a role was created for %s", name)
		}
	}
	ug, err := f.root.UserGet(ctx, "alice")
	if err != nil || !slices.Equal(ug.Roles, []string{RootRole}) {
		t.Errorf("operator alice: roles %v, %v; want [root]", ug.Roles, err)
	}
	ul, _ := f.root.UserList(ctx)
	if slices.Contains(ul.Users, "mallory") {
		t.Error("user mallory was created")
	}
}

// TestRevocationSticksUntilAdmitted: after RevokeNode the node's durable
// keys are gone, neither a later apply nor the app-register refresh
// sets it up again (its certificate stays dead), naming it explicitly is
// refused, and only AdmitNode brings it back.
func TestRevocationSticksUntilAdmitted(t *testing.T) {
	f, _ := setup(t)
	ctx := ctxT(t)
	a := join(t, f, nodeA, "192.0.2.1")
	if _, err := RevokeNode(ctx, f.root, nodeA); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{registry.MemberKey(nodeA), registry.SubnetKey(a.member.Subnet), registry.NodeKey(nodeA)} {
		if v := get(t, f.root, k); v != "" {
			t.Errorf("revoke left %s = %q", k, v)
		}
	}
	res, err := Apply(ctx, f.root, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if slices.Contains(res.Nodes, nodeA) {
		t.Errorf("apply set up the revoked node again: %v", res.Changes)
	}
	if _, err := RefreshIfEnabled(ctx, f.root, Options{}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.client(t, nodeA).Get(ctx, registry.ClusterPrefix, clientv3.WithPrefix()); err == nil {
		t.Error("revoked certificate works again after apply and refresh")
	}
	if _, err := Apply(ctx, f.root, Options{Nodes: []string{nodeA}}); err == nil || !strings.Contains(err.Error(), "revoked") {
		t.Errorf("apply --node of a revoked node: %v", err)
	}
	if ok, err := AdmitNode(ctx, f.root, nodeA); err != nil || !ok {
		t.Fatalf("admit: %v %v", ok, err)
	}
	if _, err := Apply(ctx, f.root, Options{Nodes: []string{nodeA}}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.client(t, nodeA).Get(ctx, registry.ClusterPrefix, clientv3.WithPrefix()); err != nil {
		t.Errorf("re-admitted node cannot read: %v", err)
	}
}

// TestRotationWithNewCNKillsOldCertificate: etcd knows a certificate only
// by its CN, so rotation issues node@2 and RotateNode moves the role to
// it: the old certificate (CN = node) authenticates as nobody, the new one
// has exactly the node's rights, and later applies keep it that way.
func TestRotationWithNewCNKillsOldCertificate(t *testing.T) {
	f, _ := setup(t)
	ctx := ctxT(t)
	a := join(t, f, nodeA, "192.0.2.1")
	cn := pki.NodeCN(nodeA, 2)
	next := f.client(t, cn)
	if _, err := next.Get(ctx, registry.ClusterPrefix, clientv3.WithPrefix()); err == nil {
		t.Fatal("new certificate works before the rotation")
	}
	if _, err := RotateNode(ctx, f.root, cn); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 2; i++ {
		res, err := Apply(ctx, f.root, Options{})
		if err != nil {
			t.Fatal(err)
		}
		if i == 1 && len(res.Changes) != 0 {
			t.Errorf("second apply after rotation changed %v", res.Changes)
		}
		if _, err := a.cli.Get(ctx, registry.ClusterPrefix, clientv3.WithPrefix()); err == nil {
			t.Errorf("apply %d: old certificate still reads", i)
		}
		if _, err := next.Put(ctx, registry.StatusKey(nodeA), `{"node":"worker001"}`); err != nil {
			t.Errorf("apply %d: new certificate cannot write its status: %v", i, err)
		}
		_, err = next.Put(ctx, registry.NodeKey(nodeB), "x")
		wantDenied(t, "new certificate writes B's entry", err)
	}
	ul, _ := f.root.UserList(ctx)
	if slices.Contains(ul.Users, nodeA) {
		t.Errorf("user %s still exists: %v", nodeA, ul.Users)
	}
	if _, err := RotateNode(ctx, f.root, "alice@x"); err == nil {
		t.Error("rotation to a malformed CN accepted")
	}
}

// TestRefreshUsesStoredSettings: the role refresh after `meshctl app
// register` applies the cluster's own settings (pool, subnet mode,
// operators), as the last `roles apply` stored them: on a cluster in
// open-subnets mode it writes no claim, and on a cluster with another
// pool it pre-claims from that pool, never from the default one.
func TestRefreshUsesStoredSettings(t *testing.T) {
	f := newFixture(t)
	ctx := ctxT(t)
	if _, err := RefreshIfEnabled(ctx, f.root, Options{}); err != nil {
		t.Fatal(err) // auth off: nothing to do
	}
	pool := registry.Pool{Min: netip.MustParseAddr("10.50.0.0"), Max: netip.MustParseAddr("10.50.3.192"), Bits: 26}
	put(t, f.root, registry.NodeKey(nodeA), `{"name":"worker001","ipv4":"192.0.2.1"}`)
	if _, err := Apply(ctx, f.root, Options{Subnets: OpenSubnets, Pool: pool, Operators: []string{"alice"}}); err != nil {
		t.Fatal(err)
	}
	put(t, f.root, registry.NodeKey(nodeB), `{"name":"worker002","ipv4":"192.0.2.2"}`)
	if _, err := RefreshIfEnabled(ctx, f.root, Options{}); err != nil {
		t.Fatal(err)
	}
	if r, _ := f.root.Get(ctx, registry.SubnetsPrefix, clientv3.WithPrefix()); len(r.Kvs) != 0 {
		t.Errorf("refresh on an open-subnets cluster wrote claims: %s", r.Kvs[0].Key)
	}
	if _, err := Apply(ctx, f.root, Options{Pool: pool, Operators: []string{"alice"}}); err != nil {
		t.Fatal(err)
	}
	put(t, f.root, registry.NodeKey("worker003"), `{"name":"worker003","ipv4":"192.0.2.3"}`)
	res, err := RefreshIfEnabled(ctx, f.root, Options{})
	if err != nil {
		t.Fatal(err)
	}
	r, _ := f.root.Get(ctx, registry.SubnetsPrefix, clientv3.WithPrefix())
	if len(r.Kvs) != 3 {
		t.Errorf("claims after refresh: %d, want 3 (changes %v)", len(r.Kvs), res.Changes)
	}
	for _, kv := range r.Kvs {
		pk, err := registry.ParseKey(string(kv.Key))
		if err != nil || !pool.Contains(pk.Subnet) {
			t.Errorf("claim %s outside the cluster's pool", kv.Key)
		}
	}
	if _, err := f.root.Put(ctx, SettingsKey, `{"subnetMin":"x"}`); err != nil {
		t.Fatal(err)
	}
	if _, err := RefreshIfEnabled(ctx, f.root, Options{}); err == nil {
		t.Error("refresh with broken stored settings did not fail")
	}
}

// TestRevokeRefusesOperator: `roles revoke` of a name whose user holds
// root changes nothing: the operator keeps root and no revoked mark is
// written.
func TestRevokeRefusesOperator(t *testing.T) {
	f := newFixture(t)
	ctx := ctxT(t)
	if _, err := Apply(ctx, f.root, Options{Operators: []string{"alice"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := RevokeNode(ctx, f.root, "alice"); err == nil {
		t.Fatal("revoke of an operator accepted")
	}
	if ug, err := f.root.UserGet(ctx, "alice"); err != nil || !slices.Contains(ug.Roles, RootRole) {
		t.Errorf("alice after a refused revoke: %v %v", ug, err)
	}
	if v := get(t, f.root, registry.RevokedKey("alice")); v != "" {
		t.Errorf("a refused revoke left a revoked mark: %q", v)
	}
}
