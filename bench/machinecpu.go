package bench

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/meshd/meshd/pkg/overlay"
)

// MachineCPU is where a sandbox's CPU went over a stretch of its trials:
// the machine's busy share and each kind of process's CPU per change.
type MachineCPU struct {
	Wall    time.Duration
	Changes int
	// Busy is the share of all cores' time not idle (/proc/stat), 0..1.
	Busy  float64
	Cores int
	// PerChange is CPU per change by kind: "meshd", "WireGuard devices",
	// "HAProxy" (the nodes' processes, found by network namespace) and
	// "harness" (this process: etcd, the probes, the demo servers).
	PerChange map[string]time.Duration
	// Apart is the part of PerChange, by kind, spent by the processes of
	// one network namespace set apart (a joining node's).
	Apart map[string]time.Duration `json:",omitempty"`
}

// cpuSample is one reading of the machine's and the sandbox's CPU.
type cpuSample struct {
	at        time.Time
	busy, all uint64 // /proc/stat ticks, all cores
	byPid     map[int]procTime
	self      time.Duration
	cores     int
}

type procTime struct {
	kind string
	cpu  time.Duration
	ns   uint64 // network namespace inode
}

// readCPU reads /proc/stat, this process's CPU time, and the CPU time of
// every process in one of the network namespaces (by their inode).
func readCPU(namespaces map[uint64]bool) (cpuSample, error) {
	s := cpuSample{at: time.Now(), byPid: map[int]procTime{}, self: cpuTime()}
	stat, err := os.ReadFile("/proc/stat")
	if err != nil {
		return s, err
	}
	for _, line := range strings.Split(string(stat), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		if f[0] == "cpu" {
			for i, v := range f[1:] {
				n, _ := strconv.ParseUint(v, 10, 64)
				if i == 7 { // steal: not this machine's to use
					break
				}
				s.all += n
				if i != 3 && i != 4 { // idle, iowait
					s.busy += n
				}
			}
		} else if strings.HasPrefix(f[0], "cpu") {
			s.cores++
		}
	}
	dirs, err := os.ReadDir("/proc")
	if err != nil {
		return s, err
	}
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat(filepath.Join("/proc", d.Name(), "ns", "net"), &st) != nil || !namespaces[st.Ino] {
			continue
		}
		cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil {
			continue
		}
		s.byPid[pid] = procTime{processKind(cmd), procCPU(pid), st.Ino}
	}
	return s, nil
}

// processKind names a sandbox process by its NUL-separated command line.
func processKind(cmdline []byte) string {
	args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
	switch base := filepath.Base(args[0]); {
	case base == "haproxy":
		return "HAProxy"
	case base == "meshd" && len(args) > 1 && strings.HasPrefix(args[1], overlay.DeviceFlag):
		return "WireGuard devices"
	case base == "meshd":
		return "meshd"
	default:
		return "other processes in the nodes"
	}
}

// Total is the CPU per change of every kind together.
func (m MachineCPU) Total() time.Duration { return sum(m.PerChange) }

func sum(byKind map[string]time.Duration) time.Duration {
	var s time.Duration
	for _, d := range byKind {
		s += d
	}
	return s
}

// cpuAccount sums the CPU of several stretches (samples taken around each
// trial of one kind), so that what runs between trials is left out.
type cpuAccount struct {
	wall           time.Duration
	busy, all      uint64
	cores, changes int
	byKind         map[string]time.Duration
	// apart is a network namespace whose processes are also summed, by
	// kind, in apartCPU (MachineCPU.Apart).
	apart    uint64
	apartCPU map[string]time.Duration
}

// add counts the stretch from s0 to s1, in which changes changes ran. A
// process that exited in between is left out (its time is lost with it);
// one that started counts from zero.
func (a *cpuAccount) add(s0, s1 cpuSample, changes int) {
	if a.byKind == nil {
		a.byKind = map[string]time.Duration{}
	}
	a.wall += s1.at.Sub(s0.at)
	a.busy += s1.busy - s0.busy
	a.all += s1.all - s0.all
	a.cores, a.changes = s1.cores, a.changes+changes
	for pid, p := range s1.byPid {
		d := p.cpu - s0.byPid[pid].cpu
		a.byKind[p.kind] += d
		if a.apart != 0 && p.ns == a.apart {
			if a.apartCPU == nil {
				a.apartCPU = map[string]time.Duration{}
			}
			a.apartCPU[p.kind] += d
		}
	}
	a.byKind["harness"] += s1.self - s0.self
}

// result is the account as MachineCPU, per change.
func (a *cpuAccount) result() MachineCPU {
	m := MachineCPU{Wall: a.wall, Changes: a.changes, Cores: a.cores, PerChange: map[string]time.Duration{}}
	if a.all > 0 {
		m.Busy = float64(a.busy) / float64(a.all)
	}
	if a.changes <= 0 {
		return m
	}
	for k, d := range a.byKind {
		m.PerChange[k] = d / time.Duration(a.changes)
	}
	for k, d := range a.apartCPU {
		if m.Apart == nil {
			m.Apart = map[string]time.Duration{}
		}
		m.Apart[k] = d / time.Duration(a.changes)
	}
	return m
}
