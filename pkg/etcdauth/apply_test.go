package etcdauth

import (
	"crypto/tls"
	"crypto/x509"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/registry"
)

// TestOperatorCanDoEverything: the root certificate reads and writes
// anywhere, including every node's keys, secrets and leases.
func TestOperatorCanDoEverything(t *testing.T) {
	f, b := setup(t)
	ctx := ctxT(t)
	r := f.root
	if got := get(t, r, registry.SecretKey(nodeB, "db")); !strings.Contains(got, "sealed-to-b") {
		t.Errorf("root reads B's secret: %q", got)
	}
	if _, err := r.Get(ctx, "", clientv3.WithFromKey(), clientv3.WithKeysOnly()); err != nil {
		t.Errorf("root reads the keyspace: %v", err)
	}
	put(t, r, registry.MetaKey(registry.GroupFrontends, "web"), `{"publish":{"port":80}}`)
	put(t, r, registry.NodeKey(nodeB), `{"name":"worker002","ipv4":"192.0.2.2"}`)
	put(t, r, "/unrelated", "x")
	if _, err := r.Delete(ctx, registry.InstanceKey(testApp.Group, testApp.Name, nodeB)); err != nil {
		t.Errorf("root deletes B's instance: %v", err)
	}
	if _, err := r.Revoke(ctx, b.lease); err != nil {
		t.Errorf("root revokes B's lease: %v", err)
	}
	if n, err := registry.RemoveNode(ctx, r, nodeB); err != nil || n == 0 {
		t.Errorf("root removes node B: %d keys, %v", n, err)
	}
}

func roleOf(t *testing.T, c *clientv3.Client, node string) []Perm {
	t.Helper()
	rg, err := c.RoleGet(ctxT(t), NodeRole(node))
	if err != nil {
		t.Fatal(err)
	}
	var out []Perm
	for _, p := range rg.Perm {
		out = append(out, Perm{Key: string(p.Key), RangeEnd: string(p.RangeEnd), Type: PermType(p.PermType)})
	}
	return out
}

// TestApplyIsIdempotent: a dry run changes nothing; a second run changes
// nothing; the roles hold exactly NodePerms.
func TestApplyIsIdempotent(t *testing.T) {
	f := newFixture(t)
	ctx := ctxT(t)
	put(t, f.root, registry.MetaKey(testApp.Group, testApp.Name), `{"publish":{"port":8080}}`)
	dry, err := Apply(ctx, f.root, Options{Nodes: []string{nodeA}, DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(dry.Changes) == 0 || dry.AuthEnabled {
		t.Fatalf("dry run: %+v", dry)
	}
	if st, _ := f.root.AuthStatus(ctx); st.Enabled {
		t.Fatal("dry run enabled auth")
	}
	if ul, _ := f.root.UserList(ctx); len(ul.Users) != 0 {
		t.Fatalf("dry run added users %v", ul.Users)
	}
	if r, _ := f.root.Get(ctx, registry.SubnetsPrefix, clientv3.WithPrefix()); len(r.Kvs) != 0 {
		t.Fatal("dry run claimed a subnet")
	}

	first, err := Apply(ctx, f.root, Options{Nodes: []string{nodeA}})
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(dry.Changes, first.Changes); diff != "" {
		t.Errorf("dry run and real run disagree (-dry +real):\n%s", diff)
	}
	second, err := Apply(ctx, f.root, Options{Nodes: []string{nodeA}})
	if err != nil {
		t.Fatal(err)
	}
	if len(second.Changes) != 0 {
		t.Errorf("second apply changed %v", second.Changes)
	}
	// With no --node it finds A by its role and claim and changes nothing.
	third, err := Apply(ctx, f.root, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if len(third.Changes) != 0 || !slices.Equal(third.Nodes, []string{nodeA}) {
		t.Errorf("apply without nodes: %+v", third)
	}
	view, err := ReadView(ctx, f.root)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(NodePerms(nodeA, view, Preclaim), roleOf(t, f.root, nodeA)); diff != "" {
		t.Errorf("role of A (-want +got):\n%s", diff)
	}
}

// TestRevokeNodeCutsOffCertificate: after RevokeNode a still-valid
// certificate of the node authenticates as nobody.
func TestRevokeNodeCutsOffCertificate(t *testing.T) {
	f, b := setup(t)
	a := join(t, f, nodeA, "192.0.2.1")
	done, err := RevokeNode(ctxT(t), f.root, nodeA)
	if err != nil || !slices.Contains(done, "delete user "+nodeA) || !slices.Contains(done, "delete role "+NodeRole(nodeA)) {
		t.Fatalf("revoke: %v %v", done, err)
	}
	if _, err := a.cli.Get(ctxT(t), registry.ClusterPrefix, clientv3.WithPrefix()); err == nil {
		t.Error("revoked node still reads /cluster/")
	}
	if _, err := a.cli.Put(ctxT(t), registry.StatusKey(nodeA), "x"); err == nil {
		t.Error("revoked node still writes its status")
	}
	if _, err := b.cli.Get(ctxT(t), registry.ClusterPrefix, clientv3.WithPrefix()); err != nil {
		t.Errorf("B lost access: %v", err)
	}
	if again, err := RevokeNode(ctxT(t), f.root, nodeA); err != nil || len(again) != 0 {
		t.Errorf("second revoke: %v %v", again, err)
	}
}

// TestUnknownCertificateDenied: a certificate of the right CA whose CN is
// no user gets nothing; nor does a certificate of another CA.
func TestUnknownCertificateDenied(t *testing.T) {
	f, _ := setup(t)
	intruder := f.client(t, "intruder")
	if _, err := intruder.Get(ctxT(t), registry.ClusterPrefix, clientv3.WithPrefix()); err == nil {
		t.Error("unknown CN reads /cluster/")
	}
	// A certificate of another CA fails the TLS handshake itself.
	other := newFixture(t)
	fl := other.files(t, RootUser)
	cert, err := tls.LoadX509KeyPair(fl.CertFile, fl.KeyFile)
	if err != nil {
		t.Fatal(err)
	}
	caPEM, _ := os.ReadFile(f.files(t, RootUser).CAFile)
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", strings.TrimPrefix(f.srv.Endpoint(), "https://"),
		&tls.Config{RootCAs: roots, Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})
	if err == nil {
		// TLS 1.3: the server's verdict on the client certificate
		// arrives with the first read.
		conn.SetDeadline(time.Now().Add(5 * time.Second))
		_, err = conn.Read(make([]byte, 1))
		conn.Close()
	}
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Errorf("certificate of a foreign CA: err %v, want a TLS certificate error", err)
	}
}

// TestRefreshAfterAppRegister: a node cannot advertise an app registered
// after its role was made until the roles are refreshed; a node keeps its
// existing instance key (and so its lease) when an app loses metadata.
func TestRefreshAfterAppRegister(t *testing.T) {
	f, b := setup(t)
	a := join(t, f, nodeA, "192.0.2.1")
	ctx := ctxT(t)
	web := registry.AppID{Group: registry.GroupFrontends, Name: "web"}
	put(t, f.root, registry.MetaKey(web.Group, web.Name), `{"publish":{"port":80}}`)
	inst := registry.InstanceKey(web.Group, web.Name, nodeA)
	_, err := a.cli.Put(ctx, inst, "{}", clientv3.WithLease(a.lease))
	wantDenied(t, "instance of an app newer than the role", err)

	res, err := RefreshIfEnabled(ctx, f.root, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.Nodes, []string{nodeA, nodeB}) {
		t.Errorf("refreshed nodes %v", res.Nodes)
	}
	put(t, a.cli, inst, `{"ipv4":"10.10.0.0","node":"worker001","port":80}`, clientv3.WithLease(a.lease))

	// The operator drops api's metadata; B still advertises api.
	if _, err := f.root.Delete(ctx, registry.MetaKey(testApp.Group, testApp.Name)); err != nil {
		t.Fatal(err)
	}
	if _, err := RefreshIfEnabled(ctx, f.root, Options{}); err != nil {
		t.Fatal(err)
	}
	if _, err := b.cli.KeepAliveOnce(ctx, b.lease); err != nil {
		t.Errorf("B cannot renew its lease after the app lost metadata: %v", err)
	}
	// Once A withdrew its api instance, it may not start one again.
	_, err = a.cli.Delete(ctx, registry.InstanceKey(testApp.Group, testApp.Name, nodeA))
	if err != nil {
		t.Fatalf("A withdraws its api instance: %v", err)
	}
	if _, err := RefreshIfEnabled(ctx, f.root, Options{}); err != nil {
		t.Fatal(err)
	}
	_, err = a.cli.Put(ctx, registry.InstanceKey(testApp.Group, testApp.Name, nodeA), "{}")
	wantDenied(t, "instance of an app without metadata", err)
}

// TestRefreshIfEnabledLeavesAuthOff: refreshing never turns auth on.
func TestRefreshIfEnabledLeavesAuthOff(t *testing.T) {
	f := newFixture(t)
	put(t, f.root, registry.NodeKey(nodeA), `{"name":"worker001","ipv4":"192.0.2.1"}`)
	res, err := RefreshIfEnabled(ctxT(t), f.root, Options{})
	if err != nil || len(res.Changes) != 0 {
		t.Fatalf("refresh with auth off: %+v %v", res, err)
	}
	if st, _ := f.root.AuthStatus(ctxT(t)); st.Enabled {
		t.Fatal("refresh enabled auth")
	}
}

// TestOpenSubnetsMode: without pre-claims a new node may claim a subnet
// itself, and the next apply narrows its grant to that one claim.
func TestOpenSubnetsMode(t *testing.T) {
	f := newFixture(t)
	ctx := ctxT(t)
	put(t, f.root, registry.MetaKey(testApp.Group, testApp.Name), `{"publish":{"port":8080}}`)
	if _, err := Apply(ctx, f.root, Options{Nodes: []string{nodeA}, Subnets: OpenSubnets}); err != nil {
		t.Fatal(err)
	}
	if r, _ := f.root.Get(ctx, registry.SubnetsPrefix, clientv3.WithPrefix()); len(r.Kvs) != 0 {
		t.Fatal("open mode pre-claimed")
	}
	wide := Prefix(registry.SubnetsPrefix, Write)
	if !slices.Contains(roleOf(t, f.root, nodeA), wide) {
		t.Fatal("new node lacks the claim prefix")
	}
	a := join(t, f, nodeA, "192.0.2.1")
	res, err := Apply(ctx, f.root, Options{Subnets: OpenSubnets})
	if err != nil {
		t.Fatal(err)
	}
	perms := roleOf(t, f.root, nodeA)
	if slices.Contains(perms, wide) || !slices.Contains(perms, Exact(registry.SubnetKey(a.member.Subnet), Write)) {
		t.Errorf("after joining, A holds %v (changes %v)", perms, res.Changes)
	}
}

// TestStrayRolesRevoked: a node user that somehow holds another node's
// role is brought back to its own role only; a node name whose user holds
// root is never turned into a node (root is not taken away) and is
// reported.
func TestStrayRolesRevoked(t *testing.T) {
	f, _ := setup(t)
	ctx := ctxT(t)
	if _, err := f.root.UserGrantRole(ctx, nodeA, NodeRole(nodeB)); err != nil {
		t.Fatal(err)
	}
	if _, err := Apply(ctx, f.root, Options{}); err != nil {
		t.Fatal(err)
	}
	ug, err := f.root.UserGet(ctx, nodeA)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(ug.Roles, []string{NodeRole(nodeA)}) {
		t.Errorf("A's roles %v", ug.Roles)
	}
	a := f.client(t, nodeA)
	_, err = a.Put(ctx, registry.NodeKey(nodeB), "x")
	wantDenied(t, "put B's entry after the stray roles went", err)

	if _, err := f.root.UserGrantRole(ctx, nodeA, RootRole); err != nil {
		t.Fatal(err)
	}
	res, err := Apply(ctx, f.root, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if ug, _ := f.root.UserGet(ctx, nodeA); !slices.Contains(ug.Roles, RootRole) {
		t.Errorf("apply took root from user %s: roles %v", nodeA, ug.Roles)
	}
	if slices.Contains(res.Nodes, nodeA) || !strings.Contains(strings.Join(res.Problems, "\n"), "holds the root role") {
		t.Errorf("root holder set up as a node or not reported: nodes %v problems %q", res.Nodes, res.Problems)
	}
	if _, err := Apply(ctx, f.root, Options{Nodes: []string{nodeA}}); err == nil || !strings.Contains(err.Error(), "holds the root role") {
		t.Errorf("apply --node of a root holder: %v", err)
	}
}

// TestPreclaimAdoptsFlannelSubnet: the operator's pre-claim gives a
// migrating node its flannel subnet (matched by the public IPv4 of its
// nix-infra entry), and the node's own ClaimMember accepts it.
func TestPreclaimAdoptsFlannelSubnet(t *testing.T) {
	f := newFixture(t)
	ctx := ctxT(t)
	put(t, f.root, registry.NodeKey(nodeA), `{"name":"worker001","ipv4":"192.0.2.1","services":["backends"]}`)
	put(t, f.root, registry.FlannelSubnetKey(netip.MustParsePrefix("10.10.7.0/24")), `{"PublicIP":"192.0.2.1"}`)
	put(t, f.root, registry.FlannelSubnetKey(netip.MustParsePrefix("10.10.0.0/24")), `{"PublicIP":"192.0.2.9"}`)
	res, err := Apply(ctx, f.root, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(res.Changes, "claim subnet 10.10.7.0/24 for node worker001") {
		t.Errorf("changes %v", res.Changes)
	}
	c := f.client(t, nodeA)
	m, err := registry.ClaimMember(ctx, c, registry.Member{Name: nodeA, PublicKey: wgKey(1)}, registry.DefaultPool, "192.0.2.1")
	if err != nil || m.Subnet != netip.MustParsePrefix("10.10.7.0/24") {
		t.Fatalf("A claims %v, %v", m.Subnet, err)
	}
}
