package sandbox

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/meshd/meshd/pkg/haproxycfg"
)

// This file holds the fault-injection verbs of the harness: the e2e suite
// (package e2e) breaks a running sandbox with them. Each verb changes one
// thing and can be undone, so one cluster can carry several faults in turn.

// KillMeshd SIGKILLs the node's meshd process only. Unlike Kill it leaves
// the rest of the namespace running: the supervised haproxy master (its own
// session) keeps serving, as it would on a real host when meshd crashes.
// Start runs meshd again.
func (n *Node) KillMeshd(ctx context.Context) error {
	n.mu.Lock()
	cmd, exited := n.cmd, n.exited
	n.cmd = nil
	n.mu.Unlock()
	if cmd == nil {
		return fmt.Errorf("node %s: meshd is not running", n.Name)
	}
	_ = cmd.Process.Kill()
	select {
	case <-exited:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("node %s: meshd did not exit: %w", n.Name, ctx.Err())
	}
}

// PowerOff is a node losing power: every process in its namespace is
// killed and its link to the bridge goes down. PowerOn undoes the link
// part; Start runs meshd again.
func (n *Node) PowerOff(ctx context.Context) error {
	if err := n.Kill(ctx); err != nil {
		return err
	}
	return n.CutLink(ctx, true)
}

// CutEtcd makes etcd unreachable from the node (cut=true) or reachable
// again, without touching the node's other traffic: a blackhole route to
// the hub address in the node's namespace and one to the node's address in
// the hub drop what either sends the other, while WireGuard between the
// nodes (bridged, hub routing not involved) keeps flowing. Both directions
// matter: with only the node's side cut, etcd's watch events (say, the
// expiry of other nodes' leases) would still reach the node.
//
// The node's side is cut first and restored last. While it is cut, the
// node's connection attempts fail at once (the route is local), so no
// attempt is in flight when the link returns. Restored the other way
// round, a SYN sent in the gap between the two `ip` commands reaches etcd
// while the answer is still dropped in the hub, and the kernel sends it
// again only after its initial retransmission timeout (1 s): the node
// would be back a second late for a reason of the harness's making.
func (n *Node) CutEtcd(ctx context.Context, cut bool) error {
	node := []string{"-n", n.NS, "route", "add", "blackhole", netip.PrefixFrom(hubAddr, 32).String()}
	hub := []string{"-n", n.c.HubNS(), "route", "add", "blackhole", netip.PrefixFrom(n.Addr, 32).String()}
	if cut {
		return errors.Join(ip(ctx, node...), ip(ctx, hub...))
	}
	node[3], hub[3] = "del", "del"
	return errors.Join(ip(ctx, hub...), ip(ctx, node...))
}

// HAProxyPIDFile is where the node's supervised haproxy master writes its
// pid (meshd's default: the config path with .pid for .cfg).
func (n *Node) HAProxyPIDFile() string {
	return strings.TrimSuffix(n.Config.HAProxy.ConfigPath, ".cfg") + ".pid"
}

// HAProxyMasterPID returns the pid of the node's haproxy master from its
// pid file, checking that the process is alive.
func (n *Node) HAProxyMasterPID() (int, error) {
	b, err := os.ReadFile(n.HAProxyPIDFile())
	if err != nil {
		return 0, fmt.Errorf("node %s: haproxy pid: %w", n.Name, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(strings.SplitN(string(b), "\n", 2)[0]))
	if err != nil || pid <= 1 {
		return 0, fmt.Errorf("node %s: haproxy pid file %q", n.Name, b)
	}
	if err := syscall.Kill(pid, 0); err != nil {
		return 0, fmt.Errorf("node %s: haproxy master %d: %w", n.Name, pid, err)
	}
	return pid, nil
}

// HAProxyServers returns the servers each meshd backend of the node's
// HAProxy holds right now, read from its runtime API (`show servers
// state`): backend name -> the addresses of its occupied slots. It is
// HAProxy's own view, not meshd's.
func (n *Node) HAProxyServers(ctx context.Context) (map[string][]netip.AddrPort, error) {
	live, err := haproxycfg.Runtime{Socket: n.Config.HAProxy.StatsSocket}.Live(ctx)
	if err != nil {
		return nil, fmt.Errorf("node %s: %w", n.Name, err)
	}
	out := map[string][]netip.AddrPort{}
	for be, slots := range live {
		out[be] = []netip.AddrPort{}
		for _, s := range slots {
			if s.IsValid() {
				out[be] = append(out[be], s)
			}
		}
	}
	return out, nil
}

// StateDirFault is how BreakStateDir breaks the state directory.
type StateDirFault int

// The state directory faults.
const (
	// StateReadOnly bind-mounts the state directory read-only.
	StateReadOnly StateDirFault = iota + 1
	// StateFull replaces it with a copy on a tiny tmpfs that is then filled
	// up, so that every write fails with ENOSPC.
	StateFull
)

// BreakStateDir breaks the running meshd's state directory inside its own
// mount namespace only (the host and the next meshd process see the real
// directory). The fault lasts as long as this meshd process. It returns the
// path under which the test sees the directory as meshd sees it
// (/proc/<pid>/root/...).
func (n *Node) BreakStateDir(ctx context.Context, f StateDirFault) (string, error) {
	pid := n.Pid()
	if pid == 0 {
		return "", fmt.Errorf("node %s: meshd is not running", n.Name)
	}
	dir := n.Config.StateDir
	var script string
	switch f {
	case StateReadOnly:
		script = `mount --bind "$1" "$1" && mount -o remount,bind,ro "$1"`
	case StateFull:
		// Copy the state onto a 64 KiB tmpfs, mount it over the directory,
		// then fill what is left with one file.
		script = `set -e; t=$(mktemp -d); mount -t tmpfs -o size=64k,mode=0700 mdfull "$t"; cp -a "$1"/. "$t"/;
mount --bind "$t" "$1"; umount -l "$t"; rmdir "$t";
dd if=/dev/zero of="$1"/.fill bs=4k 2>/dev/null || true; test -f "$1"/.fill`
	default:
		return "", errors.New("unknown state directory fault")
	}
	if _, err := n.Exec(ctx, "sh", "-c", script, "sh", dir); err != nil {
		return "", fmt.Errorf("node %s: break state dir: %w", n.Name, err)
	}
	return filepath.Join("/proc", strconv.Itoa(pid), "root", dir), nil
}

// ProcessCPU returns the CPU time (user + system) a process has used so
// far, from /proc/<pid>/stat.
func ProcessCPU(pid int) (time.Duration, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name may hold spaces and parentheses: fields start after
	// the last ')'.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: malformed", pid)
	}
	f := strings.Fields(s[i+1:])
	// f[0] is field 3 (state); utime and stime are fields 14 and 15.
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f)+2)
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: bad utime/stime", pid)
	}
	const hz = 100 // USER_HZ, fixed at 100 on Linux for /proc
	return time.Duration(ut+st) * time.Second / hz, nil
}

// Compact compacts etcd's history up to its current revision (physically),
// so that a watcher resuming from an older revision gets ErrCompacted and
// must re-list. It returns the compaction revision.
func (c *Cluster) Compact(ctx context.Context) (int64, error) {
	resp, err := c.cli.Get(ctx, "/", clientv3.WithCountOnly())
	if err != nil {
		return 0, fmt.Errorf("compact: %w", err)
	}
	rev := resp.Header.Revision
	if _, err := c.cli.Compact(ctx, rev, clientv3.WithCompactPhysical()); err != nil {
		return 0, fmt.Errorf("compact at %d: %w", rev, err)
	}
	return rev, nil
}

// EtcdCluster is a multi-member etcd for faults that need a quorum: a
// member restart, a leader change. The members run in this process in the
// host's network namespace on loopback (the embedded server dials its
// peers from arbitrary threads, so they cannot live in the hub), and each
// member's client port is exposed inside the hub namespace on the hub
// address (port EtcdClusterPort+i) by a forwarder. Nodes use it through
// NodeOptions.Edit:
//
//	Edit: func(cfg *config.Config) { cfg.Etcd.Endpoints = ec.Endpoints() }
//
// A stopped member's hub port still accepts and closes at once. The
// sandbox's own single etcd keeps running for the harness's tracker but
// carries nothing of these nodes. The caller closes the EtcdCluster.
type EtcdCluster struct {
	c       *Cluster
	cfgs    []*embed.Config
	members []*embed.Etcd
	fwds    []net.Listener
	cli     *clientv3.Client
}

// EtcdClusterPort is the first hub port of an EtcdCluster's members.
const EtcdClusterPort = 2391

// freeLoopbackPort returns a port free on 127.0.0.1 right now.
func freeLoopbackPort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// StartEtcdCluster starts size (1-5) etcd members and waits until they
// have a leader.
func (c *Cluster) StartEtcdCluster(ctx context.Context, size int) (_ *EtcdCluster, err error) {
	if size < 1 || size > 5 {
		return nil, fmt.Errorf("etcd cluster of %d members: want 1-5", size)
	}
	ec := &EtcdCluster{c: c, members: make([]*embed.Etcd, size)}
	defer func() {
		if err != nil {
			ec.Close()
		}
	}()
	var initial []string
	for i := range size {
		cport, err1 := freeLoopbackPort()
		pport, err2 := freeLoopbackPort()
		if err := errors.Join(err1, err2); err != nil {
			return nil, err
		}
		cfg := embed.NewConfig()
		cfg.Name = fmt.Sprintf("m%d", i+1)
		cfg.Dir = filepath.Join(c.workDir, "etcd-"+cfg.Name)
		cu, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", cport))
		pu, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", pport))
		cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
		cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
		initial = append(initial, cfg.Name+"="+pu.String())
		cfg.InitialClusterToken = "sandbox-" + c.tag
		// Slower than etcdtest's timing: three members on two shared cores
		// must not elect spuriously.
		cfg.TickMs, cfg.ElectionMs = 50, 500
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
		cfg.LogLevel = "error"
		ec.cfgs = append(ec.cfgs, cfg)
		l, err := listenIn(c.HubNS(), netip.AddrPortFrom(hubAddr, uint16(EtcdClusterPort+i)).String())
		if err != nil {
			return nil, fmt.Errorf("etcd member m%d: hub listener: %w", i+1, err)
		}
		ec.fwds = append(ec.fwds, l)
		go forwardTo(l, cu.Host)
	}
	for _, cfg := range ec.cfgs {
		cfg.InitialCluster = strings.Join(initial, ",")
	}
	errs := make(chan error, size)
	for i := range size {
		go func() { errs <- ec.StartMember(i) }()
	}
	for range size {
		if err := <-errs; err != nil {
			return nil, err
		}
	}
	if err := ec.waitReady(ctx); err != nil {
		return nil, err
	}
	ec.cli, err = clientv3.New(clientv3.Config{
		Endpoints: ec.clientURLs(), DialTimeout: 5 * time.Second, Logger: zap.NewNop(),
	})
	if err != nil {
		return nil, err
	}
	if _, err := ec.Leader(ctx); err != nil {
		return nil, err
	}
	return ec, nil
}

// forwardTo splices every connection accepted on l (in the hub) to addr
// (host loopback) until l is closed.
func forwardTo(l net.Listener, addr string) {
	for {
		in, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer in.Close()
			out, err := net.DialTimeout("tcp", addr, 5*time.Second)
			if err != nil {
				return
			}
			defer out.Close()
			done := make(chan struct{}, 2)
			cp := func(dst, src net.Conn) {
				_, _ = io.Copy(dst, src)
				if tc, ok := dst.(*net.TCPConn); ok {
					_ = tc.CloseWrite()
				}
				done <- struct{}{}
			}
			go cp(out, in)
			go cp(in, out)
			<-done
			<-done
		}()
	}
}

// Endpoints are the members' client URLs as the nodes see them (in the
// hub).
func (ec *EtcdCluster) Endpoints() []string {
	out := make([]string, len(ec.cfgs))
	for i := range ec.cfgs {
		out[i] = "http://" + netip.AddrPortFrom(hubAddr, uint16(EtcdClusterPort+i)).String()
	}
	return out
}

func (ec *EtcdCluster) clientURLs() []string {
	out := make([]string, len(ec.cfgs))
	for i, cfg := range ec.cfgs {
		out[i] = cfg.ListenClientUrls[0].String()
	}
	return out
}

// Client is a client of every member (on host loopback).
func (ec *EtcdCluster) Client() *clientv3.Client { return ec.cli }

// StartMember starts member i (again, after StopMember) on its addresses
// and data.
func (ec *EtcdCluster) StartMember(i int) error {
	if ec.members[i] != nil {
		return fmt.Errorf("etcd member m%d already runs", i+1)
	}
	e, err := embed.StartEtcd(ec.cfgs[i])
	if err != nil {
		return fmt.Errorf("start etcd member m%d: %w", i+1, err)
	}
	ec.members[i] = e
	return nil
}

// StopMember stops member i, keeping its data.
func (ec *EtcdCluster) StopMember(i int) {
	e := ec.members[i]
	if e == nil {
		return
	}
	ec.members[i] = nil
	done := make(chan struct{})
	go func() { e.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		ec.c.log.Warn("etcd member did not stop in 15s; abandoning it", "member", i+1)
	}
}

func (ec *EtcdCluster) waitReady(ctx context.Context) error {
	for i, e := range ec.members {
		if e == nil {
			continue
		}
		select {
		case <-e.Server.ReadyNotify():
		case <-ctx.Done():
			return fmt.Errorf("etcd member m%d not ready: %w", i+1, ctx.Err())
		}
	}
	return nil
}

// Leader returns the index of the current leader, waiting (until ctx ends)
// while the running members have none or disagree.
func (ec *EtcdCluster) Leader(ctx context.Context) (int, error) {
	if err := ec.waitReady(ctx); err != nil {
		return 0, err
	}
	for {
		leader, agree := -1, true
		var lid uint64
		for _, e := range ec.members {
			if e == nil {
				continue
			}
			l := uint64(e.Server.Leader())
			if lid == 0 {
				lid = l
			}
			agree = agree && l != 0 && l == lid
		}
		for i, e := range ec.members {
			if e != nil && uint64(e.Server.MemberID()) == lid {
				leader = i
			}
		}
		if agree && leader >= 0 {
			return leader, nil
		}
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("etcd cluster has no agreed leader: %w", ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Close stops every member, the forwarders and the client. The data stays
// in the work directory (removed with it).
func (ec *EtcdCluster) Close() {
	if ec.cli != nil {
		ec.cli.Close()
	}
	for _, l := range ec.fwds {
		l.Close()
	}
	for i := range ec.members {
		ec.StopMember(i)
	}
}
