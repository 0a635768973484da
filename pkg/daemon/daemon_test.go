package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/config"
	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/registry"
)

func waitFor(t *testing.T, within time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for time.Since(start) < within {
		if cond() {
			return time.Since(start)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s: not within %v", what, within)
	return 0
}

// TestDeadAppWithdrawnOnConsumingNode runs meshd (real etcd, real
// HAProxy) on a node that both serves backends/web and consumes the
// backends group: its HAProxy listens on 127.0.0.1 at the app's port, the
// app on the node's advertised address. When the app dies the instance
// must be withdrawn within about one check interval, although HAProxy
// still answers on 127.0.0.1. /healthz names the node and its last apply.
// (The registry refuses a loopback instance address, so this HAProxy gets
// no server for the app; e2e's TestDeadAppOnConsumingNode serves it
// through HAProxy over the overlay.)
func TestDeadAppWithdrawnOnConsumingNode(t *testing.T) {
	if _, err := exec.LookPath("haproxy"); err != nil {
		t.Skip("haproxy not installed")
	}
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// The app: on the node's advertised address (127.0.0.2 here; the
	// overlay IP on a real node).
	app, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Skipf("cannot listen on 127.0.0.2: %v", err)
	}
	go func() {
		for {
			c, err := app.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	port := app.Addr().(*net.TCPAddr).Port
	meta, _ := json.Marshal(registry.AppMeta{Publish: registry.Publish{Port: port}})
	if _, err := cli.Put(ctx, registry.MetaKey(registry.GroupBackends, "web"), string(meta)); err != nil {
		t.Fatal(err)
	}
	metrics := freePort(t, "127.0.0.1")

	dir := t.TempDir()
	cfg := config.Default()
	cfg.NodeName = "node-h15"
	cfg.PublicIPv4 = "127.0.0.2"
	cfg.Consume = []registry.Group{registry.GroupBackends}
	cfg.StateDir = filepath.Join(dir, "state")
	cfg.OnStop = config.OnStopRevoke
	cfg.MetricsAddr = metrics.String()
	cfg.Etcd.Endpoints = []string{srv.Endpoint()}
	cfg.Overlay.Enable = false
	cfg.Secrets.Enable = false
	cfg.HAProxy.ConfigPath = filepath.Join(dir, "haproxy.cfg")
	cfg.HAProxy.MasterSocket = filepath.Join(dir, "master.sock")
	cfg.HAProxy.StatsSocket = filepath.Join(dir, "stats.sock")
	cfg.HAProxy.HardStopAfter = config.Duration(time.Second)
	const interval = time.Second
	cfg.Instances = []config.Instance{{App: "web", Group: registry.GroupBackends, Port: port,
		Check: config.Check{Interval: config.Duration(interval)}}}
	done := make(chan error, 1)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	go func() { done <- Run(ctx, cfg, log, "test") }()
	defer func() {
		cancel()
		select {
		case <-done:
		case <-time.After(20 * time.Second):
			t.Error("meshd did not stop")
		}
		// meshd leaves its HAProxy master running on exit (a restart must
		// not cut traffic); the test ends it.
		stopMaster(t, strings.TrimSuffix(cfg.HAProxy.ConfigPath, ".cfg")+".pid")
	}()

	key := registry.InstanceKey(registry.GroupBackends, "web", cfg.NodeName)
	advertised := func() bool {
		r, err := cli.Get(ctx, key)
		return err == nil && len(r.Kvs) == 1
	}
	waitFor(t, 30*time.Second, "instance advertised", advertised)
	local := net.JoinHostPort("127.0.0.1", fmt.Sprint(port))
	haproxyUp := func() bool {
		c, err := net.DialTimeout("tcp", local, time.Second)
		if err == nil {
			c.Close()
		}
		return err == nil
	}
	waitFor(t, 30*time.Second, "HAProxy listening on "+local, haproxyUp)

	// /healthz: the node's name and the time of its last apply.
	var h health
	waitFor(t, 30*time.Second, "/healthz 200 with a last apply", func() bool {
		resp, err := http.Get("http://" + metrics.String() + "/healthz")
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		h = health{}
		return resp.StatusCode == 200 && json.NewDecoder(resp.Body).Decode(&h) == nil && h.LastApply != nil
	})
	if h.Node != cfg.NodeName || h.Revision == 0 || time.Since(*h.LastApply) > time.Minute || h.LastApply.After(time.Now()) {
		t.Errorf("/healthz = node %q revision %d lastApply %v", h.Node, h.Revision, h.LastApply)
	}

	app.Close()
	// One interval, plus one check timeout and generous slack for a
	// loaded machine.
	took := waitFor(t, interval+5*time.Second, "dead app withdrawn", func() bool { return !advertised() })
	t.Logf("withdrawn %v after the app died", took)
	if !haproxyUp() {
		t.Error("the node's HAProxy stopped answering on 127.0.0.1: the test no longer shows that it cannot fool the check")
	}
	cancel()
	if err := <-done; err != nil && !errors.Is(err, context.Canceled) {
		t.Errorf("Run: %v", err)
	}
	done <- nil
}

// stopMaster ends the HAProxy master whose pid file is pidFile, and its
// workers: SIGTERM, then SIGKILL after 5 s.
func stopMaster(t *testing.T, pidFile string) {
	t.Helper()
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return // never started
	}
	pid, err := strconv.Atoi(strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[0]))
	if err != nil || pid <= 1 {
		t.Errorf("haproxy pid file %s: %q", pidFile, b)
		return
	}
	if syscall.Kill(pid, syscall.SIGTERM) != nil {
		return // gone already
	}
	for range 250 {
		if syscall.Kill(pid, 0) != nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	syscall.Kill(pid, syscall.SIGKILL)
	t.Errorf("haproxy master %d did not stop on SIGTERM within 5 s", pid)
}
