package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/config"
	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/registry"
)

// buildBinaries builds meshd and meshctl once for the package's tests.
func buildBinaries(t *testing.T) (meshd, meshctl string) {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-o", dir+"/", "github.com/meshd/meshd/meshd", "github.com/meshd/meshd/meshctl")
	cmd.Stderr = os.Stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("build: %v", err)
	}
	return filepath.Join(dir, "meshd"), filepath.Join(dir, "meshctl")
}

func writeConfig(t *testing.T, c config.Config) string {
	t.Helper()
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "meshd.json")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestBadInputFailsWithOneLine(t *testing.T) {
	bad := func(args ...string) string {
		var out, errb bytes.Buffer
		err := run(context.Background(), args, &out, &errb)
		if err == nil {
			t.Fatalf("meshd %v succeeded", args)
		}
		if strings.Count(err.Error(), "\n") != 0 {
			t.Errorf("meshd %v: error spans lines: %q", args, err)
		}
		return err.Error()
	}
	if msg := bad("--bogus"); !strings.Contains(msg, "bogus") {
		t.Errorf("unknown flag: %q", msg)
	}
	if msg := bad("--config", "/nonexistent/meshd.json"); !strings.Contains(msg, "/nonexistent/meshd.json") {
		t.Errorf("missing file: %q", msg)
	}
	dir := t.TempDir()
	garbled := filepath.Join(dir, "g.json")
	os.WriteFile(garbled, []byte(`{"nodeName": "a", "etcd": {"endpoints": [}`), 0o600)
	if msg := bad("--config", garbled, "--check-config"); !strings.Contains(msg, "g.json") {
		t.Errorf("garbled file: %q", msg)
	}
	typo := filepath.Join(dir, "t.json")
	os.WriteFile(typo, []byte(`{"nodeName": "a", "leaseTime": "10s"}`), 0o600)
	if msg := bad("--config", typo, "--check-config"); !strings.Contains(msg, "leaseTime") {
		t.Errorf("unknown field: %q", msg)
	}
	c := config.Default()
	c.NodeName = "bad name\n"
	c.Instances = []config.Instance{{App: "x y", Group: "nope", Port: 0}}
	msg := bad("--config", writeConfig(t, c), "--check-config")
	for _, want := range []string{"nodeName", "instances[0].app", "instances[0].group", "instances[0].port"} {
		if !strings.Contains(msg, want) {
			t.Errorf("invalid config error %q does not name %s", msg, want)
		}
	}
	var out bytes.Buffer
	good := config.Default()
	good.NodeName = "worker001"
	if err := run(context.Background(), []string{"--config", writeConfig(t, good), "--check-config"}, &out, &out); err != nil {
		t.Fatalf("valid config rejected: %v", err)
	}
}

// TestDaemonRegistersAndStatusShowsIt runs the real meshd binary against a
// real etcd, checks meshctl status shows its applied revision, kills it
// with SIGKILL and restarts it: same lease, no key deleted.
func TestDaemonRegistersAndStatusShowsIt(t *testing.T) {
	if testing.Short() {
		t.Skip("builds binaries")
	}
	meshdBin, meshctlBin := buildBinaries(t)
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	c := config.Default()
	c.NodeName = "solo"
	c.StateDir = t.TempDir()
	c.MetricsAddr = "127.0.0.1:0"
	c.LeaseTTL = config.Duration(3 * time.Second)
	c.Etcd.Endpoints = []string{srv.Endpoint()}
	c.Overlay.Enable, c.HAProxy.Enable, c.Secrets.Enable = false, false, false
	c.PublicIPv4 = "192.0.2.10"
	c.Instances = []config.Instance{{App: "web", Group: "backends", Port: 8080, Check: config.Check{Disable: true}}}
	cfgPath := writeConfig(t, c)
	start := func() *exec.Cmd {
		cmd := exec.Command(meshdBin, "--config", cfgPath, "--log-level", "warn")
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return cmd
	}
	cmd := start()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resp, err := cli.Put(ctx, registry.MetaKey("backends", "web"), `{"publish":{"port":18080}}`)
	if err != nil {
		t.Fatal(err)
	}
	if err := registry.WaitApplied(ctx, cli, resp.Header.Revision, []string{"solo"}); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(meshctlBin, "--endpoints", srv.Endpoint(), "status", "-o", "json").Output()
	if err != nil {
		t.Fatalf("meshctl status: %v", err)
	}
	var st struct {
		Nodes []struct {
			Node     string `json:"node"`
			Live     bool   `json:"live"`
			Lease    string `json:"lease"`
			Revision int64  `json:"revision"`
		} `json:"nodes"`
	}
	if err := json.Unmarshal(out, &st); err != nil {
		t.Fatalf("status json: %v\n%s", err, out)
	}
	if len(st.Nodes) != 1 || st.Nodes[0].Node != "solo" || !st.Nodes[0].Live || st.Nodes[0].Revision < resp.Header.Revision || st.Nodes[0].Lease == "" {
		t.Fatalf("status = %+v, want solo live at revision >= %d", st, resp.Header.Revision)
	}
	table, _ := exec.Command(meshctlBin, "--endpoints", srv.Endpoint(), "status").Output()
	if !strings.Contains(string(table), "solo") {
		t.Errorf("status table does not show the node:\n%s", table)
	}

	// SIGKILL and restart: the restarted meshd resumes the same lease.
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	r1, _ := cli.Get(ctx, registry.NodeKey("solo"))
	start()
	resp, _ = cli.Put(ctx, registry.MetaKey("backends", "web"), `{"publish":{"port":18081}}`)
	if err := registry.WaitApplied(ctx, cli, resp.Header.Revision, []string{"solo"}); err != nil {
		t.Fatal(err)
	}
	r2, _ := cli.Get(ctx, registry.NodeKey("solo"))
	if len(r1.Kvs) != 1 || len(r2.Kvs) != 1 || r1.Kvs[0].Lease != r2.Kvs[0].Lease {
		t.Errorf("lease changed across SIGKILL restart: %v -> %v", r1.Kvs, r2.Kvs)
	}
	in, _ := cli.Get(ctx, registry.InstanceKey("backends", "web", "solo"))
	if len(in.Kvs) != 1 || !strings.Contains(string(in.Kvs[0].Value), `"ipv4":"192.0.2.10"`) {
		t.Errorf("instance = %v", in.Kvs)
	}
}
