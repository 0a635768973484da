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
	// metrics is the TCP port opened on the overlay (0: none).
	metrics int
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
		extraArgs: " --log-level debug",
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
	{
		name: "monitoring", node: "monitor001", consume: []registry.Group{"services"}, udpPort: 51820, userspace: true,
		creds: map[string]string{
			"etcd-ca.pem":   "/var/lib/secrets/etcd/ca.pem",
			"etcd-cert.pem": "/var/lib/secrets/etcd/monitor001.pem",
			"etcd-key.pem":  "/var/lib/secrets/etcd/monitor001-key.pem",
		},
		metrics: 9464,
	},
}

// The monitoring example's Prometheus scrapes every node on the port the
// nodes open on the overlay, and meshd serves there beyond loopback.
func TestPrometheusScrapesEveryNode(t *testing.T) {
	r := evalExample(t, "monitoring")
	if len(r.Prometheus) != 1 || r.Prometheus[0].JobName != "meshd" {
		t.Fatalf("scrapeConfigs %+v", r.Prometheus)
	}
	nodes := map[string]string{}
	for _, sc := range r.Prometheus[0].StaticConfigs {
		if len(sc.Targets) != 1 {
			t.Fatalf("static config %+v", sc)
		}
		nodes[sc.Labels["node"]] = sc.Targets[0]
	}
	for _, want := range examples {
		target, ok := nodes[want.node]
		if !ok {
			t.Errorf("node %s is not scraped (targets %v)", want.node, nodes)
			continue
		}
		if !strings.HasSuffix(target, ":9464") {
			t.Errorf("%s scraped at %s, not the metrics port", want.node, target)
		}
	}
	if got := r.Firewall.Interfaces["meshd-wg"].AllowedTCPPorts; len(got) != 1 || got[0] != 9464 {
		t.Errorf("metrics port on the overlay: %v", got)
	}
	if !strings.Contains(r.Meshd.SettingsJSON, `"metricsAddr":"0.0.0.0:9464"`) {
		t.Errorf("metricsAddr: %s", r.Meshd.SettingsJSON)
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
			if got := r.Firewall.Interfaces["meshd-wg"].AllowedTCPPorts; (want.metrics == 0 && len(got) != 0) || (want.metrics != 0 && !contains(got, want.metrics)) {
				t.Errorf("TCP ports open on the overlay %v, want metrics port %d", got, want.metrics)
			}
			// The WireGuard interface is meshd's alone.
			if !contains(r.DHCPCDDenyInterfaces, "meshd-wg") || !contains(r.NetworkManagerUnmanaged, "interface-name:meshd-wg") {
				t.Errorf("dhcpcd denyInterfaces %q, NetworkManager unmanaged %q: want meshd-wg kept out", r.DHCPCDDenyInterfaces, r.NetworkManagerUnmanaged)
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
		"Type": "notify", "Restart": "always", "StateDirectory": "meshd", "RuntimeDirectory": "",
		"SupplementaryGroups": "meshd-haproxy", "NoNewPrivileges": "true", "ProtectSystem": "strict",
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
	if rw := u.values("ReadWritePaths"); !contains(rw, "/run/meshd") || !contains(rw, "/etc/credstore.encrypted") || contains(rw, "/run/wireguard") != want.userspace {
		t.Errorf("ReadWritePaths %q", rw)
	}
	// /run/meshd comes from tmpfiles with the group that lets HAProxy read
	// the config (RuntimeDirectory= would reset it to root).
	if !contains(r.Tmpfiles, "d /run/meshd 0750 root meshd-haproxy - -") {
		t.Errorf("tmpfiles %q: no /run/meshd for meshd-haproxy", r.Tmpfiles)
	}
	if strings.Contains(u.UnitText, "systemd-256.8/bin\n") || strings.Contains(u.UnitText, "PATH=") {
		t.Errorf("unit sets PATH (NixOS already puts systemd on it):\n%s", u.UnitText)
	}
	if !contains(r.SystemPackages, r.Meshd.Package) {
		t.Errorf("environment.systemPackages %q lacks the meshd package (meshctl)", r.SystemPackages)
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
	if got := u.value("ExecStart"); !strings.HasSuffix(got, "/bin/haproxy -Ws -S /run/meshd-haproxy/master.sock,mode,660 -f /run/meshd/haproxy.cfg") {
		t.Errorf("meshd-haproxy ExecStart=%s", got)
	}
	// A dedicated user with CAP_NET_BIND_SERVICE only, as nixpkgs'
	// haproxy module runs as `haproxy`.
	for k, v := range map[string]string{"User": "meshd-haproxy", "Group": "meshd-haproxy", "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
		"RuntimeDirectory": "meshd-haproxy", "RuntimeDirectoryMode": "0750", "NoNewPrivileges": "true", "ProtectSystem": "strict"} {
		if got := u.value(k); got != v {
			t.Errorf("meshd-haproxy %s=%q, want %q", k, got, v)
		}
	}
	if user := r.Users["meshd-haproxy"]; !user.IsSystemUser || user.Group != "meshd-haproxy" || !contains(r.Groups, "meshd-haproxy") {
		t.Errorf("users.users.meshd-haproxy %+v, groups %q", user, r.Groups)
	}
	// Only the bootstrap runs as root: it writes /run/meshd.
	if pre := u.values("ExecStartPre"); len(pre) != 2 || !strings.HasPrefix(pre[0], "+/nix/store/") || strings.HasPrefix(pre[1], "+") {
		t.Errorf("meshd-haproxy ExecStartPre %q", pre)
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
	if c.HAProxy.Supervise || c.HAProxy.ConfigPath != "/run/meshd/haproxy.cfg" || c.HAProxy.MasterSocket != "/run/meshd-haproxy/master.sock" ||
		c.HAProxy.StatsSocket != "/run/meshd-haproxy/stats.sock" {
		t.Errorf("haproxy: supervise %v config %s master %s stats %s: must match the meshd-haproxy unit",
			c.HAProxy.Supervise, c.HAProxy.ConfigPath, c.HAProxy.MasterSocket, c.HAProxy.StatsSocket)
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
