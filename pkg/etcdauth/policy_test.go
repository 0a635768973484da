package etcdauth

import (
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/meshd/meshd/pkg/registry"
)

var update = flag.Bool("update", false, "rewrite golden files")

func testView() View {
	return ViewOf([]KV{
		{Key: "/cluster/nodes/worker001", Value: []byte(`{"name":"worker001","ipv4":"192.0.2.1","services":["backends"]}`)},
		{Key: "/cluster/nodes/worker002", Value: []byte(`{"name":"worker002","ipv4":"192.0.2.2","services":["backends"]}`)},
		{Key: "/cluster/meshd/members/worker003", Value: []byte(`{}`)},
		{Key: "/cluster/meshd/subnets/10.10.1.0-24", Value: []byte(`{"node":"worker001"}`)},
		{Key: "/cluster/meshd/subnets/10.10.2.0-24", Value: []byte(`{"node":"worker002"}`)},
		{Key: "/cluster/backends/api/meta_data", Value: []byte(`{"publish":{"port":8080}}`)},
		{Key: "/cluster/services/mongodb/meta_data", Value: []byte(`{"publish":{"port":27017}}`)},
		{Key: "/cluster/services/mongodb/instances/worker002", Value: []byte(`{}`)},
		{Key: "/cluster/frontends/old/instances/worker002", Value: []byte(`{}`)}, // app lost its metadata
		// Hostile keys: none of these may show up in any role.
		{Key: "/cluster/backends/a b/meta_data", Value: []byte(`{}`)},
		{Key: "/cluster/backends/x/instances/../../nodes/worker002", Value: []byte(`{}`)},
		{Key: "/cluster/nodes/evil\nname", Value: []byte(`{}`)},
		{Key: "/cluster/meshd/subnets/10.10.9.0-24", Value: []byte(`{"node":"../root"}`)},
		{Key: "/cluster/meshd/subnets/not-a-subnet", Value: []byte(`{"node":"worker001"}`)},
	})
}

func render(v View, nodes []string, mode SubnetMode) string {
	var b strings.Builder
	for _, n := range nodes {
		fmt.Fprintf(&b, "role %s (user %s)\n", NodeRole(n), n)
		for _, p := range NodePerms(n, v, mode) {
			fmt.Fprintf(&b, "  %s\n", p)
		}
	}
	return b.String()
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(string(want), got); diff != "" {
		t.Errorf("%s (-want +got):\n%s", name, diff)
	}
}

func TestNodePermsGolden(t *testing.T) {
	v := testView()
	if diff := cmp.Diff([]string{"worker001", "worker002", "worker003"}, v.Nodes); diff != "" {
		t.Errorf("nodes (-want +got):\n%s", diff)
	}
	golden(t, "preclaim.txt", render(v, v.Nodes, Preclaim))
	golden(t, "open-subnets.txt", render(v, v.Nodes, OpenSubnets))
}

// TestNodePermsStayInsideOwnKeys checks every writable range of every
// role: it must be one of the node's own keys, never a prefix outside its
// claim bootstrap, and no role may read another node's secrets or status.
func TestNodePermsStayInsideOwnKeys(t *testing.T) {
	v := testView()
	for _, mode := range []SubnetMode{Preclaim, OpenSubnets} {
		for _, n := range v.Nodes {
			for _, p := range NodePerms(n, v, mode) {
				if p.Type != Read {
					pk, err := registry.ParseKey(p.Key)
					own := err == nil && pk.Node == n && p.RangeEnd == ""
					if (pk.Kind == registry.KindSubnet || pk.Kind == registry.KindFlannelLease) && err == nil {
						own = p.RangeEnd == "" && slicesContains(v.Claims[n], pk.Subnet)
					}
					bootstrap := mode == OpenSubnets && len(v.Claims[n]) == 0 && p == Prefix(registry.SubnetsPrefix, Write)
					if !own && !bootstrap {
						t.Errorf("mode %d node %s may write %s", mode, n, p)
					}
				}
				if strings.HasPrefix(p.Key, registry.MeshdPrefix) && !strings.HasPrefix(p.Key, registry.StatusKey(n)) && p.Key != registry.SeenKey(n) && !strings.HasPrefix(p.Key, registry.SecretsNodePrefix(n)) {
					t.Errorf("node %s has %s", n, p)
				}
				if p.Key == registry.StatusKey(n) && p.RangeEnd != "" {
					t.Errorf("node %s status perm is a range: %s", n, p)
				}
			}
		}
	}
}

func slicesContains(ps []netip.Prefix, p netip.Prefix) bool {
	for _, x := range ps {
		if x == p {
			return true
		}
	}
	return false
}

func TestDiff(t *testing.T) {
	a := Exact("/a", Write)
	b := Prefix("/b/", Read)
	c := Exact("/c", ReadWrite)
	for _, tc := range []struct {
		name                string
		want, have          []Perm
		wantGrant, wantRevk []Perm
	}{
		{"empty", nil, nil, nil, nil},
		{"all new", []Perm{a, b}, nil, []Perm{a, b}, nil},
		{"same", []Perm{a, b}, []Perm{b, a}, nil, nil},
		{"extra revoked", []Perm{a}, []Perm{a, c}, nil, []Perm{c}},
		{"type changed is a grant", []Perm{Exact("/a", ReadWrite)}, []Perm{a}, []Perm{Exact("/a", ReadWrite)}, nil},
		{"prefix vs key differ", []Perm{Exact("/b/", Read)}, []Perm{b}, []Perm{Exact("/b/", Read)}, []Perm{b}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g, r := Diff(tc.want, tc.have)
			if diff := cmp.Diff(tc.wantGrant, g); diff != "" {
				t.Errorf("grant (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tc.wantRevk, r); diff != "" {
				t.Errorf("revoke (-want +got):\n%s", diff)
			}
		})
	}
}

func TestCheckNodeName(t *testing.T) {
	for _, n := range []string{"root", "ops", "", "a/b", "../x", "a b", "nöde"} {
		if err := CheckNodeName(n, []string{"ops"}); err == nil {
			t.Errorf("node name %q accepted", n)
		}
	}
	if err := CheckNodeName("worker001", []string{"ops"}); err != nil {
		t.Error(err)
	}
}

// FuzzNodePerms writes one hostile key-value next to a sane registry and
// checks that no role computed from it may write outside its node's own
// keys or read anything under /meshd/ but its own status and secrets.
func FuzzNodePerms(f *testing.F) {
	f.Add("/cluster/nodes/worker009", `{"name":"worker009"}`)
	f.Add("/cluster/meshd/subnets/10.10.9.0-24", `{"node":"worker002"}`)
	f.Add("/cluster/meshd/subnets/10.10.9.0-24", `{"node":"../../x"}`)
	f.Add("/cluster/backends/a\nb/meta_data", `{}`)
	f.Add("/cluster/services/x/instances/worker001/../../y", `{}`)
	f.Add("/cluster/meshd/members/root", `{}`)
	f.Fuzz(func(t *testing.T, key, value string) {
		kvs := []KV{
			{Key: "/cluster/nodes/worker001", Value: []byte(`{"name":"worker001","ipv4":"192.0.2.1"}`)},
			{Key: "/cluster/meshd/subnets/10.10.1.0-24", Value: []byte(`{"node":"worker001"}`)},
			{Key: "/cluster/backends/api/meta_data", Value: []byte(`{"publish":{"port":8080}}`)},
			{Key: key, Value: []byte(value)},
		}
		v := ViewOf(kvs)
		for _, n := range v.Nodes {
			if err := registry.ValidName(n); err != nil {
				t.Fatalf("invalid node %q in view", n)
			}
			for _, mode := range []SubnetMode{Preclaim, OpenSubnets} {
				for _, p := range NodePerms(n, v, mode) {
					if p.Type == Read {
						if strings.HasPrefix(p.Key, registry.MeshdPrefix) && p.Key != registry.SecretsNodePrefix(n) {
							t.Fatalf("node %q reads %s", n, p)
						}
						continue
					}
					if p == Prefix(registry.SubnetsPrefix, Write) && mode == OpenSubnets && len(v.Claims[n]) == 0 {
						continue
					}
					pk, err := registry.ParseKey(p.Key)
					if err != nil || p.RangeEnd != "" {
						t.Fatalf("node %q may write %s (%v)", n, p, err)
					}
					switch pk.Kind {
					case registry.KindSubnet, registry.KindFlannelLease:
						if !slicesContains(v.Claims[n], pk.Subnet) {
							t.Fatalf("node %q may write claim %s it does not hold", n, p)
						}
					case registry.KindNode, registry.KindMember, registry.KindInstance, registry.KindStatus, registry.KindSeen:
						if pk.Node != n {
							t.Fatalf("node %q may write %s", n, p)
						}
					default:
						t.Fatalf("node %q may write %s", n, p)
					}
				}
			}
		}
	})
}
