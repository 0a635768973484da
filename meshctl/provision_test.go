package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	clientv3 "go.etcd.io/etcd/client/v3"
	"sigs.k8s.io/yaml"

	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/hetzner"
	"github.com/meshd/meshd/pkg/hetzner/hcloudfake"
	"github.com/meshd/meshd/pkg/registry"
)

const hzTestToken = "hz-meshctl-test-t0ken"

// hzHarness runs meshctl against the fake API and, when etcd is set, a
// real etcd.
type hzHarness struct {
	t      *testing.T
	fake   *hcloudfake.Server
	env    map[string]string
	keyPub string
	etcd   string
}

func newHzHarness(t *testing.T) *hzHarness {
	dir := t.TempDir()
	pub := filepath.Join(dir, "id_ed25519.pub")
	line := "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBRpxh7HUDJ5pkLUvXU9/+qfQP3Oel8hL63jwQHzJ9Vx ops@laptop\n"
	if err := os.WriteFile(pub, []byte(line), 0o644); err != nil {
		t.Fatal(err)
	}
	f := hcloudfake.New(t, hzTestToken)
	return &hzHarness{t: t, fake: f, keyPub: pub, env: map[string]string{
		"HCLOUD_TOKEN": hzTestToken, "HCLOUD_ENDPOINT": f.URL(), "MESHCTL_CLUSTER": "prod",
	}}
}

// run runs meshctl and returns its exit code, stdout and stderr.
func (h *hzHarness) run(stdin string, args ...string) (int, string, string) {
	h.t.Helper()
	return h.runCtx(context.Background(), strings.NewReader(stdin), args...)
}

func (h *hzHarness) runCtx(ctx context.Context, stdin io.Reader, args ...string) (int, string, string) {
	h.t.Helper()
	var out, errb bytes.Buffer
	if h.etcd != "" {
		args = append([]string{"--endpoints", h.etcd}, args...)
	}
	code := run(ctx, args, stdin, &out, &errb, func(k string) string { return h.env[k] })
	for _, s := range []string{out.String(), errb.String()} {
		if strings.Contains(s, hzTestToken) {
			h.t.Errorf("meshctl %v printed the API token:\n%s", args, s)
		}
	}
	return code, out.String(), errb.String()
}

func (h *hzHarness) provisionArgs(names ...string) []string {
	return append([]string{"provision", "--ssh-key-file", h.keyPub, "--network", "prod-net", "--poll-interval", "1ms"}, names...)
}

func TestMeshctlProvisionRerunDestroyAndCloud(t *testing.T) {
	h := newHzHarness(t)
	// One 429 (waited out by its RateLimit-Reset, at most a second and a
	// half with jitter) and one 502.
	h.fake.Inject(hcloudfake.Fault{Method: "GET", Path: "/servers", Status: http.StatusTooManyRequests,
		Code: "rate_limit_exceeded", Message: "slow down"})
	h.fake.Inject(hcloudfake.Fault{Method: "GET", Path: "/ssh_keys", Status: http.StatusBadGateway,
		Code: "bad_gateway", Message: "upstream"})

	code, out, stderr := h.run("", append(h.provisionArgs("node1", "node2", "node3"), "-o", "json")...)
	if code != exitOK {
		t.Fatalf("provision exit %d\n%s", code, stderr)
	}
	var res []hetzner.ServerResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("-o json output: %v\n%s", err, out)
	}
	if len(res) != 3 {
		t.Fatalf("results: %+v", res)
	}
	for _, r := range res {
		if r.Outcome != hetzner.OutcomeCreated || r.ID == 0 || r.IPv4 == "" || r.PrivateIP == "" || r.Status != "running" {
			t.Errorf("result %+v", r)
		}
	}
	for _, n := range []string{"node1", "node2", "node3"} {
		if !strings.Contains(stderr, n+": created (id") {
			t.Errorf("progress lacks %s:\n%s", n, stderr)
		}
	}
	for _, path := range []string{"/servers", "/ssh_keys"} {
		if reqs := h.fake.RequestsTo("GET", path); len(reqs) < 2 || reqs[0].Status < 429 || reqs[1].Status != 200 {
			t.Errorf("GET %s not retried after the injected error", path)
		}
	}

	// Re-run: a table, every server reported as existing, nothing created.
	posts := len(h.fake.RequestsTo("POST", "/servers"))
	code, out, stderr = h.run("", h.provisionArgs("node1", "node2", "node3")...)
	if code != exitOK {
		t.Fatalf("re-run exit %d\n%s", code, stderr)
	}
	if got := len(h.fake.RequestsTo("POST", "/servers")); got != posts {
		t.Errorf("re-run created %d servers", got-posts)
	}
	if !strings.HasPrefix(out, "NAME") || strings.Count(out, " exists") != 3 {
		t.Errorf("re-run table:\n%s", out)
	}

	// The registry: node2 has every kind of key; node1 and node3 are
	// joined; "ghost" has keys but no server; node4 is a server that
	// never joined.
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	h.etcd = srv.Endpoint()
	for i, n := range []string{"node1", "node2", "node3", "ghost"} {
		seedNode(t, cli, n, i+1)
	}
	h.fake.AddServer("node4", map[string]string{hetzner.LabelCluster: "prod", hetzner.LabelRole: "worker"})
	h.fake.AddServer("other", map[string]string{hetzner.LabelCluster: "staging"})

	code, out, stderr = h.run("", "cloud", "-o", "json")
	if code != exitOK {
		t.Fatalf("cloud exit %d\n%s", code, stderr)
	}
	var rows []hetzner.InventoryRow
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		t.Fatalf("cloud -o json: %v\n%s", err, out)
	}
	states := map[string]string{}
	for _, r := range rows {
		states[r.Name] = r.State
	}
	want := map[string]string{"node1": "joined", "node2": "joined", "node3": "joined", "node4": "never joined", "ghost": "no server"}
	if diff := cmp.Diff(want, states); diff != "" {
		t.Errorf("cloud states (-want +got):\n%s", diff)
	}
	// -o yaml is the same document, and list is optional.
	code, out, stderr = h.run("", "cloud", "list", "-o", "yaml")
	var yrows []hetzner.InventoryRow
	if err := yaml.Unmarshal([]byte(out), &yrows); err != nil || code != exitOK || !cmp.Equal(rows, yrows) {
		t.Errorf("cloud list -o yaml: exit %d, %v, stderr %q, rows differ from -o json:\n%s", code, err, stderr, out)
	}

	// Refusals change nothing: a name outside the cluster, and "no".
	if code, _, stderr = h.run("", "destroy", "node2", "other", "--yes"); code != exitUsage || !strings.Contains(stderr, "other") {
		t.Errorf("destroy of a name outside the cluster: exit %d\n%s", code, stderr)
	}
	if code, _, stderr = h.run("n\n", "destroy", "node2"); code != exitFailed || !strings.Contains(stderr, "Continue? [y/N]") {
		t.Errorf("destroy answered no: exit %d\n%s", code, stderr)
	}
	if _, ok := h.fake.ServerByName("node2"); !ok || len(keysOf(t, cli, "node2")) == 0 {
		t.Fatal("a refused destroy deleted something")
	}

	code, out, stderr = h.run("yes\n", "destroy", "node2")
	if code != exitOK {
		t.Fatalf("destroy exit %d\n%s\n%s", code, out, stderr)
	}
	if _, ok := h.fake.ServerByName("node2"); ok {
		t.Error("server node2 still exists")
	}
	if keys := keysOf(t, cli, "node2"); len(keys) != 0 {
		t.Errorf("node2's keys survived destroy: %v", keys)
	}
	if keys := keysOf(t, cli, "node1"); len(keys) != 5 {
		t.Errorf("node1's keys = %v, want its 5 keys untouched", keys)
	}
	if !strings.Contains(out, "node2") || !strings.Contains(out, "deleted") {
		t.Errorf("destroy table:\n%s", out)
	}
	if diff := cmp.Diff([]string{"node1", "node3", "node4", "other"}, h.fake.ServerNames()); diff != "" {
		t.Errorf("servers after destroy (-want +got):\n%s", diff)
	}
	// A registry-only name is cleaned up too.
	if code, _, stderr = h.run("", "destroy", "ghost", "--yes"); code != exitOK || len(keysOf(t, cli, "ghost")) != 0 {
		t.Errorf("destroy ghost: exit %d, keys %v\n%s", code, keysOf(t, cli, "ghost"), stderr)
	}
}

func TestMeshctlProvisionFailureMidwayThenRerun(t *testing.T) {
	h := newHzHarness(t)
	h.fake.Inject(hcloudfake.Fault{Method: "POST", Path: "/servers", BodyContains: `"name":"node2"`,
		Status: http.StatusServiceUnavailable, Code: "resource_unavailable", Message: "cpx22 is sold out in hel1"})
	code, out, stderr := h.run("", h.provisionArgs("node1", "node2", "node3")...)
	if code != exitFailed {
		t.Fatalf("exit %d, want %d\n%s", code, exitFailed, stderr)
	}
	for _, want := range []string{"server node2", "cpx22 is sold out in hel1 (resource_unavailable)"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, stderr)
		}
	}
	if !strings.Contains(out, "node2") || !strings.Contains(out, "failed") {
		t.Errorf("table does not show the failure:\n%s", out)
	}
	if code, _, stderr = h.run("", h.provisionArgs("node1", "node2", "node3")...); code != exitOK {
		t.Fatalf("re-run exit %d\n%s", code, stderr)
	}
	var created []string
	for _, r := range h.fake.RequestsTo("POST", "/servers") {
		if r.Status == http.StatusCreated {
			var body struct{ Name string }
			_ = json.Unmarshal(r.Body, &body)
			created = append(created, body.Name)
		}
	}
	slices.Sort(created)
	if diff := cmp.Diff([]string{"node1", "node2", "node3"}, created); diff != "" {
		t.Errorf("servers created over both runs (-want +got):\n%s", diff)
	}
}

func TestMeshctlProvisionUserDataOverride(t *testing.T) {
	h := newHzHarness(t)
	ud := filepath.Join(t.TempDir(), "user-data")
	const content = "#cloud-config\nruncmd:\n  - echo custom\n"
	if err := os.WriteFile(ud, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if code, _, stderr := h.run("", append(h.provisionArgs("node1", "node2"), "--user-data", ud, "--role", "ingress")...); code != exitOK {
		t.Fatalf("exit %d\n%s", code, stderr)
	}
	for _, n := range []string{"node1", "node2"} {
		if got := h.fake.UserData(n); got != content {
			t.Errorf("%s user data = %q, want the file verbatim", n, got)
		}
		if s, _ := h.fake.ServerByName(n); s.Labels[hetzner.LabelRole] != "ingress" {
			t.Errorf("%s labels %v", n, s.Labels)
		}
	}
	// Without --user-data the generated cloud-config is sent.
	if code, _, stderr := h.run("", h.provisionArgs("node3")...); code != exitOK {
		t.Fatalf("exit %d\n%s", code, stderr)
	}
	if got := h.fake.UserData("node3"); !strings.HasPrefix(got, "#cloud-config\n# Rendered by meshctl provision: node node3 (worker)") {
		t.Errorf("node3 user data:\n%s", got)
	}
}

func TestMeshctlHetznerTokenAndUsage(t *testing.T) {
	h := newHzHarness(t)
	// A wrong token: the fake echoes the Authorization header in its
	// error, and meshctl must still not print the token.
	h.env["HCLOUD_TOKEN"] = ""
	tokenFile := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tokenFile, []byte(hzTestToken+"-wrong\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, out, stderr := h.run("", append(h.provisionArgs("node1"), "--token-file", tokenFile)...)
	if code != exitFailed || !strings.Contains(stderr, "unauthorized") || !strings.Contains(stderr, "[REDACTED]") {
		t.Errorf("wrong token: exit %d\n%s\n%s", code, out, stderr)
	}
	// The right token from the file works.
	if err := os.WriteFile(tokenFile, []byte(hzTestToken+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if code, _, stderr = h.run("", append(h.provisionArgs("node1"), "--token-file", tokenFile)...); code != exitOK {
		t.Errorf("token file: exit %d\n%s", code, stderr)
	}

	for name, args := range map[string][]string{
		"no token":        h.provisionArgs("node2"),
		"bad name":        append(h.provisionArgs("bad_name"), "--token-file", tokenFile),
		"bad label":       append(h.provisionArgs("node2"), "--labels", "meshd/cluster=x", "--token-file", tokenFile),
		"bad role":        append(h.provisionArgs("node2"), "--role", "boss", "--token-file", tokenFile),
		"no names":        {"provision", "--token-file", tokenFile},
		"private ssh key": {"provision", "node2", "--ssh-key-file", tokenFile, "--token-file", tokenFile},
	} {
		if code, _, stderr := h.run("", args...); code != exitUsage {
			t.Errorf("%s: exit %d, want %d\n%s", name, code, exitUsage, stderr)
		}
	}
	delete(h.env, "MESHCTL_CLUSTER")
	if code, _, stderr := h.run("", "cloud", "--token-file", tokenFile); code != exitUsage || !strings.Contains(stderr, "--cluster") {
		t.Errorf("no cluster: exit %d\n%s", code, stderr)
	}
	if n := len(h.fake.RequestsTo("POST", "/servers")); n != 1 {
		t.Errorf("%d servers created, want only the one with a valid token", n)
	}
}

// seedNode writes every kind of registry key of a node: entry, member,
// subnet claim, status and one instance (5 keys), plus a secret.
func seedNode(t *testing.T, cli *clientv3.Client, n string, i int) {
	t.Helper()
	put := func(k string, v any) {
		b, _ := json.Marshal(v)
		if _, err := cli.Put(context.Background(), k, string(b)); err != nil {
			t.Fatal(err)
		}
	}
	subnet := "10.10." + string(rune('0'+i)) + ".0/24"
	put(registry.NodeKey(n), map[string]any{"name": n, "ipv4": "203.0.113.9", "services": []string{"backends"}})
	put(registry.MemberKey(n), map[string]any{"name": n, "publicKey": strings.Repeat("A", 43) + "=",
		"subnet": subnet, "overlayIp": strings.TrimSuffix(subnet, "/24")})
	put(registry.SubnetsPrefix+"10.10."+string(rune('0'+i))+".0-24", map[string]any{"node": n})
	put(registry.StatusKey(n), map[string]any{"node": n, "revision": 5})
	put(registry.InstanceKey(registry.GroupBackends, "api", n), map[string]any{"ipv4": strings.TrimSuffix(subnet, "/24"), "node": n, "port": 8080})
	if n == "node2" {
		put(registry.SecretKey(n, "db"), map[string]any{"version": 1, "ciphertext": "x"})
	}
}

// keysOf lists the registry keys that belong to node n.
func keysOf(t *testing.T, cli *clientv3.Client, n string) []string {
	t.Helper()
	var out []string
	for _, prefix := range []string{"/cluster/", "/meshd/"} {
		resp, err := cli.Get(context.Background(), prefix, clientv3.WithPrefix())
		if err != nil {
			t.Fatal(err)
		}
		for _, kv := range resp.Kvs {
			k := string(kv.Key)
			if strings.HasSuffix(k, "/"+n) || strings.Contains(k, "/"+n+"/") || strings.Contains(string(kv.Value), `"node":"`+n+`"`) {
				out = append(out, k)
			}
		}
	}
	return out
}
