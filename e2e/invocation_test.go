package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/config"
)

// TestBadInvocation runs the real meshd binary with bad flags, bad config
// files and unreadable TLS files, each inside a fresh network namespace.
// Each must exit non-zero at once with one line "meshd: ..." naming the
// problem, create no interface, and write nothing: the state directory and
// every other path in the config stay absent.
func TestBadInvocation(t *testing.T) {
	b := need(t)
	ns := fmt.Sprintf("mde2eb%d", os.Getpid()%10000)
	_ = exec.Command("ip", "netns", "del", ns).Run()
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", ns).Run() })
	links := func() string {
		out, err := exec.Command("ip", "-n", ns, "-o", "link").CombinedOutput()
		if err != nil {
			t.Fatalf("ip link: %v: %s", err, out)
		}
		return string(out)
	}
	linksBefore := links()
	garbage := filepath.Join(t.TempDir(), "garbage.pem")
	if err := os.WriteFile(garbage, []byte("not a certificate\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	type tc struct {
		name string
		args []string
		// cfg edits a valid config written to meshd.json (nil: no file);
		// raw, if set, breaks the valid config's JSON instead.
		cfg  func(c *config.Config)
		raw  func(m map[string]any) []byte
		want string
	}
	cases := []tc{
		{name: "unknown flag", args: []string{"--bogus"}, want: "unknown flag: --bogus"},
		{name: "bad log level", args: []string{"--log-level", "loud"}, want: "--log-level"},
		{name: "stray argument", args: []string{"run"}, want: `unexpected argument "run"`},
		{name: "check-config without config", args: []string{"--check-config"}, want: "needs --config"},
		{name: "missing config file", args: []string{"--config", "/nonexistent/meshd.json"}, want: "/nonexistent/meshd.json"},
		{name: "malformed JSON", raw: func(m map[string]any) []byte { b, _ := json.Marshal(m); return b[:len(b)-10] }, want: "meshd.json"},
		{name: "unknown field", raw: func(m map[string]any) []byte { m["nodeNmae"] = "n1"; return marshal(m) }, want: `unknown field "nodeNmae"`},
		{name: "wrong type", raw: func(m map[string]any) []byte {
			m["overlay"].(map[string]any)["listenPort"] = "51820"
			return marshal(m)
		}, want: "listenPort"},
		{name: "bad duration", raw: func(m map[string]any) []byte { m["leaseTTL"] = "ten"; return marshal(m) }, want: "leaseTTL"},
		{name: "huge value", raw: func(m map[string]any) []byte { m["nodeName"] = strings.Repeat("n", 1<<20); return marshal(m) }, want: "nodeName"},
		{name: "hostile node name", cfg: func(c *config.Config) { c.NodeName = "n1\nlisten evil" }, want: "nodeName"},
		{name: "node name with path", args: []string{"--node-name", "../etc"}, cfg: func(c *config.Config) {}, want: "nodeName"},
		{name: "missing CA file", cfg: func(c *config.Config) { c.Etcd.CAFile = "/nonexistent/ca.pem" }, want: "/nonexistent/ca.pem"},
		{name: "garbage CA file", cfg: func(c *config.Config) { c.Etcd.CAFile = garbage }, want: "etcd ca file"},
		{name: "cert without key", cfg: func(c *config.Config) { c.Etcd.CertFile = garbage }, want: "keyFile"},
		{name: "garbage certificate", cfg: func(c *config.Config) { c.Etcd.CertFile, c.Etcd.KeyFile = garbage, garbage }, want: "etcd client certificate"},
		{name: "unreadable key file", cfg: func(c *config.Config) { c.Etcd.CertFile, c.Etcd.KeyFile = garbage, "/" }, want: "etcd client certificate"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			args := slices.Clone(c.args)
			if c.cfg != nil || c.raw != nil {
				// Every case starts from a config whose paths are all in
				// dir, so that a case meshd wrongly accepts still writes
				// nowhere else.
				path := filepath.Join(dir, "meshd.json")
				cfg := validConfig(dir)
				if c.cfg != nil {
					c.cfg(&cfg)
				}
				data := marshal(cfg)
				if c.raw != nil {
					var m map[string]any
					if err := json.Unmarshal(data, &m); err != nil {
						t.Fatal(err)
					}
					data = c.raw(m)
				}
				if err := os.WriteFile(path, data, 0o600); err != nil {
					t.Fatal(err)
				}
				args = append(args, "--config", path)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			// A private /run/wireguard, as in the sandbox: a meshd that
			// wrongly started must not leave a UAPI socket on the host.
			cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns, "sh", "-c",
				`mount -t tmpfs none /run/wireguard && exec "$0" "$@"`, b.meshd}, args...)...)
			cmd.Dir = dir
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err := cmd.Run()
			if ctx.Err() != nil {
				t.Fatalf("meshd %v did not exit within 10s: it started despite the bad input", args)
			}
			var ee *exec.ExitError
			if !errors.As(err, &ee) || ee.ExitCode() == 0 {
				t.Fatalf("meshd %v: exit %v, want a non-zero exit; stderr: %s", args, err, stderr.String())
			}
			var errLines []string
			for _, l := range strings.Split(strings.TrimSpace(stderr.String()), "\n") {
				if strings.HasPrefix(l, "meshd: ") {
					errLines = append(errLines, l)
				}
			}
			if len(errLines) != 1 || !strings.Contains(errLines[0], c.want) {
				t.Errorf("meshd %v: want one line \"meshd: ...%s...\", stderr:\n%s", args, c.want, stderr.String())
			} else {
				t.Logf("%s", errLines[0])
			}
			if other := strings.Count(strings.TrimSpace(stderr.String()), "\n"); other > 0 && !strings.Contains(c.name, "flag") && c.name != "bad log level" {
				t.Errorf("meshd %v printed %d more lines besides the error:\n%s", args, other, stderr.String())
			}
			if l := links(); l != linksBefore {
				t.Errorf("meshd %v changed the namespace's links:\n%s", args, l)
			}
			ents, _ := os.ReadDir(dir)
			for _, e := range ents {
				if e.Name() != "meshd.json" {
					t.Errorf("meshd %v wrote %s although it refused to start", args, filepath.Join(dir, e.Name()))
				}
			}
		})
	}
}

// validConfig is a config that would start (every path under dir, an
// unreachable etcd): each case breaks one thing in it.
func validConfig(dir string) config.Config {
	cfg := config.Default()
	cfg.NodeName = "n1"
	cfg.StateDir = filepath.Join(dir, "state")
	cfg.MetricsAddr = ""
	cfg.Etcd.Endpoints = []string{"http://127.0.0.1:1"}
	cfg.Overlay.Mode = "userspace"
	cfg.Overlay.Interface = "mde2ebwg"
	cfg.HAProxy.ConfigPath = filepath.Join(dir, "haproxy", "haproxy.cfg")
	cfg.HAProxy.MasterSocket = filepath.Join(dir, "haproxy", "master.sock")
	cfg.HAProxy.StatsSocket = filepath.Join(dir, "haproxy", "stats.sock")
	cfg.Secrets.Enable = false
	return cfg
}

func marshal(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}
