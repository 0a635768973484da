package creds

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/registry"
)

// secretValue returns a distinctive random clear value, long enough that
// finding it anywhere cannot be a coincidence.
func secretValue(label string) []byte {
	b := make([]byte, 16)
	rand.Read(b)
	return []byte(label + "-" + hex.EncodeToString(b))
}

// metricValue reads an unlabelled gauge or counter from the node's registry.
func metricValue(t *testing.T, n *testNode, name string) float64 {
	t.Helper()
	mfs, err := n.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name || len(mf.Metric) != 1 {
			continue
		}
		m := mf.Metric[0]
		if g := m.GetGauge(); g != nil {
			return g.GetValue()
		}
		return m.GetCounter().GetValue()
	}
	t.Fatalf("metric %s not registered", name)
	return 0
}

func status(t *testing.T, c *Component) Status {
	t.Helper()
	// Round-trip through JSON: that is what the agent publishes.
	b, err := json.Marshal(c.Status())
	if err != nil {
		t.Fatal(err)
	}
	var st Status
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

func TestDeliveryWithEtcdAndSystemdCreds(t *testing.T) {
	needSystemdCreds(t)
	ctx := context.Background()
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)

	units := map[string]SecretUse{
		"db-password": {Units: []string{"app.service", "worker.service"}},
		"api-token":   {Units: []string{"proxy.service"}, Action: "reload"},
	}
	a := newTestNode(t, "node-a", units)
	b := newTestNode(t, "node-b", nil)
	addMember(t, cli, "node-a", 1, a.comp.Recipient())
	addMember(t, cli, "node-b", 2, b.comp.Recipient())
	// A credential meshd did not write: it must survive everything.
	if err := os.MkdirAll(a.credstore, 0o700); err != nil {
		t.Fatal(err)
	}
	foreign := filepath.Join(a.credstore, "foreign")
	if err := os.WriteFile(foreign, []byte("not ours"), 0o600); err != nil {
		t.Fatal(err)
	}

	db1, db2, tok := secretValue("db1"), secretValue("db2"), secretValue("tok")
	res, err := PutSecret(ctx, cli, "db-password", db1, Targets{Nodes: []string{"node-a", "node-b"}})
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(PutResult{Version: 1, Revision: res.Revision, Nodes: []string{"node-a", "node-b"}}, res); diff != "" {
		t.Errorf("put (-want +got):\n%s", diff)
	}
	if _, err := PutSecret(ctx, cli, "api-token", tok, Targets{Nodes: []string{"node-a"}}); err != nil {
		t.Fatal(err)
	}

	// First delivery.
	if err := a.comp.Apply(ctx, snapshotFor(t, cli, "node-a")); err != nil {
		t.Fatal(err)
	}
	dbFile := filepath.Join(a.credstore, "db-password")
	if got := decryptCred(t, a.env, "db-password", dbFile); !bytes.Equal(got, db1) {
		t.Errorf("credential decrypts to something else than version 1")
	}
	if got := decryptCred(t, a.env, "api-token", filepath.Join(a.credstore, "api-token")); !bytes.Equal(got, tok) {
		t.Errorf("api-token credential decrypts to something else")
	}
	fi, err := os.Stat(dbFile)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("credential mode %v, want 0600", fi.Mode().Perm())
	}
	if diff := cmp.Diff([]string{"restart app.service", "reload proxy.service", "restart worker.service"}, a.mgr.take()); diff != "" {
		t.Errorf("unit actions on first delivery (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff(Status{Delivered: map[string]int64{"db-password": 1, "api-token": 1}, Recipient: a.comp.Recipient()}, status(t, a.comp)); diff != "" {
		t.Errorf("status (-want +got):\n%s", diff)
	}

	// The same snapshot again changes nothing.
	before, _ := os.ReadFile(dbFile)
	if err := a.comp.Apply(ctx, snapshotFor(t, cli, "node-a")); err != nil {
		t.Fatal(err)
	}
	after, _ := os.ReadFile(dbFile)
	if !bytes.Equal(before, after) {
		t.Error("credential rewritten without a change")
	}
	if calls := a.mgr.take(); len(calls) != 0 {
		t.Errorf("units touched without a change: %v", calls)
	}

	// Rotation: new file, restart of exactly the declaring units.
	res, err = PutSecret(ctx, cli, "db-password", db2, Targets{Nodes: []string{"node-a", "node-b"}})
	if err != nil {
		t.Fatal(err)
	}
	if res.Version != 2 {
		t.Errorf("rotated version %d, want 2", res.Version)
	}
	if err := a.comp.Apply(ctx, snapshotFor(t, cli, "node-a")); err != nil {
		t.Fatal(err)
	}
	after, _ = os.ReadFile(dbFile)
	if bytes.Equal(before, after) {
		t.Error("credential file unchanged after rotation")
	}
	if got := decryptCred(t, a.env, "db-password", dbFile); !bytes.Equal(got, db2) {
		t.Errorf("rotated credential does not decrypt to version 2")
	}
	if diff := cmp.Diff([]string{"restart app.service", "restart worker.service"}, a.mgr.take()); diff != "" {
		t.Errorf("unit actions on rotation (-want +got):\n%s", diff)
	}
	if got := status(t, a.comp).Delivered["db-password"]; got != 2 {
		t.Errorf("delivered version %d, want 2", got)
	}

	// Node b delivers its own copy with its own key.
	if err := b.comp.Apply(ctx, snapshotFor(t, cli, "node-b")); err != nil {
		t.Fatal(err)
	}
	if got := decryptCred(t, b.env, "db-password", filepath.Join(b.credstore, "db-password")); !bytes.Equal(got, db2) {
		t.Errorf("node b's credential does not decrypt to version 2")
	}

	// A ciphertext sealed to another node is reported, skipped, and the
	// previous credential stays.
	wrong, err := Seal(secretValue("db3"), b.comp.Recipient())
	if err != nil {
		t.Fatal(err)
	}
	v, _ := json.Marshal(registry.SealedSecret{Version: 3, Ciphertext: wrong})
	if _, err := cli.Put(ctx, registry.SecretKey("node-a", "db-password"), string(v)); err != nil {
		t.Fatal(err)
	}
	if err := a.comp.Apply(ctx, snapshotFor(t, cli, "node-a")); err != nil {
		t.Errorf("an unopenable secret made Apply fail (the agent would retry forever): %v", err)
	}
	st := status(t, a.comp)
	if st.Delivered["db-password"] != 2 || !strings.Contains(st.Errors["db-password"], "another recipient") {
		t.Errorf("status after a wrong-recipient ciphertext: %+v", st)
	}
	if got := decryptCred(t, a.env, "db-password", dbFile); !bytes.Equal(got, db2) {
		t.Errorf("previous credential was not kept")
	}
	if calls := a.mgr.take(); len(calls) != 0 {
		t.Errorf("units touched for an undelivered secret: %v", calls)
	}
	if !strings.Contains(a.logs.String(), `"secret":"db-password"`) {
		t.Errorf("the unopenable secret is not named in the logs:\n%s", a.logs)
	}
	if n := metricValue(t, a, "meshd_creds_failing_secrets"); n != 1 {
		t.Errorf("failing gauge %v, want 1", n)
	}

	// A key that does not decode is reported and changes nothing: the
	// last good credential stays.
	tokFile := filepath.Join(a.credstore, "api-token")
	if _, err := cli.Put(ctx, registry.SecretKey("node-a", "api-token"), `{"version":0}`); err != nil {
		t.Fatal(err)
	}
	if err := a.comp.Apply(ctx, snapshotFor(t, cli, "node-a")); err != nil {
		t.Fatal(err)
	}
	if got := decryptCred(t, a.env, "api-token", tokFile); !bytes.Equal(got, tok) {
		t.Error("an undecodable key removed or changed the credential")
	}
	if st := status(t, a.comp); st.Delivered["api-token"] != 1 || !strings.Contains(st.Errors["api-token"], "invalid") {
		t.Errorf("status after an undecodable key: %+v", st)
	}
	if _, err := PutSecret(ctx, cli, "api-token", tok, Targets{Nodes: []string{"node-a"}}); err != nil {
		t.Fatal(err)
	}
	if err := a.comp.Apply(ctx, snapshotFor(t, cli, "node-a")); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"reload proxy.service"}, a.mgr.take()); diff != "" {
		t.Errorf("re-put api-token (-want +got):\n%s", diff)
	}

	// Removal deletes the credential file meshd wrote, and only that.
	rm, err := RemoveSecret(ctx, cli, "db-password", nil)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"node-a", "node-b"}, rm.Nodes); diff != "" {
		t.Errorf("removed from (-want +got):\n%s", diff)
	}
	if err := a.comp.Apply(ctx, snapshotFor(t, cli, "node-a")); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dbFile); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("credential of a removed secret still there: %v", err)
	}
	if _, err := os.Stat(foreign); err != nil {
		t.Errorf("a credential meshd did not write was touched: %v", err)
	}
	st = status(t, a.comp)
	if diff := cmp.Diff(Status{Delivered: map[string]int64{"api-token": 1}, Recipient: a.comp.Recipient()}, st); diff != "" {
		t.Errorf("status after removal (-want +got):\n%s", diff)
	}

	// A restarted meshd (new component, same state dir) knows what it
	// delivered: no rewrite, no restart.
	a2, err := New(Options{Self: "node-a", StateDir: a.stateDir, CredstoreDir: a.credstore, Units: units,
		Creds: SystemdCreds{Env: a.env}, Manager: a.mgr}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if a2.Recipient() != a.comp.Recipient() {
		t.Error("identity changed across restarts")
	}
	tokBefore, _ := os.ReadFile(tokFile)
	if err := a2.Apply(ctx, snapshotFor(t, cli, "node-a")); err != nil {
		t.Fatal(err)
	}
	tokAfter, _ := os.ReadFile(tokFile)
	if !bytes.Equal(tokBefore, tokAfter) || len(a.mgr.take()) != 0 {
		t.Error("restarted component redelivered an unchanged secret")
	}

	// The clear values never reached etcd, the logs, or any file.
	clearValues := [][]byte{db1, db2, tok}
	assertNowhereInEtcd(t, cli, clearValues...)
	assertNotInLogs(t, a.logs.String()+b.logs.String(), clearValues...)
	assertNowhereInFiles(t, []string{a.stateDir, a.credstore, b.stateDir, b.credstore}, clearValues...)
}

func TestSystemdCredsFailureKeepsPreviousCredential(t *testing.T) {
	needSystemdCreds(t)
	ctx := context.Background()
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	n := newTestNode(t, "node-a", map[string]SecretUse{"tls-key": {Units: []string{"app.service"}}})
	addMember(t, cli, "node-a", 1, n.comp.Recipient())
	v1, v2 := secretValue("v1"), secretValue("v2")
	if _, err := PutSecret(ctx, cli, "tls-key", v1, Targets{All: true}); err != nil {
		t.Fatal(err)
	}
	if err := n.comp.Apply(ctx, snapshotFor(t, cli, "node-a")); err != nil {
		t.Fatal(err)
	}
	n.mgr.take()
	if _, err := PutSecret(ctx, cli, "tls-key", v2, Targets{All: true}); err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(n.credstore, "tls-key")

	for name, enc := range map[string]Encrypter{
		"missing binary": SystemdCreds{Binary: "/nonexistent/systemd-creds", Env: n.env},
		"failing binary": SystemdCreds{Binary: "false", Env: n.env},
	} {
		t.Run(name, func(t *testing.T) {
			broken, err := New(Options{Self: "node-a", StateDir: n.stateDir, CredstoreDir: n.credstore,
				Units: n.comp.opts.Units, Creds: enc, Manager: n.mgr}, nil, nil)
			if err != nil {
				t.Fatal(err)
			}
			err = broken.Apply(ctx, snapshotFor(t, cli, "node-a"))
			if err == nil {
				t.Fatal("Apply succeeded without a working systemd-creds")
			}
			if name == "missing binary" && !errors.Is(err, ErrNoSystemdCreds) {
				t.Errorf("err = %v, want ErrNoSystemdCreds", err)
			}
			st := status(t, broken)
			if st.Delivered["tls-key"] != 1 || st.Errors["tls-key"] == "" {
				t.Errorf("status: %+v", st)
			}
			if got := decryptCred(t, n.env, "tls-key", file); !bytes.Equal(got, v1) {
				t.Error("previous credential lost")
			}
			if calls := n.mgr.take(); len(calls) != 0 {
				t.Errorf("units touched although nothing was delivered: %v", calls)
			}
			entries, _ := os.ReadDir(n.credstore)
			for _, e := range entries {
				if strings.HasPrefix(e.Name(), ".") {
					t.Errorf("temporary file left behind: %s", e.Name())
				}
			}
		})
	}

	// Once systemd-creds works again the retry delivers.
	if err := n.comp.Apply(ctx, snapshotFor(t, cli, "node-a")); err != nil {
		t.Fatal(err)
	}
	if got := decryptCred(t, n.env, "tls-key", file); !bytes.Equal(got, v2) {
		t.Error("retry did not deliver version 2")
	}
	if diff := cmp.Diff([]string{"restart app.service"}, n.mgr.take()); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

func TestUnitFailureIsRetried(t *testing.T) {
	needSystemdCreds(t)
	ctx := context.Background()
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	n := newTestNode(t, "node-a", map[string]SecretUse{"s": {Units: []string{"a.service", "b.service"}}})
	addMember(t, cli, "node-a", 1, n.comp.Recipient())
	if _, err := PutSecret(ctx, cli, "s", secretValue("s"), Targets{Nodes: []string{"node-a"}}); err != nil {
		t.Fatal(err)
	}
	n.mgr.fail = map[string]error{"b.service": errors.New("job failed")}
	if err := n.comp.Apply(ctx, snapshotFor(t, cli, "node-a")); err == nil {
		t.Fatal("a failed restart was not returned for retry")
	}
	if st := status(t, n.comp); st.Delivered["s"] != 1 || !strings.Contains(st.Errors["s"], "b.service") {
		t.Errorf("status: %+v", st)
	}
	n.mgr.take()
	n.mgr.fail = nil
	if err := n.comp.Apply(ctx, snapshotFor(t, cli, "node-a")); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"restart a.service", "restart b.service"}, n.mgr.take()); diff != "" {
		t.Errorf("retry (-want +got):\n%s", diff)
	}
	if st := status(t, n.comp); len(st.Errors) != 0 {
		t.Errorf("errors after a successful retry: %v", st.Errors)
	}
	if err := n.comp.Apply(ctx, snapshotFor(t, cli, "node-a")); err != nil || len(n.mgr.take()) != 0 {
		t.Errorf("units restarted again after success (err %v)", err)
	}
}

func TestPutTargetsAndVersions(t *testing.T) {
	ctx := context.Background()
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ids := map[string]string{}
	for i, name := range []string{"ingress1", "worker1", "worker2"} {
		id, err := LoadOrCreateIdentity(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		ids[name] = Recipient(id)
		addMember(t, cli, name, i+1, ids[name])
	}
	addNodeEntry(t, cli, "ingress1", registry.GroupFrontends)
	addNodeEntry(t, cli, "worker1", registry.GroupBackends, registry.GroupServices)
	addNodeEntry(t, cli, "worker2", registry.GroupBackends, registry.GroupServices)
	addNodeEntry(t, cli, "legacy1", registry.GroupServices) // nix-infra only: no member
	addMember(t, cli, "norecip", 9, "")
	for _, n := range []string{"worker1", "worker2", "legacy1"} {
		if err := SetGroups(ctx, cli, n, []registry.Group{registry.GroupServices, registry.GroupBackends}); err != nil {
			t.Fatal(err)
		}
	}

	res, err := PutSecret(ctx, cli, "s", []byte("v"), Targets{Group: registry.GroupServices})
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"worker1", "worker2"}, res.Nodes); diff != "" {
		t.Errorf("group targets (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]string{"legacy1"}, res.Skipped); diff != "" {
		t.Errorf("skipped (-want +got):\n%s", diff)
	}
	res, err = PutSecret(ctx, cli, "s", []byte("v2"), Targets{Nodes: []string{"worker1"}})
	if err != nil {
		t.Fatal(err)
	}
	if res.Version != 2 || !slices.Equal(res.Others, []string{"worker2"}) {
		t.Errorf("second put: %+v", res)
	}
	res, err = PutSecret(ctx, cli, "s", []byte("v3"), Targets{All: true})
	if err != nil {
		t.Fatal(err)
	}
	if res.Version != 3 || !slices.Equal(res.Nodes, []string{"ingress1", "worker1", "worker2"}) || !slices.Equal(res.Skipped, []string{"norecip"}) {
		t.Errorf("--all put: %+v", res)
	}

	// Bad input changes nothing.
	rev := res.Revision
	for name, tc := range map[string]struct {
		name string
		t    Targets
	}{
		"unknown node":  {"s", Targets{Nodes: []string{"worker1", "ghost"}}},
		"no recipient":  {"s", Targets{Nodes: []string{"norecip"}}},
		"two selectors": {"s", Targets{Nodes: []string{"worker1"}, All: true}},
		"no selector":   {"s", Targets{}},
		"bad name":      {"../etc", Targets{All: true}},
		"bad group":     {"s", Targets{Group: "db"}},
		"bad node name": {"s", Targets{Nodes: []string{"a b"}}},
	} {
		if _, err := PutSecret(ctx, cli, tc.name, []byte("v"), tc.t); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if r, _ := cli.Get(ctx, "x"); r.Header.Revision != rev {
		t.Errorf("a rejected put wrote to etcd (revision %d -> %d)", rev, r.Header.Revision)
	}

	// Removal from one node, then everywhere.
	rm, err := RemoveSecret(ctx, cli, "s", []string{"ingress1"})
	if err != nil || !slices.Equal(rm.Nodes, []string{"ingress1"}) {
		t.Fatalf("rm --node: %+v %v", rm, err)
	}
	infos, _, err := ListSecrets(ctx, cli)
	if err != nil {
		t.Fatal(err)
	}
	want := []SecretInfo{{Name: "s", Copies: []Copy{{Node: "worker1", Version: 3}, {Node: "worker2", Version: 3}}}}
	if diff := cmp.Diff(want, infos); diff != "" {
		t.Errorf("list (-want +got):\n%s", diff)
	}
	if _, err := RemoveSecret(ctx, cli, "s", nil); err != nil {
		t.Fatal(err)
	}
	if _, err := RemoveSecret(ctx, cli, "s", nil); !errors.Is(err, ErrNoSecret) {
		t.Errorf("second rm: %v, want ErrNoSecret", err)
	}
	// After removal the version starts again at 1; the component tells the
	// two apart by the ciphertext's fingerprint.
	res, err = PutSecret(ctx, cli, "s", []byte("again"), Targets{Nodes: []string{"worker1"}})
	if err != nil || res.Version != 1 {
		t.Errorf("put after rm: %+v %v", res, err)
	}
}

func TestSlowUnitJobIsNotRepeated(t *testing.T) {
	needSystemdCreds(t)
	ctx := context.Background()
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	n := newTestNode(t, "node-a", map[string]SecretUse{"s": {Units: []string{"slow.service"}}})
	addMember(t, cli, "node-a", 1, n.comp.Recipient())
	if _, err := PutSecret(ctx, cli, "s", secretValue("s"), Targets{Nodes: []string{"node-a"}}); err != nil {
		t.Fatal(err)
	}
	n.mgr.fail = map[string]error{"slow.service": fmt.Errorf("%w after 20s", ErrJobPending)}
	if err := n.comp.Apply(ctx, snapshotFor(t, cli, "node-a")); err != nil {
		t.Fatalf("a queued but slow restart was treated as a failure: %v", err)
	}
	if err := n.comp.Apply(ctx, snapshotFor(t, cli, "node-a")); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"restart slow.service"}, n.mgr.take()); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

// TestGroupSecretsFollowOperatorAssignment: a group secret is sealed to
// the nodes the operator assigned to the group, never to a node whose own
// entry claims it; the recipients are shown before anything is sealed,
// and a refusal writes nothing.
func TestGroupSecretsFollowOperatorAssignment(t *testing.T) {
	ctx := context.Background()
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	for i, name := range []string{"ingress1", "worker2"} {
		id, err := LoadOrCreateIdentity(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		addMember(t, cli, name, i+1, Recipient(id))
	}
	addNodeEntry(t, cli, "ingress1", registry.GroupFrontends)
	var err error
	var res PutResult
	// A worker that adds frontends to its own entry gets no frontends
	// secret: only the operator's assignment counts, and the recipients
	// are shown before anything is sealed.
	addNodeEntry(t, cli, "worker2", registry.GroupBackends, registry.GroupServices, registry.GroupFrontends)
	if _, err := PutSecret(ctx, cli, "tls", []byte("k"), Targets{Group: registry.GroupFrontends}); err == nil || !strings.Contains(err.Error(), "assign") {
		t.Errorf("frontends put with no assignment: %v", err)
	}
	if err := SetGroups(ctx, cli, "ingress1", []registry.Group{registry.GroupFrontends}); err != nil {
		t.Fatal(err)
	}
	var shown []string
	stop := errors.New("operator said no")
	_, err = PutSecret(ctx, cli, "tls", []byte("k"), Targets{Group: registry.GroupFrontends, Confirm: func(n []string) error { shown = n; return stop }})
	if !errors.Is(err, stop) || !slices.Equal(shown, []string{"ingress1"}) {
		t.Errorf("confirm: shown %v, err %v", shown, err)
	}
	if r, _ := cli.Get(ctx, registry.SecretsPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly()); slices.ContainsFunc(r.Kvs, func(kv *mvccpb.KeyValue) bool { return strings.HasSuffix(string(kv.Key), "/tls") }) {
		t.Error("a refused confirmation sealed the secret")
	}
	res, err = PutSecret(ctx, cli, "tls", []byte("k"), Targets{Group: registry.GroupFrontends})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(res.Nodes, []string{"ingress1"}) || !slices.Equal(res.Unassigned, []string{"worker2"}) {
		t.Errorf("frontends put: sealed to %v, unassigned %v; want ingress1 only, worker2 reported", res.Nodes, res.Unassigned)
	}
}
