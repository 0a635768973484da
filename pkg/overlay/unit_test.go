package overlay

import (
	"encoding/json"
	"errors"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshd/meshd/pkg/config"
	"github.com/meshd/meshd/pkg/overlay/desired"
)

func TestPeerConfig(t *testing.T) {
	k, _ := wgtypes.GeneratePrivateKey()
	pub := k.PublicKey()
	ka := 25 * time.Second
	p := desired.Peer{
		Name:       "b",
		PublicKey:  pub.String(),
		Endpoint:   netip.MustParseAddrPort("192.0.2.7:51820"),
		AllowedIPs: []netip.Prefix{netip.MustParsePrefix("10.10.7.0/24")},
		Keepalive:  ka,
	}
	allowed := []net.IPNet{{IP: net.IP{10, 10, 7, 0}, Mask: net.CIDRMask(24, 32)}}
	ep := &net.UDPAddr{IP: net.IP{192, 0, 2, 7}, Port: 51820}
	tests := []struct {
		name   string
		change desired.PeerChange
		want   wgtypes.PeerConfig
	}{
		{"add", desired.PeerChange{Op: desired.OpAdd, Peer: p},
			wgtypes.PeerConfig{PublicKey: pub, Endpoint: ep, ReplaceAllowedIPs: true, AllowedIPs: allowed, PersistentKeepaliveInterval: &ka}},
		{"remove", desired.PeerChange{Op: desired.OpRemove, Peer: p},
			wgtypes.PeerConfig{PublicKey: pub, Remove: true}},
		{"update endpoint only", desired.PeerChange{Op: desired.OpUpdate, Peer: p, Endpoint: true},
			wgtypes.PeerConfig{PublicKey: pub, UpdateOnly: true, Endpoint: ep}},
		{"update allowed ips only", desired.PeerChange{Op: desired.OpUpdate, Peer: p, AllowedIPs: true},
			wgtypes.PeerConfig{PublicKey: pub, UpdateOnly: true, ReplaceAllowedIPs: true, AllowedIPs: allowed}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := peerConfig(tt.change)
			if err != nil {
				t.Fatal(err)
			}
			if got.Endpoint != nil {
				got.Endpoint.IP = got.Endpoint.IP.To4()
			}
			for i := range got.AllowedIPs {
				got.AllowedIPs[i].IP = got.AllowedIPs[i].IP.To4()
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("peerConfig (-want +got):\n%s", diff)
			}
		})
	}
	if _, err := peerConfig(desired.PeerChange{Op: desired.OpAdd, Peer: desired.Peer{PublicKey: "bad"}}); err == nil {
		t.Error("bad key accepted")
	}
}

func TestIPNetToPrefix(t *testing.T) {
	for in, want := range map[string]string{
		"10.10.1.0/24": "10.10.1.0/24",
		"10.10.1.5/24": "10.10.1.0/24",
		"fd00::/64":    "fd00::/64",
	} {
		_, n, _ := net.ParseCIDR(in)
		got, ok := ipNetToPrefix(*n)
		if !ok || got.String() != want {
			t.Errorf("ipNetToPrefix(%s) = %v, %v; want %s", in, got, ok, want)
		}
	}
	// A v4 network in 16-byte form with a 128-bit mask, as some kernels
	// and libraries produce.
	n := net.IPNet{IP: net.ParseIP("10.10.2.0"), Mask: net.CIDRMask(96+24, 128)}
	if got, ok := ipNetToPrefix(n); !ok || got.String() != "10.10.2.0/24" {
		t.Errorf("4-in-6 form: got %v, %v", got, ok)
	}
}

func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := newMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	m.observe(desired.Plan{Peers: []desired.PeerChange{{Op: desired.OpAdd}, {Op: desired.OpAdd}, {Op: desired.OpRemove}}}, nil)
	m.observe(desired.Plan{}, errors.New("boom"))
	if got := value(t, m.applies); got != 2 {
		t.Errorf("applies = %v, want 2", got)
	}
	if got := value(t, m.errors); got != 1 {
		t.Errorf("errors = %v, want 1", got)
	}
	if got := value(t, m.changes.WithLabelValues("add")); got != 2 {
		t.Errorf("adds = %v, want 2", got)
	}
	// A second component on the same registry is a wiring bug: say so.
	if _, err := newMetrics(reg); err == nil {
		t.Error("registering twice succeeded")
	}
}

func TestNewValidates(t *testing.T) {
	base := OptionsFromConfig(config.Default())
	base.Self, base.StateDir = "n0", t.TempDir()
	for name, mut := range map[string]func(*Options){
		"bad node name":      func(o *Options) { o.Self = "../x" },
		"bad interface name": func(o *Options) { o.Interface = "wg 0; rm" },
		"long interface":     func(o *Options) { o.Interface = "abcdefghijklmnop" },
		"bad mode":           func(o *Options) { o.Mode = "magic" },
		"no network":         func(o *Options) { o.Network = netip.Prefix{} },
		"no state dir":       func(o *Options) { o.StateDir = "" },
	} {
		t.Run(name, func(t *testing.T) {
			o := base
			mut(&o)
			c, err := New(o, discard(), nil)
			if err == nil {
				c.Close()
				t.Fatal("New accepted bad options")
			}
		})
	}
	c, err := New(base, discard(), prometheus.NewRegistry())
	if err != nil {
		t.Fatalf("New with defaults: %v", err)
	}
	defer c.Close()
	if c.Name() != "overlay" || len(c.PublicKey()) != 44 {
		t.Errorf("Name %q, PublicKey %q", c.Name(), c.PublicKey())
	}
	st := c.Status().(Status)
	if st.PublicKey != c.PublicKey() || st.Mode != "" || st.Applied {
		t.Errorf("status before any apply: %+v", st)
	}
	b, err := json.Marshal(c.Status())
	if err != nil {
		t.Fatalf("status does not encode: %v", err)
	}
	if strings.Contains(string(b), c.key.String()) {
		t.Error("status contains the private key")
	}
}

// value reads a counter or gauge.
func value(t *testing.T, m prometheus.Metric) float64 {
	t.Helper()
	var d dto.Metric
	if err := m.Write(&d); err != nil {
		t.Fatal(err)
	}
	switch {
	case d.Counter != nil:
		return d.Counter.GetValue()
	case d.Gauge != nil:
		return d.Gauge.GetValue()
	}
	t.Fatal("not a counter or gauge")
	return 0
}
