package sandbox

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/meshd/meshd/pkg/config"
	"github.com/meshd/meshd/pkg/registry"
)

// NodeOptions configures one node.
type NodeOptions struct {
	// Consume lists the groups the node's HAProxy serves locally.
	Consume []registry.Group
	// Instances are the apps the node serves (advertised by its meshd).
	Instances []config.Instance
	// Edit, if set, may change the generated meshd config before it is
	// validated and written.
	Edit func(*config.Config)
	// BeforeStart, if set, runs once the namespace is up and before meshd
	// starts (to start what the node's instances check, like ServeDemo).
	BeforeStart func(*Node) error
	// NoStart leaves meshd stopped: the namespace, link and config are
	// ready and Start runs it later (a node that runs something else
	// first, like a migration test's legacy node).
	NoStart bool
}

// Node is one sandbox node: a network namespace with a veth into the hub
// bridge, running meshd.
type Node struct {
	// Name is the node's registry name (n1, n2, ...).
	Name  string
	Index int
	// NS is the node's network namespace.
	NS string
	// Addr is the node's address on the sandbox bridge (its "public" IP).
	Addr netip.Addr
	// Dir holds the node's config, state and meshd.log.
	Dir string
	// RunDir holds what a real node keeps in /run (a tmpfs): HAProxy's
	// rendered config, pid file and sockets, and the node's private
	// /run/wireguard. It is on a tmpfs where the host has one (/dev/shm),
	// as on a real node: meshd rewrites the HAProxy config on every
	// instance change.
	RunDir string
	// Config is the meshd configuration the node runs with.
	Config config.Config

	c          *Cluster
	mu         sync.Mutex
	cmd        *exec.Cmd
	exited     chan struct{}
	closers    []func()
	configPath string
}

// AddNode creates the next node's namespace and link and starts its meshd.
func (c *Cluster) AddNode(ctx context.Context, o NodeOptions) (*Node, error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, errors.New("sandbox closed")
	}
	idx := c.nextIdx
	if idx > MaxNodes {
		c.mu.Unlock()
		return nil, fmt.Errorf("at most %d nodes", MaxNodes)
	}
	c.nextIdx++
	n := &Node{
		Name: nodeName(idx), Index: idx, NS: fmt.Sprintf("%s-n%d", c.tag, idx),
		Addr: nodeAddr(idx), Dir: filepath.Join(c.workDir, nodeName(idx)), RunDir: filepath.Join(c.runDir, nodeName(idx)), c: c,
	}
	c.nodes[n.Name] = n
	c.mu.Unlock()
	if err := n.setup(ctx, o); err != nil {
		return n, fmt.Errorf("node %s: %w", n.Name, err)
	}
	if o.BeforeStart != nil {
		if err := o.BeforeStart(n); err != nil {
			return n, fmt.Errorf("node %s: %w", n.Name, err)
		}
	}
	if o.NoStart {
		return n, nil
	}
	if err := n.Start(ctx); err != nil {
		return n, fmt.Errorf("node %s: %w", n.Name, err)
	}
	return n, nil
}

func (n *Node) hostVeth() string { return fmt.Sprintf("%sh%d", n.c.tag, n.Index) }

// Veth is the name of the node's interface on the bridge network.
func (n *Node) Veth() string { return fmt.Sprintf("%se%d", n.c.tag, n.Index) }

func (n *Node) setup(ctx context.Context, o NodeOptions) error {
	for _, d := range []string{filepath.Join(n.Dir, "state"), n.RunDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	hub := n.c.HubNS()
	for _, args := range [][]string{
		{"netns", "add", n.NS},
		{"-n", n.NS, "link", "set", "lo", "up"},
		{"link", "add", n.hostVeth(), "netns", hub, "type", "veth", "peer", "name", n.Veth(), "netns", n.NS},
		{"-n", hub, "link", "set", n.hostVeth(), "master", n.c.tag + "br", "up"},
		{"-n", n.NS, "addr", "add", netip.PrefixFrom(n.Addr, bridgeNet.Bits()).String(), "dev", n.Veth()},
		{"-n", n.NS, "link", "set", n.Veth(), "up"},
	} {
		if err := ip(ctx, args...); err != nil {
			return err
		}
	}
	cfg := n.c.nodeConfig(n, o)
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("generated config: %w", err)
	}
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return err
	}
	n.configPath = filepath.Join(n.Dir, "meshd.json")
	if err := os.WriteFile(n.configPath, b, 0o600); err != nil {
		return err
	}
	n.Config = cfg
	return nil
}

// nodeConfig is the meshd configuration of a sandbox node: WireGuard in
// mode auto (kernel if the module exists, else userspace), a supervised haproxy with its files in the node's run directory,
// no secrets.
func (c *Cluster) nodeConfig(n *Node, o NodeOptions) config.Config {
	cfg := config.Default()
	cfg.NodeName = n.Name
	cfg.PublicIPv4 = n.Addr.String()
	cfg.Consume = o.Consume
	cfg.StateDir = filepath.Join(n.Dir, "state")
	cfg.LeaseTTL = config.Duration(c.opts.LeaseTTL)
	cfg.MetricsAddr = ""
	cfg.Etcd.Endpoints = []string{c.EtcdEndpoint()}
	cfg.Instances = o.Instances
	cfg.Overlay.Mode = "auto" // kernel WireGuard where the module exists, else userspace
	cfg.Overlay.Interface = c.tag + "wg"
	cfg.Overlay.Endpoint = netip.AddrPortFrom(n.Addr, uint16(cfg.Overlay.ListenPort)).String()
	cfg.HAProxy.Binary = c.opts.HAProxyBinary
	if p, err := exec.LookPath(cfg.HAProxy.Binary); err == nil {
		cfg.HAProxy.Binary = p
	}
	cfg.HAProxy.Supervise = true
	cfg.HAProxy.ConfigPath = filepath.Join(n.RunDir, "haproxy.cfg")
	cfg.HAProxy.MasterSocket = filepath.Join(n.RunDir, "haproxy-master.sock")
	cfg.HAProxy.StatsSocket = filepath.Join(n.RunDir, "haproxy-stats.sock")
	cfg.Secrets.Enable = false
	if o.Edit != nil {
		o.Edit(&cfg)
	}
	return cfg
}

// Start starts the node's meshd (again, after Kill or Stop) in its
// namespace, with its own /run/wireguard so that its WireGuard UAPI
// socket is its own.
func (n *Node) Start(ctx context.Context) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd != nil {
		return fmt.Errorf("meshd already running (pid %d)", n.cmd.Process.Pid)
	}
	logf, err := os.OpenFile(filepath.Join(n.Dir, "meshd.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	// A directory of the node's own is bind-mounted on /run/wireguard in a
	// fresh mount namespace: the WireGuard UAPI socket is private to the
	// node, yet the same across meshd restarts (a detached userspace
	// device outlives the meshd that started it).
	wgDir := filepath.Join(n.RunDir, "wireguard")
	if err := os.MkdirAll(wgDir, 0o700); err != nil {
		logf.Close()
		return err
	}
	args := []string{"netns", "exec", n.NS, "sh", "-c",
		`mount --bind "$MESHD_SANDBOX_WGDIR" /run/wireguard && exec "$0" "$@"`, n.c.opts.MeshdBinary, "--config", n.configPath}
	if lvl := n.c.opts.MeshdLogLevel; lvl != "" {
		args = append(args, "--log-level", lvl)
	}
	cmd := exec.Command("ip", args...)
	cmd.Env = append(os.Environ(), "MESHD_SANDBOX_WGDIR="+wgDir)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start meshd: %w", err)
	}
	exited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(exited)
	}()
	n.cmd, n.exited = cmd, exited
	n.c.log.Info("meshd started", "node", n.Name, "ns", n.NS, "pid", cmd.Process.Pid, "addr", n.Addr)
	return nil
}

// Pid is the node's meshd process id, or 0 when it is not running.
func (n *Node) Pid() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.cmd == nil {
		return 0
	}
	select {
	case <-n.exited:
		return 0
	default:
		return n.cmd.Process.Pid
	}
}

// Exited is closed when the current meshd process ends (nil if none was
// started).
func (n *Node) Exited() <-chan struct{} {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.exited
}

// Kill SIGKILLs the node's meshd and everything else running in its
// namespace (its haproxy): a node dying without saying goodbye. It returns
// once no process is left in the namespace.
func (n *Node) Kill(ctx context.Context) error {
	n.mu.Lock()
	cmd, exited := n.cmd, n.exited
	n.cmd = nil
	n.mu.Unlock()
	if cmd != nil {
		_ = cmd.Process.Kill()
		select {
		case <-exited:
		case <-ctx.Done():
			return fmt.Errorf("node %s: meshd did not exit: %w", n.Name, ctx.Err())
		}
	}
	for {
		pids := nsPids(ctx, n.NS)
		if len(pids) == 0 {
			return nil
		}
		for _, p := range pids {
			_ = syscall.Kill(p, syscall.SIGKILL)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("node %s: processes %v still in namespace: %w", n.Name, describePids(pids), ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func describePids(pids []int) []string {
	out := make([]string, len(pids))
	for i, p := range pids {
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p))
		out[i] = fmt.Sprintf("%d %s", p, bytes.ReplaceAll(b, []byte{0}, []byte{' '}))
	}
	return out
}

// Stop asks meshd to stop (SIGTERM), waits up to grace, then kills what is
// left in the namespace.
func (n *Node) Stop(ctx context.Context, grace time.Duration) error {
	n.mu.Lock()
	cmd, exited := n.cmd, n.exited
	n.mu.Unlock()
	if cmd != nil {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(grace):
		case <-ctx.Done():
		}
	}
	return n.Kill(ctx)
}

// StopMeshd stops only meshd (SIGTERM, then SIGKILL after grace) and
// leaves everything else in the namespace running: its detached
// WireGuard device and its haproxy, and whatever else a test started
// there (a node rolled back to another overlay).
func (n *Node) StopMeshd(ctx context.Context, grace time.Duration) error {
	n.mu.Lock()
	cmd, exited := n.cmd, n.exited
	n.cmd = nil
	n.mu.Unlock()
	if cmd == nil {
		return nil
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
		return nil
	case <-time.After(grace):
	case <-ctx.Done():
	}
	_ = cmd.Process.Kill()
	select {
	case <-exited:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("node %s: meshd did not exit: %w", n.Name, ctx.Err())
	}
}

// Restart kills the node's meshd and starts it again with the same state.
func (n *Node) Restart(ctx context.Context) error {
	if err := n.Kill(ctx); err != nil {
		return err
	}
	return n.Start(ctx)
}

// CutLink takes the node's link to the bridge down (down=true) or up
// again: the node is partitioned from etcd and every peer.
func (n *Node) CutLink(ctx context.Context, down bool) error {
	state := "up"
	if down {
		state = "down"
	}
	return ip(ctx, "-n", n.c.HubNS(), "link", "set", n.hostVeth(), state)
}

// Exec runs a command in the node's network namespace with the node's
// private /run/wireguard (so `wg` sees its device) and returns its
// combined output.
func (n *Node) Exec(ctx context.Context, name string, args ...string) ([]byte, error) {
	var cmd *exec.Cmd
	if pid := n.Pid(); pid != 0 {
		cmd = exec.CommandContext(ctx, "nsenter", append([]string{"-t", strconv.Itoa(pid), "-m", "-n", "--", name}, args...)...)
	} else {
		cmd = exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.NS, "sh", "-c",
			`mount --bind "$MESHD_SANDBOX_WGDIR" /run/wireguard && exec "$0" "$@"`, name}, args...)...)
		cmd.Env = append(os.Environ(), "MESHD_SANDBOX_WGDIR="+filepath.Join(n.RunDir, "wireguard"))
	}
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		return out.Bytes(), fmt.Errorf("%s in %s: %w: %s", name, n.NS, err, bytes.TrimSpace(out.Bytes()))
	}
	return out.Bytes(), nil
}

// LogTail returns the last max bytes of the node's meshd log.
func (n *Node) LogTail(max int) string {
	b, _ := os.ReadFile(filepath.Join(n.Dir, "meshd.log"))
	if len(b) > max {
		b = b[len(b)-max:]
	}
	return string(b)
}

func (n *Node) addCloser(f func()) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.closers = append(n.closers, f)
}

func (n *Node) teardown(ctx context.Context) error {
	kerr := n.Kill(ctx)
	n.mu.Lock()
	closers := n.closers
	n.closers = nil
	n.mu.Unlock()
	for _, f := range closers {
		f()
	}
	if _, err := os.Stat(filepath.Join(netnsDir, n.NS)); err != nil {
		return kerr
	}
	return errors.Join(kerr, killNetns(ctx, n.NS))
}

// RemoveNode kills a node, deletes its namespace (and link) and forgets
// it. Its registry keys stay: registry.RemoveNode deletes those, as
// `meshctl node remove` does.
func (c *Cluster) RemoveNode(ctx context.Context, name string) error {
	c.mu.Lock()
	n := c.nodes[name]
	delete(c.nodes, name)
	c.mu.Unlock()
	if n == nil {
		return fmt.Errorf("no node %s", name)
	}
	return n.teardown(ctx)
}
