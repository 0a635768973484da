package registry

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

const flannelTestKey = "2Hn1xnfYqRRsbqbFkCMcE1Hh+Ru7zx8LRvJahO+BLkE="

// TestFlannelLeaseRoundTrip checks the value meshd writes against the
// bytes flanneld's WireGuard backend writes (wireguard.go newSubnetAttrs
// marshalled by pkg/subnet/etcd/registry.go createSubnet: LeaseAttrs has
// no JSON tags, so the names are the Go field names; PublicIPv6 is a nil
// pointer, so null; BackendV6Data is omitted) and decodes it back.
func TestFlannelLeaseRoundTrip(t *testing.T) {
	b, err := EncodeFlannelLease(netip.MustParseAddr("65.108.1.2"), flannelTestKey, 51820)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"PublicIP":"65.108.1.2","PublicIPv6":null,"BackendType":"wireguard","BackendData":{"PublicKey":"` + flannelTestKey + `","Port":51820}}`
	if string(b) != want {
		t.Fatalf("encoded\n %s\nwant\n %s", b, want)
	}
	// Every field name is flannel's, spelled exactly.
	var generic map[string]json.RawMessage
	if err := json.Unmarshal(b, &generic); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"PublicIP", "PublicIPv6", "BackendType", "BackendData"} {
		if _, ok := generic[k]; !ok {
			t.Errorf("field %s missing", k)
		}
	}
	subnet := netip.MustParsePrefix("10.10.93.0/24")
	l, err := DecodeFlannelLease(subnet, b)
	if err != nil {
		t.Fatal(err)
	}
	if l.Subnet != subnet || l.PublicIP != "65.108.1.2" || l.WireGuard == nil || *l.WireGuard != (FlannelWireGuard{PublicKey: flannelTestKey, Port: 51820}) {
		t.Fatalf("decoded %+v", l)
	}
	again, err := EncodeFlannelLease(l.Addr(), l.WireGuard.PublicKey, l.WireGuard.Port)
	if err != nil || string(again) != string(b) {
		t.Fatalf("re-encoded %s, %v", again, err)
	}
	if got := FlannelEndpoint(l, nil); got != netip.MustParseAddrPort("65.108.1.2:51820") {
		t.Errorf("endpoint %v", got)
	}
}

func TestDecodeFlannelLeaseRejects(t *testing.T) {
	subnet := netip.MustParsePrefix("10.10.7.0/24")
	for name, v := range map[string]string{
		"not json":         `{"PublicIP":`,
		"no public ip":     `{"BackendType":"wireguard","BackendData":{"PublicKey":"` + flannelTestKey + `"}}`,
		"ipv6 public ip":   `{"PublicIP":"2001:db8::1","BackendType":"wireguard","BackendData":{"PublicKey":"` + flannelTestKey + `"}}`,
		"newline in ip":    `{"PublicIP":"1.2.3.4\n","BackendType":"wireguard","BackendData":{"PublicKey":"` + flannelTestKey + `"}}`,
		"short key":        `{"PublicIP":"1.2.3.4","BackendType":"wireguard","BackendData":{"PublicKey":"abc="}}`,
		"key with newline": `{"PublicIP":"1.2.3.4","BackendType":"wireguard","BackendData":{"PublicKey":"` + flannelTestKey[:43] + `\n"}}`,
		"no backend data":  `{"PublicIP":"1.2.3.4","BackendType":"wireguard"}`,
		"port too big":     `{"PublicIP":"1.2.3.4","BackendType":"wireguard","BackendData":{"PublicKey":"` + flannelTestKey + `","Port":70000}}`,
		"huge":             `{"PublicIP":"1.2.3.4","BackendType":"` + strings.Repeat("w", MaxValueSize) + `"}`,
	} {
		if l, err := DecodeFlannelLease(subnet, []byte(v)); err == nil {
			t.Errorf("%s: accepted as %+v", name, l)
		}
	}
	// Another backend decodes, without WireGuard data.
	l, err := DecodeFlannelLease(subnet, []byte(`{"PublicIP":"1.2.3.4","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}`))
	if err != nil || l.WireGuard != nil || l.BackendType != "vxlan" {
		t.Errorf("vxlan lease: %+v, %v", l, err)
	}
}

func TestDecodeFlannelConfig(t *testing.T) {
	c, err := DecodeFlannelConfig([]byte(`{"Backend":{"PersistentKeepaliveInterval":60,"Type":"wireguard"},"Network":"10.0.0.0/8","SubnetLen":24,"SubnetMin":"10.10.0.0","SubnetMax":"10.99.0.0"}`))
	if err != nil {
		t.Fatal(err)
	}
	want := FlannelConfig{Network: netip.MustParsePrefix("10.0.0.0/8"), SubnetLen: 24, BackendType: "wireguard", ListenPort: 51820, Keepalive: 60 * time.Second}
	if c != want {
		t.Errorf("config %+v, want %+v", c, want)
	}
	c, err = DecodeFlannelConfig([]byte(`{"Backend":{"Type":"wireguard","ListenPort":51999},"Network":"10.0.0.0/8"}`))
	if err != nil || c.ListenPort != 51999 || c.Keepalive != 0 {
		t.Errorf("listen port config: %+v, %v", c, err)
	}
	l := FlannelLease{PublicIP: "1.2.3.4", WireGuard: &FlannelWireGuard{PublicKey: flannelTestKey}}
	if got := FlannelEndpoint(l, &c); got != netip.MustParseAddrPort("1.2.3.4:51999") {
		t.Errorf("endpoint of a lease without Port = %v, want the config's port", got)
	}
	for _, bad := range []string{
		`{"Backend":{"ListenPort":0}}`,
		`{"Backend":{"ListenPort":65536}}`,
		`{"Backend":{"PersistentKeepaliveInterval":-1}}`,
		`{"Network":"10.0.0.1/8"}`,
		`{"Network":"nonsense"}`,
	} {
		if c, err := DecodeFlannelConfig([]byte(bad)); err == nil {
			t.Errorf("%s accepted as %+v", bad, c)
		}
	}
}

func TestSnapshotHoldsFlannelLeases(t *testing.T) {
	good, _ := EncodeFlannelLease(netip.MustParseAddr("65.108.1.2"), flannelTestKey, 51820)
	snap := SnapshotOf(append(append([]KV(nil), nixInfraKVs...),
		KV{Key: "/coreos.com/network/subnets/10.10.93.0-24", Value: good, Lease: 7},
		KV{Key: "/coreos.com/network/subnets/10.10.94.0-24", Value: []byte(`{"PublicIP":"x"}`)},
		KV{Key: "/coreos.com/network/subnets/nonsense", Value: good},
	), 5)
	l, ok := snap.FlannelLeases[netip.MustParsePrefix("10.10.93.0/24")]
	if !ok || l.Lease != 7 || l.WireGuard.PublicKey != flannelTestKey {
		t.Fatalf("lease: %+v", snap.FlannelLeases)
	}
	if len(snap.FlannelLeases) != 1 {
		t.Errorf("leases %v, want only the valid one", snap.FlannelLeases)
	}
	if snap.FlannelConfig == nil || snap.FlannelConfig.Keepalive != time.Minute {
		t.Errorf("config %+v", snap.FlannelConfig)
	}
	var keys []string
	for _, p := range snap.Problems {
		keys = append(keys, p.Key)
		want := ReasonBadValue
		if strings.HasSuffix(p.Key, "nonsense") {
			want = ReasonBadKey
		}
		if p.Reason != want {
			t.Errorf("%s: reason %q, want %q", p.Key, p.Reason, want)
		}
	}
	if diff := cmp.Diff([]string{"/coreos.com/network/subnets/10.10.94.0-24", "/coreos.com/network/subnets/nonsense"}, keys); diff != "" {
		t.Errorf("problems (-want +got):\n%s", diff)
	}
}
