package nixtest

import (
	"path/filepath"
	"strings"
	"testing"
)

// Bad configurations fail evaluation with a message that names the problem.
func TestInvalidConfigurationsFail(t *testing.T) {
	// Every invalid example is checked (freeform-typo by the test below).
	covered := map[string]bool{"freeform-typo.nix": true}
	defer func() {
		files, _ := filepath.Glob(filepath.Join(repoRoot(t), "nix", "examples", "invalid", "*.nix"))
		for _, f := range files {
			if !covered[filepath.Base(f)] {
				t.Errorf("%s: no test says how it fails", f)
			}
		}
	}()
	for _, tc := range []struct {
		file    string
		wantErr string
	}{
		{"store-key", "A definition for option `services.meshd.etcd.keyFile' is not of type `null or absolute path not in the Nix store'"},
		{"path-literal-key", "A definition for option `services.meshd.etcd.keyFile' is not of type `null or absolute path not in the Nix store'"},
		{"settings-path-literal", "services.meshd.settings.etcd.keyFile = " + filepath.Join(repoRoot(t), "nix", "examples", "invalid", "worker002-key.pem") + " is a Nix path"},
		{"unknown-option", "The option `services.meshd.etcd.keyfile' does not exist."},
		{"bad-node-name", "A definition for option `services.meshd.nodeName' is not of type `string matching the pattern"},
		{"haproxy-path", `services.meshd.settings.haproxy.configPath = "/var/lib/haproxy/meshd.cfg": meshd may write the HAProxy config only in /run/meshd`},
	} {
		covered[tc.file+".nix"] = true
		t.Run(tc.file, func(t *testing.T) {
			_, err := evalConfiguration(t, filepath.Join(repoRoot(t), "nix", "examples", "invalid", tc.file+".nix"))
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("got error %v\nwant one containing %q", err, tc.wantErr)
			}
		})
	}
}

// settings is freeform, so a misspelt meshd field evaluates; the rendered
// file then fails meshd --check-config, which the module runs at build time.
func TestFreeformTypoRejectedByMeshd(t *testing.T) {
	r, err := evalConfiguration(t, filepath.Join(repoRoot(t), "nix", "examples", "invalid", "freeform-typo.nix"))
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Checks) != 1 || !strings.Contains(r.Checks[0].Text, "--check-config --config "+r.Meshd.ConfigFile) {
		t.Fatalf("system.checks %+v: the build would not check the config", r.Checks)
	}
	out, err := checkConfig(t, r.Meshd.SettingsJSON, nil)
	if err == nil || !strings.Contains(out, `unknown field "wgPort"`) {
		t.Fatalf("meshd --check-config: err %v, output %q; want a failure naming the unknown field", err, out)
	}
}

// Single options change the generated system as documented.
func TestOptionEffects(t *testing.T) {
	const base = `services.meshd.enable = true; services.meshd.settings.etcd.endpoints = [ "http://127.0.0.1:2379" ];`
	for _, tc := range []struct {
		name  string
		body  string
		check func(t *testing.T, r *evalResult)
	}{
		{"defaults", "", func(t *testing.T, r *evalResult) {
			if len(r.Firewall.AllowedUDPPorts) != 0 {
				t.Errorf("openFirewall defaults to false, but UDP %v is open", r.Firewall.AllowedUDPPorts)
			}
			if len(r.Warnings) != 1 || !strings.Contains(r.Warnings[0], "UDP port 51820 is closed") {
				t.Errorf("warnings %q: want one about the closed WireGuard port", r.Warnings)
			}
			if got := r.Services["meshd"].values("LoadCredential"); len(got) != 0 {
				t.Errorf("LoadCredential %q without TLS files", got)
			}
			if !strings.Contains(r.Meshd.SettingsJSON, `"nodeName":"node1"`) {
				t.Errorf("nodeName is not networking.hostName: %s", r.Meshd.SettingsJSON)
			}
			if strings.Contains(r.Meshd.SettingsJSON, "null") {
				t.Errorf("nulls reach the config file: %s", r.Meshd.SettingsJSON)
			}
		}},
		{"openFirewall with a custom port", `services.meshd.openFirewall = true; services.meshd.settings.overlay.listenPort = 40000;`, func(t *testing.T, r *evalResult) {
			if len(r.Firewall.AllowedUDPPorts) != 1 || r.Firewall.AllowedUDPPorts[0] != 40000 || len(r.Warnings) != 0 {
				t.Errorf("UDP %v warnings %q, want exactly 40000 and no warning", r.Firewall.AllowedUDPPorts, r.Warnings)
			}
		}},
		{"overlay off", `services.meshd.openFirewall = true; services.meshd.settings.overlay.enable = false; services.meshd.settings.secrets.enable = false;`, func(t *testing.T, r *evalResult) {
			u := r.Services["meshd"]
			if len(r.Firewall.AllowedUDPPorts) != 0 || len(u.values("DeviceAllow")) != 0 || u.value("PrivateDevices") != "true" || len(r.KernelModules) != 0 {
				t.Errorf("overlay disabled but UDP %v DeviceAllow %q PrivateDevices=%s modules %v",
					r.Firewall.AllowedUDPPorts, u.values("DeviceAllow"), u.value("PrivateDevices"), r.KernelModules)
			}
		}},
		{"meshd supervises haproxy", `services.meshd.settings.haproxy.supervise = true;`, func(t *testing.T, r *evalResult) {
			if _, ok := r.Services["meshd-haproxy"]; ok {
				t.Error("meshd-haproxy unit exists although meshd supervises HAProxy")
			}
			if _, ok := r.Users["meshd-haproxy"]; ok || r.Services["meshd"].value("SupplementaryGroups") != "" {
				t.Error("meshd-haproxy user or group still wired although meshd supervises HAProxy")
			}
			// Everything in meshd's own writable directory.
			for _, s := range []string{`"masterSocket":"/run/meshd/master.sock"`, `"statsSocket":"/run/meshd/stats.sock"`, `"configPath":"/run/meshd/haproxy.cfg"`} {
				if !strings.Contains(r.Meshd.SettingsJSON, s) {
					t.Errorf("config lacks %s: %s", s, r.Meshd.SettingsJSON)
				}
			}
			if !contains(r.Tmpfiles, "d /run/meshd 0750 root root - -") {
				t.Errorf("tmpfiles %q", r.Tmpfiles)
			}
			if got := r.Services["meshd"].value("CapabilityBoundingSet"); got != "CAP_NET_ADMIN CAP_NET_BIND_SERVICE" {
				t.Errorf("CapabilityBoundingSet=%s: the supervised HAProxy needs CAP_NET_BIND_SERVICE", got)
			}
		}},
		{"meshd supervises haproxy over kernel WireGuard", `services.meshd.settings.haproxy.supervise = true; services.meshd.settings.overlay.mode = "kernel";`, func(t *testing.T, r *evalResult) {
			if got := r.Services["meshd"].value("KillMode"); got != "process" {
				t.Errorf("KillMode=%s: a meshd restart would kill the HAProxy master it supervises", got)
			}
		}},
		{"kernel WireGuard, HAProxy in its own unit", `services.meshd.settings.overlay.mode = "kernel";`, func(t *testing.T, r *evalResult) {
			if got := r.Services["meshd"].value("KillMode"); got != "control-group" {
				t.Errorf("KillMode=%s: nothing of meshd's must outlive it", got)
			}
		}},
		{"haproxy off", `services.meshd.settings.haproxy.enable = false;`, func(t *testing.T, r *evalResult) {
			if _, ok := r.Services["meshd-haproxy"]; ok || contains(r.Targets["meshd-online"].Wants, "meshd-haproxy.service") {
				t.Error("meshd-haproxy still wired although haproxy is disabled")
			}
		}},
		{"secrets off", `services.meshd.settings.secrets.enable = false;`, func(t *testing.T, r *evalResult) {
			u := r.Services["meshd"]
			if len(u.values("ExecStartPre")) != 0 || contains(u.values("ReadWritePaths"), "/etc/credstore.encrypted") {
				t.Errorf("secrets disabled but ExecStartPre %q ReadWritePaths %q", u.values("ExecStartPre"), u.values("ReadWritePaths"))
			}
		}},
		{"unit tunables are defaults a plain definition overrides", `systemd.services.meshd.serviceConfig.WatchdogSec = "60s";
			systemd.services.meshd.serviceConfig.Restart = "on-failure"; systemd.services.meshd.startLimitIntervalSec = 60;
			systemd.services.meshd-haproxy.serviceConfig.LimitNOFILE = 4096;`, func(t *testing.T, r *evalResult) {
			m, h := r.Services["meshd"], r.Services["meshd-haproxy"]
			if m.value("WatchdogSec") != "60s" || m.value("Restart") != "on-failure" || h.value("LimitNOFILE") != "4096" ||
				!strings.Contains(m.UnitText, "StartLimitIntervalSec=60\n") {
				t.Errorf("WatchdogSec=%s Restart=%s LimitNOFILE=%s:\n%s", m.value("WatchdogSec"), m.value("Restart"), h.value("LimitNOFILE"), m.UnitText)
			}
		}},
		{"unit tunables without overrides", "", func(t *testing.T, r *evalResult) {
			m := r.Services["meshd"]
			if m.value("WatchdogSec") != "30s" || m.value("Restart") != "always" || !strings.Contains(m.UnitText, "StartLimitIntervalSec=0\n") {
				t.Errorf("WatchdogSec=%s Restart=%s:\n%s", m.value("WatchdogSec"), m.value("Restart"), m.UnitText)
			}
		}},
		{"metrics for a central Prometheus", `services.meshd.openMetricsFirewall = true; services.meshd.settings.metricsAddr = "0.0.0.0:9100";`, func(t *testing.T, r *evalResult) {
			if got := r.Firewall.Interfaces["meshd-wg"].AllowedTCPPorts; len(got) != 1 || got[0] != 9100 || len(r.Firewall.AllowedTCPPorts) != 0 {
				t.Errorf("firewall: overlay TCP %v, all interfaces TCP %v; want 9100 on meshd-wg only", got, r.Firewall.AllowedTCPPorts)
			}
			if !strings.Contains(r.Meshd.SettingsJSON, `"metricsAddr":"0.0.0.0:9100"`) {
				t.Errorf("config: %s", r.Meshd.SettingsJSON)
			}
		}},
		{"metrics closed by default", "", func(t *testing.T, r *evalResult) {
			if len(r.Firewall.Interfaces) != 0 || len(r.Firewall.AllowedTCPPorts) != 0 {
				t.Errorf("firewall %+v", r.Firewall)
			}
		}},
		{"systemd-networkd leaves the interface alone", `systemd.network.enable = true; services.meshd.settings.overlay.interface = "wg-mesh";`, func(t *testing.T, r *evalResult) {
			n := r.NetworkdNetworks["50-meshd"]
			if n.MatchConfig["Name"] != "wg-mesh" || n.LinkConfig["Unmanaged"] != true || n.LinkConfig["ActivationPolicy"] != "manual" {
				t.Errorf("systemd.network.networks.50-meshd %+v", n)
			}
			if !contains(r.DHCPCDDenyInterfaces, "wg-mesh") || !contains(r.NetworkManagerUnmanaged, "interface-name:wg-mesh") {
				t.Errorf("dhcpcd %q NetworkManager %q", r.DHCPCDDenyInterfaces, r.NetworkManagerUnmanaged)
			}
		}},
		{"networkd off: no network unit", "", func(t *testing.T, r *evalResult) {
			if len(r.NetworkdNetworks) != 0 {
				t.Errorf("systemd.network.networks %+v without systemd-networkd", r.NetworkdNetworks)
			}
		}},
		{"custom stateDir is writable", `services.meshd.settings.stateDir = "/srv/meshd";`, func(t *testing.T, r *evalResult) {
			if !contains(r.Services["meshd"].values("ReadWritePaths"), "/srv/meshd") || !contains(r.Tmpfiles, "d /srv/meshd 0700 root root - -") {
				t.Errorf("ReadWritePaths %q tmpfiles %q", r.Services["meshd"].values("ReadWritePaths"), r.Tmpfiles)
			}
		}},
		{"the package defaults to nix/package.nix", "", func(t *testing.T, r *evalResult) {
			a := r.Meshd.BuildGoModuleArgs
			if a == nil || a["pname"] != "meshd" || !strings.HasSuffix(r.Meshd.Package, "-meshd-0.1.0") {
				t.Errorf("package %s built with %v: want nix/package.nix through pkgs.buildGoModule", r.Meshd.Package, a)
			}
		}},
		{"checkConfig off", `services.meshd.checkConfig = false;`, func(t *testing.T, r *evalResult) {
			if len(r.Checks) != 0 {
				t.Errorf("system.checks %+v", r.Checks)
			}
		}},
		{"instances from two app modules", `services.meshd.instances.a = { group = "services"; port = 8001; };
			services.meshd.instances.b = { app = "a"; group = "backends"; port = 8002; check.disable = true; };`, func(t *testing.T, r *evalResult) {
			for _, s := range []string{`"app":"a","check":{"disable":false},"group":"services","port":8001`, `"app":"a","check":{"disable":true},"group":"backends","port":8002`} {
				if !strings.Contains(r.Meshd.SettingsJSON, s) {
					t.Errorf("config lacks %s: %s", s, r.Meshd.SettingsJSON)
				}
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := evalConfiguration(t, inline(t, base+tc.body))
			if err != nil {
				t.Fatal(err)
			}
			tc.check(t, r)
			if out, err := checkConfig(t, r.Meshd.SettingsJSON, nil); err != nil {
				t.Errorf("meshd --check-config: %v: %s", err, out)
			}
		})
	}
}

// More invalid settings caught at evaluation, before anything is built.
func TestInvalidOptionValues(t *testing.T) {
	const base = `services.meshd.enable = true; services.meshd.settings.etcd.endpoints = [ "http://127.0.0.1:2379" ];`
	for _, tc := range []struct{ name, body, wantErr string }{
		{"duplicate instance", `services.meshd.instances.a = { group = "services"; port = 1; }; services.meshd.settings.instances = [ { app = "a"; group = "services"; port = 2; } ];`, "an app is declared twice"},
		{"unknown group", `services.meshd.settings.consume = [ "databases" ];`, "services.meshd.settings.consume.\"[definition 1-entry 1]\"' is not of type"},
		{"cert without key", `services.meshd.etcd.certFile = "/var/lib/secrets/c.pem";`, "certFile and keyFile go together"},
		{"relative key", `services.meshd.etcd = { certFile = "/c.pem"; keyFile = "secrets/k.pem"; };`, "A definition for option `services.meshd.etcd.keyFile' is not of type `null or absolute path not in the Nix store'"},
		{"store path through settings", `services.meshd.settings.etcd.keyFile = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-k.pem";`, `services.meshd.settings.etcd.keyFile = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-k.pem" points into the Nix store`},
		{"store path in another file setting", `services.meshd.settings.tls.certFile = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-c.pem";`, `services.meshd.settings.tls.certFile = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-c.pem" points into the Nix store`},
		{"path literal deep in settings", `services.meshd.settings.extra = [ { key = /etc/hostname; } ];`, "services.meshd.settings.extra.[1].key = /etc/hostname is a Nix path"},
		{"metrics firewall on loopback", `services.meshd.openMetricsFirewall = true;`, `services.meshd.openMetricsFirewall: services.meshd.settings.metricsAddr = "127.0.0.1:9464" listens on loopback only`},
		{"metrics firewall without metrics", `services.meshd.openMetricsFirewall = true; services.meshd.settings.metricsAddr = "";`, `services.meshd.settings.metricsAddr = "" serves no metrics`},
		{"metrics address without port", `services.meshd.settings.metricsAddr = "0.0.0.0";`, "services.meshd.settings.metricsAddr' is not of type"},
		{"master socket outside the unit's directory", `services.meshd.settings.haproxy.masterSocket = "/run/meshd/master.sock";`,
			`services.meshd.settings.haproxy.masterSocket = "/run/meshd/master.sock": HAProxy may create its sockets only in /run/meshd-haproxy`},
		{"stats socket outside /run/meshd when supervised", `services.meshd.settings.haproxy = { supervise = true; statsSocket = "/run/haproxy/stats.sock"; };`,
			`services.meshd.settings.haproxy.statsSocket = "/run/haproxy/stats.sock": HAProxy may create its sockets only in /run/meshd`},
		{"bad secret name", `services.meshd.secrets."db password".units = [ "a.service" ];`, "services.meshd.secrets: names must match"},
		{"interface too long", `services.meshd.settings.overlay.interface = "meshd-wireguard0";`, "services.meshd.settings.overlay.interface' is not of type"},
		{"public address is no IPv4", `services.meshd.settings.publicIPv4 = "2001:db8::1";`, ""},
		{"secrets without overlay", `services.meshd.settings.overlay.enable = false;`, ""},
		{"unit without suffix", `services.meshd.instances.a = { group = "services"; port = 1; unit = "podman-a"; };`, "services.meshd.instances.a.unit' is not of type"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conf := inline(t, base+tc.body)
			if tc.wantErr == "" {
				// Evaluates, but meshd refuses the file.
				r, err := evalConfiguration(t, conf)
				if err != nil {
					t.Fatal(err)
				}
				if out, err := checkConfig(t, r.Meshd.SettingsJSON, nil); err == nil {
					t.Fatalf("meshd --check-config accepted %s: %s", r.Meshd.SettingsJSON, out)
				}
				return
			}
			_, err := evalConfiguration(t, conf)
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("got error %v\nwant one containing %q", err, tc.wantErr)
			}
		})
	}
}
