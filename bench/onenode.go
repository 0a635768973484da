package bench

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/meshd/meshd/pkg/overlay"
	"github.com/meshd/meshd/pkg/registry"
	"github.com/meshd/meshd/pkg/sandbox"
)

// OneNodeOptions configures the one-node benchmark: one real meshd
// process (a sandbox node: its namespace, WireGuard device, supervised
// HAProxy) whose registry holds N nodes, the other N-1 registered by the
// harness.
type OneNodeOptions struct {
	Sandbox sandbox.Options
	// N is the size of the node's view (N-1 harness nodes plus itself).
	N int
	// Idle is how long the node is left alone while its CPU time and
	// status writes are counted.
	Idle time.Duration
	Log  func(format string, a ...any)
}

// OneNodeResult is what the one-node benchmark measured.
type OneNodeResult struct {
	N int
	// Peers is the peer count the node's overlay status reported.
	Peers int
	// Converged is the time from the node's start until its status showed
	// every peer.
	Converged time.Duration
	// RSS is meshd's resident set after Idle (VmRSS); DeviceRSS the
	// detached WireGuard device process's (0 when the device runs inside
	// meshd or in the kernel).
	RSS, DeviceRSS int64
	// IdleCPU is meshd's CPU time over Idle as a fraction of one core;
	// DeviceIdleCPU the device process's.
	IdleCPU, DeviceIdleCPU float64
	Idle                   time.Duration
	// IdleStatusWrites counts the node's status writes during Idle.
	IdleStatusWrites int64
}

// OneNode runs the one-node benchmark. The harness's nodes name no
// WireGuard endpoint, so the node's device holds N-1 peers that send
// nothing: the idle cost measured is meshd's own with an N-node view,
// without handshake or keepalive traffic (on a live cluster each peer
// adds a keepalive every 25 s and a handshake every 2 minutes).
func OneNode(ctx context.Context, o OneNodeOptions) (OneNodeResult, error) {
	res := OneNodeResult{N: o.N, Idle: o.Idle}
	if o.Log == nil {
		o.Log = func(string, ...any) {}
	}
	c, err := sandbox.Start(ctx, o.Sandbox)
	if err != nil {
		return res, err
	}
	defer c.Close()
	cli := c.Client()
	lease, err := cli.Grant(ctx, 3600)
	if err != nil {
		return res, err
	}
	for i := range o.N - 1 {
		if err := registerNode(ctx, cli, lease.ID, i, false); err != nil {
			return res, err
		}
	}
	o.Log("one node: %d nodes registered, starting meshd", o.N-1)
	start := time.Now()
	n, err := c.AddNode(ctx, sandbox.NodeOptions{Consume: []registry.Group{registry.GroupBackends}})
	if err != nil {
		return res, err
	}
	// Converged: the node's status shows every other node as a peer.
	deadline := time.Now().Add(5 * time.Minute)
	for {
		if p := statusPeers(ctx, c, n.Name); p == o.N-1 {
			res.Peers, res.Converged = p, time.Since(start)
			break
		} else if time.Now().After(deadline) {
			return res, fmt.Errorf("one node: %d peers in its status after 5 minutes, want %d", p, o.N-1)
		}
		select {
		case <-ctx.Done():
			return res, ctx.Err()
		case <-time.After(100 * time.Millisecond):
		}
	}
	// Let the start settle (the first status writes, HAProxy's start).
	select {
	case <-ctx.Done():
		return res, ctx.Err()
	case <-time.After(5 * time.Second):
	}
	pid := n.Pid()
	dev := devicePid(n.Config.Overlay.Interface)
	writes0 := statusVersion(ctx, c, n.Name)
	cpu0, dcpu0 := procCPU(pid), procCPU(dev)
	t0 := time.Now()
	select {
	case <-ctx.Done():
		return res, ctx.Err()
	case <-time.After(o.Idle):
	}
	elapsed := time.Since(t0)
	res.IdleCPU = float64(procCPU(pid)-cpu0) / float64(elapsed)
	if dev != 0 {
		res.DeviceIdleCPU = float64(procCPU(dev)-dcpu0) / float64(elapsed)
		res.DeviceRSS = procRSS(dev)
	}
	res.RSS = procRSS(pid)
	res.IdleStatusWrites = statusVersion(ctx, c, n.Name) - writes0
	o.Log("one node N=%d: converged in %s, RSS %d MiB (device %d MiB), idle CPU %.2f%% (device %.2f%%) of a core, %d status writes in %s",
		o.N, res.Converged.Round(time.Millisecond), res.RSS>>20, res.DeviceRSS>>20, 100*res.IdleCPU, 100*res.DeviceIdleCPU, res.IdleStatusWrites, elapsed.Round(time.Second))
	return res, nil
}

// statusPeers is the peer count in node's published overlay status (-1:
// none yet).
func statusPeers(ctx context.Context, c *sandbox.Cluster, node string) int {
	r, err := c.Client().Get(ctx, registry.StatusKey(node))
	if err != nil || len(r.Kvs) != 1 {
		return -1
	}
	st, err := registry.DecodeStatus(node, r.Kvs[0].Value)
	if err != nil {
		return -1
	}
	var ov overlay.Status
	if json.Unmarshal(st.Components["overlay"], &ov) != nil {
		return -1
	}
	return ov.Peers.Count
}

// statusVersion is how many times the status key was written since it
// was created (etcd's per-key version).
func statusVersion(ctx context.Context, c *sandbox.Cluster, node string) int64 {
	r, err := c.Client().Get(ctx, registry.StatusKey(node))
	if err != nil || len(r.Kvs) != 1 {
		return 0
	}
	return r.Kvs[0].Version
}

// devicePid finds the detached userspace WireGuard process of iface
// (meshd --meshd-wireguard-device=IFACE), or 0.
func devicePid(iface string) int {
	want := overlay.DeviceFlag + "=" + iface
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		for _, a := range strings.Split(string(b), "\x00") {
			if a == want {
				return pid
			}
		}
	}
	return 0
}

// procCPU is a process's user+system CPU time with that of the children
// it waited for (/proc/PID/stat fields 14 to 17, in clock ticks of 1/100 s
// on Linux): meshd's `haproxy -c` lives for tens of milliseconds and no
// reading would see it otherwise.
func procCPU(pid int) time.Duration {
	if pid == 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The command name (field 2) may hold spaces: count from its ")".
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 15 {
		return 0
	}
	var ticks int64
	for _, v := range f[11:15] { // utime, stime, cutime, cstime
		n, _ := strconv.ParseInt(v, 10, 64)
		ticks += n
	}
	return time.Duration(ticks) * 10 * time.Millisecond
}

// procRSS is a process's VmRSS in bytes.
func procRSS(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			var kb int64
			fmt.Sscanf(strings.TrimSpace(v), "%d", &kb)
			return kb << 10
		}
	}
	return 0
}
