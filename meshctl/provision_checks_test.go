package main

import (
	"context"
	"encoding/json"
	"io"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/hetzner"
)

// unreachableEtcd is an address nothing listens on.
const unreachableEtcd = "http://127.0.0.1:1"

func TestMeshctlProvisionRefusesBeforeAnyCall(t *testing.T) {
	h := newHzHarness(t)
	for name, tt := range map[string]struct {
		args []string
		want string
		// calls says whether read-only API calls may happen (the type
		// and image are looked up); nothing is ever created.
		calls bool
	}{
		"double dot":             {h.provisionArgs("a..b"), "not a hostname", false},
		"label starting with -":  {h.provisionArgs("web.-1"), "must start and end with a letter or digit", false},
		"unpinned infect script": {append(h.provisionArgs("n1"), "--nixos-infect-url", "https://example.com/nixos-infect"), "--nixos-infect-sha256", false},
		"retired type":           {append(h.provisionArgs("n1"), "--type", "cpx21"), `"cpx21" is unavailable in "hel1"`, true},
		"type sold out here":     {append(h.provisionArgs("n1"), "--type", "cpx32", "--location", "sin"), `"cpx32" cannot be ordered in sin`, true},
		"deprecated image":       {append(h.provisionArgs("n1"), "--image", "debian-11"), `Image "debian-11" is deprecated`, true},
		"image for another arch": {append(h.provisionArgs("n1"), "--type", "cax11", "--image", "114690387"), "is for x86, the server type is arm", true},
	} {
		t.Run(name, func(t *testing.T) {
			before := len(h.fake.Requests())
			code, _, stderr := h.run("", tt.args...)
			if code != exitUsage || !strings.Contains(stderr, tt.want) {
				t.Fatalf("exit %d, want %d and %q in:\n%s", code, exitUsage, tt.want, stderr)
			}
			for _, r := range h.fake.Requests()[before:] {
				if !tt.calls || r.Method != "GET" {
					t.Errorf("sent %s %s before refusing", r.Method, r.Path)
				}
			}
			if tt.calls && !strings.Contains(stderr, "orderable in") && !strings.Contains(stderr, "choose a current image") &&
				!strings.Contains(stderr, "is for x86") {
				t.Errorf("no way forward in:\n%s", stderr)
			}
		})
	}
	// The message lists what is orderable in the location.
	_, _, stderr := h.run("", append(h.provisionArgs("n1"), "--type", "cx22")...)
	for _, want := range []string{"cpx22 (x86", "cx23 (x86", "cax11 (arm"} {
		if !strings.Contains(stderr, want) {
			t.Errorf("refusal does not list %s:\n%s", want, stderr)
		}
	}
	if strings.Contains(stderr, "cpx11 (") {
		t.Errorf("refusal lists a retired type as orderable:\n%s", stderr)
	}
}

func TestMeshctlDestroyAndCloudWithoutEtcd(t *testing.T) {
	h := newHzHarness(t)
	if code, _, stderr := h.run("", h.provisionArgs("node1", "node2")...); code != exitOK {
		t.Fatalf("provision exit %d\n%s", code, stderr)
	}
	h.etcd = unreachableEtcd

	code, out, stderr := h.run("", "--command-timeout", "2s", "cloud", "-o", "json")
	if code != exitRegistry {
		t.Fatalf("cloud exit %d, want %d\n%s", code, exitRegistry, stderr)
	}
	var rows []hetzner.InventoryRow
	if err := json.Unmarshal([]byte(out), &rows); err != nil || len(rows) != 2 {
		t.Fatalf("cloud -o json: %v\n%s", err, out)
	}
	for _, r := range rows {
		if r.State != hetzner.StateUnknown || r.ServerID == 0 {
			t.Errorf("row %+v, want the server with state unknown", r)
		}
	}

	start := time.Now()
	code, out, stderr = h.run("", "--command-timeout", "2s", "destroy", "node1", "--yes")
	if code != exitRegistry {
		t.Fatalf("destroy exit %d, want %d\n%s\n%s", code, exitRegistry, out, stderr)
	}
	if d := time.Since(start); d > 30*time.Second {
		t.Errorf("destroy took %v with etcd down", d)
	}
	if _, ok := h.fake.ServerByName("node1"); ok {
		t.Error("node1 was not deleted although etcd was down")
	}
	if _, ok := h.fake.ServerByName("node2"); !ok {
		t.Error("node2 was deleted")
	}
	for _, want := range []string{"/cluster/nodes/node1", "meshctl destroy node1", "registry keys left behind"} {
		if !strings.Contains(stderr+out, want) {
			t.Errorf("output lacks %q:\n%s\n%s", want, out, stderr)
		}
	}
}

func TestMeshctlDestroyPromptInterrupted(t *testing.T) {
	h := newHzHarness(t)
	if code, _, stderr := h.run("", h.provisionArgs("node1")...); code != exitOK {
		t.Fatalf("provision exit %d\n%s", code, stderr)
	}
	// stdin stays open and silent, as a terminal waiting for a key.
	stdin, w := io.Pipe()
	defer w.Close()
	ctx, cancel := context.WithCancel(context.Background())
	prompt := &promptWatch{seen: make(chan struct{})}
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"--endpoints", unreachableEtcd, "--command-timeout", "2s", "destroy", "node1"},
			stdin, io.Discard, prompt, func(k string) string { return h.env[k] })
	}()
	select {
	case <-prompt.seen:
	case <-time.After(30 * time.Second):
		t.Fatal("no prompt")
	}
	// Ctrl-C at the prompt: the run must end at once.
	cancel()
	select {
	case code := <-done:
		if code != exitFailed || !strings.Contains(prompt.text(), "interrupted at the prompt, nothing deleted") {
			t.Errorf("exit %d\n%s", code, prompt.text())
		}
	case <-time.After(5 * time.Second):
		t.Fatal("destroy still waits for stdin after Ctrl-C")
	}
	if _, ok := h.fake.ServerByName("node1"); !ok {
		t.Error("node1 was deleted after Ctrl-C")
	}
}

// promptWatch is a stderr that closes seen once the prompt is written.
type promptWatch struct {
	mu   sync.Mutex
	b    strings.Builder
	seen chan struct{}
	once sync.Once
}

func (p *promptWatch) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.b.Write(b)
	if strings.Contains(p.b.String(), "Continue? [y/N]") {
		p.once.Do(func() { close(p.seen) })
	}
	return len(b), nil
}

func (p *promptWatch) text() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.b.String()
}
