package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/config"
	"github.com/meshd/meshd/pkg/registry"
	"github.com/meshd/meshd/pkg/sandbox"
)

// healthTag names this file's sandboxes (at most 10 characters): the
// prefix is "mdh", or $MESHD_E2E_PREFIX to tell one run's namespaces from
// another's on a shared machine.
func healthTag(letter string) string {
	p := os.Getenv("MESHD_E2E_PREFIX")
	if p == "" {
		p = "mdh"
	}
	return fmt.Sprintf("%s%s%d", p, letter, os.Getpid()%1000)
}

// TestDeadAppOnConsumingNode is nix-infra's layout: the app binds its
// node's overlay address on its publish port, and the same node consumes
// the app's group, so its HAProxy listens on 127.0.0.1 at that port. With
// the default check the instance is advertised while the app answers
// (consumers reach it through HAProxy) and withdrawn within about one
// check interval after the app dies, although HAProxy still answers on
// 127.0.0.1.
func TestDeadAppOnConsumingNode(t *testing.T) {
	c, _ := startClusterNamed(t, healthTag("d"), 5*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	const (
		app      = "deadapp"
		port     = 18090
		interval = time.Second
	)
	meta := registry.AppMeta{Env: registry.Env{"PROTOCOL": json.RawMessage(`"http"`)}, Publish: registry.Publish{Port: port}}
	if _, _, err := c.RegisterApp(ctx, sandbox.DemoGroup, app, meta); err != nil {
		t.Fatal(err)
	}
	n, err := c.AddNode(ctx, sandbox.NodeOptions{
		Consume: []registry.Group{sandbox.DemoGroup},
		Instances: []config.Instance{{App: app, Group: sandbox.DemoGroup, Port: port,
			Check: config.Check{Interval: config.Duration(interval)}}},
	})
	if err != nil {
		t.Fatal(err)
	}
	consumer, err := c.AddNode(ctx, sandbox.NodeOptions{Consume: []registry.Group{sandbox.DemoGroup}})
	if err != nil {
		t.Fatal(err)
	}
	var m registry.Member
	if _, err := eventually(60*time.Second, 100*time.Millisecond, func() error {
		ms, err := c.Members(ctx)
		if err != nil {
			return err
		}
		var ok bool
		if m, ok = ms[n.Name]; !ok {
			return errors.New("no member record yet")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	key := registry.InstanceKey(sandbox.DemoGroup, app, n.Name)
	advertised := func() (bool, error) {
		r, err := c.Client().Get(ctx, key)
		if err != nil {
			return false, err
		}
		return len(r.Kvs) == 1, nil
	}
	// HAProxy answers on 127.0.0.1:port, the app is not running: the
	// instance must not be advertised.
	local := fmt.Sprintf("http://127.0.0.1:%d/", port)
	if _, err := eventually(60*time.Second, 200*time.Millisecond, func() error {
		return haproxyListening(ctx, n, local)
	}); err != nil {
		t.Fatalf("%s's HAProxy does not listen on %s: %v", n.Name, local, err)
	}
	time.Sleep(2 * interval)
	if ok, err := advertised(); err != nil || ok {
		t.Fatalf("instance advertised (%v, %v) with the app down: the check was answered by the node's HAProxy", ok, err)
	}

	// The app comes up on the overlay address: advertised, and reachable
	// through HAProxy on both consuming nodes.
	var stop func()
	if _, err := eventually(60*time.Second, 200*time.Millisecond, func() error {
		var err error
		stop, err = n.ServeDemoAt(netip.AddrPortFrom(m.OverlayIP, port))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	for _, via := range []*sandbox.Node{n, consumer} {
		if _, err := eventually(60*time.Second, 200*time.Millisecond, func() error {
			body, _, err := via.HTTPGet(ctx, local)
			if err == nil && body != sandbox.DemoBody(n.Name) {
				err = fmt.Errorf("body %q", body)
			}
			return err
		}); err != nil {
			t.Fatalf("app not served through %s's HAProxy: %v", via.Name, err)
		}
	}
	if ok, err := advertised(); err != nil || !ok {
		t.Fatalf("instance not advertised while the app answers: %v %v", ok, err)
	}

	// The app dies: withdrawn within about one interval (plus generous
	// slack for a loaded machine), HAProxy still listening.
	stop()
	took, err := eventually(interval+8*time.Second, 50*time.Millisecond, func() error {
		ok, err := advertised()
		if err == nil && ok {
			err = errors.New("still advertised")
		}
		return err
	})
	if err != nil {
		t.Fatalf("dead app not withdrawn: %v", err)
	}
	t.Logf("dead app withdrawn %v after it stopped (check interval %v)", took, interval)
	if err := haproxyListening(ctx, n, local); err != nil {
		t.Errorf("%s's HAProxy on %s: %v; want it still listening", n.Name, local, err)
	}
}

// haproxyListening reports whether something accepts connections at url
// in the node's namespace: the node's HAProxy, which with no server closes
// the connection or answers 503.
func haproxyListening(ctx context.Context, n *sandbox.Node, url string) error {
	rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	_, _, err := n.HTTPGet(rctx, url)
	if err != nil && strings.Contains(err.Error(), "connection refused") {
		return err
	}
	return nil
}

// TestStatusShowsDownNode: with one node's meshd stopped cleanly and
// another's killed, `meshctl status` lists both as DOWN with when they
// were last seen and exits 1; with every node back it exits 0 and reports
// no node behind.
func TestStatusShowsDownNode(t *testing.T) {
	c, b := startClusterNamed(t, healthTag("s"), 4*time.Second)
	bringUp(t, c, 3, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	status := func() (int, string, error) {
		out, err := meshctl(ctx, b, c, "status")
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode(), out, nil
		}
		return 0, out, err
	}
	if _, err := eventually(60*time.Second, 500*time.Millisecond, func() error {
		code, out, err := status()
		if err == nil && code != 0 {
			err = fmt.Errorf("exit %d:\n%s", code, out)
		}
		return err
	}); err != nil {
		t.Fatalf("healthy cluster: %v", err)
	}
	out, err := meshctl(ctx, b, c, "status", "-o", "json")
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	var so struct {
		Nodes []struct {
			Node   string `json:"node"`
			State  string `json:"state"`
			Behind int64  `json:"behind"`
		} `json:"nodes"`
	}
	if err := json.Unmarshal([]byte(out), &so); err != nil {
		t.Fatal(err)
	}
	for _, r := range so.Nodes {
		if r.State != "up" || r.Behind != 0 {
			t.Errorf("converged cluster: %+v", r)
		}
	}

	nodes := c.Nodes()
	stopped, killed := nodes[1], nodes[2]
	if err := stopped.Stop(ctx, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := killed.KillMeshd(ctx); err != nil {
		t.Fatal(err)
	}
	// The killed node's lease expires after its TTL.
	var table string
	if _, err := eventually(60*time.Second, 500*time.Millisecond, func() error {
		code, out, err := status()
		table = out
		if err != nil {
			return err
		}
		if code != 1 {
			return fmt.Errorf("exit %d, want 1", code)
		}
		for _, want := range []string{stopped.Name + " ", "stopped ", killed.Name + " ", "registered ", "down: "} {
			if !strings.Contains(out, want) {
				return fmt.Errorf("no %q in\n%s", want, out)
			}
		}
		if strings.Count(out, "DOWN") != 2 {
			return fmt.Errorf("want 2 DOWN nodes:\n%s", out)
		}
		return nil
	}); err != nil {
		t.Fatalf("status with two nodes down: %v", err)
	}
	t.Logf("\n%s", table)

	for _, n := range []*sandbox.Node{stopped, killed} {
		if err := n.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := eventually(90*time.Second, 500*time.Millisecond, func() error {
		code, out, err := status()
		if err == nil && code != 0 {
			err = fmt.Errorf("exit %d:\n%s", code, out)
		}
		return err
	}); err != nil {
		t.Fatalf("nodes back: %v", err)
	}
}
