package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/creds"
	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/registry"
)

// secretRun runs meshctl against the test etcd and returns its exit code,
// standard output and standard error.
func secretRun(t *testing.T, endpoint string, stdin string, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	code := run(ctx, append([]string{"--endpoints", endpoint}, args...), strings.NewReader(stdin), &stdout, &stderr,
		func(string) string { return "" })
	return code, stdout.String(), stderr.String()
}

// fileEncrypter stands in for systemd-creds in these CLI tests (the real
// one is exercised in pkg/creds): it writes a marker, never the value.
type fileEncrypter struct{}

func (fileEncrypter) Encrypt(ctx context.Context, name string, value []byte, out string) error {
	return os.WriteFile(out, []byte("credential "+name), 0o600)
}

type nopManager struct{}

func (nopManager) RestartUnit(context.Context, string) error { return nil }
func (nopManager) ReloadUnit(context.Context, string) error  { return nil }

// secretNode is a node whose creds component follows its secrets and
// publishes its status the way the agent does, so --wait has someone to
// wait for.
type secretNode struct {
	name      string
	comp      *creds.Component
	credstore string
}

func newSecretNode(t *testing.T, cli *clientv3.Client, name string, idx int, publish bool) *secretNode {
	t.Helper()
	n := &secretNode{name: name, credstore: t.TempDir()}
	var err error
	n.comp, err = creds.New(creds.Options{Self: name, StateDir: t.TempDir(), CredstoreDir: n.credstore,
		Creds: fileEncrypter{}, Manager: nopManager{}}, slog.New(slog.DiscardHandler), nil)
	if err != nil {
		t.Fatal(err)
	}
	key := make([]byte, 32)
	rand.Read(key)
	subnet := netip.MustParsePrefix(fmt.Sprintf("10.10.%d.0/24", idx))
	m, _ := json.Marshal(registry.Member{Name: name, PublicKey: base64.StdEncoding.EncodeToString(key),
		Subnet: subnet, OverlayIP: subnet.Addr(), Recipient: n.comp.Recipient()})
	if _, err := cli.Put(context.Background(), registry.MemberKey(name), string(m)); err != nil {
		t.Fatal(err)
	}
	claim, _ := json.Marshal(registry.SubnetClaim{Node: name})
	if _, err := cli.Put(context.Background(), registry.SubnetKey(subnet), string(claim)); err != nil {
		t.Fatal(err)
	}
	if publish {
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { defer close(done); n.follow(ctx, cli) }()
		t.Cleanup(func() { cancel(); <-done })
	}
	return n
}

// follow applies every change of the node's secrets and publishes the
// status at the revision applied.
func (n *secretNode) follow(ctx context.Context, cli *clientv3.Client) {
	wch := cli.Watch(ctx, registry.SecretsNodePrefix(n.name), clientv3.WithPrefix())
	for {
		resp, err := cli.Get(ctx, registry.SecretsNodePrefix(n.name), clientv3.WithPrefix())
		if err != nil {
			return
		}
		var kvs []registry.KV
		for _, kv := range resp.Kvs {
			kvs = append(kvs, registry.KV{Key: string(kv.Key), Value: kv.Value})
		}
		if err := n.comp.Apply(ctx, registry.SnapshotOf(kvs, resp.Header.Revision)); err != nil {
			return
		}
		cs, _ := json.Marshal(n.comp.Status())
		st, _ := json.Marshal(registry.Status{Node: n.name, Revision: resp.Header.Revision, Seen: resp.Header.Revision,
			Components: map[string]json.RawMessage{"creds": cs}})
		if _, err := cli.Put(ctx, registry.StatusKey(n.name), string(st)); err != nil {
			return
		}
		select {
		case <-ctx.Done():
			return
		case _, ok := <-wch:
			if !ok {
				return
			}
		}
	}
}

func secretValueForTest(label string) string {
	b := make([]byte, 16)
	rand.Read(b)
	return label + "-" + hex.EncodeToString(b)
}

func TestSecretPutListRemove(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ep := srv.Endpoint()
	n1 := newSecretNode(t, cli, "node1", 1, true)
	newSecretNode(t, cli, "node2", 2, true)
	// node3 lost its key: its member record names a recipient it cannot
	// open for.
	newSecretNode(t, cli, "node3", 3, true)
	other, _ := creds.LoadOrCreateIdentity(t.TempDir())
	m, _ := json.Marshal(registry.Member{Name: "node3", PublicKey: base64.StdEncoding.EncodeToString(make([]byte, 32)),
		Subnet: netip.MustParsePrefix("10.10.3.0/24"), OverlayIP: netip.MustParseAddr("10.10.3.0"), Recipient: creds.Recipient(other)})
	cli.Put(context.Background(), registry.MemberKey("node3"), string(m))
	// node4 has a recipient but no meshd running.
	newSecretNode(t, cli, "node4", 4, false)

	v1 := secretValueForTest("v1")
	code, out, errOut := secretRun(t, ep, v1, "secret", "put", "db-password", "--node", "node1,node2", "--wait", "--timeout", "20s")
	if code != exitOK {
		t.Fatalf("put --wait: exit %d: %s%s", code, out, errOut)
	}
	if !strings.Contains(out, "db-password version 1 sealed to node1, node2") {
		t.Errorf("put output: %q", out)
	}
	if _, err := os.Stat(filepath.Join(n1.credstore, "db-password")); err != nil {
		t.Errorf("--wait returned before node1 delivered: %v", err)
	}

	file := filepath.Join(t.TempDir(), "v2")
	v2 := secretValueForTest("v2")
	os.WriteFile(file, []byte(v2), 0o600)
	if code, out, errOut := secretRun(t, ep, "", "secret", "put", "db-password", "--from-file", file, "--node", "node1", "--wait"); code != exitOK ||
		!strings.Contains(errOut, "node2 still hold an older version") {
		t.Errorf("put --from-file: exit %d: %s%s", code, out, errOut)
	}

	// Bad usage is exit 2, a failing put exit 1; neither writes anything.
	rev := currentRevision(t, cli)
	for _, tc := range []struct {
		args []string
		code int
	}{
		{[]string{"secret", "put", "x"}, exitUsage},
		{[]string{"secret", "put", "x", "--node", "node1", "--all"}, exitUsage},
		{[]string{"secret", "put", "../x", "--all"}, exitUsage},
		{[]string{"secret", "put", "x", "--group", "db"}, exitUsage},
		{[]string{"secret", "put", "x", "--node", "ghost"}, exitFailed},
		{[]string{"secret", "frobnicate"}, exitUsage},
	} {
		if code, _, errOut := secretRun(t, ep, "value", tc.args...); code != tc.code {
			t.Errorf("%v: exit %d, want %d (%s)", tc.args, code, tc.code, errOut)
		}
	}
	if code, _, _ := secretRun(t, ep, "", "secret", "put", "x", "--all"); code != exitUsage {
		t.Errorf("empty value: exit %d, want %d", code, exitUsage)
	}
	if got := currentRevision(t, cli); got != rev {
		t.Errorf("rejected commands wrote to etcd (revision %d -> %d)", rev, got)
	}

	// A node that cannot open its copy makes --wait fail, naming it.
	code, _, errOut = secretRun(t, ep, "v", "secret", "put", "api-token", "--node", "node3", "--wait", "--timeout", "20s")
	if code != exitFailed || !strings.Contains(errOut, "node3") || !strings.Contains(errOut, "another recipient") {
		t.Errorf("put to a node that cannot open it: exit %d: %s", code, errOut)
	}
	// A node that never applies makes --wait time out (exit 3).
	code, _, errOut = secretRun(t, ep, "v", "secret", "put", "cache-key", "--node", "node4", "--wait", "--timeout", "300ms")
	if code != exitTimeout || !strings.Contains(errOut, "node4") {
		t.Errorf("put to a silent node: exit %d: %s", code, errOut)
	}

	code, out, _ = secretRun(t, ep, "", "secret", "list", "-o", "json")
	if code != exitOK {
		t.Fatalf("list: exit %d", code)
	}
	var infos []creds.SecretInfo
	if err := json.Unmarshal([]byte(out), &infos); err != nil {
		t.Fatalf("list -o json: %v\n%s", err, out)
	}
	if len(infos) == 0 || len(infos[0].Copies) == 0 || !strings.Contains(infos[0].Copies[0].Error, "another recipient") {
		t.Fatalf("list does not show node3's error:\n%s", out)
	}
	want := []creds.SecretInfo{
		{Name: "api-token", Copies: []creds.Copy{{Node: "node3", Version: 1, Reported: true,
			Error: infos[0].Copies[0].Error}}},
		{Name: "cache-key", Copies: []creds.Copy{{Node: "node4", Version: 1}}},
		{Name: "db-password", Copies: []creds.Copy{
			{Node: "node1", Version: 2, Delivered: 2, Reported: true},
			{Node: "node2", Version: 1, Delivered: 1, Reported: true},
		}},
	}
	if diff := cmp.Diff(want, infos); diff != "" {
		t.Errorf("list (-want +got):\n%s", diff)
	}
	code, table, _ := secretRun(t, ep, "", "secret", "list")
	if code != exitOK || !strings.Contains(table, "db-password  node1  2        2          delivered") ||
		!strings.Contains(table, "cache-key    node4  1        -          unknown") {
		t.Errorf("list table:\n%s", table)
	}
	for _, o := range []string{out, table} {
		if strings.Contains(o, "AGE ENCRYPTED") || strings.Contains(o, v1) || strings.Contains(o, v2) {
			t.Errorf("list shows a ciphertext or a value:\n%s", o)
		}
	}

	if code, out, errOut := secretRun(t, ep, "", "secret", "rm", "db-password", "--wait", "--timeout", "20s"); code != exitOK {
		t.Errorf("rm --wait: exit %d: %s%s", code, out, errOut)
	}
	if _, err := os.Stat(filepath.Join(n1.credstore, "db-password")); !os.IsNotExist(err) {
		t.Errorf("credential still there after rm --wait: %v", err)
	}
	if code, _, _ := secretRun(t, ep, "", "secret", "rm", "db-password"); code != exitFailed {
		t.Errorf("rm of a missing secret: exit %d, want %d", code, exitFailed)
	}
	assertNotInEtcd(t, cli, v1, v2)
}

func TestSecretImport(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ep := srv.Endpoint()
	newSecretNode(t, cli, "worker1", 1, true)
	newSecretNode(t, cli, "worker2", 2, true)
	dir := t.TempDir()
	values := map[string]string{"mongodb-app-credentials": secretValueForTest("mongo"), "api-key": secretValueForTest("api")}
	for name, v := range values {
		// nix-infra's `openssl enc -a` wraps base64 at 64 columns.
		enc := base64.StdEncoding.EncodeToString([]byte(v))
		os.WriteFile(filepath.Join(dir, name), []byte(enc[:40]+"\n"+enc[40:]+"\n"), 0o400)
	}

	code, out, errOut := secretRun(t, ep, "", "secret", "import", dir, "--all", "--wait", "--timeout", "20s")
	if code != exitOK {
		t.Fatalf("import: exit %d: %s%s", code, out, errOut)
	}
	if !strings.Contains(errOut, "never really encrypted") {
		t.Errorf("import printed no warning: %q", errOut)
	}
	if !strings.Contains(out, "imported 2 secrets") {
		t.Errorf("import output: %q", out)
	}
	infos, _, err := creds.ListSecrets(context.Background(), cli)
	if err != nil {
		t.Fatal(err)
	}
	if len(infos) != 2 || infos[0].Name != "api-key" || len(infos[0].Copies) != 2 || infos[0].Copies[0].State() != "delivered" {
		t.Errorf("after import: %+v", infos)
	}

	// One bad file: nothing is imported.
	bad := t.TempDir()
	os.WriteFile(filepath.Join(bad, "good"), []byte(base64.StdEncoding.EncodeToString([]byte("x"))), 0o400)
	os.WriteFile(filepath.Join(bad, "bad"), []byte("%%%"), 0o400)
	rev := currentRevision(t, cli)
	if code, _, errOut := secretRun(t, ep, "", "secret", "import", bad, "--all"); code != exitFailed || !strings.Contains(errOut, "bad") {
		t.Errorf("import of a bad dir: exit %d: %s", code, errOut)
	}
	if got := currentRevision(t, cli); got != rev {
		t.Errorf("a failed import wrote to etcd")
	}
	vals := make([]string, 0, len(values))
	for _, v := range values {
		vals = append(vals, v)
	}
	assertNotInEtcd(t, cli, vals...)
}

func currentRevision(t *testing.T, cli *clientv3.Client) int64 {
	t.Helper()
	resp, err := cli.Get(context.Background(), "meshctl-test-revision-probe")
	if err != nil {
		t.Fatal(err)
	}
	return resp.Header.Revision
}

func assertNotInEtcd(t *testing.T, cli *clientv3.Client, values ...string) {
	t.Helper()
	resp, err := cli.Get(context.Background(), "\x00", clientv3.WithFromKey())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range resp.Kvs {
		for _, v := range values {
			if bytes.Contains(kv.Value, []byte(v)) || bytes.Contains(kv.Value, []byte(base64.StdEncoding.EncodeToString([]byte(v)))) {
				t.Errorf("clear value in etcd key %s", kv.Key)
			}
		}
	}
}

// TestSecretListEscapesNodeText: the error a node reports for a secret is
// its own text; `secret list` prints it on one line of the table, cut
// short, with escape sequences and control characters written out, so
// the node can neither fake table rows nor drive the operator's terminal.
func TestSecretListEscapesNodeText(t *testing.T) {
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ctx := context.Background()
	if _, err := cli.Put(ctx, registry.SecretKey("node1", "db"), `{"version":1,"ciphertext":"x"}`); err != nil {
		t.Fatal(err)
	}
	hostile := "\x1b[2J\x1b]0;owned\x07bad\rnode9\tdb\t7\t7\tdelivered\t" + strings.Repeat("A", 3000)
	st, _ := json.Marshal(map[string]any{"node": "node1", "revision": 1, "components": map[string]any{
		"creds": map[string]any{"delivered": map[string]int{}, "errors": map[string]string{"db": hostile}}}})
	if _, err := cli.Put(ctx, registry.StatusKey("node1"), string(st)); err != nil {
		t.Fatal(err)
	}
	code, out, errOut := ctlRun(t, srv.Endpoint(), "secret", "list")
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	if strings.ContainsAny(out, "\x1b\x07\r") {
		t.Errorf("raw control characters reach the terminal: %q", out)
	}
	if lines := strings.Split(strings.TrimSpace(out), "\n"); len(lines) != 2 || len(out) > 1000 {
		t.Errorf("want a header and one row of bounded size, got %d lines, %d bytes", len(lines), len(out))
	}
	if !strings.Contains(out, `\x1b[2J`) {
		t.Errorf("escape not written out: %q", out)
	}
}
