package nixtest

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/meshd/meshd/pkg/config"
	"github.com/meshd/meshd/pkg/registry"
)

// exampleWant is what one example node configuration must produce.
type exampleWant struct {
	name      string
	node      string
	consume   []registry.Group
	udpPort   int
	userspace bool // /dev/net/tun allowed
	tpm       bool // /dev/tpmrm0 allowed
	extraArgs string
	// creds maps LoadCredential ids to the host files.
	creds     map[string]string
	instances []config.Instance
	secrets   map[string]config.SecretUse
	// appUnits maps a consumer unit to the credential directive it uses.
	appUnits map[string]string
}

var examples = []exampleWant{
	{
		name: "worker", node: "worker001", consume: []registry.Group{"backends", "services"}, udpPort: 51820, userspace: true,
		creds: map[string]string{
			"etcd-ca.pem":   "/var/lib/secrets/etcd/ca.pem",
			"etcd-cert.pem": "/var/lib/secrets/etcd/worker001.pem",
			"etcd-key.pem":  "/var/lib/secrets/etcd/worker001-key.pem",
		},
		instances: []config.Instance{{App: "app-pod", Group: "backends", Port: 11311,
			Check: config.Check{Unit: "podman-app-pod.service"}}},
		secrets:  map[string]config.SecretUse{"app-db-password": {Units: []string{"podman-app-pod.service"}, Action: "restart"}},
		appUnits: map[string]string{"podman-app-pod": "LoadCredentialEncrypted"},
	},
	{
		name: "ingress", node: "ingress001", consume: []registry.Group{"frontends"}, udpPort: 51820, userspace: false,
		creds: map[string]string{
			"etcd-ca.pem":   "/var/lib/secrets/etcd/ca.pem",
			"etcd-cert.pem": "/var/lib/secrets/etcd/ingress001.pem",
			"etcd-key.pem":  "/var/lib/secrets/etcd/ingress001-key.pem",
		},
		secrets:  map[string]config.SecretUse{"ingress-tls-key": {Units: []string{"ingress-proxy.service"}, Action: "reload"}},
		appUnits: map[string]string{"ingress-proxy": "ImportCredential"},
	},
	{
		name: "service", node: "service001", consume: []registry.Group{"services"}, udpPort: 51821, userspace: true, tpm: true,
		extraArgs: " '--log-level' 'debug'",
		creds: map[string]string{
			"etcd-ca.pem":   "/var/lib/secrets/etcd/ca.pem",
			"etcd-cert.pem": "/var/lib/secrets/etcd/service001.pem",
			"etcd-key.pem":  "/var/lib/secrets/etcd/service001-key.pem",
		},
		instances: []config.Instance{{App: "mongodb", Group: "services", Port: 27017,
			Check: config.Check{Unit: "podman-mongodb.service",
				Interval: config.Duration(2e9), Timeout: config.Duration(1e9)}}},
		secrets:  map[string]config.SecretUse{"mongodb-root-password": {Units: []string{"podman-mongodb.service"}, Action: "restart"}},
		appUnits: map[string]string{"podman-mongodb": "LoadCredentialEncrypted"},
	},
}

func TestModuleParses(t *testing.T) {
	root := repoRoot(t)
	files, err := filepath.Glob(filepath.Join(root, "nix", "*", "*.nix"))
	if err != nil {
		t.Fatal(err)
	}
	more, _ := filepath.Glob(filepath.Join(root, "nix", "examples", "invalid", "*.nix"))
	files = append(append([]string{filepath.Join(root, "nixos-module.nix"), filepath.Join(root, "nix", "harness.nix")}, files...), more...)
	for _, f := range files {
		if _, err := nixInstantiate(t, "--parse", f); err != nil {
			t.Errorf("parse %s: %v", f, err)
		}
	}
}

func TestExamples(t *testing.T) {
	for _, want := range examples {
		t.Run(want.name, func(t *testing.T) {
			r := evalExample(t, want.name)
			if r.Meshd == nil {
				t.Fatal("services.meshd is not enabled")
			}
			meshd, ok := r.Services["meshd"]
			if !ok {
				t.Fatal("no meshd service")
			}
			checkMeshdUnit(t, want, r, meshd)
			checkCredentials(t, want, meshd)
			checkHAProxyUnit(t, r)
			checkRenderedConfig(t, want, r)
			if !contains(r.Firewall.AllowedUDPPorts, want.udpPort) {
				t.Errorf("firewall UDP ports %v: WireGuard port %d not open", r.Firewall.AllowedUDPPorts, want.udpPort)
			}
			target := r.Targets["meshd-online"]
			if !contains(target.Wants, "meshd.service") || !contains(target.After, "meshd.service") || !contains(target.WantedBy, "multi-user.target") {
				t.Errorf("meshd-online.target: wants %v after %v wantedBy %v", target.Wants, target.After, target.WantedBy)
			}
			for name, directive := range want.appUnits {
				u := r.Services[name]
				if len(u.values(directive)) == 0 {
					t.Errorf("%s: no %s= (example of a unit using a meshd credential)", name, directive)
				}
				if !contains(u.After, "meshd-online.target") && name != "podman-mongodb" {
					t.Errorf("%s: not ordered after meshd-online.target: %v", name, u.After)
				}
			}
			if len(r.Warnings) != 0 {
				t.Errorf("warnings: %q", r.Warnings)
			}
		})
	}
}

func checkMeshdUnit(t *testing.T, want exampleWant, r *evalResult, u unit) {
	t.Helper()
	wantExec := r.Meshd.Package + "/bin/meshd --config " + r.Meshd.ConfigFile + want.extraArgs
	if got := u.value("ExecStart"); got != wantExec {
		t.Errorf("ExecStart:\n got %s\nwant %s", got, wantExec)
	}
	exact := map[string]string{
		"Type": "notify", "Restart": "always", "StateDirectory": "meshd", "RuntimeDirectory": "meshd",
		"RuntimeDirectoryPreserve": "yes", "NoNewPrivileges": "true", "ProtectSystem": "strict",
		"ProtectHome": "true", "PrivateTmp": "true", "CapabilityBoundingSet": "CAP_NET_ADMIN",
		"AmbientCapabilities": "CAP_NET_ADMIN", "SystemCallFilter": "@system-service",
		"RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK", "ProtectKernelModules": "true",
		"ProtectKernelTunables": "true", "ProtectControlGroups": "true", "RestrictNamespaces": "true",
		"RestrictSUIDSGID": "true", "LockPersonality": "true", "MemoryDenyWriteExecute": "true",
		"SystemCallArchitectures": "native", "DevicePolicy": "closed", "UMask": "0077",
	}
	for k, v := range exact {
		if got := u.value(k); got != v {
			t.Errorf("%s=%q, want %q", k, got, v)
		}
	}
	if u.value("WatchdogSec") == "" {
		t.Error("no WatchdogSec")
	}
	devices := u.values("DeviceAllow")
	if got := contains(devices, "/dev/net/tun rw"); got != want.userspace {
		t.Errorf("DeviceAllow %q: /dev/net/tun allowed = %v, want %v", devices, got, want.userspace)
	}
	if got := contains(devices, "/dev/tpmrm0 rw"); got != want.tpm {
		t.Errorf("DeviceAllow %q: /dev/tpmrm0 allowed = %v, want %v", devices, got, want.tpm)
	}
	if got, wantPD := u.value("PrivateDevices"), !(want.userspace || want.tpm); got != map[bool]string{true: "true", false: "false"}[wantPD] {
		t.Errorf("PrivateDevices=%s with userspace=%v tpm=%v", got, want.userspace, want.tpm)
	}
	if rw := u.values("ReadWritePaths"); !contains(rw, "/etc/credstore.encrypted") || contains(rw, "/run/wireguard") != want.userspace {
		t.Errorf("ReadWritePaths %q", rw)
	}
	if !contains(u.Before, "meshd-online.target") || !contains(u.After, "meshd-haproxy.service") || !contains(u.Wants, "meshd-haproxy.service") {
		t.Errorf("ordering: before %v after %v wants %v", u.Before, u.After, u.Wants)
	}
	// The build-time check runs the real meshd on the very file the unit reads.
	found := false
	for _, c := range r.Checks {
		found = found || strings.Contains(c.Text, r.Meshd.Package+"/bin/meshd --check-config --config "+r.Meshd.ConfigFile+"\n")
	}
	if !found {
		t.Errorf("system.checks %+v: no meshd --check-config of %s", r.Checks, r.Meshd.ConfigFile)
	}
}

func checkCredentials(t *testing.T, want exampleWant, u unit) {
	t.Helper()
	got := map[string]string{}
	for _, lc := range u.values("LoadCredential") {
		id, path, ok := strings.Cut(lc, ":")
		if !ok {
			t.Errorf("LoadCredential=%s: want ID:PATH", lc)
			continue
		}
		if strings.HasPrefix(path, "/nix/store") {
			t.Errorf("LoadCredential=%s: file in the Nix store", lc)
		}
		got[id] = path
	}
	if d := cmp.Diff(want.creds, got); d != "" {
		t.Errorf("LoadCredential (-want +got):\n%s", d)
	}
	// The TLS files reach the unit only through LoadCredential=.
	for _, line := range strings.Split(u.UnitText, "\n") {
		for _, path := range want.creds {
			if strings.Contains(line, path) && !strings.HasPrefix(line, "LoadCredential=") {
				t.Errorf("unit line %q names TLS file %s outside LoadCredential=", line, path)
			}
		}
	}
}

func checkHAProxyUnit(t *testing.T, r *evalResult) {
	t.Helper()
	u, ok := r.Services["meshd-haproxy"]
	if !ok {
		t.Fatal("no meshd-haproxy service")
	}
	if got := u.value("ExecStart"); !strings.HasSuffix(got, "/bin/haproxy -Ws -S /run/meshd/haproxy-master.sock -f /run/meshd/haproxy.cfg") {
		t.Errorf("meshd-haproxy ExecStart=%s", got)
	}
	if u.value("Type") != "notify" || !contains(u.Before, "meshd.service") || !u.ReloadIfChanged {
		t.Errorf("meshd-haproxy: Type=%s before %v reloadIfChanged %v", u.value("Type"), u.Before, u.ReloadIfChanged)
	}
	if got := u.value("CapabilityBoundingSet"); got != "CAP_NET_BIND_SERVICE" {
		t.Errorf("meshd-haproxy CapabilityBoundingSet=%s", got)
	}
}

func checkRenderedConfig(t *testing.T, want exampleWant, r *evalResult) {
	t.Helper()
	dir := t.TempDir()
	f := filepath.Join(dir, "meshd.json")
	if err := os.WriteFile(f, []byte(r.Meshd.SettingsJSON), 0o600); err != nil {
		t.Fatal(err)
	}
	credDir := filepath.Join(dir, "credentials")
	t.Setenv("CREDENTIALS_DIRECTORY", credDir)
	c, err := config.Load(f) // strict: unknown fields fail
	if err != nil {
		t.Fatalf("config.Load: %v\n%s", err, r.Meshd.SettingsJSON)
	}
	if err := c.Validate(); err != nil {
		t.Errorf("Validate: %v", err)
	}
	if c.NodeName != want.node {
		t.Errorf("nodeName %q, want %q", c.NodeName, want.node)
	}
	if d := cmp.Diff(want.consume, c.Consume); d != "" {
		t.Errorf("consume (-want +got):\n%s", d)
	}
	gotTLS := map[string]string{"etcd-ca.pem": c.Etcd.CAFile, "etcd-cert.pem": c.Etcd.CertFile, "etcd-key.pem": c.Etcd.KeyFile}
	for id := range want.creds {
		if w := filepath.Join(credDir, id); gotTLS[id] != w {
			t.Errorf("etcd %s at %q, want %q (from LoadCredential)", id, gotTLS[id], w)
		}
	}
	if c.Overlay.ListenPort != want.udpPort {
		t.Errorf("overlay.listenPort %d, want %d", c.Overlay.ListenPort, want.udpPort)
	}
	if c.HAProxy.Supervise || c.HAProxy.ConfigPath != "/run/meshd/haproxy.cfg" || c.HAProxy.MasterSocket != "/run/meshd/haproxy-master.sock" {
		t.Errorf("haproxy: supervise %v config %s master %s: must match the meshd-haproxy unit", c.HAProxy.Supervise, c.HAProxy.ConfigPath, c.HAProxy.MasterSocket)
	}
	if !strings.HasSuffix(c.HAProxy.Binary, "/bin/haproxy") || !strings.HasPrefix(c.HAProxy.Binary, "/nix/store/") {
		t.Errorf("haproxy.binary %q: want the package's binary", c.HAProxy.Binary)
	}
	if d := cmp.Diff(want.instances, c.Instances, cmpopts.EquateEmpty()); d != "" {
		t.Errorf("instances (-want +got):\n%s", d)
	}
	if d := cmp.Diff(want.secrets, c.Secrets.Units); d != "" {
		t.Errorf("secrets.units (-want +got):\n%s", d)
	}
	if c.StateDir != "/var/lib/meshd" {
		t.Errorf("stateDir %q: StateDirectory=meshd is /var/lib/meshd", c.StateDir)
	}
}

// The real meshd accepts every rendered config, in a build sandbox's empty
// environment (the system.checks derivation) and under systemd.
func TestMeshdAcceptsRenderedConfigs(t *testing.T) {
	for _, want := range examples {
		t.Run(want.name, func(t *testing.T) {
			r := evalExample(t, want.name)
			for _, env := range [][]string{nil, {"CREDENTIALS_DIRECTORY=" + t.TempDir()}} {
				out, err := checkConfig(t, r.Meshd.SettingsJSON, env)
				if err != nil || !strings.HasPrefix(out, "config ok: node "+want.node) {
					t.Errorf("meshd --check-config (env %q): %v: %s\n%s", env, err, out, r.Meshd.SettingsJSON)
				}
			}
		})
	}
}
