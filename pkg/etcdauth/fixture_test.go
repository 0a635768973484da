package etcdauth

import (
	"context"
	"encoding/base64"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/pki"
	"github.com/meshd/meshd/pkg/registry"
)

// The two nodes of every fixture: A is the (possibly compromised) node
// under test, B is its victim.
const (
	nodeA = "worker001"
	nodeB = "worker002"
)

var testApp = registry.AppID{Group: registry.GroupBackends, Name: "api"}

// fixture is a real etcd with TLS and --client-cert-auth, a CA, and a
// client per certificate.
type fixture struct {
	srv  *etcdtest.TLSServer
	dir  pki.Dir
	ca   *pki.CA
	root *clientv3.Client
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	d := pki.Dir{Path: filepath.Join(t.TempDir(), "pki")}
	now := time.Now()
	ca, err := d.Init(pki.CAOptions{Cluster: "test", Now: now}, pki.WriteOptions{})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ca.Issue(pki.Request{CommonName: "etcd0", Usage: pki.Server, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Write("etcd0", srv, pki.WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	f := &fixture{dir: d, ca: ca}
	f.srv = etcdtest.NewTLS(t, etcdtest.TLSFiles{CAFile: filepath.Join(d.Path, pki.CACertFile), CertFile: d.CertPath("etcd0"), KeyFile: d.KeyPath("etcd0")})
	f.root = f.client(t, RootUser)
	return f
}

// files issues (once) a client certificate with the given CN.
func (f *fixture) files(t *testing.T, cn string) etcdtest.TLSFiles {
	t.Helper()
	fl := etcdtest.TLSFiles{CAFile: filepath.Join(f.dir.Path, pki.CACertFile), CertFile: f.dir.CertPath(cn), KeyFile: f.dir.KeyPath(cn)}
	is, err := f.ca.Issue(pki.Request{CommonName: cn, Now: time.Now()})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.dir.Write(cn, is, pki.WriteOptions{}); err != nil && !strings.Contains(err.Error(), "already exists") {
		t.Fatal(err)
	}
	return fl
}

// client returns a client authenticating with a certificate of CN cn.
func (f *fixture) client(t *testing.T, cn string) *clientv3.Client {
	t.Helper()
	return etcdtest.NewTLSClient(t, f.srv, f.files(t, cn))
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func put(t *testing.T, c *clientv3.Client, k, v string, opts ...clientv3.OpOption) {
	t.Helper()
	if _, err := c.Put(ctxT(t), k, v, opts...); err != nil {
		t.Fatalf("put %s: %v", k, err)
	}
}

func get(t *testing.T, c *clientv3.Client, k string) string {
	t.Helper()
	r, err := c.Get(ctxT(t), k)
	if err != nil {
		t.Fatalf("get %s: %v", k, err)
	}
	if len(r.Kvs) == 0 {
		return ""
	}
	return string(r.Kvs[0].Value)
}

// wantDenied fails unless err is etcd's permission denial.
func wantDenied(t *testing.T, what string, err error) {
	t.Helper()
	if err == nil {
		t.Errorf("%s: allowed, want permission denied", what)
		return
	}
	if !strings.Contains(err.Error(), "permission denied") {
		t.Errorf("%s: err %v, want permission denied", what, err)
	}
}

func wgKey(b byte) string {
	k := make([]byte, 32)
	for i := range k {
		k[i] = b
	}
	return base64.StdEncoding.EncodeToString(k)
}

// joined is a node that has set itself up the way meshd does: subnet
// claim and member record, an entry, an instance and a status on its lease.
type joined struct {
	cli    *clientv3.Client
	lease  clientv3.LeaseID
	member registry.Member
}

func join(t *testing.T, f *fixture, node, ipv4 string) joined {
	t.Helper()
	ctx := ctxT(t)
	c := f.client(t, node)
	l, err := c.Grant(ctx, 30)
	if err != nil {
		t.Fatalf("%s grants a lease: %v", node, err)
	}
	// As meshd: subnet claim, member record and node entry in one
	// transaction, all under the node's role.
	m, err := registry.ClaimMemberWith(ctx, c, registry.Member{Name: node, PublicKey: wgKey(node[len(node)-1])}, registry.DefaultPool, ipv4, &registry.ClaimEntry{
		Key: registry.NodeKey(node), Lease: l.ID,
		Value: func(registry.Member) []byte {
			return []byte(`{"name":"` + node + `","ipv4":"` + ipv4 + `","services":["backends"]}`)
		},
		May: func(context.Context, *mvccpb.KeyValue) error { return nil },
	})
	if err != nil {
		t.Fatalf("%s claims its member record and registers its entry: %v", node, err)
	}
	put(t, c, registry.InstanceKey(testApp.Group, testApp.Name, node), `{"ipv4":"`+m.OverlayIP.String()+`","node":"`+node+`","port":8080}`, clientv3.WithLease(l.ID))
	put(t, c, registry.StatusKey(node), `{"node":"`+node+`","revision":1}`, clientv3.WithLease(l.ID))
	if _, err := c.KeepAliveOnce(ctx, l.ID); err != nil {
		t.Fatalf("%s renews its lease: %v", node, err)
	}
	return joined{cli: c, lease: l.ID, member: m}
}

// setup registers an app and a secret for each node as the operator,
// applies the roles for A and B, enables auth, and has B join.
func setup(t *testing.T) (*fixture, joined) {
	t.Helper()
	f := newFixture(t)
	put(t, f.root, registry.MetaKey(testApp.Group, testApp.Name), `{"publish":{"port":8080}}`)
	put(t, f.root, registry.SecretKey(nodeA, "db"), `{"version":1,"ciphertext":"sealed-to-a"}`)
	put(t, f.root, registry.SecretKey(nodeB, "db"), `{"version":1,"ciphertext":"sealed-to-b"}`)
	res, err := Apply(ctxT(t), f.root, Options{Nodes: []string{nodeA, nodeB}})
	if err != nil {
		t.Fatal(err)
	}
	if !res.AuthEnabled {
		t.Fatal("auth not enabled")
	}
	return f, join(t, f, nodeB, "192.0.2.2")
}
