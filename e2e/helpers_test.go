// Package e2e is meshd's end-to-end and fault-injection suite: real meshd
// binaries in network namespaces (pkg/sandbox), real etcd, real userspace
// WireGuard, real haproxy. Every test needs root, /dev/net/tun, haproxy and
// wireguard-tools and skips with a message otherwise. docs/faults.md says
// what each test injects and asserts, with measured numbers.
package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/registry"
	"github.com/meshd/meshd/pkg/sandbox"
	"github.com/meshd/meshd/pkg/sandbox/sandboxtest"
)

// bins are the meshd and meshctl binaries built once for the package.
type bins struct {
	meshd, meshctl string
}

var (
	buildOnce sync.Once
	built     bins
	buildErr  error
)

// TestMain removes the binaries built for the run.
func TestMain(m *testing.M) {
	code := m.Run()
	if built.meshd != "" {
		os.RemoveAll(filepath.Dir(built.meshd))
	}
	os.Exit(code)
}

// need skips the test unless a sandbox can run here, and returns the
// binaries (built once per test process).
func need(t *testing.T) bins {
	t.Helper()
	sandboxtest.Need(t) // skips without root, tun, haproxy, wg; builds meshd
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "meshd-e2e-bin-")
		if err != nil {
			buildErr = err
			return
		}
		built = bins{meshd: filepath.Join(dir, "meshd"), meshctl: filepath.Join(dir, "meshctl")}
		cmd := exec.Command("go", "build", "-o", dir+"/", "./meshd", "./meshctl")
		cmd.Dir = repoRoot()
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return built
}

func repoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..")
}

// tag is a sandbox name unique to this test process: mde2e<letter><pid>.
func tag(letter string) string { return fmt.Sprintf("mde2e%s%d", letter, os.Getpid()%10000) }

// startCluster starts a sandbox torn down when the test ends; teardown must
// leave no namespace behind.
func startCluster(t *testing.T, letter string, ttl time.Duration) (*sandbox.Cluster, bins) {
	t.Helper()
	return startClusterNamed(t, tag(letter), ttl)
}

// startClusterNamed is startCluster with the sandbox's name given.
func startClusterNamed(t *testing.T, name string, ttl time.Duration) (*sandbox.Cluster, bins) {
	t.Helper()
	b := need(t)
	if _, err := sandbox.Clean(context.Background(), name); err != nil {
		t.Logf("cleaning leftovers of %s: %v", name, err)
	}
	// MESHD_E2E_LOG_LEVEL=debug runs every meshd with --log-level debug
	// and shows more of each log when a test fails (one reconcile pass per
	// line: what a flaky failure needs).
	level, tail := os.Getenv("MESHD_E2E_LOG_LEVEL"), 25
	if level == "debug" {
		tail = 200
	}
	c, err := sandbox.Start(context.Background(), sandbox.Options{Name: name, MeshdBinary: b.meshd, LeaseTTL: ttl, MeshdLogLevel: level})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, n := range c.Nodes() {
				t.Logf("%s meshd.log, last lines other than key reports:\n%s", n.Name, logTail(n, tail))
			}
		}
		if err := c.Close(); err != nil {
			t.Errorf("teardown: %v", err)
		}
		if left, _ := sandbox.Clean(context.Background(), name); len(left) > 0 {
			t.Errorf("namespaces left after teardown: %v", left)
		}
	})
	return c, b
}

// logTail returns the last lines of a node's meshd log, without the
// per-key reports of invalid registry keys (the hostile test writes many).
func logTail(n *sandbox.Node, lines int) string {
	var keep []string
	for _, l := range strings.Split(n.LogTail(1<<30), "\n") {
		if !strings.Contains(l, "invalid registry key") && !strings.Contains(l, "no longer invalid") {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep[max(0, len(keep)-lines):], "\n")
}

// meshctl runs the meshctl binary against the sandbox's etcd.
func meshctl(ctx context.Context, b bins, c *sandbox.Cluster, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, b.meshctl, append([]string{"--endpoints", c.Endpoint()}, args...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// load is a bounded HTTP load through one node's HAProxy: workers each
// GET url from inside the node's namespace in a loop, with a pause.
type load struct {
	ok, fail atomic.Int64
	maxLat   atomic.Int64
	mu       sync.Mutex
	errs     []string
	cancel   context.CancelFunc
	wg       sync.WaitGroup
}

// startLoad starts workers GETting url on node n until stop; a request
// fails on a transport error, a non-200 status, a body that is not the
// demo app's, or no answer within timeout.
func startLoad(n *sandbox.Node, url string, workers int, pause, timeout time.Duration) *load {
	ctx, cancel := context.WithCancel(context.Background())
	l := &load{cancel: cancel}
	for range workers {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for ctx.Err() == nil {
				rctx, rcancel := context.WithTimeout(ctx, timeout)
				body, lat, err := n.HTTPGet(rctx, url)
				rcancel()
				if ctx.Err() != nil {
					return // stopped mid-request: not a failure
				}
				if err == nil && !strings.HasPrefix(body, "demo from ") {
					err = fmt.Errorf("unexpected body %q", body)
				}
				if err != nil {
					l.fail.Add(1)
					l.mu.Lock()
					if len(l.errs) < 10 {
						l.errs = append(l.errs, time.Now().Format("15:04:05.000")+" "+err.Error())
					}
					l.mu.Unlock()
				} else {
					l.ok.Add(1)
					for {
						m := l.maxLat.Load()
						if int64(lat) <= m || l.maxLat.CompareAndSwap(m, int64(lat)) {
							break
						}
					}
				}
				select {
				case <-ctx.Done():
				case <-time.After(pause):
				}
			}
		}()
	}
	return l
}

// loadResult is what a load saw.
type loadResult struct {
	OK, Failed int64
	MaxLatency time.Duration
	Errors     []string
}

func (r loadResult) String() string {
	return fmt.Sprintf("%d ok, %d failed, max latency %v", r.OK, r.Failed, r.MaxLatency.Round(time.Millisecond))
}

// counts returns the requests so far.
func (l *load) counts() (ok, failed int64) { return l.ok.Load(), l.fail.Load() }

// takeMaxLatency returns the slowest successful request since the last
// call (or the start) and starts over.
func (l *load) takeMaxLatency() time.Duration { return time.Duration(l.maxLat.Swap(0)) }

// stop ends the load and returns its totals.
func (l *load) stop() loadResult {
	l.cancel()
	l.wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	return loadResult{OK: l.ok.Load(), Failed: l.fail.Load(), MaxLatency: time.Duration(l.maxLat.Load()), Errors: l.errs}
}

// demoURL is the demo app as consumers reach it through HAProxy.
var demoURL = fmt.Sprintf("http://127.0.0.1:%d/", sandbox.DemoPublishPort)

// eventually polls f every interval until it returns nil or d passes, and
// returns the last error and how long it took.
func eventually(d, interval time.Duration, f func() error) (time.Duration, error) {
	start := time.Now()
	for {
		err := f()
		if err == nil {
			return time.Since(start), nil
		}
		if time.Since(start) > d {
			return time.Since(start), err
		}
		time.Sleep(interval)
	}
}

// steady waits, for at most d, until every GET of url from n succeeds for
// a whole window (polled every 50 ms): one success is not enough before a
// load starts, because HAProxy's own health checks lag the data plane (a
// server marked down while a new WireGuard session was still settling
// comes back only after "rise" good checks).
func steady(ctx context.Context, n *sandbox.Node, url string, window, d time.Duration) error {
	deadline := time.Now().Add(d)
	var since time.Time
	for {
		rctx, cancel := context.WithTimeout(ctx, time.Second)
		_, _, err := n.HTTPGet(rctx, url)
		cancel()
		now := time.Now()
		switch {
		case err != nil:
			since = time.Time{}
			if now.After(deadline) {
				return fmt.Errorf("%s: %s not steady within %v: %w", n.Name, url, d, err)
			}
		case since.IsZero():
			since = now
		case now.Sub(since) >= window:
			return nil
		}
		if now.After(deadline.Add(window)) {
			return fmt.Errorf("%s: %s not steady within %v", n.Name, url, d)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// peerKeys returns the public keys of a node's WireGuard peers with their
// latest handshake times.
func peerKeys(ctx context.Context, n *sandbox.Node) (map[string]time.Time, error) {
	peers, err := n.WGPeers(ctx)
	if err != nil {
		return nil, err
	}
	out := map[string]time.Time{}
	for _, p := range peers {
		out[p.PublicKey] = p.Handshake
	}
	return out, nil
}

// pingAll checks that from pings every overlay address in to within d.
func pingAll(ctx context.Context, from *sandbox.Node, to map[string]registry.Member, d time.Duration) error {
	for name, m := range to {
		if name == from.Name {
			continue
		}
		if _, err := eventually(d, 100*time.Millisecond, func() error {
			pctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
			defer cancel()
			_, err := from.Ping(pctx, m.OverlayIP)
			return err
		}); err != nil {
			return fmt.Errorf("%s cannot ping %s (%s): %w", from.Name, name, m.OverlayIP, err)
		}
	}
	return nil
}

// clusterRev returns the revision of the newest write under /cluster/,
// which every node watches and so reaches. etcd's head may be past it: a
// status or presence write (/meshd/) reaches no other node, and a restart
// that changes nothing writes nothing under /cluster/.
func clusterRev(ctx context.Context, c *sandbox.Cluster) (int64, error) {
	resp, err := c.Client().Get(ctx, registry.ClusterPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly(),
		clientv3.WithSort(clientv3.SortByModRevision, clientv3.SortDescend), clientv3.WithLimit(1))
	if err != nil {
		return 0, err
	}
	if len(resp.Kvs) == 0 {
		return 0, fmt.Errorf("nothing under %s", registry.ClusterPrefix)
	}
	return resp.Kvs[0].ModRevision, nil
}

// waitAll waits until every running node applied rev.
func waitAll(ctx context.Context, c *sandbox.Cluster, rev int64, d time.Duration) (sandbox.Convergence, error) {
	wctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	return c.WaitApplied(wctx, rev, time.Now(), c.NodeNames())
}

// bringUp starts a demo cluster of nodes nodes with servers serving nodes.
func bringUp(t *testing.T, c *sandbox.Cluster, nodes, servers int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var out strings.Builder
	_, err := c.BringUp(ctx, sandbox.DemoOptions{Nodes: nodes, Servers: servers, Out: &out, StepTimeout: 30 * time.Second})
	t.Log("\n" + out.String())
	if err != nil {
		t.Fatal(err)
	}
	reports, err := c.Check(ctx, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var tbl strings.Builder
	sandbox.WriteTable(&tbl, reports)
	t.Log("\n" + tbl.String())
	for _, r := range reports {
		if !r.OK() {
			t.Fatalf("node %s failed the bring-up check: %v", r.Node, r.Errors)
		}
	}
}
