package haproxycfg

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// netnsEnv is a private network namespace (named mdthap<pid>) whose
// loopback carries a few 10.254.0.x addresses. The registry refuses
// loopback instance addresses, so tests that go through etcd run HAProxy,
// the backends and the client in here instead: traffic never leaves it.
type netnsEnv struct {
	name string
	dir  string
}

func newNetns(tb testing.TB, addrs ...string) *netnsEnv {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("needs root for a network namespace")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		tb.Skip("needs iproute2 (ip)")
	}
	e := &netnsEnv{name: fmt.Sprintf("mdthap%d", os.Getpid())}
	run := func(args ...string) {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			tb.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
		}
	}
	run("netns", "add", e.name)
	tb.Cleanup(func() { exec.Command("ip", "netns", "del", e.name).Run() })
	run("-n", e.name, "link", "set", "lo", "up")
	for _, a := range addrs {
		run("-n", e.name, "addr", "add", a+"/32", "dev", "lo")
	}
	// HAProxy runs in the namespace through a wrapper: `ip netns exec`
	// execs, so the pid the supervisor sees is haproxy's own. `-c` needs
	// no namespace and skips the wrapper's cost, as in production.
	e.dir = testDir(tb)
	bin := requireHAProxy(tb)
	script := fmt.Sprintf("#!/bin/sh\n[ \"$1\" = -c ] && exec %[2]s \"$@\"\nexec ip netns exec %[1]s %[2]s \"$@\"\n", e.name, bin)
	if err := os.WriteFile(e.binary(), []byte(script), 0o755); err != nil {
		tb.Fatal(err)
	}
	return e
}

func (e *netnsEnv) binary() string { return filepath.Join(e.dir, "haproxy-in-netns") }

// do runs fn on an OS thread switched into the namespace: sockets fn
// creates (listen, dial) belong to the namespace.
func (e *netnsEnv) do(fn func() error) error {
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	target, err := os.Open("/var/run/netns/" + e.name)
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer target.Close()
	if err := setns(target); err != nil {
		runtime.UnlockOSThread()
		return err
	}
	ferr := fn()
	if err := setns(orig); err != nil {
		return fmt.Errorf("restore netns: %w (thread stays locked and dies with its goroutine)", err)
	}
	runtime.UnlockOSThread()
	return ferr
}

func setns(f *os.File) error {
	if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("setns: %w", err)
	}
	return nil
}

// backendAt starts a backend listening on addr:0 inside the namespace.
func (e *netnsEnv) backendAt(tb testing.TB, name, addr string) *backend {
	tb.Helper()
	var ln net.Listener
	if err := e.do(func() (err error) {
		ln, err = net.Listen("tcp", addr+":0")
		return err
	}); err != nil {
		tb.Fatal(err)
	}
	b := &backend{name: name, port: ln.Addr().(*net.TCPAddr).Port, ln: ln, ip: addr}
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

// freePort returns a free port on the namespace's loopback.
func (e *netnsEnv) freePort(tb testing.TB) int {
	tb.Helper()
	var port int
	if err := e.do(func() error {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return err
		}
		port = l.Addr().(*net.TCPAddr).Port
		return l.Close()
	}); err != nil {
		tb.Fatal(err)
	}
	return port
}

// ask is ask() from inside the namespace.
func (e *netnsEnv) ask(port int) (string, error) {
	var c net.Conn
	if err := e.do(func() (err error) {
		c, err = net.DialTimeout("tcp", "127.0.0.1:"+strconv.Itoa(port), 2*time.Second)
		return err
	}); err != nil {
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

func (e *netnsEnv) askUntil(tb testing.TB, port int, want string, timeout time.Duration) {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	var got string
	var err error
	for time.Now().Before(deadline) {
		if got, err = e.ask(port); err == nil && got == want {
			return
		}
		time.Sleep(time.Millisecond)
	}
	tb.Fatalf("port %d: want %q, last answer %q, err %v", port, want, got, err)
}
