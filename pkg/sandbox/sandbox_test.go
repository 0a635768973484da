package sandbox

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/meshd/meshd/pkg/registry"
	"github.com/meshd/meshd/pkg/sandbox/sandboxtest"
)

// testTag is a sandbox name unique to this test process.
func testTag(suffix string) string { return fmt.Sprintf("mdt%s%d", suffix, os.Getpid()%100000) }

// startTest starts a sandbox that is torn down when the test ends, and
// checks afterwards that teardown left nothing behind.
func startTest(t *testing.T, tag string) *Cluster {
	t.Helper()
	meshd := sandboxtest.Need(t)
	ctx := context.Background()
	c, err := Start(ctx, Options{Name: tag, MeshdBinary: meshd})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		pids := map[int]bool{}
		for _, n := range c.Nodes() {
			for _, p := range nsPids(ctx, n.NS) {
				pids[p] = true
			}
		}
		dir, runDir := c.WorkDir(), c.runDir
		if err := c.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
		left, _ := namespacesOf(tag)
		if len(left) > 0 {
			t.Errorf("namespaces left after teardown: %v", left)
		}
		for p := range pids {
			if syscall.Kill(p, 0) == nil {
				if b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p)); !strings.Contains(string(b), ") Z ") {
					t.Errorf("process %d still running after teardown", p)
				}
			}
		}
		for _, d := range []string{dir, runDir} {
			if _, err := os.Stat(d); err == nil {
				t.Errorf("directory %s left after teardown", d)
			}
		}
	})
	return c
}

// TestCheck is `meshctl sandbox --check` with 3 nodes: every node must
// reach the demo app through HAProxy and WireGuard, and ping every peer.
func TestCheck(t *testing.T) {
	c := startTest(t, testTag("c"))
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	var out strings.Builder
	steps, err := c.BringUp(ctx, DemoOptions{Nodes: 3, Out: &out, StepTimeout: 30 * time.Second})
	t.Log("\n" + out.String())
	if err != nil {
		t.Fatal(err)
	}
	if len(steps) != 4 {
		t.Errorf("got %d steps, want 3 joins and 1 instance", len(steps))
	}
	reports, err := c.Check(ctx, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var tbl strings.Builder
	WriteTable(&tbl, reports)
	t.Log("\n" + tbl.String())
	if len(reports) != 3 {
		t.Fatalf("got %d reports, want 3", len(reports))
	}
	for _, r := range reports {
		if !r.OK() {
			t.Errorf("node %s failed: %v", r.Node, r.Errors)
		}
		if len(r.Peers) != 2 {
			t.Errorf("node %s has %d WireGuard peers, want 2", r.Node, len(r.Peers))
		}
	}
	// HAProxy's files are on a tmpfs, as in a real node's /run, where the
	// host has one.
	if onTmpfs(runParent) {
		for _, n := range c.Nodes() {
			if !onTmpfs(n.Config.HAProxy.ConfigPath) || !strings.HasPrefix(n.Config.HAProxy.ConfigPath, runParent+"/") {
				t.Errorf("%s's HAProxy config %s is not on the tmpfs %s", n.Name, n.Config.HAProxy.ConfigPath, runParent)
			}
		}
	}
}

// TestHarness exercises the harness's own verbs against real meshd
// processes: convergence, kill, restart, link cut, etcd stop/start, and
// the leftover check.
func TestHarness(t *testing.T) {
	tag := testTag("h")
	c := startTest(t, tag)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	if _, err := Start(ctx, Options{Name: tag, MeshdBinary: c.opts.MeshdBinary}); err == nil || !strings.Contains(err.Error(), "--clean --name "+tag) {
		t.Errorf("second Start with the same name: got %v, want a leftover error naming the cleanup command", err)
	}

	var nodes []*Node
	for range 2 {
		n, err := c.AddNode(ctx, NodeOptions{Consume: []registry.Group{registry.GroupBackends}})
		if err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, n)
	}
	for _, n := range nodes {
		if _, _, err := c.WaitKey(ctx, registry.NodeKey(n.Name), false); err != nil {
			t.Fatal(err)
		}
	}
	rev, at, err := c.Put(ctx, "/cluster/backends/x/meta_data", `{"publish":{"port":19000}}`)
	if err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 20*time.Second)
	cv, err := c.WaitApplied(wctx, rev, at, c.NodeNames())
	wcancel()
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"n1", "n2"}, sortedKeys(cv.PerNode)); diff != "" {
		t.Errorf("converged nodes (-want +got):\n%s", diff)
	}

	// PollHTTP asks from inside its node's namespace, and many polls do
	// not end the threads the nodes' meshd were started from (their
	// Pdeathsig would kill them).
	const probePort = 19900
	if err := nodes[0].ServeDemo(probePort); err != nil {
		t.Fatal(err)
	}
	url := fmt.Sprintf("http://127.0.0.1:%d/", probePort)
	// The answer's time is the kernel's receive time (wall clock, no
	// monotonic reading), within the call.
	var body string
	before := time.Now()
	at, err = nodes[0].PollHTTP(ctx, url, time.Millisecond, time.Second, func(b string, err error) bool {
		body = b
		return err == nil
	})
	if after := time.Now(); err != nil || body != DemoBody(nodes[0].Name) {
		t.Errorf("poll on %s: %q, %v", nodes[0].Name, body, err)
	} else if at.Round(0) != at || at.Before(before.Round(0)) || at.After(after.Round(0)) {
		t.Errorf("poll on %s: answered at %v, want a kernel receive time between %v and %v", nodes[0].Name, at, before, after)
	}
	var wg sync.WaitGroup
	for i := range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			n := nodes[i%2]
			pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			var last error
			if _, err := n.PollHTTP(pctx, url, time.Millisecond, time.Second, func(_ string, err error) bool {
				last = err
				return true
			}); err != nil {
				t.Errorf("poll on %s: %v", n.Name, err)
			}
			if n == nodes[1] && last == nil {
				t.Errorf("%s reached %s's demo app on its own loopback", n.Name, nodes[0].Name)
			}
		}()
	}
	wg.Wait()
	time.Sleep(100 * time.Millisecond) // a killed meshd is reaped
	for _, n := range nodes {
		if n.Pid() == 0 {
			t.Errorf("meshd on %s stopped while the harness polled: %s", n.Name, n.LogTail(500))
		}
	}

	// PingUntilReply keeps sending until an answer comes, and reports
	// when none does. The reply's time is the kernel's (wall clock, no
	// monotonic reading), within the call.
	before = time.Now()
	if at, err := nodes[0].PingUntilReply(ctx, nodes[1].Addr, 10*time.Millisecond); err != nil || at.IsZero() {
		t.Errorf("ping %s from %s: %v, %v", nodes[1].Addr, nodes[0].Name, at, err)
	} else if after := time.Now(); at.Round(0) != at || at.Before(before.Round(0)) || at.After(after.Round(0)) {
		t.Errorf("ping %s from %s: reply at %v, want a kernel receive time between %v and %v", nodes[1].Addr, nodes[0].Name, at, before, after)
	}
	nobody := nodeAddr(200) // on the bridge, held by no node
	pctx, pcancel := context.WithTimeout(ctx, 100*time.Millisecond)
	if at, err := nodes[0].PingUntilReply(pctx, nobody, 10*time.Millisecond); err == nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("ping %s, which nobody holds: %v, %v; want no reply before the deadline", nobody, at, err)
	}
	pcancel()

	// A killed node's entry vanishes with its lease; a restarted one returns.
	n2 := nodes[1]
	if err := n2.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	if n2.Pid() != 0 || len(nsPids(ctx, n2.NS)) != 0 {
		t.Errorf("after Kill: pid %d, processes in namespace %v", n2.Pid(), nsPids(ctx, n2.NS))
	}
	if _, _, err := c.WaitKey(ctx, registry.NodeKey(n2.Name), true); err != nil {
		t.Fatalf("killed node's entry did not expire: %v", err)
	}
	if err := n2.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if _, _, err := c.WaitKey(ctx, registry.NodeKey(n2.Name), false); err != nil {
		t.Fatalf("restarted node did not register: %v", err)
	}

	// A node cut off from the bridge cannot apply; after the link is back it
	// catches up.
	if err := n2.CutLink(ctx, true); err != nil {
		t.Fatal(err)
	}
	rev, at, err = c.Put(ctx, "/cluster/backends/y/meta_data", `{"publish":{"port":19001}}`)
	if err != nil {
		t.Fatal(err)
	}
	sctx, scancel := context.WithTimeout(ctx, 1500*time.Millisecond)
	_, err = c.WaitApplied(sctx, rev, at, []string{n2.Name})
	scancel()
	if err == nil {
		t.Error("a node with its link down applied a change")
	}
	if err := n2.CutLink(ctx, false); err != nil {
		t.Fatal(err)
	}
	wctx, wcancel = context.WithTimeout(ctx, 30*time.Second)
	if _, err := c.WaitApplied(wctx, rev, at, c.NodeNames()); err != nil {
		t.Errorf("after the link came back: %v", err)
	}
	wcancel()

	// etcd restarts on the same address with the same data.
	c.StopEtcd()
	if err := c.StartEtcd(); err != nil {
		t.Fatal(err)
	}
	rev, at, err = c.Put(ctx, "/cluster/backends/z/meta_data", `{"publish":{"port":19002}}`)
	if err != nil {
		t.Fatal(err)
	}
	wctx, wcancel = context.WithTimeout(ctx, 30*time.Second)
	if _, err := c.WaitApplied(wctx, rev, at, c.NodeNames()); err != nil {
		t.Errorf("after an etcd restart: %v", err)
	}
	wcancel()

	// Exec runs inside the node's namespace.
	out, err := nodes[0].Exec(ctx, "ip", "-4", "-o", "addr", "show", "dev", nodes[0].Veth())
	if err != nil || !strings.Contains(string(out), nodes[0].Addr.String()) {
		t.Errorf("Exec ip addr in %s: %v %q", nodes[0].NS, err, out)
	}
	if _, err := os.Stat(filepath.Join(nodes[0].Dir, "meshd.json")); err != nil {
		t.Error(err)
	}
}

func sortedKeys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sortNodeNames(out)
	return out
}

func sortNodeNames(s []string) { slices.SortFunc(s, compareNodeNames) }
