package nixtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/pki"
)

var storePath = regexp.MustCompile(`/nix/store/[a-z0-9]{32}-[^/\s"':]+`)

// machine is a throwaway OS tree for systemd-nspawn that borrows the
// host's /usr and gets the module's units, with every /nix/store path they
// name made real.
type machine struct {
	dir, out string
	binds    []string
}

func needNspawn(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("booting systemd with systemd-nspawn needs root")
	}
	for _, bin := range []string{"systemd-nspawn", "haproxy", "bash", "ip", "systemd-run", "systemd-creds"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("%s not installed", bin)
		}
	}
	if _, err := os.Stat("/usr/lib/systemd/systemd"); err != nil {
		t.Skip("no systemd in /usr to boot")
	}
}

func newMachine(t *testing.T) *machine {
	t.Helper()
	m := &machine{dir: filepath.Join(t.TempDir(), "root"), out: t.TempDir()}
	for _, d := range []string{"etc/systemd/system/multi-user.target.wants", "etc/tmpfiles.d", "var/lib/systemd",
		"usr", "proc", "sys", "dev", "run", "tmp", "out", "helper"} {
		m.mkdir(t, d)
	}
	for _, l := range []string{"bin", "lib", "lib64", "sbin"} {
		if _, err := os.Lstat("/usr/" + l); err == nil {
			os.Symlink("usr/"+l, filepath.Join(m.dir, l))
		}
	}
	osRelease, err := os.ReadFile("/usr/lib/os-release")
	if err != nil {
		t.Skipf("no /usr/lib/os-release: %v", err)
	}
	m.write(t, "etc/os-release", string(osRelease), 0o644)
	b := make([]byte, 16)
	rand.Read(b)
	m.write(t, "etc/machine-id", hex.EncodeToString(b)+"\n", 0o444)
	return m
}

func (m *machine) mkdir(t *testing.T, rel string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Join(m.dir, rel), 0o755); err != nil {
		t.Fatal(err)
	}
}

func (m *machine) write(t *testing.T, rel, content string, mode os.FileMode) {
	t.Helper()
	m.mkdir(t, filepath.Dir(rel))
	if err := os.WriteFile(filepath.Join(m.dir, rel), []byte(content), mode); err != nil {
		t.Fatal(err)
	}
}

func (m *machine) link(t *testing.T, rel, target string) {
	t.Helper()
	m.mkdir(t, filepath.Dir(rel))
	if err := os.Symlink(target, filepath.Join(m.dir, rel)); err != nil {
		t.Fatal(err)
	}
}

// bind mounts a host file read-only at an absolute path of the machine.
func (m *machine) bind(t *testing.T, host, at string) {
	m.write(t, at[1:], "", 0o755) // the mount point
	m.binds = append(m.binds, "--bind-ro="+host+":"+at)
}

// unit installs a unit, enabled for multi-user.target.
func (m *machine) unit(t *testing.T, name, text string) {
	m.write(t, "etc/systemd/system/"+name, text, 0o644)
	if err := os.Symlink("../"+name, filepath.Join(m.dir, "etc/systemd/system/multi-user.target.wants", name)); err != nil {
		t.Fatal(err)
	}
}

// boot runs the machine with a private network (loopback only) until a
// unit powers it off.
func (m *machine) boot(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	args := append([]string{"--quiet", "--directory=" + m.dir, "--machine=" + fmt.Sprintf("mdtnix%d", os.Getpid()),
		"--bind-ro=/usr", "--bind=" + m.out + ":/out", "--register=no", "--keep-unit", "--link-journal=no",
		"--private-network"}, m.binds...)
	out, err := exec.CommandContext(ctx, "systemd-nspawn", append(args, "--boot")...).CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("the machine did not power off within 90s:\n%s%s", out, m.read("journal"))
	}
	if err != nil {
		t.Logf("systemd-nspawn: %v", err)
	}
	return string(out)
}

func (m *machine) read(name string) string {
	b, _ := os.ReadFile(filepath.Join(m.out, name))
	return string(b)
}

// The module's units, exactly as generated for the worker example, boot
// under a real systemd with all their hardening: meshd reads its etcd TLS
// files through LoadCredential and ${CREDENTIALS_DIRECTORY}, creates its
// userspace WireGuard device through DeviceAllow=/dev/net/tun, takes over
// the HAProxy that meshd-haproxy started on the bootstrap file, and serves
// the app it read from etcd; systemd sees both units running.
func TestNspawnModuleUnitsRun(t *testing.T) {
	needNspawn(t)
	self, err := os.Executable()
	if err != nil {
		t.Skip(err)
	}
	r := evalExample(t, "worker")
	m := newMachine(t)
	appPort := freePort(t) // any port: the machine has its own loopback
	b := make([]byte, 16)
	rand.Read(b)
	secret := "mdtnix-" + hex.EncodeToString(b)

	// PKI: the node's client certificate (LoadCredential sources, outside
	// any store) and etcd's server certificate.
	now := time.Now()
	ca, _, err := pki.NewCA(pki.CAOptions{Cluster: "mdtnix", Now: now})
	if err != nil {
		t.Fatal(err)
	}
	node, err := ca.Issue(pki.Request{CommonName: "worker001", Usage: pki.Client, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	server, err := ca.Issue(pki.Request{CommonName: "etcd", Usage: pki.Server, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	for rel, content := range map[string][]byte{
		"var/lib/secrets/etcd/ca.pem": ca.CertPEM, "var/lib/secrets/etcd/worker001.pem": node.CertPEM,
		"var/lib/secrets/etcd/worker001-key.pem": node.KeyPEM,
		"etc/mdt-etcd/ca.pem":                    ca.CertPEM, "etc/mdt-etcd/server.pem": server.CertPEM, "etc/mdt-etcd/server-key.pem": server.KeyPEM,
	} {
		m.write(t, rel, string(content), 0o400)
	}

	// The store paths the units name.
	m.bind(t, meshdBinary(t), r.Meshd.Package+"/bin/meshd")
	var settings map[string]any
	if err := json.Unmarshal([]byte(r.Meshd.SettingsJSON), &settings); err != nil {
		t.Fatal(err)
	}
	settings["etcd"].(map[string]any)["endpoints"] = []string{etcdHelperEndpoint}
	settings["overlay"].(map[string]any)["interface"] = "mdtnixwg"
	conf, _ := json.Marshal(settings)
	m.write(t, r.Meshd.ConfigFile[1:], string(conf), 0o444)
	bootstrapScript := strings.TrimPrefix(r.Services["meshd-haproxy"].values("ExecStartPre")[0], "+")
	texts := r.Services["meshd"].UnitText + r.Services["meshd-haproxy"].UnitText
	seen := map[string]bool{}
	for _, p := range storePath.FindAllString(texts, -1) {
		if seen[p] {
			continue
		}
		seen[p] = true
		switch {
		case strings.HasSuffix(p, "-haproxy-2.8.5"):
			m.link(t, p[1:]+"/bin/haproxy", lookPath(t, "haproxy"))
		case strings.HasSuffix(p, "-systemd-256.8"):
			m.link(t, p[1:]+"/bin/systemd-creds", lookPath(t, "systemd-creds"))
		case strings.HasSuffix(p, "-coreutils-9.5"):
			m.link(t, p[1:]+"/bin/kill", lookPath(t, "kill"))
		}
	}
	installBootstrap(t, m, bootstrapScript, r.Services["meshd-haproxy"].UnitText)

	// The users the module declares (NixOS writes them to /etc/passwd and
	// /etc/group at activation).
	passwd, group := "root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/var/empty:/bin/false\n", "root:x:0:\nnogroup:x:65534:\n"
	id := 990
	for _, name := range sorted(r.Groups) {
		group += fmt.Sprintf("%s:x:%d:\n", name, id)
		if u, ok := r.Users[name]; ok && u.Group == name && u.IsSystemUser {
			passwd += fmt.Sprintf("%s:x:%d:%d::/var/empty:/bin/false\n", name, id, id)
		}
		id--
	}
	if !strings.Contains(passwd, "\nmeshd-haproxy:") {
		t.Fatalf("the worker example declares no meshd-haproxy user: %+v", r.Users)
	}
	m.write(t, "etc/passwd", passwd, 0o644)
	m.write(t, "etc/group", group, 0o644)

	// The module's units and tmpfiles rules, verbatim.
	for _, name := range []string{"meshd", "meshd-haproxy"} {
		m.unit(t, name+".service", r.Services[name].UnitText)
	}
	m.unit(t, "meshd-online.target", r.Targets["meshd-online"].UnitText)
	m.write(t, "etc/tmpfiles.d/meshd.conf", strings.Join(r.Tmpfiles, "\n")+"\n", 0o644)

	// etcd for the machine, and a unit that reports once the mesh is online.
	m.bind(t, self, "/helper/nixtest.test")
	m.unit(t, "mdt-etcd.service", fmt.Sprintf(`[Unit]
Description=etcd for the test
Before=meshd.service

[Service]
Type=notify
Environment=%s=1 MDT_NIX_ETCD_DIR=/var/lib/mdt-etcd MDT_NIX_APP_PORT=%d
Environment=MDT_NIX_NODE=worker001 MDT_NIX_SECRET_NAME=app-db-password MDT_NIX_SECRET=%s
Environment=MDT_NIX_ETCD_CA=/etc/mdt-etcd/ca.pem MDT_NIX_ETCD_CERT=/etc/mdt-etcd/server.pem MDT_NIX_ETCD_KEY=/etc/mdt-etcd/server-key.pem
ExecStart=/helper/nixtest.test
`, etcdHelperEnv, appPort, secret))
	m.unit(t, "mdt-check.service", fmt.Sprintf(`[Unit]
Description=report the mesh state
Wants=meshd-online.target
After=meshd-online.target
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
ExecStart=/bin/bash -c 'for i in $$(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/%d) 2>/dev/null && { echo ok > /out/listener; break; }; sleep 0.05; done; \
  systemctl show -p ActiveState -p SubState -p NRestarts meshd.service > /out/meshd.show; \
  systemctl show -p ActiveState -p SubState -p NRestarts meshd-haproxy.service > /out/haproxy.show; \
  ip -o link show mdtnixwg > /out/link 2>&1; \
  stat -c "%%%%a %%%%U" /etc/credstore.encrypted > /out/credstore 2>&1; \
  stat -c "%%%%n %%%%a %%%%U %%%%G" /run/meshd /run/meshd/haproxy.cfg /run/meshd-haproxy /run/meshd-haproxy/master.sock /run/meshd-haproxy/stats.sock > /out/runtime 2>&1; \
  for p in $$(pgrep -x haproxy); do stat -c %%%%U /proc/$$p; done | sort -u > /out/haproxy.users; \
  for i in $$(seq 400); do [ -e /etc/credstore.encrypted/app-db-password ] && break; sleep 0.05; done; \
  systemd-run --quiet --wait --pipe -p LoadCredentialEncrypted=app-db-password:/etc/credstore.encrypted/app-db-password \
    /bin/sh -c "cat \\$$CREDENTIALS_DIRECTORY/app-db-password" > /out/secret 2>/out/secret.err; \
  journalctl -b --no-pager -u meshd -u meshd-haproxy -u mdt-etcd > /out/journal 2>&1; true'
`, appPort))

	out := m.boot(t)
	journal := m.read("journal")
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("boot output:\n%s\njournal:\n%s", out, journal)
		}
	})
	for file, want := range map[string]string{"meshd.show": "ActiveState=active\nNRestarts=0\nSubState=running", "haproxy.show": "ActiveState=active\nNRestarts=0\nSubState=running"} {
		if got := sortedLines(m.read(file)); got != want {
			t.Errorf("%s:\n%s\nwant\n%s", file, got, want)
		}
	}
	if m.read("listener") != "ok\n" {
		t.Errorf("nothing listens on 127.0.0.1:%d: meshd did not render the app it read from etcd, or HAProxy did not load it", appPort)
	}
	if !regexp.MustCompile(`^\d+: mdtnixwg[:@]`).MatchString(m.read("link")) {
		t.Errorf("no WireGuard device: %s", m.read("link"))
	}
	// HAProxy runs as meshd-haproxy, reads the config meshd wrote in
	// /run/meshd, and meshd reaches its sockets through the group.
	if got, want := strings.TrimSpace(m.read("runtime")), "/run/meshd 750 root meshd-haproxy\n"+
		"/run/meshd/haproxy.cfg 644 root root\n"+
		"/run/meshd-haproxy 750 meshd-haproxy meshd-haproxy\n"+
		"/run/meshd-haproxy/master.sock 660 meshd-haproxy meshd-haproxy\n"+
		"/run/meshd-haproxy/stats.sock 660 meshd-haproxy meshd-haproxy"; got != want {
		t.Errorf("runtime files:\n%s\nwant\n%s", got, want)
	}
	if got := strings.TrimSpace(m.read("haproxy.users")); got != "meshd-haproxy" {
		t.Errorf("haproxy processes run as %q, want meshd-haproxy only", got)
	}
	if got := strings.TrimSpace(m.read("credstore")); got != "700 root" {
		t.Errorf("credential store: %q, want mode 700 owned by root (tmpfiles rule)", got)
	}
	if got := m.read("secret"); got != secret {
		t.Errorf("a unit loading the credential meshd delivered read %d bytes, want the secret put in etcd (%s)", len(got), m.read("secret.err"))
	}
	if strings.Contains(journal, string(node.KeyPEM)) || strings.Contains(journal, secret) {
		t.Error("the etcd client key or the secret appears in the journal")
	}
}

// installBootstrap writes the meshd-haproxy bootstrap script into the
// machine after checking, by its store path, that it is byte for byte the
// script the module generates.
func installBootstrap(t *testing.T, m *machine, scriptPath, unitText string) {
	t.Helper()
	root := repoRoot(t)
	coreutils := regexp.MustCompile(`/nix/store/[a-z0-9]{32}-coreutils-9.5`).FindString(unitText)
	cfgFile := filepath.Join(root, "nix", "meshd-haproxy-bootstrap.cfg")
	script := func(cfg string) string {
		return "#!/bin/sh\n[ -d /run/meshd ] || " + coreutils + "/bin/install -d -m 0750 -g meshd-haproxy /run/meshd\n" +
			"[ -e /run/meshd/haproxy.cfg ] || " + coreutils + "/bin/install -m 0644 " + cfg + " /run/meshd/haproxy.cfg\n"
	}
	expr := fmt.Sprintf(`let cfg = %s; in { path = builtins.toFile "meshd-haproxy-bootstrap" %q; cfg = "${cfg}"; }`, cfgFile,
		script("${cfg}"))
	out, err := nixInstantiate(t, "--eval", "--strict", "--json", "-E", expr)
	if err != nil {
		t.Fatal(err)
	}
	var got struct{ Path, Cfg string }
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatal(err)
	}
	if got.Path != scriptPath {
		t.Fatalf("ExecStartPre %s is not the script this test reproduces (%s): update installBootstrap", scriptPath, got.Path)
	}
	m.write(t, scriptPath[1:], script(got.Cfg), 0o755)
	m.link(t, coreutils[1:]+"/bin/install", lookPath(t, "install"))
	b, err := os.ReadFile(cfgFile)
	if err != nil {
		t.Fatal(err)
	}
	m.write(t, got.Cfg[1:], string(b), 0o444)
}

// lookPath finds a host binary; the machine sees the host's /usr, so its
// path is valid inside too.
func lookPath(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("%s not installed", name)
	}
	if p, err = filepath.EvalSymlinks(p); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(p, "/usr/") {
		t.Skipf("%s is at %s, outside the /usr the machine borrows", name, p)
	}
	return p
}

func sortedLines(s string) string {
	return strings.Join(sorted(strings.Split(strings.TrimSpace(s), "\n")), "\n")
}
