package nixtest

import (
	"path/filepath"
	"strings"
	"testing"
)

// Bad configurations fail evaluation with a message that names the problem.
func TestInvalidConfigurationsFail(t *testing.T) {
	for _, tc := range []struct {
		file    string
		wantErr string
	}{
		{"store-key", `services.meshd.etcd.keyFile = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-worker002-key.pem" is in the Nix store`},
		{"path-literal-key", "A definition for option `services.meshd.etcd.keyFile' is not of type `null or string'"},
		{"unknown-option", "The option `services.meshd.etcd.keyfile' does not exist."},
		{"bad-node-name", "A definition for option `services.meshd.nodeName' is not of type `string matching the pattern"},
	} {
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
			if got := r.Services["meshd"].value("CapabilityBoundingSet"); got != "CAP_NET_ADMIN CAP_NET_BIND_SERVICE" {
				t.Errorf("CapabilityBoundingSet=%s: the supervised HAProxy needs CAP_NET_BIND_SERVICE", got)
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
		{"unknown group", `services.meshd.settings.consume = [ "databases" ];`, "services.meshd.settings.consume.[definition 1-entry 1]' is not of type"},
		{"cert without key", `services.meshd.etcd.certFile = "/var/lib/secrets/c.pem";`, "certFile and keyFile go together"},
		{"relative key", `services.meshd.etcd = { certFile = "/c.pem"; keyFile = "secrets/k.pem"; };`, "must be an absolute path"},
		{"store path through settings", `services.meshd.settings.etcd.keyFile = "/nix/store/0123456789abcdfghijklmnpqrsvwxyz-k.pem";`, "services.meshd.settings.etcd.keyFile points into the Nix store"},
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
