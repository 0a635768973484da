package sandbox

import (
	"context"
	"errors"
	"fmt"
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
	"google.golang.org/grpc"

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
// the hub address in the node's namespace drops what the node sends to
// etcd, while WireGuard between the nodes (bridge addresses of the nodes)
// keeps flowing. It models a node cut off from etcd, not from its peers.
func (n *Node) CutEtcd(ctx context.Context, cut bool) error {
	verb := "add"
	if !cut {
		verb = "del"
	}
	return ip(ctx, "-n", n.NS, "route", verb, "blackhole", netip.PrefixFrom(hubAddr, 32).String())
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

// EtcdCluster is a multi-member etcd inside the hub namespace, for faults
// that need a quorum: a member restart, a leader change. Its members listen
// on the hub address (ports EtcdClusterPort+i) and talk to each other on the
// hub's loopback. Nodes use it through NodeOptions.Edit:
//
//	Edit: func(cfg *config.Config) { cfg.Etcd.Endpoints = ec.Endpoints() }
//
// The sandbox's own single etcd keeps running for the harness's tracker
// but carries nothing of these nodes. The caller closes the EtcdCluster.
type EtcdCluster struct {
	c       *Cluster
	cfgs    []*embed.Config
	members []*embed.Etcd
	cli     *clientv3.Client
}

// EtcdClusterPort is the first client port of an EtcdCluster's members.
const EtcdClusterPort = 2391

// StartEtcdCluster starts size (3 or 5) etcd members in the hub namespace
// and waits until they have a leader.
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
		initial = append(initial, fmt.Sprintf("m%d=http://127.0.0.1:%d", i+1, EtcdClusterPort+100+i))
	}
	for i := range size {
		cfg := embed.NewConfig()
		cfg.Name = fmt.Sprintf("m%d", i+1)
		cfg.Dir = filepath.Join(c.workDir, "etcd-"+cfg.Name)
		cu, _ := url.Parse(ec.endpoint(i))
		pu, _ := url.Parse(fmt.Sprintf("http://127.0.0.1:%d", EtcdClusterPort+100+i))
		cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
		cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
		cfg.InitialCluster = strings.Join(initial, ",")
		cfg.InitialClusterToken = "sandbox-" + c.tag
		// Slower than etcdtest's timing: three members on two shared cores
		// must not elect spuriously.
		cfg.TickMs, cfg.ElectionMs = 50, 500
		cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
		cfg.LogLevel = "error"
		ec.cfgs = append(ec.cfgs, cfg)
	}
	for i := range size {
		if err := ec.StartMember(i); err != nil {
			return nil, err
		}
	}
	if err := ec.waitReady(ctx); err != nil {
		return nil, err
	}
	hub := c.HubNS()
	ec.cli, err = clientv3.New(clientv3.Config{
		Endpoints:   ec.Endpoints(),
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
		DialOptions: []grpc.DialOption{grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return dialIn(ctx, hub, "tcp", addr)
		})},
	})
	if err != nil {
		return nil, err
	}
	if _, err := ec.Leader(ctx); err != nil {
		return nil, err
	}
	return ec, nil
}

func (ec *EtcdCluster) endpoint(i int) string {
	return "http://" + netip.AddrPortFrom(hubAddr, uint16(EtcdClusterPort+i)).String()
}

// Endpoints are the members' client URLs as the nodes see them.
func (ec *EtcdCluster) Endpoints() []string {
	out := make([]string, len(ec.cfgs))
	for i := range ec.cfgs {
		out[i] = ec.endpoint(i)
	}
	return out
}

// Client is a client of every member (dialing into the hub namespace).
func (ec *EtcdCluster) Client() *clientv3.Client { return ec.cli }

// StartMember starts member i (again, after StopMember) on its addresses
// and data.
func (ec *EtcdCluster) StartMember(i int) error {
	if ec.members[i] != nil {
		return fmt.Errorf("etcd member m%d already runs", i+1)
	}
	return inNetns(ec.c.HubNS(), func() error {
		e, err := embed.StartEtcd(ec.cfgs[i])
		if err != nil {
			return fmt.Errorf("start etcd member m%d: %w", i+1, err)
		}
		ec.members[i] = e
		return nil
	})
}

// StopMember stops member i, keeping its data.
func (ec *EtcdCluster) StopMember(i int) {
	if e := ec.members[i]; e != nil {
		e.Close()
		ec.members[i] = nil
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

// Close stops every member and the client. The data stays in the work
// directory (removed with it).
func (ec *EtcdCluster) Close() {
	if ec.cli != nil {
		ec.cli.Close()
	}
	for i := range ec.members {
		ec.StopMember(i)
	}
}
