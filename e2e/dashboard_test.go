package e2e

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"image/png"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/config"
	"github.com/meshd/meshd/pkg/registry"
	"github.com/meshd/meshd/pkg/sandbox"
	"github.com/meshd/meshd/pkg/sandbox/sandboxtest"
)

var updateScreenshot = flag.Bool("update", false, "rewrite docs/dashboard.png from the browser test")

// Hostile values the page must show as text, never as markup.
const (
	hostileKey     = `/cluster/nodes/<img src=x onerror="window.__pwned=1">`
	hostileError   = `<b id="pwn">bold?</b><script>window.__pwned=2</script>`
	hostileVersion = `<i id="pwn2">v</i>`
)

// chromium finds Debian's chromium (or another Chrome) or skips.
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	sandboxtest.Missing(t, "no chromium (apt-get install --no-install-recommends chromium): skipping the browser test")
	return ""
}

// startDashboard runs `meshctl dashboard` against the sandbox on an
// ephemeral loopback port and returns the page's URL.
func startDashboard(t *testing.T, meshctl, endpoint string) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, meshctl, "--endpoints", endpoint, "dashboard", "--listen", "127.0.0.1:0")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("meshctl dashboard printed no address: %v; stderr: %s", err, stderr.String())
	}
	var url string
	if _, err := fmt.Sscanf(line, "dashboard on %s", &url); err != nil || !strings.HasPrefix(url, "http://127.0.0.1:") {
		t.Fatalf("meshctl dashboard's first line %q: want its loopback URL", line)
	}
	go func() { _, _ = bufio.NewReader(out).WriteTo(new(bytes.Buffer)) }()
	return url
}

// TestDashboardInBrowser opens `meshctl dashboard` in headless Chromium
// on a live sandbox: every node and app is shown, a killed node shows
// down within two seconds without a reload, hostile etcd text stays text.
func TestDashboardInBrowser(t *testing.T) {
	chrome := chromium(t)
	// The shortest lease meshd allows: a killed meshd's entry expires
	// within about 2 s.
	const ttl = 2 * time.Second
	c, b := startClusterNamed(t, fmt.Sprintf("h18d%d", os.Getpid()%10000), ttl)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	// A stopped meshd gives its lease back (what "auto" does without
	// systemd, set here so that a host's systemd cannot change it).
	revoke := func(cfg *config.Config) { cfg.OnStop = config.OnStopRevoke }
	if _, err := c.BringUp(ctx, sandbox.DemoOptions{Nodes: 3, Servers: 1, Edit: revoke}); err != nil {
		t.Fatal(err)
	}
	cli := c.Client()
	url := startDashboard(t, b.meshctl, c.Endpoint())

	actx, acancel := chromedp.NewExecAllocator(ctx, append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(chrome), chromedp.NoSandbox, chromedp.DisableGPU, chromedp.WindowSize(1280, 1000))...)
	defer acancel()
	bctx, bcancel := chromedp.NewContext(actx)
	defer bcancel()
	if _, err := chromedp.Run(bctx, chromedp.Navigate(url)); err != nil {
		t.Fatalf("open %s: %v", url, err)
	}
	evalBool := func(js string) bool {
		t.Helper()
		v, err := chromedp.Run(bctx, chromedp.Evaluate[bool](js))
		if err != nil {
			t.Fatalf("evaluate %s: %v", js, err)
		}
		return v
	}
	pageText := func() string {
		t.Helper()
		v, err := chromedp.Run(bctx, chromedp.Evaluate[string](`document.body.innerText`))
		if err != nil {
			t.Fatalf("page text: %v", err)
		}
		return v
	}
	waitJS := func(what, js string, within time.Duration) time.Duration {
		t.Helper()
		start := time.Now()
		for {
			if evalBool(js) {
				return time.Since(start)
			}
			if time.Since(start) > within {
				t.Fatalf("page: not within %v: %s\npage text:\n%s", within, what, pageText())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	state := func(node string) string {
		return fmt.Sprintf(`(document.querySelector('tr[data-node=%q] [data-state]') || {}).textContent`, node)
	}
	nodes := c.NodeNames()
	for _, n := range nodes {
		waitJS(n+" shown up", state(n)+` === "up"`, 20*time.Second)
	}
	app := string(sandbox.DemoGroup) + "/" + sandbox.DemoApp
	waitJS("the demo app with its instance on n1", fmt.Sprintf(
		`!!document.querySelector('tr[data-app=%q] [data-instance="n1"][data-state="up"]')`, app), 10*time.Second)
	waitJS("consumers of the demo group", fmt.Sprintf(
		`(document.querySelector('[data-group=%q] p') || {}).textContent === "Consumed by: n2, n3"`, string(sandbox.DemoGroup)), 10*time.Second)
	waitJS("a peer matrix of every node", `document.querySelectorAll('#peers [data-peer-row]').length === 3`, 10*time.Second)
	waitJS("the live connection", `document.getElementById("conn").textContent === "live"`, 5*time.Second)

	evalBool(`window.__noReload = 1; true`)

	// kill (SIGTERM, what kill(1) and systemctl stop send) n3's meshd: it
	// revokes its lease, and the page shows n3 down within 2 s of the
	// signal.
	term := time.Now()
	if err := c.Node("n3").StopMeshd(ctx, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	waitJS("n3 shown down", state("n3")+` === "down"`, 10*time.Second)
	if d := time.Since(term); d > 2*time.Second {
		t.Errorf("the page showed n3 down %v after its meshd got SIGTERM, want within 2s", d)
	} else {
		t.Logf("the page showed n3 down %v after its meshd got SIGTERM", d.Round(time.Millisecond))
	}

	// Kill (SIGKILL) the meshd of the node serving the app, a crash: once
	// its lease expires, the page shows it and its instance down.
	gone := make(chan time.Time, 1)
	wctx, wcancel := context.WithCancel(ctx)
	defer wcancel()
	wch := cli.Watch(wctx, registry.NodeKey("n1"))
	go func() {
		for resp := range wch {
			for _, ev := range resp.Events {
				if ev.Type == clientv3.EventTypeDelete {
					gone <- time.Now()
					return
				}
			}
		}
	}()
	kill := time.Now()
	if err := c.Node("n1").KillMeshd(ctx); err != nil {
		t.Fatal(err)
	}
	waitJS("n1 shown down", state("n1")+` === "down"`, 10*time.Second)
	shown := time.Now()
	var expired time.Time
	select {
	case expired = <-gone:
	case <-time.After(5 * time.Second):
		t.Fatal("the test's watch saw no expiry of n1's entry")
	}
	t.Logf("n1's lease expired %v after the kill; the page showed n1 down %v after that",
		expired.Sub(kill).Round(time.Millisecond), shown.Sub(expired).Round(time.Millisecond))
	if d := shown.Sub(expired); d > 2*time.Second {
		t.Errorf("the page showed n1 down %v after its lease expired, want within 2s", d)
	}
	if d := shown.Sub(kill); d > ttl+2*time.Second {
		t.Errorf("the page showed n1 down %v after the kill, want within the lease TTL (%v) + 2s", d, ttl)
	}
	waitJS("n1's instance shown down", fmt.Sprintf(
		`!!document.querySelector('tr[data-app=%q] [data-instance="n1"][data-state="down"]')`, app), 5*time.Second)
	waitJS("a node-down problem for n1", `[...document.querySelectorAll('#problems tr[data-kind="node down"] td')].some(td => td.textContent === "n1")`, 5*time.Second)
	if !evalBool(`window.__noReload === 1`) {
		t.Error("the page reloaded")
	}

	shot, err := chromedp.Run(bctx, chromedp.FullScreenshot(100))
	if err != nil {
		t.Fatal(err)
	}
	img, err := png.Decode(bytes.NewReader(shot))
	if err != nil {
		t.Fatalf("screenshot: %v", err)
	}
	if r := img.Bounds(); r.Dx() < 800 || r.Dy() < 400 {
		t.Errorf("screenshot is %v", r)
	}
	path := filepath.Join(t.TempDir(), "dashboard.png")
	if *updateScreenshot {
		path = filepath.Join(repoRoot(), "docs", "dashboard.png")
	}
	if err := os.WriteFile(path, shot, 0o644); err != nil {
		t.Fatal(err)
	}
	t.Logf("screenshot: %s", path)

	// Hostile values in etcd: a key that is not a valid node name, and a
	// status whose error and version text carry markup and script.
	if _, err := cli.Put(ctx, hostileKey, `{}`); err != nil {
		t.Fatal(err)
	}
	ghost := fmt.Sprintf(`{"node":"ghost","revision":1,"seen":2,"version":%q,"errors":{"haproxy":%q}}`, hostileVersion, hostileError)
	if _, err := cli.Put(ctx, registry.StatusKey("ghost"), ghost); err != nil {
		t.Fatal(err)
	}
	waitJS("the hostile status shown", `!!document.querySelector('tr[data-node="ghost"]')`, 5*time.Second)
	// Shown literally, never parsed.
	body := pageText()
	for _, s := range []string{hostileKey, hostileError, hostileVersion} {
		if !strings.Contains(body, s) {
			t.Errorf("page text lacks the hostile value %s literally", s)
		}
	}
	if evalBool(`!!(document.getElementById("pwn") || document.getElementById("pwn2") || document.querySelector("img, script:not([src])") || window.__pwned)`) {
		t.Error("hostile etcd text became markup or ran as script")
	}
}
