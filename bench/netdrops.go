package bench

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
)

// NetLoss is what the kernel lost to load during a part of the run: a
// part with losses measured the kernel's retransmissions too (200 ms and
// more each), not only etcd's or meshd's work.
type NetLoss struct {
	// BacklogDrops are packets dropped because a CPU's input backlog was
	// full (/proc/net/softnet_stat, second column, summed over CPUs):
	// loopback and veth traffic pass through it, so thousands of
	// connections answering at once can overflow it
	// (net.core.netdev_max_backlog). Machine-wide.
	BacklogDrops int64
	// AbortOnTimeout are TCP connections the kernel aborted because their
	// retransmissions outlasted the socket's timeout (TcpExt
	// TCPAbortOnTimeout in /proc/net/netstat: gRPC sets TCP_USER_TIMEOUT
	// to its keep-alive timeout, so a lost burst can end a connection
	// silently). The benchmark process's network namespace: etcd, the
	// agents, the floor's watchers and Traefik, not the sandbox's nodes.
	AbortOnTimeout int64
}

// PartLoss is the loss during one part of the run.
type PartLoss struct {
	Part string
	NetLoss
}

// ReadNetLoss reads the kernel's counters now.
func ReadNetLoss() (NetLoss, error) {
	softnet, err1 := os.ReadFile("/proc/net/softnet_stat")
	netstat, err2 := os.ReadFile("/proc/net/netstat")
	if err := errors.Join(err1, err2); err != nil {
		return NetLoss{}, err
	}
	var l NetLoss
	var err error
	if l.BacklogDrops, err = backlogDrops(softnet); err != nil {
		return NetLoss{}, err
	}
	if l.AbortOnTimeout, err = netstatField(netstat, "TcpExt", "TCPAbortOnTimeout"); err != nil {
		return NetLoss{}, err
	}
	return l, nil
}

// Sub is the loss from o to l.
func (l NetLoss) Sub(o NetLoss) NetLoss {
	return NetLoss{BacklogDrops: l.BacklogDrops - o.BacklogDrops, AbortOnTimeout: l.AbortOnTimeout - o.AbortOnTimeout}
}

// backlogDrops sums the second column (hexadecimal) of softnet_stat, one
// line per CPU.
func backlogDrops(b []byte) (int64, error) {
	var sum int64
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 {
			return 0, fmt.Errorf("softnet_stat: line %q has no drop column", sc.Text())
		}
		v, err := strconv.ParseUint(f[1], 16, 32)
		if err != nil {
			return 0, fmt.Errorf("softnet_stat: %w", err)
		}
		sum += int64(v)
	}
	return sum, sc.Err()
}

// netstatField is one counter of /proc/net/netstat (or /proc/net/snmp):
// each section is a line of names and a line of values, both starting
// with "Section:".
func netstatField(b []byte, section, name string) (int64, error) {
	lines := strings.Split(string(b), "\n")
	for i := 0; i+1 < len(lines); i++ {
		names, ok1 := strings.CutPrefix(lines[i], section+":")
		values, ok2 := strings.CutPrefix(lines[i+1], section+":")
		if !ok1 || !ok2 {
			continue
		}
		ns, vs := strings.Fields(names), strings.Fields(values)
		if len(ns) != len(vs) {
			return 0, fmt.Errorf("netstat: %s has %d names and %d values", section, len(ns), len(vs))
		}
		for j, n := range ns {
			if n == name {
				return strconv.ParseInt(vs[j], 10, 64)
			}
		}
		return 0, fmt.Errorf("netstat: %s has no %s", section, name)
	}
	return 0, fmt.Errorf("netstat: no %s section", section)
}

// NetdevMaxBacklog is net.core.netdev_max_backlog (0: unknown).
func NetdevMaxBacklog() int {
	b, err := os.ReadFile("/proc/sys/net/core/netdev_max_backlog")
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return n
}
