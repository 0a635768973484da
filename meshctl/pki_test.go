package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/registry"
)

// pkiRun runs meshctl with the given arguments and no environment.
func pkiRun(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	code := run(ctx, args, strings.NewReader(""), &out, &errb, func(string) string { return "" })
	return code, out.String(), errb.String()
}

// pkiKeys returns the contents of every private key in dir.
func pkiKeys(t *testing.T, dir string) []string {
	t.Helper()
	ms, _ := filepath.Glob(filepath.Join(dir, "*-key.pem"))
	var out []string
	for _, m := range ms {
		b, err := os.ReadFile(m)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, string(b))
	}
	return out
}

// TestMeshctlPKIFiles: init, issue and issue-server write the expected
// files with private modes, refuse to overwrite without --force, reject
// bad names, and never print a key.
func TestMeshctlPKIFiles(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	var printed strings.Builder
	must := func(args ...string) string {
		t.Helper()
		code, out, errs := pkiRun(t, args...)
		printed.WriteString(out + errs)
		if code != exitOK {
			t.Fatalf("meshctl %v: exit %d: %s", args, code, errs)
		}
		return out
	}
	must("pki", "init", "--dir", dir, "--cluster", "prod")
	must("pki", "issue", "worker001", "--dir", dir)
	must("pki", "issue", "root", "--dir", dir, "--days", "30")
	must("pki", "issue-server", "etcd0", "--dir", dir, "--ip", "127.0.0.1", "--dns", "etcd0.example")
	must("pki", "issue", "edge1", "--dir", dir, "--key-type", "ed25519")

	for _, f := range []string{"ca-key.pem", "worker001-key.pem", "root-key.pem", "etcd0-key.pem", "edge1-key.pem"} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v", f, st.Mode().Perm())
		}
	}
	caBefore, _ := os.ReadFile(filepath.Join(dir, "ca.pem"))
	keyBefore, _ := os.ReadFile(filepath.Join(dir, "worker001-key.pem"))

	if code, _, errs := pkiRun(t, "pki", "init", "--dir", dir); code != exitFailed || !strings.Contains(errs, "already exists") {
		t.Errorf("second init: exit %d, %q", code, errs)
	}
	if code, _, errs := pkiRun(t, "pki", "issue", "worker001", "--dir", dir); code != exitFailed || !strings.Contains(errs, "--force") {
		t.Errorf("re-issue without --force: exit %d, %q", code, errs)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "ca.pem")); !bytes.Equal(b, caBefore) {
		t.Error("refused init changed ca.pem")
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "worker001-key.pem")); !bytes.Equal(b, keyBefore) {
		t.Error("refused issue changed the key")
	}
	must("pki", "issue", "worker001", "--dir", dir, "--force")
	if b, _ := os.ReadFile(filepath.Join(dir, "worker001-key.pem")); bytes.Equal(b, keyBefore) {
		t.Error("--force did not rotate the key")
	}

	for _, args := range [][]string{
		{"pki", "issue", "../evil", "--dir", dir},
		{"pki", "issue", "a b", "--dir", dir},
		{"pki", "issue", "worker001"},
		{"pki", "issue-server", "etcd1", "--dir", dir, "--ip", "not-an-ip"},
		{"pki", "init", "--dir", dir, "--key-type", "rsa"},
		{"pki", "issue", "n", "--dir", dir, "--days", "-1"},
		{"pki", "frobnicate"},
	} {
		if code, _, _ := pkiRun(t, args...); code != exitUsage {
			t.Errorf("meshctl %v: exit %d, want %d", args, code, exitUsage)
		}
	}
	if code, _, errs := pkiRun(t, "pki", "issue-server", "etcd1", "--dir", dir); code == exitOK {
		t.Errorf("server cert without --ip/--dns accepted: %s", errs)
	}

	out := must("pki", "list", "--dir", dir)
	for _, want := range []string{"ca.pem", "worker001.pem", "root.pem", "etcd0.pem", "server", "client", "ca "} {
		if !strings.Contains(out, want) {
			t.Errorf("list lacks %q:\n%s", want, out)
		}
	}
	if code, _, errs := pkiRun(t, "pki", "list", "--dir", dir, "--expiring", "60"); code != exitFailed || !strings.Contains(errs, "root.pem") {
		t.Errorf("list --expiring 60: exit %d %q (root.pem lasts 30 days)", code, errs)
	}

	for _, k := range pkiKeys(t, dir) {
		body := strings.Split(strings.TrimSpace(k), "\n")[1]
		if strings.Contains(printed.String(), body) {
			t.Fatal("a private key was printed")
		}
	}
}

// TestMeshctlEtcdRolesApply drives the whole flow an operator follows:
// pki init/issue, an etcd with --client-cert-auth using those files,
// `etcd roles apply` with the root certificate, then checks that the node
// certificate is confined and cannot change roles itself.
func TestMeshctlEtcdRolesApply(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "pki")
	for _, args := range [][]string{
		{"pki", "init", "--dir", dir},
		{"pki", "issue-server", "etcd0", "--dir", dir, "--ip", "127.0.0.1"},
		{"pki", "issue", "root", "--dir", dir},
		{"pki", "issue", "worker001", "--dir", dir},
		{"pki", "issue", "worker002", "--dir", dir},
	} {
		if code, _, errs := pkiRun(t, args...); code != exitOK {
			t.Fatalf("meshctl %v: %s", args, errs)
		}
	}
	files := func(cn string) etcdtest.TLSFiles {
		return etcdtest.TLSFiles{CAFile: filepath.Join(dir, "ca.pem"), CertFile: filepath.Join(dir, cn+".pem"), KeyFile: filepath.Join(dir, cn+"-key.pem")}
	}
	srv := etcdtest.NewTLS(t, files("etcd0"))
	as := func(cn string, args ...string) (int, string, string) {
		f := files(cn)
		return pkiRun(t, append([]string{"--endpoints", srv.Endpoint(), "--cacert", f.CAFile, "--cert", f.CertFile, "--key", f.KeyFile}, args...)...)
	}
	root := etcdtest.NewTLSClient(t, srv, files("root"))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := root.Put(ctx, registry.MetaKey(registry.GroupBackends, "api"), `{"publish":{"port":8080}}`); err != nil {
		t.Fatal(err)
	}

	code, out, errs := as("root", "etcd", "roles", "apply", "--node", "worker001", "--node", "worker002", "--dry-run")
	if code != exitOK || !strings.Contains(out, "would enable auth") {
		t.Fatalf("dry run: exit %d\n%s%s", code, out, errs)
	}
	if st, _ := root.AuthStatus(ctx); st.Enabled {
		t.Fatal("dry run enabled auth")
	}
	code, out, errs = as("root", "etcd", "roles", "apply", "--node", "worker001", "--node", "worker002")
	if code != exitOK || !strings.Contains(out, "auth enabled") || !strings.Contains(out, "claim subnet 10.10.0.0/24 for node worker001") {
		t.Fatalf("apply: exit %d\n%s%s", code, out, errs)
	}
	code, out, _ = as("root", "etcd", "roles", "apply")
	if code != exitOK || !strings.Contains(out, "0 changes") {
		t.Errorf("second apply:\n%s", out)
	}
	code, out, _ = as("root", "etcd", "roles", "show", "--node", "worker001")
	if code != exitOK || !strings.Contains(out, "write     /cluster/backends/api/instances/worker001") || !strings.Contains(out, "read      /meshd/secrets/worker001/*") {
		t.Errorf("show:\n%s", out)
	}

	// The node certificate may neither change roles nor write B's keys.
	if code, _, errs := as("worker001", "etcd", "roles", "apply", "--node", "worker001"); code != exitFailed || !strings.Contains(errs, "permission denied") {
		t.Errorf("node runs roles apply: exit %d %q", code, errs)
	}
	w1 := etcdtest.NewTLSClient(t, srv, files("worker001"))
	if _, err := w1.Put(ctx, registry.NodeKey("worker002"), "x"); err == nil || !strings.Contains(err.Error(), "permission denied") {
		t.Errorf("worker001 writes worker002's entry: %v", err)
	}
	if _, err := w1.Put(ctx, registry.NodeKey("worker001"), `{"name":"worker001","ipv4":"192.0.2.1"}`); err != nil {
		t.Errorf("worker001 writes its entry: %v", err)
	}

	// Revocation cuts the certificate off.
	if code, out, errs := as("root", "etcd", "roles", "revoke", "worker001"); code != exitOK || !strings.Contains(out, "delete user worker001") {
		t.Fatalf("revoke: exit %d %s%s", code, out, errs)
	}
	if _, err := w1.Get(ctx, registry.ClusterPrefix, clientv3.WithPrefix()); err == nil {
		t.Error("revoked certificate still reads /cluster/")
	}
	for _, args := range [][]string{{"etcd"}, {"etcd", "roles"}, {"etcd", "roles", "apply", "--node", "root"}, {"etcd", "roles", "apply", "--subnet-len", "40"}, {"etcd", "roles", "revoke"}} {
		if code, _, _ := as("root", args...); code != exitUsage {
			t.Errorf("meshctl %v: exit %d, want %d", args, code, exitUsage)
		}
	}
}
