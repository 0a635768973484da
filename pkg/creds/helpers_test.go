package creds

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/registry"
	"github.com/meshd/meshd/pkg/testlog"
)

// needSystemdCreds skips a test when the real systemd-creds is missing.
func needSystemdCreds(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("systemd-creds"); err != nil {
		t.Skip("systemd-creds not installed (Debian package systemd); this test needs the real binary")
	}
}

// hostKeyEnv points systemd-creds at a host key owned by the test, never
// at the machine's /var/lib/systemd/credential.secret.
func hostKeyEnv(t *testing.T) []string {
	t.Helper()
	return []string{"SYSTEMD_CREDENTIAL_SECRET=" + filepath.Join(t.TempDir(), "credential.secret")}
}

// decryptCred runs `systemd-creds decrypt --name=NAME FILE -`.
func decryptCred(t *testing.T, env []string, name, file string) []byte {
	t.Helper()
	cmd := exec.Command("systemd-creds", "decrypt", "--name="+name, file, "-")
	cmd.Env = append(os.Environ(), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("systemd-creds decrypt %s: %v: %s", file, err, stderr.String())
	}
	return out
}

// fakeManager records unit actions as text lines ("restart app.service").
type fakeManager struct {
	mu    sync.Mutex
	calls []string
	fail  map[string]error // by unit
}

func (m *fakeManager) RestartUnit(ctx context.Context, unit string) error {
	return m.record("restart", unit)
}

func (m *fakeManager) ReloadUnit(ctx context.Context, unit string) error {
	return m.record("reload", unit)
}

func (m *fakeManager) record(verb, unit string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.calls = append(m.calls, verb+" "+unit)
	return m.fail[unit]
}

// take returns and forgets the calls so far.
func (m *fakeManager) take() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	c := m.calls
	m.calls = nil
	return c
}

// newTestLogger logs JSON at debug level into w.
func newTestLogger(w *testlog.Buffer) *slog.Logger {
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// testNode is one node's delivery component with its own directories.
type testNode struct {
	name      string
	stateDir  string
	credstore string
	env       []string
	mgr       *fakeManager
	logs      *testlog.Buffer
	reg       *prometheus.Registry
	comp      *Component
}

func newTestNode(t *testing.T, name string, units map[string]SecretUse) *testNode {
	t.Helper()
	root := t.TempDir()
	n := &testNode{
		name:      name,
		stateDir:  filepath.Join(root, "state"),
		credstore: filepath.Join(root, "credstore.encrypted"),
		env:       hostKeyEnv(t),
		mgr:       &fakeManager{},
		logs:      &testlog.Buffer{},
		reg:       prometheus.NewRegistry(),
	}
	var err error
	n.comp, err = New(Options{
		Self: name, StateDir: n.stateDir, CredstoreDir: n.credstore, Units: units,
		Creds: SystemdCreds{WithKey: "host", Env: n.env}, Manager: n.mgr,
	}, newTestLogger(n.logs), n.reg)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// addMember writes a member record for node with the given age recipient,
// as the agent does when it registers.
func addMember(t *testing.T, cli *clientv3.Client, node string, idx int, recipient string) {
	t.Helper()
	key := make([]byte, 32)
	rand.Read(key)
	subnet := netip.MustParsePrefix(fmt.Sprintf("10.10.%d.0/24", idx))
	m := registry.Member{
		Name: node, PublicKey: base64.StdEncoding.EncodeToString(key),
		Subnet: subnet, OverlayIP: subnet.Addr(), Recipient: recipient,
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(context.Background(), registry.MemberKey(node), string(b)); err != nil {
		t.Fatal(err)
	}
	// The subnet claim that ClaimMember writes with the record.
	claim, _ := json.Marshal(registry.SubnetClaim{Node: node})
	if _, err := cli.Put(context.Background(), registry.SubnetKey(subnet), string(claim)); err != nil {
		t.Fatal(err)
	}
}

// addNodeEntry writes a node entry consuming groups.
func addNodeEntry(t *testing.T, cli *clientv3.Client, node string, groups ...registry.Group) {
	t.Helper()
	b, _ := json.Marshal(registry.Node{Name: node, IPv4: "192.0.2.1", Services: groups})
	if _, err := cli.Put(context.Background(), registry.NodeKey(node), string(b)); err != nil {
		t.Fatal(err)
	}
}

// snapshotFor reads node's secrets the way the agent's watch sees them.
func snapshotFor(t *testing.T, cli *clientv3.Client, node string) *registry.Snapshot {
	t.Helper()
	resp, err := cli.Get(context.Background(), registry.SecretsNodePrefix(node), clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	var kvs []registry.KV
	for _, kv := range resp.Kvs {
		kvs = append(kvs, registry.KV{Key: string(kv.Key), Value: kv.Value})
	}
	return registry.SnapshotOf(kvs, resp.Header.Revision)
}

// assertNowhereInEtcd scans every key and value in etcd for the values.
func assertNowhereInEtcd(t *testing.T, cli *clientv3.Client, values ...[]byte) {
	t.Helper()
	resp, err := cli.Get(context.Background(), "\x00", clientv3.WithFromKey())
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Kvs) == 0 {
		t.Fatal("etcd scan found no keys at all")
	}
	for _, kv := range resp.Kvs {
		for _, v := range values {
			if bytes.Contains(kv.Key, v) || bytes.Contains(kv.Value, v) {
				t.Errorf("clear value found in etcd key %s", kv.Key)
			}
			// A base64 spelling of the value would be just as clear.
			if bytes.Contains(kv.Value, []byte(base64.StdEncoding.EncodeToString(v))) {
				t.Errorf("base64 of the clear value found in etcd key %s", kv.Key)
			}
		}
	}
}

// assertNowhereInFiles scans every file under the directories.
func assertNowhereInFiles(t *testing.T, dirs []string, values ...[]byte) {
	t.Helper()
	files := 0
	for _, dir := range dirs {
		filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			b, err := os.ReadFile(path)
			if err != nil {
				t.Errorf("scan %s: %v", path, err)
				return nil
			}
			files++
			for _, v := range values {
				if bytes.Contains(b, v) || bytes.Contains(b, []byte(base64.StdEncoding.EncodeToString(v))) {
					t.Errorf("clear value found in file %s", path)
				}
			}
			return nil
		})
	}
	if files == 0 {
		t.Error("file scan found no files at all")
	}
}

// assertNotInLogs checks captured log output.
func assertNotInLogs(t *testing.T, logs string, values ...[]byte) {
	t.Helper()
	if logs == "" {
		t.Error("no log output captured")
	}
	for _, v := range values {
		if strings.Contains(logs, string(v)) {
			t.Errorf("clear value found in logs")
		}
	}
}
