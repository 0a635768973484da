package nixtest

import (
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/haproxycfg"
	"github.com/meshd/meshd/pkg/registry"
)

// newerThanLocalSystemd are directives current nixpkgs' systemd knows and
// this machine's systemd 252 does not; the examples use them on purpose.
var newerThanLocalSystemd = map[string]bool{
	"ImportCredential": true, // systemd 254
}

var storeExec = regexp.MustCompile(`^(Exec\w+=)([-+@!:]*)/nix/store/\S+(.*)$`)

// systemd itself parses every generated unit: unknown directives, bad
// values and broken dependencies fail the test. Store paths cannot exist
// here, so commands become /bin/true, and directives newer than the local
// systemd are left out; everything else is verified as is.
func TestSystemdVerifiesUnits(t *testing.T) {
	analyze, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze not installed")
	}
	unknownKey := regexp.MustCompile(`Unknown key '([^']+)'|Unknown key name '([^']+)'`)
	for _, want := range examples {
		t.Run(want.name, func(t *testing.T) {
			r := evalExample(t, want.name)
			dir := t.TempDir()
			var files []string
			write := func(name, text string) {
				var lines []string
				for _, l := range strings.Split(text, "\n") {
					if key, _, ok := strings.Cut(l, "="); ok && newerThanLocalSystemd[key] {
						continue
					}
					lines = append(lines, storeExec.ReplaceAllString(l, "${1}${2}/bin/true${3}"))
				}
				f := filepath.Join(dir, name)
				if err := os.WriteFile(f, []byte(strings.Join(lines, "\n")), 0o644); err != nil {
					t.Fatal(err)
				}
				files = append(files, f)
			}
			for name, u := range r.Services {
				write(name+".service", u.UnitText)
			}
			for name, u := range r.Targets {
				write(name+".target", u.UnitText)
			}
			cmd := exec.Command(analyze, append([]string{"verify", "--man=no", "--recursive-errors=no"}, files...)...)
			cmd.Env = append(os.Environ(), "SYSTEMD_UNIT_PATH="+dir+":", "SYSTEMD_LOG_COLOR=0")
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Errorf("systemd-analyze verify: %v", err)
			}
			if s := strings.TrimSpace(string(out)); s != "" {
				t.Errorf("systemd-analyze verify:\n%s", s)
			}
			if err := os.WriteFile(filepath.Join(dir, "probe.service"), []byte("[Service]\nExecStart=/bin/true\nProtectSytem=strict\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			probe, _ := exec.Command(analyze, "verify", "--man=no", filepath.Join(dir, "probe.service")).CombinedOutput()
			if !unknownKey.Match(probe) {
				t.Fatalf("systemd-analyze does not report a misspelt directive (%q): this check cannot work", probe)
			}
		})
	}
}

// The meshd-haproxy unit starts HAProxy on the bootstrap file, before meshd
// exists; meshd (supervise = false) then renders its config and reloads the
// master through the socket the unit passes with -S. Real haproxy, real
// meshd applier; the NOTIFY_SOCKET stands in for systemd's Type=notify.
func TestHAProxyUnitBootstrapHandover(t *testing.T) {
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		t.Skip("haproxy not installed")
	}
	root := repoRoot(t)
	r := evalExample(t, "worker")
	execStart := r.Services["meshd-haproxy"].value("ExecStart")
	if !strings.Contains(execStart, " -Ws -S /run/meshd-haproxy/master.sock,mode,660 -f /run/meshd/haproxy.cfg") {
		t.Fatalf("meshd-haproxy ExecStart=%s: not the command this test runs", execStart)
	}
	dir, err := os.MkdirTemp("", "mdtnix") // short: socket paths are limited to 107 bytes
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	cfgPath, master, stats := filepath.Join(dir, "haproxy.cfg"), filepath.Join(dir, "master.sock"), filepath.Join(dir, "stats.sock")

	// ExecStartPre: install the bootstrap file, validate it.
	boot, err := os.ReadFile(filepath.Join(root, "nix", "meshd-haproxy-bootstrap.cfg"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cfgPath, boot, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(bin, "-c", "-q", "-f", cfgPath).CombinedOutput(); err != nil {
		t.Fatalf("haproxy -c on the bootstrap file: %v: %s", err, out)
	}

	// ExecStart, with a notify socket of our own.
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: filepath.Join(dir, "notify.sock"), Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer notify.Close()
	cmd := exec.Command(bin, "-Ws", "-S", master+",mode,660", "-f", cfgPath)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+filepath.Join(dir, "notify.sock"))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		cmd.Wait()
	})
	waitReady(t, notify)

	// meshd's HAProxy component, as the module configures it.
	port := freePort(t)
	comp, err := haproxycfg.New(haproxycfg.Options{
		Self: "worker001", Consume: []registry.Group{registry.GroupServices},
		ConfigPath: cfgPath, MasterSocket: master, StatsSocket: stats, Binary: bin, Supervise: false,
	}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer comp.Close()
	id := registry.AppID{Group: registry.GroupServices, Name: "mongodb"}
	snap := &registry.Snapshot{Revision: 1, Apps: map[registry.AppID]*registry.App{id: {
		ID:        id,
		Meta:      &registry.AppMeta{Publish: registry.Publish{Port: port}},
		Instances: map[string]registry.Instance{"service001": {IPv4: "10.10.21.0", Node: "service001", Port: 27017}},
	}}}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := comp.Apply(ctx, snap); err != nil {
		t.Fatalf("meshd applies its config to the unit's HAProxy: %v", err)
	}
	rendered, _ := os.ReadFile(cfgPath)
	if strings.Contains(string(rendered), "Bootstrap config") || !strings.Contains(string(rendered), "bind 127.0.0.1:"+strconv.Itoa(port)) {
		t.Fatalf("config after apply:\n%s", rendered)
	}
	waitReady(t, notify) // the master finished the reload
	c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), 5*time.Second)
	if err != nil {
		t.Fatalf("mesh listener for %v not serving after the handover: %v", id, err)
	}
	c.Close()
	if cmd.ProcessState != nil {
		t.Fatal("haproxy master exited")
	}
}

// waitReady reads sd_notify messages until READY=1.
func waitReady(t *testing.T, notify *net.UnixConn) {
	t.Helper()
	buf := make([]byte, 4096)
	notify.SetReadDeadline(time.Now().Add(15 * time.Second))
	for {
		n, err := notify.Read(buf)
		if err != nil {
			t.Fatalf("waiting for READY=1 from haproxy: %v", err)
		}
		if strings.Contains("\n"+string(buf[:n])+"\n", "\nREADY=1\n") {
			return
		}
	}
}

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
