package config

import (
	"log/slog"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/creds"
	"github.com/meshd/meshd/pkg/haproxycfg"
	"github.com/meshd/meshd/pkg/overlay"
)

// TestSectionsAgreeWithComponents sets one field of the overlay, haproxy
// and secrets sections at and just past each limit: the config check accepts
// exactly what the component's New accepts, and names the field.
func TestSectionsAgreeWithComponents(t *testing.T) {
	type tc struct {
		name  string
		set   func(c *Config)
		valid bool
		field string // in the config check's error when invalid
	}
	var cases []tc
	haproxy := func(name string, valid bool, set func(h *HAProxy)) {
		cases = append(cases, tc{"haproxy " + name, func(c *Config) { set(&c.HAProxy) }, valid, "haproxy." + strings.Fields(name)[0]})
	}
	overlayCase := func(name string, valid bool, set func(o *Overlay)) {
		cases = append(cases, tc{"overlay " + name, func(c *Config) { set(&c.Overlay) }, valid, "overlay." + strings.Fields(name)[0]})
	}
	secrets := func(name string, valid bool, set func(s *Secrets)) {
		cases = append(cases, tc{"secrets " + name, func(c *Config) { set(&c.Secrets) }, valid, "secrets." + strings.Fields(name)[0]})
	}
	for n, valid := range map[int]bool{-1: false, 0: true, 1: true, haproxycfg.MaxServerSlots: true, haproxycfg.MaxServerSlots + 1: false} {
		haproxy("serverSlots "+strconv.Itoa(n), valid, func(h *HAProxy) { h.ServerSlots = n })
	}
	for d, valid := range map[time.Duration]bool{-1: false, 0: true, haproxycfg.MaxHardStopAfter: true, haproxycfg.MaxHardStopAfter + 1: false} {
		haproxy("hardStopAfter "+d.String(), valid, func(h *HAProxy) { h.HardStopAfter = Duration(d) })
	}
	for n, valid := range map[int]bool{-1: false, 0: true, haproxycfg.MaxMaxReloads: true, haproxycfg.MaxMaxReloads + 1: false} {
		haproxy("maxReloads "+strconv.Itoa(n), valid, func(h *HAProxy) { h.MaxReloads = n })
	}
	for p, valid := range map[int]bool{0: false, 1: true, 65535: true, 65536: false} {
		haproxy("reservedPorts "+strconv.Itoa(p), valid, func(h *HAProxy) { h.ReservedPorts = []int{p} })
	}
	for p, valid := range map[int]bool{0: false, 1: true, 1023: true, 1024: false} {
		haproxy("allowLowPorts "+strconv.Itoa(p), valid, func(h *HAProxy) { h.AllowLowPorts = []int{p} })
	}
	for u, valid := range map[string]bool{"meshd-haproxy": true, "bad user": false, "-x": false} {
		haproxy("user "+u, valid, func(h *HAProxy) { h.User = u })
		haproxy("group "+u, valid, func(h *HAProxy) { h.Group = u })
	}
	for p, valid := range map[string]bool{"/etc/haproxy.cfg": false, "run/haproxy.cfg": false, "": false} {
		haproxy("configPath "+p, valid, func(h *HAProxy) { h.ConfigPath = p })
	}
	for p, valid := range map[string]bool{"": false, "/run/meshd/master sock": false, "ipv4@127.0.0.1:9999": true} {
		haproxy("masterSocket "+p, valid, func(h *HAProxy) { h.MasterSocket = p })
	}
	for n, valid := range map[int]bool{0: true, 1279: false, 1280: true, overlay.MaxMTU: true, overlay.MaxMTU + 1: false} {
		overlayCase("mtu "+strconv.Itoa(n), valid, func(o *Overlay) { o.MTU = n })
	}
	for n, valid := range map[int]bool{-1: false, 1: true, 65535: true, 65536: false} {
		overlayCase("listenPort "+strconv.Itoa(n), valid, func(o *Overlay) { o.ListenPort = n })
	}
	for n, valid := range map[int]bool{-1: false, 1: true, 253: false, 254: false, 255: false, 51820: true} {
		overlayCase("routeTable "+strconv.Itoa(n), valid, func(o *Overlay) { o.RouteTable = n })
	}
	for n, valid := range map[string]bool{"meshd-wg": true, "wg0": true, "abcdefghijklmno": true, "abcdefghijklmnop": false, "": false, "wg 0": false, "../x": false} {
		overlayCase("interface "+n, valid, func(o *Overlay) { o.Interface = n })
	}
	for m, valid := range map[string]bool{"auto": true, "kernel": true, "userspace": true, "magic": false} {
		overlayCase("mode "+m, valid, func(o *Overlay) { o.Mode = m })
	}
	for f, valid := range map[string]bool{"": true, "/var/lib/flannel/key": true, "flannel.key": false} {
		overlayCase("importKeyFile "+f, valid, func(o *Overlay) { o.ImportKeyFile = f })
	}
	for _, k := range creds.WithKeys {
		secrets("withKey "+k, true, func(s *Secrets) { s.WithKey = k })
	}
	for _, k := range []string{"null", "HOST", "host,tpm2"} {
		secrets("withKey "+k, false, func(s *Secrets) { s.WithKey = k })
	}
	for a, valid := range map[string]bool{"": true, "restart": true, "reload": true, "none": true, "kill": false} {
		secrets("units action "+a, valid, func(s *Secrets) { s.Units = map[string]SecretUse{"db": {Units: []string{"app.service"}, Action: a}} })
	}
	for u, valid := range map[string]bool{"app.service": true, "app@1.service": true, "../app.service": false, "app": false} {
		secrets("units unit "+u, valid, func(s *Secrets) { s.Units = map[string]SecretUse{"db": {Units: []string{u}}} })
	}
	secrets("units secret name", false, func(s *Secrets) { s.Units = map[string]SecretUse{"a b": {Units: []string{"app.service"}}} })

	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			c := Default()
			c.NodeName, c.StateDir = "n1", dir
			c.HAProxy.ConfigPath = filepath.Join(dir, "haproxy.cfg")
			c.HAProxy.Binary = "true" // New looks the binary up; it starts nothing
			tt.set(&c)
			cfgErr := c.Validate()
			var newErr error
			if strings.HasPrefix(tt.name, "overlay") {
				o := c.OverlayOptions()
				o.DetachUserspace = false
				var ov *overlay.Component
				if ov, newErr = overlay.New(o, slog.New(slog.DiscardHandler), nil); newErr == nil {
					ov.Close()
				}
			} else if strings.HasPrefix(tt.name, "haproxy") {
				var h *haproxycfg.Component
				if h, newErr = haproxycfg.New(c.HAProxyOptions(), nil, nil); newErr == nil {
					h.Close()
				}
			} else {
				var s *creds.Component
				if s, newErr = creds.New(c.SecretsOptions(), nil, nil); newErr == nil {
					s.Close()
				}
			}
			if (cfgErr == nil) != tt.valid || (newErr == nil) != tt.valid {
				t.Fatalf("want valid=%v: config check says %v, New says %v", tt.valid, cfgErr, newErr)
			}
			if !tt.valid && !strings.Contains(cfgErr.Error(), tt.field) {
				t.Errorf("config error %q does not name %s", cfgErr, tt.field)
			}
		})
	}
}
