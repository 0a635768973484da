// Package sandbox runs a real meshd cluster on one Linux machine: an
// in-process etcd in a hub network namespace holding a bridge, and N nodes,
// each a network namespace with a veth into the bridge, running the real
// meshd binary (userspace WireGuard, its own haproxy). It is what `meshctl
// sandbox` runs and the harness of the end-to-end tests and benchmarks.
//
// Nothing is created in the host's network namespace except one loopback
// listener that forwards to etcd in the hub, so that meshctl can be pointed
// at the sandbox. Everything is removed by Close, and a leftover from a
// crashed run is reported with the command that removes it (Clean).
package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/etcdembed"
)

// The sandbox's private addressing, chosen so it overlaps neither the
// overlay (10.10.0.0-10.99.0.0) nor anything on the host (it only exists
// inside the sandbox's namespaces).
var (
	bridgeNet = netip.MustParsePrefix("172.31.213.0/24")
	hubAddr   = netip.MustParseAddr("172.31.213.1")
)

// EtcdPort is the port etcd listens on inside the hub namespace.
const EtcdPort = 2379

// MaxNodes bounds the node count: one address per node on the bridge /24.
const MaxNodes = 200

// Options configures a sandbox. Zero values take the defaults noted.
type Options struct {
	// Name is the tag every namespace and link carries (default "mdsb"):
	// <name>-hub, <name>-n1, ... Lowercase letters and digits, at most 10.
	Name string
	// MeshdBinary is the meshd executable (default: "meshd" next to the
	// running executable, else on PATH).
	MeshdBinary string
	// HAProxyBinary is handed to each meshd (default "haproxy" on PATH).
	HAProxyBinary string
	// WorkDir holds node configs, state and logs (default: a new temporary
	// directory, removed by Close unless KeepWorkDir).
	WorkDir     string
	KeepWorkDir bool
	// ForwardAddr is the host loopback address forwarded to etcd in the
	// hub (default "127.0.0.1:0": an ephemeral port).
	ForwardAddr string
	// LeaseTTL of every node (default 3s: a killed node vanishes fast).
	LeaseTTL time.Duration
	// Logger receives the harness's own progress (default: discard).
	Logger *slog.Logger
	// MeshdLogLevel is passed to each meshd as --log-level when set.
	MeshdLogLevel string
}

// Cluster is a running sandbox.
type Cluster struct {
	opts    Options
	log     *slog.Logger
	tag     string
	workDir string
	ownDir  bool
	// runDir holds the nodes' run directories (Node.RunDir): on a tmpfs
	// when the host has one, else the work directory; ownRun says Close
	// removes it.
	runDir string
	ownRun bool

	mu      sync.Mutex
	etcd    *etcdembed.Server
	cli     *clientv3.Client
	fwd     *forwarder
	nodes   map[string]*Node
	nextIdx int
	closed  bool
	track   *tracker
	stop    context.CancelFunc
	// pingSeq numbers the harness's ICMP echoes, so concurrent probes on
	// one raw socket family tell their replies apart.
	pingSeq atomic.Uint32
	// stamps keeps the kernel's receive timestamping on (keepTimestamps)
	// for as long as the cluster lives.
	stamps io.Closer
}

var tagRE = regexp.MustCompile(`^[a-z][a-z0-9]{0,9}$`)

func validTag(tag string) error {
	if !tagRE.MatchString(tag) {
		return fmt.Errorf("sandbox name %q: want 1-10 lowercase letters and digits, starting with a letter", tag)
	}
	return nil
}

// HubNS is the name of the hub namespace.
func (c *Cluster) HubNS() string { return c.tag + "-hub" }

// Name is the sandbox's tag.
func (c *Cluster) Name() string { return c.tag }

// WorkDir is the directory holding node configs, state and logs.
func (c *Cluster) WorkDir() string { return c.workDir }

// RunDir is the directory holding the nodes' run directories (HAProxy's
// files, /run/wireguard): on a tmpfs (/dev/shm) when the host has one,
// else the work directory.
func (c *Cluster) RunDir() string { return c.runDir }

// Client is the harness's etcd client (dialing into the hub namespace).
func (c *Cluster) Client() *clientv3.Client { return c.cli }

// Endpoint is the host loopback URL forwarded to the sandbox's etcd: what
// `meshctl --endpoints` takes.
func (c *Cluster) Endpoint() string { return "http://" + c.fwd.Addr().String() }

// EtcdEndpoint is etcd's URL as the nodes see it, inside the namespaces.
func (c *Cluster) EtcdEndpoint() string {
	return "http://" + netip.AddrPortFrom(hubAddr, EtcdPort).String()
}

// Start checks the machine, creates the hub namespace with its bridge and
// starts etcd inside it. It starts no node: call AddNode.
func Start(ctx context.Context, o Options) (_ *Cluster, err error) {
	if o.Name == "" {
		o.Name = "mdsb"
	}
	if err := validTag(o.Name); err != nil {
		return nil, err
	}
	if o.HAProxyBinary == "" {
		o.HAProxyBinary = "haproxy"
	}
	if o.LeaseTTL == 0 {
		o.LeaseTTL = 3 * time.Second
	}
	if o.ForwardAddr == "" {
		o.ForwardAddr = "127.0.0.1:0"
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	meshd, err := Preflight(o)
	if err != nil {
		return nil, err
	}
	o.MeshdBinary = meshd
	left, err := namespacesOf(o.Name)
	if err != nil {
		return nil, err
	}
	if pid := ownerPid(o.Name); pid != 0 {
		return nil, fmt.Errorf("%w: sandbox %q is running in process %d; stop it (Ctrl-C there) or pick another --name", ErrRunning, o.Name, pid)
	}
	if len(left) > 0 {
		return nil, fmt.Errorf("%w: %v exist from an earlier run; remove them with: %s", ErrLeftover, left, CleanCommand(o.Name))
	}
	c := &Cluster{opts: o, log: log, tag: o.Name, nodes: map[string]*Node{}, nextIdx: 1}
	stamps, err := keepTimestamps()
	if err != nil {
		return nil, err
	}
	c.stamps = stamps
	defer func() {
		if err != nil {
			c.Close()
		}
	}()
	if o.WorkDir == "" {
		d, err := os.MkdirTemp("", "meshd-sandbox-"+o.Name+"-")
		if err != nil {
			return nil, err
		}
		c.workDir, c.ownDir = d, !o.KeepWorkDir
	} else {
		if err := os.MkdirAll(o.WorkDir, 0o700); err != nil {
			return nil, err
		}
		c.workDir = o.WorkDir
	}
	if c.runDir, c.ownRun, err = makeRunDir(o.Name, c.workDir, !o.KeepWorkDir); err != nil {
		return nil, err
	}
	// /run/wireguard must exist on the host for each node's private mount.
	if err := os.MkdirAll("/run/wireguard", 0o755); err != nil {
		return nil, fmt.Errorf("create /run/wireguard: %w", err)
	}
	if err := writeOwner(o.Name); err != nil {
		return nil, err
	}
	hub := c.HubNS()
	if err := ip(ctx, "netns", "add", hub); err != nil {
		return nil, err
	}
	br := c.tag + "br"
	for _, args := range [][]string{
		{"-n", hub, "link", "set", "lo", "up"},
		{"-n", hub, "link", "add", br, "type", "bridge"},
		{"-n", hub, "addr", "add", netip.PrefixFrom(hubAddr, bridgeNet.Bits()).String(), "dev", br},
		{"-n", hub, "link", "set", br, "up"},
	} {
		if err := ip(ctx, args...); err != nil {
			return nil, err
		}
	}
	log.Info("hub namespace up", "ns", hub, "bridge", br, "addr", hubAddr)
	if err := c.startEtcd(); err != nil {
		return nil, err
	}
	cli, err := c.newClient()
	if err != nil {
		return nil, err
	}
	c.cli = cli
	resp, err := cli.Get(ctx, "/", clientv3.WithCountOnly())
	if err != nil {
		return nil, fmt.Errorf("etcd in the hub does not answer: %w", err)
	}
	cctx, stop := context.WithCancel(context.Background())
	c.stop = stop
	c.track = newTracker()
	go c.track.run(cctx, cli, resp.Header.Revision+1)
	fwd, err := newForwarder(o.ForwardAddr, func(ctx context.Context) (net.Conn, error) {
		return dialIn(ctx, hub, "tcp", netip.AddrPortFrom(hubAddr, EtcdPort).String())
	}, log)
	if err != nil {
		return nil, err
	}
	c.fwd = fwd
	log.Info("etcd up", "in", hub, "endpoint", c.EtcdEndpoint(), "host", c.Endpoint())
	return c, nil
}

// runParent is where the sandbox's run directories go when it is a tmpfs,
// as /run is on a real node.
const runParent = "/dev/shm"

// makeRunDir creates the directory for the nodes' run directories: a new
// one in runParent when that is a tmpfs (own says whether Close removes
// it), else workDir itself.
func makeRunDir(tag, workDir string, own bool) (dir string, owned bool, err error) {
	if !onTmpfs(runParent) {
		return workDir, false, nil
	}
	d, err := os.MkdirTemp(runParent, "meshd-sandbox-"+tag+"-")
	if err != nil {
		return "", false, fmt.Errorf("run directory: %w", err)
	}
	return d, own, nil
}

// onTmpfs says whether path is on a tmpfs (statfs(2)'s TMPFS_MAGIC).
func onTmpfs(path string) bool {
	var st syscall.Statfs_t
	return syscall.Statfs(path, &st) == nil && st.Type == 0x01021994
}

// ErrLeftover is returned by Start when namespaces of the same sandbox name
// already exist.
var ErrLeftover = errors.New("leftover sandbox namespaces")

// ErrRunning is returned by Start when a live process runs a sandbox of the
// same name.
var ErrRunning = errors.New("sandbox already running")

// Close stops every node and etcd and removes every namespace, link,
// process and (unless kept) the work directory. It is safe to call more
// than once and collects every failure.
func (c *Cluster) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	nodes := make([]*Node, 0, len(c.nodes))
	for _, n := range c.nodes {
		nodes = append(nodes, n)
	}
	c.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var errs []error
	for _, n := range nodes {
		if err := n.teardown(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	if c.stop != nil {
		c.stop()
	}
	if c.fwd != nil {
		c.fwd.Close()
	}
	if c.cli != nil {
		c.cli.Close()
	}
	if c.etcd != nil {
		c.etcd.Close()
	}
	if c.stamps != nil {
		c.stamps.Close()
	}
	if _, err := os.Stat(filepath.Join(netnsDir, c.HubNS())); err == nil {
		if err := killNetns(ctx, c.HubNS()); err != nil {
			errs = append(errs, err)
		}
	}
	removeOwner(c.tag)
	if c.ownDir && c.workDir != "" {
		if err := os.RemoveAll(c.workDir); err != nil {
			errs = append(errs, err)
		}
	}
	if c.ownRun && c.runDir != "" {
		if err := os.RemoveAll(c.runDir); err != nil {
			errs = append(errs, err)
		}
	}
	c.log.Info("sandbox torn down", "name", c.tag)
	return errors.Join(errs...)
}

// Nodes returns the nodes, ordered by index.
func (c *Cluster) Nodes() []*Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]*Node, 0, len(c.nodes))
	for _, n := range c.nodes {
		out = append(out, n)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Index < out[j].Index })
	return out
}

// Node returns the node with the given name, or nil.
func (c *Cluster) Node(name string) *Node {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.nodes[name]
}

// nodeAddr is node idx's address on the bridge.
func nodeAddr(idx int) netip.Addr {
	a := bridgeNet.Addr().As4()
	a[3] = byte(10 + idx)
	return netip.AddrFrom4(a)
}

func nodeName(idx int) string { return "n" + strconv.Itoa(idx) }
