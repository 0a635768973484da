package bench

import (
	"testing"
	"time"
)

func TestProcessKind(t *testing.T) {
	for cmd, want := range map[string]string{
		"/work/bin/meshd\x00--config\x00/tmp/n2/meshd.json\x00":     "meshd",
		"/work/bin/meshd\x00--meshd-wireguard-device=mdbenchwg\x00": "WireGuard devices",
		"/usr/sbin/haproxy\x00-W\x00-f\x00/tmp/n2/haproxy.cfg\x00":  "HAProxy",
		"meshd\x00":                 "meshd",
		"/usr/bin/ping\x0010.0.0.1": "other processes in the nodes",
	} {
		if got := processKind([]byte(cmd)); got != want {
			t.Errorf("processKind(%q) = %q, want %q", cmd, got, want)
		}
	}
}

func TestCPUAccount(t *testing.T) {
	t0 := time.Unix(1000, 0)
	s0 := cpuSample{at: t0, busy: 100, all: 400, self: time.Second, cores: 2, byPid: map[int]procTime{
		1: {"meshd", 100 * time.Millisecond, 0},
		2: {"HAProxy", 50 * time.Millisecond, 0},
		3: {"meshd", time.Second, 7}, // exits before the second sample
	}}
	s1 := cpuSample{at: t0.Add(2 * time.Second), busy: 400, all: 800, self: 3 * time.Second, cores: 2, byPid: map[int]procTime{
		1: {"meshd", 300 * time.Millisecond, 0},
		2: {"HAProxy", 150 * time.Millisecond, 0},
		4: {"meshd", 200 * time.Millisecond, 7}, // started in between, in namespace 7
		5: {"HAProxy", 100 * time.Millisecond, 7},
	}}
	a := cpuAccount{apart: 7}
	a.add(s0, s1, 60)
	a.add(s1, s1, 40) // an empty stretch still counts its changes
	m := a.result()
	if m.Wall != 2*time.Second || m.Busy != 0.75 || m.Cores != 2 {
		t.Errorf("wall %v, busy %v, cores %d; want 2s, 0.75, 2", m.Wall, m.Busy, m.Cores)
	}
	want := map[string]time.Duration{"meshd": 4 * time.Millisecond, "HAProxy": 2 * time.Millisecond, "harness": 20 * time.Millisecond}
	// Namespace 7's processes: 200 ms + 100 ms over 100 changes.
	if m.Apart["meshd"] != 2*time.Millisecond || m.Apart["HAProxy"] != time.Millisecond || len(m.Apart) != 2 {
		t.Errorf("apart: %v per change, want meshd 2ms, HAProxy 1ms", m.Apart)
	}
	for k, v := range want {
		if m.PerChange[k] != v {
			t.Errorf("%s: %v per change, want %v", k, m.PerChange[k], v)
		}
	}
	if len(m.PerChange) != len(want) {
		t.Errorf("kinds %v, want %v", m.PerChange, want)
	}
}
