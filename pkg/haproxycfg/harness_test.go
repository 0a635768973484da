package haproxycfg

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/meshd/meshd/pkg/registry"
)

// requireHAProxy skips tests that need the real binary when it is missing.
func requireHAProxy(tb testing.TB) string {
	tb.Helper()
	bin, err := exec.LookPath("haproxy")
	if err != nil {
		tb.Skip("haproxy not installed (apt-get install haproxy): skipping a test that runs the real binary")
	}
	return bin
}

// testDir is a short private directory (unix socket paths are limited to
// 107 bytes, and t.TempDir paths grow with test names).
func testDir(tb testing.TB) string {
	tb.Helper()
	d, err := os.MkdirTemp("", "mdthap")
	if err != nil {
		tb.Fatal(err)
	}
	if os.Getenv("MDT_KEEP") == "" {
		tb.Cleanup(func() { os.RemoveAll(d) })
	}
	return d
}

func testOptions(dir string) Options {
	return Options{
		Self:          "node1",
		Consume:       []registry.Group{registry.GroupServices, registry.GroupBackends},
		ConfigPath:    filepath.Join(dir, "haproxy.cfg"),
		MasterSocket:  filepath.Join(dir, "master.sock"),
		StatsSocket:   filepath.Join(dir, "stats.sock"),
		Binary:        "haproxy",
		Supervise:     true,
		ServerSlots:   4,
		HardStopAfter: 5 * time.Second,
	}
}

// newComponent builds a supervised component; the cleanup stops haproxy.
func newComponent(tb testing.TB, opts Options) *Component {
	tb.Helper()
	return newComponentReg(tb, opts, prometheus.NewRegistry())
}

// counter reads a counter (summed over labels matching label=value, or
// all when label is "") from reg.
func counter(tb testing.TB, reg *prometheus.Registry, name, label, value string) float64 {
	tb.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		tb.Fatal(err)
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			match := label == ""
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					match = true
				}
			}
			if match {
				sum += m.GetCounter().GetValue()
			}
		}
	}
	return sum
}

// newComponentReg is newComponent with the metrics registry given.
func newComponentReg(tb testing.TB, opts Options, reg prometheus.Registerer) *Component {
	tb.Helper()
	requireHAProxy(tb)
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	c, err := New(opts, log, reg)
	if err != nil {
		tb.Fatal(err)
	}
	// Run as the agent would; stopMeshd(c) ends it as meshd exiting does.
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan struct{})
	go func() { defer close(ran); c.Run(ctx) }()
	running.Store(c, func() { cancel(); <-ran })
	tb.Cleanup(func() {
		stopMeshd(c)
		c.Close()
		// Stop whatever master runs on this socket, adopted or not.
		if p, err := (Master{Socket: opts.MasterSocket}).Procs(context.Background()); err == nil {
			sup := &Supervisor{pid: p.Master.PID}
			sup.Stop(5 * time.Second)
		}
	})
	return c
}

// running maps a component of newComponentReg to the function that ends
// its Run.
var running sync.Map

// stopMeshd ends c's Run and closes it, as meshd exiting does: HAProxy
// keeps running.
func stopMeshd(c *Component) {
	if stop, ok := running.LoadAndDelete(c); ok {
		stop.(func())()
	}
	c.Close()
}

// freePort returns a currently free high loopback port.
func freePort(tb testing.TB) int {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// backend is a loopback TCP server that answers every connection with its
// name and closes it.
type backend struct {
	name string
	port int
	ln   net.Listener
	ip   string // "" means 127.0.0.1
}

func startBackend(tb testing.TB, name string) *backend {
	tb.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	b := &backend{name: name, port: ln.Addr().(*net.TCPAddr).Port, ln: ln}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				io.WriteString(c, name+"\n")
			}()
		}
	}()
	tb.Cleanup(func() { ln.Close() })
	return b
}

func (b *backend) instance() registry.Instance {
	ip := b.ip
	if ip == "" {
		ip = "127.0.0.1"
	}
	return registry.Instance{IPv4: ip, Node: b.name, Port: b.port}
}

// snapshot builds a snapshot of services apps: name -> (port, instances).
type appSpec struct {
	port      int
	instances []*backend
}

func snapshot(apps map[string]appSpec) *registry.Snapshot {
	s := &registry.Snapshot{Apps: map[registry.AppID]*registry.App{}}
	for name, spec := range apps {
		id := registry.AppID{Group: registry.GroupServices, Name: name}
		a := &registry.App{ID: id, Meta: &registry.AppMeta{Publish: registry.Publish{Port: spec.port}}, Instances: map[string]registry.Instance{}}
		for _, b := range spec.instances {
			a.Instances[b.name] = b.instance()
		}
		s.Apps[id] = a
	}
	return s
}

// ask connects to 127.0.0.1:port and returns the line the backend sent.
func ask(port int) (string, error) {
	c, err := net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), 2*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "", fmt.Errorf("read: %w (got %q)", err, line)
	}
	return strings.TrimSpace(line), nil
}

// askUntil retries ask until want answers, for at most timeout.
func askUntil(tb testing.TB, port int, want string, timeout time.Duration) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	var got string
	var err error
	for time.Now().Before(deadline) {
		if got, err = ask(port); err == nil && got == want {
			return
		}
		time.Sleep(time.Millisecond)
	}
	tb.Fatalf("port %d: want %q, last answer %q, err %v", port, want, got, err)
}

// runningApp builds a component with opts and applies one app to it: web
// on a free port, served by backend a.
func runningApp(tb testing.TB, opts Options) (c *Component, port int, a *backend, snap *registry.Snapshot) {
	tb.Helper()
	c = newComponent(tb, opts)
	port, a = freePort(tb), startBackend(tb, "a")
	snap = snapshot(map[string]appSpec{"web": {port, []*backend{a}}})
	if err := c.Apply(context.Background(), snap); err != nil {
		tb.Fatal(err)
	}
	return c, port, a, snap
}

// listenReusePort listens on addr as HAProxy binds (SO_REUSEADDR and
// SO_REUSEPORT): the legacy HAProxy of a node migrating from confd.
func listenReusePort(tb testing.TB, addr string) net.Listener {
	tb.Helper()
	lc := net.ListenConfig{Control: func(_, _ string, rc syscall.RawConn) error {
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = errors.Join(unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEADDR, 1),
				unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1))
		}); err != nil {
			return err
		}
		return serr
	}}
	ln, err := lc.Listen(context.Background(), "tcp4", addr)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { ln.Close() })
	return ln
}

func procs(tb testing.TB, c *Component) Procs {
	tb.Helper()
	p, err := c.applier.Master.Procs(context.Background())
	if err != nil {
		tb.Fatal(err)
	}
	return p
}

func status(c *Component) Status { return c.Status().(Status) }

// load runs clients against port until stop or max requests, counting
// failures (a refused or reset connection, or a wrong answer).
type load struct {
	mu       sync.Mutex
	ok, fail int
	errs     []string
	stop     chan struct{}
	wg       sync.WaitGroup
}

func startLoad(port, clients, max int, valid map[string]bool) *load {
	l := &load{stop: make(chan struct{})}
	for i := 0; i < clients; i++ {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for n := 0; n < max/clients; n++ {
				select {
				case <-l.stop:
					return
				default:
				}
				got, err := ask(port)
				l.mu.Lock()
				if err != nil || !valid[got] {
					l.fail++
					if len(l.errs) < 10 {
						l.errs = append(l.errs, fmt.Sprintf("%q %v", got, err))
					}
				} else {
					l.ok++
				}
				l.mu.Unlock()
			}
		}()
	}
	return l
}

func (l *load) finish() (ok, fail int, errs []string) {
	close(l.stop)
	l.wg.Wait()
	return l.ok, l.fail, l.errs
}

// childrenOf counts the processes whose parent is pid.
func childrenOf(pid int) int {
	ents, _ := os.ReadDir("/proc")
	n := 0
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...
		s := string(b)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
		if len(f) > 1 && f[1] == strconv.Itoa(pid) && f[0] != "Z" {
			n++
		}
	}
	return n
}

var errNotYet = errors.New("not yet")
