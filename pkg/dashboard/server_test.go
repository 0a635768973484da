package dashboard

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/registry"
)

// serve runs the dashboard on a loopback port against a real etcd.
func serve(t *testing.T) (*clientv3.Client, string) {
	t.Helper()
	srv := etcdtest.New(t)
	cli := etcdtest.NewClient(t, srv)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, Options{Client: cli}, ln) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Serve did not return after its context ended")
		}
	})
	return cli, "http://" + ln.Addr().String()
}

// stream reads views from /events.
func stream(t *testing.T, url string) <-chan View {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	req, _ := http.NewRequestWithContext(ctx, "GET", url+"/events", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Fatalf("content type %q", ct)
	}
	ch := make(chan View, 64)
	go func() {
		defer resp.Body.Close()
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(make([]byte, 1<<20), 8<<20)
		for sc.Scan() {
			if data, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
				var v View
				if json.Unmarshal([]byte(data), &v) == nil {
					ch <- v
				}
			}
		}
	}()
	return ch
}

func waitView(t *testing.T, ch <-chan View, what string, cond func(View) bool) View {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		select {
		case v := <-ch:
			if cond(v) {
				return v
			}
		case <-deadline:
			t.Fatalf("no view with %s", what)
		}
	}
}

func nodeUp(v View, name string) (up, found bool) {
	for _, n := range v.Nodes {
		if n.Name == name {
			return n.Up, true
		}
	}
	return false, false
}

func TestEventsFollowTheRegistry(t *testing.T) {
	cli, url := serve(t)
	ctx := t.Context()
	lease, err := cli.Grant(ctx, 60)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cli.Put(ctx, registry.NodeKey("n1"), `{"name":"n1","ipv4":"192.0.2.1","services":["backends"]}`, clientv3.WithLease(lease.ID)); err != nil {
		t.Fatal(err)
	}
	ch := stream(t, url)
	waitView(t, ch, "n1 up", func(v View) bool { up, _ := nodeUp(v, "n1"); return up })
	// The lease goes (as when a node dies): the page hears at once.
	start := time.Now()
	if _, err := cli.Revoke(ctx, lease.ID); err != nil {
		t.Fatal(err)
	}
	waitView(t, ch, "n1 down", func(v View) bool { up, found := nodeUp(v, "n1"); return found && !up })
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("n1 shown down %v after its lease went, want < 2s", d)
	}
	// The JSON view agrees.
	resp, err := http.Get(url + "/view.json")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var v View
	if err := json.NewDecoder(resp.Body).Decode(&v); err != nil {
		t.Fatal(err)
	}
	if up, found := nodeUp(v, "n1"); !found || up {
		t.Errorf("view.json: n1 found=%v up=%v", found, up)
	}
}

func TestPageHeaders(t *testing.T) {
	_, url := serve(t)
	for _, path := range []string{"/", "/static/app.js", "/static/style.css"} {
		resp, err := http.Get(url + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 200 {
			t.Errorf("%s: %s", path, resp.Status)
		}
		if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "script-src 'self'") || strings.Contains(csp, "unsafe") {
			t.Errorf("%s: CSP %q", path, csp)
		}
	}
	// A name other than localhost in Host (DNS rebinding) is refused.
	req, _ := http.NewRequest("GET", url+"/view.json", nil)
	req.Host = "evil.example:8080"
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMisdirectedRequest {
		t.Errorf("Host evil.example: %s, want 421", resp.Status)
	}
	// The page is read-only.
	resp, err = http.Post(url+"/events", "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Errorf("POST /events: %s", resp.Status)
	}
}

func TestBanner(t *testing.T) {
	if b := Banner("127.0.0.1:8080"); !strings.Contains(b, "ssh -N -L 8080:127.0.0.1:8080") {
		t.Errorf("loopback banner: %q", b)
	}
	if b := Banner("0.0.0.0:8080"); !strings.Contains(b, "warning") {
		t.Errorf("wildcard banner: %q", b)
	}
}
