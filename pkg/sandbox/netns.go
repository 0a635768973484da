package sandbox

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// netnsDir is where `ip netns add` pins named namespaces.
const netnsDir = "/run/netns"

// inNetns runs fn on an OS thread switched into the named network
// namespace. Sockets fn creates belong to that namespace for their whole
// life, whichever thread later uses them: that is how the sandbox puts its
// in-process etcd, its demo servers and its probes inside namespaces
// without a helper process. fn runs on its own goroutine.
func inNetns(name string, fn func() error) error {
	done := make(chan error, 1)
	go func() {
		leave, err := enterNetns(name)
		if err != nil {
			done <- err
			return
		}
		ferr := fn()
		if err := leave(); err != nil {
			done <- errors.Join(ferr, err)
			select {} // keep the thread out of use (enterNetns)
		}
		done <- ferr
	}()
	return <-done
}

// enterNetns locks the calling goroutine to its OS thread and switches
// the thread into the named namespace; leave switches it back and unlocks
// it. Sockets the goroutine opens in between are the namespace's, without
// a switch per socket.
//
// A thread must never end while the sandbox runs: the processes it starts
// (meshd) have Pdeathsig set, which the kernel sends when the *thread*
// that forked them exits, and a goroutine that returns still locked ends
// its thread. So when leave fails, the caller keeps the goroutine (and the
// thread, in the wrong namespace) parked for good instead of returning.
func enterNetns(name string) (leave func() error, err error) {
	target, err := os.Open(netnsDir + "/" + name)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", name, err)
	}
	defer target.Close()
	runtime.LockOSThread()
	orig, err := os.Open(fmt.Sprintf("/proc/self/task/%d/ns/net", syscall.Gettid()))
	if err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("open own netns: %w", err)
	}
	if err := setns(target.Fd()); err != nil {
		orig.Close()
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("enter netns %s: %w", name, err)
	}
	return func() error {
		defer orig.Close()
		if err := setns(orig.Fd()); err != nil {
			return fmt.Errorf("leave netns %s: %w", name, err)
		}
		runtime.UnlockOSThread()
		return nil
	}, nil
}

func setns(fd uintptr) error {
	return unix.Setns(int(fd), unix.CLONE_NEWNET)
}

// dialIn opens a connection from inside the named namespace.
func dialIn(ctx context.Context, ns, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := inNetns(ns, func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}

// listenIn opens a TCP listener inside the named namespace.
func listenIn(ns, addr string) (net.Listener, error) {
	var l net.Listener
	err := inNetns(ns, func() error {
		var err error
		l, err = net.Listen("tcp", addr)
		return err
	})
	return l, err
}

// ip runs one iproute2 command and returns its error with its output.
func ip(ctx context.Context, args ...string) error {
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
	return nil
}

// listNetns returns the named network namespaces.
func listNetns() ([]string, error) {
	ents, err := os.ReadDir(netnsDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		out = append(out, e.Name())
	}
	slices.Sort(out)
	return out, nil
}

// namespacesOf returns the existing namespaces that belong to the sandbox
// named tag: <tag>-hub and <tag>-n<N>.
func namespacesOf(tag string) ([]string, error) {
	all, err := listNetns()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, n := range all {
		rest, ok := strings.CutPrefix(n, tag+"-")
		if !ok {
			continue
		}
		if rest == "hub" || (len(rest) > 1 && rest[0] == 'n' && allDigits(rest[1:])) {
			out = append(out, n)
		}
	}
	return out, nil
}

func allDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return s != ""
}

// nsPids returns the processes running in a named namespace.
func nsPids(ctx context.Context, ns string) []int {
	out, err := exec.CommandContext(ctx, "ip", "netns", "pids", ns).Output()
	if err != nil {
		return nil
	}
	var pids []int
	for _, f := range strings.Fields(string(out)) {
		var p int
		if _, err := fmt.Sscanf(f, "%d", &p); err == nil && p > 1 && p != os.Getpid() {
			pids = append(pids, p)
		}
	}
	return pids
}

// killNetns kills every process in a namespace and deletes it (and with
// it every link inside).
func killNetns(ctx context.Context, ns string) error {
	for _, p := range nsPids(ctx, ns) {
		_ = syscall.Kill(p, syscall.SIGKILL)
	}
	return ip(ctx, "netns", "del", ns)
}

// CleanCommand is the shell command that removes what a sandbox named tag
// left behind, for error messages.
func CleanCommand(tag string) string {
	return fmt.Sprintf("meshctl sandbox --clean --name %s   (or: for ns in $(ip netns list | grep -o '^%s-[a-z0-9]*'); do ip netns pids $ns | xargs -r kill -9; ip netns del $ns; done)", tag, tag)
}

// Clean removes every namespace (and so every link and process) and every
// temporary work and run directory of a sandbox named tag that an earlier
// run left behind. It returns what it removed: namespace names, then
// directory paths. It refuses while a live process runs that sandbox.
func Clean(ctx context.Context, tag string) ([]string, error) {
	if err := validTag(tag); err != nil {
		return nil, err
	}
	if pid := ownerPid(tag); pid != 0 {
		return nil, fmt.Errorf("%w: sandbox %q is running in process %d; stop it there instead", ErrRunning, tag, pid)
	}
	nss, err := namespacesOf(tag)
	if err != nil {
		return nil, err
	}
	var errs []error
	for _, ns := range nss {
		if err := killNetns(ctx, ns); err != nil {
			errs = append(errs, err)
		}
	}
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "meshd-sandbox-"+tag+"-*"))
	runDirs, _ := filepath.Glob(filepath.Join(runParent, "meshd-sandbox-"+tag+"-*"))
	dirs = append(dirs, runDirs...)
	for _, d := range dirs {
		if err := os.RemoveAll(d); err != nil {
			errs = append(errs, err)
			continue
		}
		nss = append(nss, d)
	}
	os.Remove(ownerFile(tag))
	return nss, errors.Join(errs...)
}

// ownerDir holds one pid file per running sandbox, so that a second run of
// the same name can tell a live sandbox from a crashed one's leftovers.
const ownerDir = "/run/meshd-sandbox"

func ownerFile(tag string) string { return filepath.Join(ownerDir, tag+".pid") }

// ownerPid returns the pid of the live process running the sandbox named
// tag, or 0.
func ownerPid(tag string) int {
	b, err := os.ReadFile(ownerFile(tag))
	if err != nil {
		return 0
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 || pid == os.Getpid() {
		return 0
	}
	if err := syscall.Kill(pid, 0); err != nil {
		return 0
	}
	return pid
}

func writeOwner(tag string) error {
	if err := os.MkdirAll(ownerDir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(ownerFile(tag), []byte(strconv.Itoa(os.Getpid())+"\n"), 0o644)
}

func removeOwner(tag string) {
	if b, err := os.ReadFile(ownerFile(tag)); err == nil && strings.TrimSpace(string(b)) == strconv.Itoa(os.Getpid()) {
		os.Remove(ownerFile(tag))
	}
}

// NetnsInode is the inode of the node's network namespace, which
// /proc/PID/ns/net of every process in it names.
func (n *Node) NetnsInode() (uint64, error) {
	var st syscall.Stat_t
	if err := syscall.Stat(netnsDir+"/"+n.NS, &st); err != nil {
		return 0, fmt.Errorf("network namespace of %s: %w", n.Name, err)
	}
	return st.Ino, nil
}
