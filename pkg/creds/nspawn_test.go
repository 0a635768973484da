package creds

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/testlog"
)

// nspawnRoot is a throwaway OS tree that borrows the host's /usr
// (bind-mounted read-only) and has just enough /etc for systemd to boot:
// os-release, a machine id, and the units under test.
type nspawnRoot struct {
	dir string
	out string // bind-mounted at /out, where units write what they saw
}

func needNspawn(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("booting systemd with systemd-nspawn needs root")
	}
	for _, bin := range []string{"systemd-nspawn", "systemd-creds"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("%s not installed (Debian packages systemd-container, systemd)", bin)
		}
	}
	if _, err := os.Stat("/usr/lib/systemd/systemd"); err != nil {
		t.Skip("no systemd in /usr to boot")
	}
}

func newNspawnRoot(t *testing.T) *nspawnRoot {
	t.Helper()
	r := &nspawnRoot{dir: filepath.Join(t.TempDir(), "root"), out: filepath.Join(t.TempDir(), "out")}
	for _, d := range []string{"etc/systemd/system/multi-user.target.wants", "var/lib/systemd", "usr", "proc", "sys", "dev", "run", "tmp", "out"} {
		if err := os.MkdirAll(filepath.Join(r.dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.MkdirAll(r.out, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, l := range []string{"bin", "lib", "lib64", "sbin"} {
		if _, err := os.Lstat("/usr/" + l); err == nil {
			os.Symlink("usr/"+l, filepath.Join(r.dir, l))
		}
	}
	osRelease, err := os.ReadFile("/usr/lib/os-release")
	if err != nil {
		t.Skipf("no /usr/lib/os-release: %v", err)
	}
	r.write(t, "etc/os-release", string(osRelease))
	// The credential is decrypted on the machine that encrypted it: meshd
	// and the unit share the machine id.
	mid, err := os.ReadFile("/etc/machine-id")
	if err != nil || len(bytes.TrimSpace(mid)) != 32 {
		b := make([]byte, 16)
		rand.Read(b)
		mid = []byte(hex.EncodeToString(b) + "\n")
	}
	r.write(t, "etc/machine-id", string(mid))
	return r
}

// enable makes unit start at boot.
func (r *nspawnRoot) enable(t *testing.T, unit string) {
	t.Helper()
	link := filepath.Join(r.dir, "etc/systemd/system/multi-user.target.wants", unit)
	os.Remove(link)
	if err := os.Symlink("../"+unit, link); err != nil {
		t.Fatal(err)
	}
}

func (r *nspawnRoot) write(t *testing.T, rel, content string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(r.dir, rel), []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

// addReader installs a oneshot unit, started at boot, that loads the
// encrypted credential name from the credential store by name only and
// copies $CREDENTIALS_DIRECTORY/name to /out/name, then powers off.
func (r *nspawnRoot) addReader(t *testing.T, name string) {
	t.Helper()
	unit := "read-" + name + ".service"
	r.write(t, "etc/systemd/system/"+unit, fmt.Sprintf(`[Unit]
Description=read credential %[1]s
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
LoadCredentialEncrypted=%[1]s
ExecStart=/bin/sh -c 'cp "$CREDENTIALS_DIRECTORY/%[1]s" /out/%[1]s'
`, name))
	r.enable(t, unit)
}

// boot boots systemd in the tree; a unit powers the machine off. Extra
// arguments go to systemd-nspawn; without any the machine gets a private
// network with loopback only.
func (r *nspawnRoot) boot(t *testing.T, extra ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	args := []string{"--quiet",
		"--directory=" + r.dir, "--machine=" + fmt.Sprintf("mdtcreds%d", os.Getpid()),
		"--bind-ro=/usr", "--bind=" + r.out + ":/out",
		"--register=no", "--keep-unit", "--link-journal=no"}
	if len(extra) == 0 {
		extra = []string{"--private-network"}
	}
	args = append(append(args, extra...), "--boot")
	cmd := exec.CommandContext(ctx, "systemd-nspawn", args...)
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("systemd-nspawn did not power off within 60s:\n%s", out)
	}
	if err != nil {
		t.Logf("systemd-nspawn: %v (output below)", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("last boot:\n%s", out)
		}
	})
}

func TestNspawnUnitReadsDeliveredCredential(t *testing.T) {
	needNspawn(t)
	ctx := context.Background()
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	root := newNspawnRoot(t)
	root.addReader(t, "db-password")

	// meshd runs "on" the booted machine: its credential store is the
	// tree's /etc/credstore.encrypted, its host key the tree's own.
	stateDir := t.TempDir()
	credstore := filepath.Join(root.dir, "etc/credstore.encrypted")
	env := []string{"SYSTEMD_CREDENTIAL_SECRET=" + filepath.Join(root.dir, "var/lib/systemd/credential.secret")}
	logs := &testlog.Buffer{}
	mgr := &fakeManager{}
	comp, err := New(Options{
		Self: "node-a", StateDir: stateDir, CredstoreDir: credstore,
		Units: map[string]SecretUse{"db-password": {Units: []string{"read-db-password.service"}}},
		Creds: SystemdCreds{WithKey: "host", Env: env}, Manager: mgr,
	}, newTestLogger(logs), nil)
	if err != nil {
		t.Fatal(err)
	}
	addMember(t, cli, "node-a", 1, comp.Recipient())

	var values [][]byte
	for round, label := range []string{"first", "rotated"} {
		value := secretValue(label)
		values = append(values, value)
		res, err := PutSecret(ctx, cli, "db-password", value, Targets{Nodes: []string{"node-a"}})
		if err != nil {
			t.Fatal(err)
		}
		if err := comp.Apply(ctx, snapshotFor(t, cli, "node-a")); err != nil {
			t.Fatal(err)
		}
		os.Remove(filepath.Join(root.out, "db-password"))
		root.boot(t)
		got, err := os.ReadFile(filepath.Join(root.out, "db-password"))
		if err != nil {
			t.Fatalf("round %d: the unit did not read the credential: %v", round, err)
		}
		if !bytes.Equal(got, value) {
			t.Fatalf("round %d (version %d): the unit read something else than the value put", round, res.Version)
		}
	}
	if strings.Join(mgr.take(), ",") != "restart read-db-password.service,restart read-db-password.service" {
		t.Error("the declaring unit was not restarted once per version")
	}
	assertNowhereInEtcd(t, cli, values...)
	assertNotInLogs(t, logs.String(), values...)
	assertNowhereInFiles(t, []string{stateDir, credstore}, values...)
}

// TestNspawnRotationRestartsUnitOverDBus runs the component inside the
// booted machine with its real defaults: systemd-creds with the machine's
// own host key, and the D-Bus unit manager. A running unit that loaded
// version 1 at boot must be restarted by meshd and load version 2.
func TestNspawnRotationRestartsUnitOverDBus(t *testing.T) {
	needNspawn(t)
	self, err := os.Executable()
	if err != nil {
		t.Skipf("cannot find the test binary to run inside the machine: %v", err)
	}
	ctx := context.Background()
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	root := newNspawnRoot(t)
	stateDir := t.TempDir()
	credstore := filepath.Join(root.dir, "etc/credstore.encrypted")
	env := []string{"SYSTEMD_CREDENTIAL_SECRET=" + filepath.Join(root.dir, "var/lib/systemd/credential.secret")}

	// Version 1 is delivered before boot, as a meshd that ran earlier would.
	logs := &testlog.Buffer{}
	comp, err := New(Options{Self: "node-a", StateDir: stateDir, CredstoreDir: credstore,
		Creds: SystemdCreds{WithKey: "host", Env: env}, Manager: &fakeManager{}}, newTestLogger(logs), nil)
	if err != nil {
		t.Fatal(err)
	}
	addMember(t, cli, "node-a", 1, comp.Recipient())
	v1, v2 := secretValue("v1"), secretValue("v2")
	if _, err := PutSecret(ctx, cli, "db-password", v1, Targets{Nodes: []string{"node-a"}}); err != nil {
		t.Fatal(err)
	}
	if err := comp.Apply(ctx, snapshotFor(t, cli, "node-a")); err != nil {
		t.Fatal(err)
	}
	// Version 2 is waiting in etcd when the machine boots.
	if _, err := PutSecret(ctx, cli, "db-password", v2, Targets{Nodes: []string{"node-a"}}); err != nil {
		t.Fatal(err)
	}

	root.write(t, "etc/systemd/system/app.service", `[Unit]
Description=an app that loads db-password at start

[Service]
Type=oneshot
RemainAfterExit=yes
LoadCredentialEncrypted=db-password
ExecStart=/bin/sh -c 'cat "$CREDENTIALS_DIRECTORY/db-password" >> /out/app.log; echo >> /out/app.log'
`)
	root.enable(t, "app.service")
	root.write(t, "etc/systemd/system/meshd-helper.service", fmt.Sprintf(`[Unit]
Description=meshd creds component, once
After=app.service dbus.service
Wants=dbus.service
SuccessAction=poweroff-force
FailureAction=poweroff-force

[Service]
Type=oneshot
Environment=%s=1 MDT_CREDS_OUT=/out MDT_CREDS_NODE=node-a MDT_CREDS_STATE=/state MDT_CREDS_ETCD=%s MDT_CREDS_UNITS=db-password=app.service
ExecStart=/helper/creds.test
StandardOutput=file:/out/helper.out
StandardError=file:/out/helper.out
`, helperEnv, srv.Endpoint()))
	root.enable(t, "meshd-helper.service")

	// The machine shares the host's network so the helper reaches etcd on
	// loopback.
	root.boot(t, "--bind-ro="+self+":/helper/creds.test", "--bind="+stateDir+":/state")

	helperOut, _ := os.ReadFile(filepath.Join(root.out, "helper.out"))
	st, err := os.ReadFile(filepath.Join(root.out, "helper-status.json"))
	if err != nil {
		t.Fatalf("the helper did not run: %v\n%s", err, helperOut)
	}
	var got Status
	if err := json.Unmarshal(st, &got); err != nil {
		t.Fatal(err)
	}
	if got.Delivered["db-password"] != 2 || len(got.Errors) != 0 {
		t.Errorf("helper status %s\n%s", st, helperOut)
	}
	appLog, err := os.ReadFile(filepath.Join(root.out, "app.log"))
	if err != nil {
		t.Fatalf("app never started: %v", err)
	}
	if want := string(v1) + "\n" + string(v2) + "\n"; string(appLog) != want {
		t.Errorf("app loaded %d lines, want version 1 at boot then version 2 after meshd restarted it over D-Bus", strings.Count(string(appLog), "\n"))
	}
	helperLog, _ := os.ReadFile(filepath.Join(root.out, "helper.log"))
	t.Logf("helper log:\n%s", helperLog)
	if !strings.Contains(string(helperLog), "app.service") {
		t.Errorf("helper log does not mention the restart:\n%s", helperLog)
	}
	values := [][]byte{v1, v2}
	assertNowhereInEtcd(t, cli, values...)
	assertNotInLogs(t, logs.String()+string(helperLog)+string(helperOut), values...)
	assertNowhereInFiles(t, []string{stateDir, credstore}, values...)
}
