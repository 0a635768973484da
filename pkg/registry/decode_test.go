package registry

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// Values exactly as a running nix-infra cluster has them
// (../shared/NIX-INFRA.md).
var nixInfraKVs = []KV{
	{Key: "/cluster/nodes/worker001", Value: []byte(`{"name":"worker001","ipv4":"65.108.1.2","services":["backends","services"]}`)},
	{Key: "/cluster/nodes/ingress001", Value: []byte(`{"name":"ingress001","ipv4":"65.108.1.3","services":["frontends"]}`)},
	{Key: "/cluster/services/app-mongodb-pod/meta_data", Value: []byte(`{"env":{"HOST":"127.0.0.1","PATH":"","PORT":11311,"PROTOCOL":"http"},"env_prefix":"APP_MONGODB_POD","publish":{"port":11311}}`)},
	{Key: "/cluster/services/app-mongodb-pod/instances/worker001", Value: []byte(`{"ipv4":"10.10.93.0","node":"worker001","port":11311}`)},
	{Key: "/coreos.com/network/config", Value: []byte(`{"Backend":{"PersistentKeepaliveInterval":60,"Type":"wireguard"},"Network":"10.0.0.0/8","SubnetLen":24,"SubnetMin":"10.10.0.0","SubnetMax":"10.99.0.0"}`)},
}

func TestNixInfraValuesDecode(t *testing.T) {
	snap := SnapshotOf(nixInfraKVs, 42)
	if len(snap.Problems) != 0 {
		t.Fatalf("problems: %v", snap.Problems)
	}
	want := Node{Name: "worker001", IPv4: "65.108.1.2", Services: []Group{GroupBackends, GroupServices}}
	if diff := cmp.Diff(want, snap.Nodes["worker001"]); diff != "" {
		t.Errorf("node (-want +got):\n%s", diff)
	}
	app := snap.Apps[AppID{GroupServices, "app-mongodb-pod"}]
	if app == nil || app.Meta == nil {
		t.Fatalf("app missing: %+v", snap.Apps)
	}
	if app.Meta.Publish.Port != 11311 || app.Meta.EnvPrefix != "APP_MONGODB_POD" || app.Meta.Protocol() != "http" {
		t.Errorf("meta = %+v", app.Meta)
	}
	if got := app.Instances["worker001"].Addr(); got != netip.MustParseAddrPort("10.10.93.0:11311") {
		t.Errorf("instance addr = %v", got)
	}
	if snap.Revision != 42 {
		t.Errorf("revision = %d", snap.Revision)
	}
}

func TestHostileAndMalformedSkipped(t *testing.T) {
	hostile := []KV{
		{Key: "/cluster/backends/x\n  server evil 1.2.3.4:80/meta_data", Value: []byte(`{"publish":{"port":80}}`)},
		{Key: "/cluster/backends/x y/meta_data", Value: []byte(`{"publish":{"port":81}}`)},
		{Key: "/cluster/backends/a#b/meta_data", Value: []byte(`{"publish":{"port":82}}`)},
		{Key: "/cluster/backends/a\"b/meta_data", Value: []byte(`{"publish":{"port":83}}`)},
		{Key: "/cluster/backends/../meta_data", Value: []byte(`{"publish":{"port":84}}`)},
		{Key: "/cluster/backends/" + strings.Repeat("a", 200) + "/meta_data", Value: []byte(`{"publish":{"port":85}}`)},
		{Key: "/cluster/backends/аpp/meta_data", Value: []byte(`{"publish":{"port":86}}`)}, // Cyrillic a
		{Key: "/cluster/backends/badjson/meta_data", Value: []byte(`{"publish":`)},
		{Key: "/cluster/backends/wrongtype/meta_data", Value: []byte(`{"publish":{"port":"80"}}`)},
		{Key: "/cluster/backends/badport/meta_data", Value: []byte(`{"publish":{"port":70000}}`)},
		{Key: "/cluster/backends/huge/meta_data", Value: []byte(`{"env_prefix":"` + strings.Repeat("A", MaxValueSize) + `","publish":{"port":87}}`)},
		{Key: "/cluster/backends/ok/instances/evil node", Value: []byte(`{"ipv4":"10.10.1.0","node":"evil node","port":80}`)},
		{Key: "/cluster/backends/ok/instances/n1", Value: []byte(`{"ipv4":"10.10.1.0\n","node":"n1","port":80}`)},
		{Key: "/cluster/backends/ok/instances/n2", Value: []byte(`{"ipv4":"10.10.1.0","node":"other","port":80}`)},
		{Key: "/cluster/nodes/n3", Value: []byte(`{"name":"n3","ipv4":"1.2.3.4","services":["everything"]}`)},
		{Key: "/cluster/meshd/members/n4", Value: []byte(`{"name":"n4","publicKey":"not-a-key","subnet":"10.10.4.0/24","overlayIp":"10.10.4.0"}`)},
		{Key: "/cluster/meshd/members/n5", Value: []byte(`{"name":"n5","publicKey":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","subnet":"10.10.5.0/24","overlayIp":"10.10.6.0"}`)},
	}
	good := []KV{
		{Key: "/cluster/backends/ok/meta_data", Value: []byte(`{"publish":{"port":8080}}`)},
		{Key: "/cluster/backends/ok/instances/n9", Value: []byte(`{"ipv4":"10.10.9.0","node":"n9","port":8080}`)},
		{Key: "/cluster/unrelated/tool/key", Value: []byte(`anything`)},
	}
	snap := SnapshotOf(append(append([]KV{}, hostile...), good...), 7)
	if len(snap.Problems) != len(hostile) {
		t.Errorf("got %d problems, want %d: %v", len(snap.Problems), len(hostile), snap.Problems)
	}
	if len(snap.Apps) != 1 {
		t.Fatalf("apps = %v, want only backends/ok", snap.Apps)
	}
	ok := snap.Apps[AppID{GroupBackends, "ok"}]
	if ok == nil || ok.Meta == nil || ok.Meta.Publish.Port != 8080 || len(ok.Instances) != 1 || ok.Instances["n9"].Port != 8080 {
		t.Errorf("good app not intact: %+v", ok)
	}
	if len(snap.Nodes) != 0 || len(snap.Members) != 0 {
		t.Errorf("bad node/member accepted: %v %v", snap.Nodes, snap.Members)
	}
}

func TestValidName(t *testing.T) {
	for _, s := range []string{"worker001", "app-mongodb-pod", "a.b_c", "A1"} {
		if err := ValidName(s); err != nil {
			t.Errorf("ValidName(%q) = %v", s, err)
		}
	}
	for _, s := range []string{"", "-x", ".x", "a b", "a\nb", "a#b", "a/b", "a\"b", "é", strings.Repeat("a", 64), "..", "a;b", "a{b}"} {
		if err := ValidName(s); err == nil {
			t.Errorf("ValidName(%q) accepted", s)
		}
	}
}

// FuzzDecode checks that no key or value can make the decoders panic, and
// that whatever they accept is safe to put into a config file.
func FuzzDecode(f *testing.F) {
	for _, kv := range nixInfraKVs {
		f.Add(kv.Key, kv.Value)
	}
	f.Add("/cluster/meshd/members/n1", []byte(`{"name":"n1","publicKey":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","subnet":"10.10.1.0/24","overlayIp":"10.10.1.0","endpoint":"1.2.3.4:51820"}`))
	f.Add("/cluster/meshd/subnets/10.10.1.0-24", []byte(`{"node":"n1"}`))
	f.Add("/meshd/secrets/n1/db", []byte(`{"version":1,"ciphertext":"x"}`))
	f.Add("/meshd/status/n1", []byte(`{"node":"n1","revision":3}`))
	f.Add("/coreos.com/network/subnets/10.10.7.0-24", []byte(`{"PublicIP":"198.51.100.7","PublicIPv6":null,"BackendType":"wireguard","BackendData":{"PublicKey":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=","Port":51820}}`))
	f.Fuzz(func(t *testing.T, key string, value []byte) {
		snap := SnapshotOf([]KV{{Key: key, Value: value, Lease: 1}}, 1)
		for id, a := range snap.Apps {
			mustSafe(t, id.Name)
			if a.Meta != nil && (a.Meta.Publish.Port < 1 || a.Meta.Publish.Port > 65535) {
				t.Fatalf("port %d accepted", a.Meta.Publish.Port)
			}
			for n, in := range a.Instances {
				mustSafe(t, n)
				if !in.Addr().Addr().Is4() {
					t.Fatalf("instance address %q accepted", in.IPv4)
				}
			}
		}
		for n := range snap.Nodes {
			mustSafe(t, n)
		}
		for n, m := range snap.Members {
			mustSafe(t, n)
			if !m.Subnet.Contains(m.OverlayIP) {
				t.Fatalf("member %v accepted", m)
			}
		}
		for n := range snap.Secrets {
			mustSafe(t, n)
		}
		for p, l := range snap.FlannelLeases {
			if !p.Addr().Is4() || p != p.Masked() || !l.Addr().Is4() {
				t.Fatalf("flannel lease %v %q accepted", p, l.PublicIP)
			}
			if l.BackendType == FlannelBackendWireGuard && (l.WireGuard == nil || validKey(l.WireGuard.PublicKey) != nil) {
				t.Fatalf("wireguard lease without a valid key accepted: %+v", l)
			}
		}
		if c := snap.FlannelConfig; c != nil && (c.ListenPort < 1 || c.ListenPort > 65535 || c.Keepalive < 0) {
			t.Fatalf("flannel config %+v accepted", c)
		}
	})
}

func mustSafe(t *testing.T, s string) {
	t.Helper()
	if err := ValidName(s); err != nil {
		t.Fatalf("unsafe name %q accepted: %v", s, err)
	}
	if strings.ContainsAny(s, " \t\r\n#\"'/\\") {
		t.Fatalf("unsafe name %q accepted", s)
	}
}

func TestCrossChecksStopHijacks(t *testing.T) {
	key := "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="
	kvs := []KV{
		{Key: "/cluster/meshd/subnets/10.10.1.0-24", Value: []byte(`{"node":"victim"}`)},
		{Key: "/cluster/meshd/members/victim", Value: []byte(`{"name":"victim","publicKey":"` + key + `","subnet":"10.10.1.0/24","overlayIp":"10.10.1.0"}`)},
		// thief copies the victim's subnet into its own record
		{Key: "/cluster/meshd/members/thief", Value: []byte(`{"name":"thief","publicKey":"` + key + `","subnet":"10.10.1.0/24","overlayIp":"10.10.1.0"}`)},
		{Key: "/cluster/backends/web/meta_data", Value: []byte(`{"publish":{"port":8080}}`)},
		{Key: "/cluster/backends/web/instances/victim", Value: []byte(`{"ipv4":"10.10.1.0","node":"victim","port":8080}`)},
		// an instance claiming to be victim's but pointing elsewhere
		{Key: "/cluster/backends/api/instances/victim", Value: []byte(`{"ipv4":"10.10.7.0","node":"victim","port":8080}`)},
		// loopback is never a valid instance address
		{Key: "/cluster/backends/web/instances/legacy", Value: []byte(`{"ipv4":"127.0.0.1","node":"legacy","port":22}`)},
		// a legacy (flannel) node without member record keeps working
		{Key: "/cluster/backends/web/instances/old", Value: []byte(`{"ipv4":"10.10.93.0","node":"old","port":8080}`)},
	}
	snap := SnapshotOf(kvs, 1)
	if _, ok := snap.Members["thief"]; ok {
		t.Error("member with another node's subnet accepted")
	}
	if _, ok := snap.Members["victim"]; !ok {
		t.Error("victim's member record dropped")
	}
	web := snap.Apps[AppID{GroupBackends, "web"}]
	if len(web.Instances) != 2 || web.Instances["victim"].Port != 8080 || web.Instances["old"].Port != 8080 {
		t.Errorf("web instances = %v", web.Instances)
	}
	if api := snap.Apps[AppID{GroupBackends, "api"}]; api != nil && len(api.Instances) != 0 {
		t.Errorf("redirected instance accepted: %v", api.Instances)
	}
	if len(snap.Problems) != 3 {
		t.Errorf("problems = %v, want 3", snap.Problems)
	}
}
