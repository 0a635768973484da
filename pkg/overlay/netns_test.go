package overlay

import (
	"bufio"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/registry"
)

// lab is a set of network namespaces joined by a bridge in a hub
// namespace: the underlay. Node i has 192.0.2.<i+1>/24 on eth0 (MTU 1460)
// and a default route, so the applier finds an uplink. Everything is
// created inside namespaces named <tag>-*, and deleted at cleanup.
type lab struct {
	t   *testing.T
	tag string
	// detached: each node's userspace device runs in its own process
	// (DeviceFlag) and nodes have distinct interface names in the shared
	// /run/wireguard, so a restarted node adopts its device. Otherwise the
	// device lives in the node process, which mounts a private
	// /run/wireguard, as the sandbox runs meshd.
	detached bool
	dir      string
	nodes    []*node
}

func requireLab(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces, TUN, WireGuard); runs in CI")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs the ip command (iproute2)")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("needs /dev/net/tun")
	}
}

func newLab(t *testing.T, detached bool) *lab {
	requireLab(t)
	l := &lab{t: t, tag: fmt.Sprintf("mdtov%d", os.Getpid()), detached: detached, dir: t.TempDir()}
	// ip netns exec needs the mount point on the host for the private
	// tmpfs; detached devices put their sockets there.
	if err := os.MkdirAll("/run/wireguard", 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, n := range l.nodes {
			n.in.Close()
			done := make(chan struct{})
			go func() { n.cmd.Wait(); close(done) }()
			select {
			case <-done:
			case <-time.After(3 * time.Second):
				n.cmd.Process.Kill()
				<-done
			}
			if t.Failed() {
				t.Logf("log of %s:\n%s", n.name, n.logText())
			}
		}
		for _, n := range l.nodes {
			// Detached device processes keep their namespace (and TUN)
			// alive after `ip netns del`: end every process left in it.
			// SIGTERM lets a device remove its socket; SIGKILL what remains.
			for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
				for range 50 {
					out, _ := exec.Command("ip", "netns", "pids", n.ns).Output()
					pids := strings.Fields(string(out))
					if len(pids) == 0 {
						break
					}
					for _, f := range pids {
						if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
							syscall.Kill(pid, sig)
						}
					}
					time.Sleep(20 * time.Millisecond)
				}
			}
			exec.Command("ip", "netns", "del", n.ns).Run()
		}
		if l.detached {
			for i := range l.nodes {
				os.Remove("/run/wireguard/" + l.iface(i) + ".sock")
			}
		}
		exec.Command("ip", "netns", "del", l.tag+"-hub").Run()
	})
	l.ip("netns", "add", l.tag+"-hub")
	l.ip("-n", l.tag+"-hub", "link", "add", "br0", "type", "bridge")
	l.ip("-n", l.tag+"-hub", "link", "set", "br0", "up")
	return l
}

// ip runs an ip(8) command and fails the test if it fails.
func (l *lab) ip(args ...string) string {
	l.t.Helper()
	out, err := exec.Command("ip", args...).CombinedOutput()
	if err != nil {
		l.t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

// addNode creates namespace, veth and a helper process for node i.
func (l *lab) addNode(i int) *node {
	t := l.t
	t.Helper()
	ns := fmt.Sprintf("%s-n%d", l.tag, i)
	hub := l.tag + "-hub"
	l.ip("netns", "add", ns)
	n := &node{name: fmt.Sprintf("n%d", i), ns: ns, logPath: filepath.Join(l.dir, fmt.Sprintf("n%d.log", i))}
	l.nodes = append(l.nodes, n)
	v := fmt.Sprintf("v%d", i)
	l.ip("-n", hub, "link", "add", v, "type", "veth", "peer", "name", "eth0", "netns", ns)
	l.ip("-n", hub, "link", "set", v, "master", "br0", "up")
	l.ip("-n", ns, "link", "set", "lo", "up")
	l.ip("-n", ns, "link", "set", "eth0", "mtu", "1460", "up")
	l.ip("-n", ns, "addr", "add", fmt.Sprintf("192.0.2.%d/24", i+1), "dev", "eth0")
	l.ip("-n", ns, "route", "add", "default", "via", "192.0.2.254")

	l.startHelper(n)
	return n
}

// startHelper starts (or restarts) node n's process in its namespace.
func (l *lab) startHelper(n *node) {
	t := l.t
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	n.cmd = exec.Command("ip", "netns", "exec", n.ns, exe, "-test.run=^$")
	n.cmd.Env = append(os.Environ(), helperEnv+"=1")
	if !l.detached {
		n.cmd.Env = append(n.cmd.Env, privateRunEnv+"=1")
	}
	// A file, not a pipe: a detached device process inherits it and may
	// outlive the node process, which must not hold up Wait.
	logf, err := os.OpenFile(n.logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	n.cmd.Stderr = logf
	if n.in, err = n.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	stdout, err := n.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	n.out = bufio.NewScanner(stdout)
	n.out.Buffer(make([]byte, 1<<20), 1<<20)
	if err := n.cmd.Start(); err != nil {
		t.Fatal(err)
	}
}

// kill SIGKILLs node n's process (ip netns exec execs, so it is the
// helper itself) and waits for it.
func (l *lab) kill(n *node) {
	n.cmd.Process.Kill()
	n.cmd.Wait()
}

// iface is node i's interface name: distinct per node when devices are
// detached (their sockets share /run/wireguard), one name otherwise.
func (l *lab) iface(i int) string {
	if l.detached {
		return fmt.Sprintf("mdtwg%d-%d", os.Getpid()%100000, i)
	}
	return fmt.Sprintf("mdtwg%d", os.Getpid()%1000000)
}

// options returns node i's component options with state in the lab's
// directory (the same on every call: a restarted node finds its state).
func (l *lab) options(i int) *Options {
	return &Options{
		Self:            fmt.Sprintf("n%d", i),
		StateDir:        filepath.Join(l.dir, fmt.Sprintf("n%d", i)),
		Interface:       l.iface(i),
		Keepalive:       25 * time.Second,
		Mode:            ModeAuto,
		Network:         netip.MustParsePrefix("10.0.0.0/8"),
		DetachUserspace: l.detached,
	}
}

// memberOf is node i's member record as ClaimMember would write it.
func memberOf(i int, publicKey string) registry.Member {
	subnet := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 10, byte(i), 0}), 24)
	return registry.Member{
		Name:      fmt.Sprintf("n%d", i),
		PublicKey: publicKey,
		Endpoint:  fmt.Sprintf("192.0.2.%d:51820", i+1),
		Subnet:    subnet,
		OverlayIP: subnet.Addr(),
	}
}

func overlayIP(i int) string { return fmt.Sprintf("10.10.%d.0", i) }

// handshake returns the time of node n's last handshake with the peer
// whose public key is key (zero: none; fails if there is no such peer).
func handshake(t *testing.T, n *node, key string) time.Time {
	t.Helper()
	peers := n.must(t, helperCmd{Op: "status"}).Peers
	for _, p := range peers {
		if p.PublicKey == key {
			return p.LastHandshake
		}
	}
	t.Fatalf("%s has no peer %s; peers: %+v", n.name, key, peers)
	return time.Time{}
}

// settledHandshake waits until node n's handshake with peer key has
// happened and has not moved for 300ms, and returns it. Right after peers
// are configured both sides may initiate a handshake (persistent
// keepalive sends at once); the later one can complete a few ms after the
// first ping. A handshake time only makes a baseline once that is over.
func settledHandshake(t *testing.T, n *node, key string) time.Time {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	last := handshake(t, n, key)
	for time.Now().Before(deadline) {
		time.Sleep(300 * time.Millisecond)
		cur := handshake(t, n, key)
		if !cur.IsZero() && cur.Equal(last) {
			return cur
		}
		last = cur
	}
	t.Fatalf("%s: handshake with %s did not settle", n.name, key)
	return time.Time{}
}

func hasPeer(t *testing.T, n *node, key string) bool {
	t.Helper()
	for _, p := range n.must(t, helperCmd{Op: "status"}).Peers {
		if p.PublicKey == key {
			return true
		}
	}
	return false
}
