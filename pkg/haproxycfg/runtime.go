package haproxycfg

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Admin state bits of `show servers state` (HAProxy's SRV_ADMF_*): forced,
// inherited and DNS-resolution maintenance. A slot in any of them is free.
const adminMaintMask = 0x01 | 0x02 | 0x20

// Runtime talks to the current worker's runtime API (the stats socket).
type Runtime struct {
	// Socket is the stats socket path (or "ipv4@host:port").
	Socket string
}

// Live reads every meshd backend's slot occupancy.
func (r Runtime) Live(ctx context.Context) (Live, error) {
	out, err := socketCmd(ctx, r.Socket, "show servers state")
	if err != nil {
		return nil, fmt.Errorf("runtime: %w", err)
	}
	return parseServersState(out)
}

// parseServersState parses `show servers state` (format version 1), whose
// second line names the columns.
func parseServersState(s string) (Live, error) {
	live := Live{}
	err := eachSlot(s, func(be string, idx int, get func(string) (string, error)) error {
		addrS, err1 := get("srv_addr")
		portS, err2 := get("srv_port")
		adm, err3 := adminState(get)
		if err := errors.Join(err1, err2, err3); err != nil {
			return err
		}
		slots := live[be]
		for len(slots) < idx {
			slots = append(slots, netip.AddrPort{})
		}
		if adm&adminMaintMask == 0 {
			a, errA := netip.ParseAddr(addrS)
			p, errP := strconv.ParseUint(portS, 10, 16)
			if errA == nil && errP == nil {
				slots[idx-1] = netip.AddrPortFrom(a, uint16(p))
			}
		}
		live[be] = slots
		return nil
	})
	if err != nil {
		return nil, err
	}
	return live, nil
}

// eachSlot calls fn for every line of `show servers state` that is a slot
// (s1, s2…) of a meshd backend (be_…); get reads a column of that line.
func eachSlot(s string, fn func(be string, idx int, get func(string) (string, error)) error) error {
	var cols map[string]int
	sc := bufio.NewScanner(strings.NewReader(s))
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line == "1" {
			continue
		}
		if strings.HasPrefix(line, "#") {
			cols = map[string]int{}
			for i, c := range strings.Fields(strings.TrimPrefix(line, "#")) {
				cols[c] = i
			}
			continue
		}
		if cols == nil {
			return fmt.Errorf("servers state: no header before %q", line)
		}
		f := strings.Fields(line)
		get := func(name string) (string, error) {
			i, ok := cols[name]
			if !ok || i >= len(f) {
				return "", fmt.Errorf("servers state: no %s in %q", name, line)
			}
			return f[i], nil
		}
		be, err := get("be_name")
		if err != nil {
			return err
		}
		if !strings.HasPrefix(be, "be_") {
			continue
		}
		name, err := get("srv_name")
		if err != nil {
			return err
		}
		idx, err := strconv.Atoi(strings.TrimPrefix(name, "s"))
		if !strings.HasPrefix(name, "s") || err != nil || idx < 1 || idx > MaxServerSlots {
			continue // not a slot of ours
		}
		if err := fn(be, idx, get); err != nil {
			return err
		}
	}
	return sc.Err()
}

func adminState(get func(string) (string, error)) (int, error) {
	s, err := get("srv_admin_state")
	if err != nil {
		return 0, err
	}
	adm, err := strconv.Atoi(s)
	if err != nil {
		return 0, fmt.Errorf("servers state: admin state %q", s)
	}
	return adm, nil
}

// srvRunning is HAProxy's SRV_ST_RUNNING operational state.
const srvRunning = 2

// Health counts the occupied slots of one backend by health.
type Health struct{ Up, Down int }

// Health reads every meshd backend's occupied slots (those not in
// maintenance) and counts them as up (operational state running) or down
// (stopped, starting or stopping: failing its health check).
func (r Runtime) Health(ctx context.Context) (map[string]Health, error) {
	out, err := socketCmd(ctx, r.Socket, "show servers state")
	if err != nil {
		return nil, fmt.Errorf("runtime: %w", err)
	}
	return parseHealth(out)
}

func parseHealth(s string) (map[string]Health, error) {
	h := map[string]Health{}
	err := eachSlot(s, func(be string, _ int, get func(string) (string, error)) error {
		adm, err := adminState(get)
		if err != nil {
			return err
		}
		opS, err := get("srv_op_state")
		if err != nil {
			return err
		}
		op, err := strconv.Atoi(opS)
		if err != nil {
			return fmt.Errorf("servers state: op state %q", opS)
		}
		c := h[be]
		switch {
		case adm&adminMaintMask != 0: // a free slot
		case op == srvRunning:
			c.Up++
		default:
			c.Down++
		}
		h[be] = c
		return nil
	})
	if err != nil {
		return nil, err
	}
	return h, nil
}

// State reads, over one connection, the pid of the worker answering on
// the socket and every meshd backend's slot occupancy in that worker: the
// CLI runs `show info;show servers state` in turn and ends each answer
// with an empty line. One connection is one wait for the worker fewer on
// every instance change, and both answers are the same process's.
func (r Runtime) State(ctx context.Context) (pid int, live Live, err error) {
	out, err := socketCmd(ctx, r.Socket, "show info;show servers state")
	if err != nil {
		return 0, nil, fmt.Errorf("runtime: %w", err)
	}
	return parseState(out)
}

// parseState splits the answer to `show info;show servers state` at the
// first empty line (show info has none inside) and parses both parts.
func parseState(out string) (int, Live, error) {
	info, servers, ok := strings.Cut(out, "\n\n")
	if !ok {
		return 0, nil, fmt.Errorf("runtime: no end of show info in %q", firstLines(out, 3))
	}
	pid := 0
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(line, "Pid: "); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil || n <= 0 {
				return 0, nil, fmt.Errorf("runtime: show info: bad %q", line)
			}
			pid = n
		}
	}
	if pid == 0 {
		return 0, nil, fmt.Errorf("runtime: no Pid in show info (answer begins %q)", firstLines(out, 3))
	}
	if first, _, _ := strings.Cut(strings.TrimLeft(servers, "\n"), "\n"); first != "1" {
		return 0, nil, fmt.Errorf("runtime: show servers state: format %q, want 1", first)
	}
	live, err := parseServersState(servers)
	if err != nil {
		return 0, nil, fmt.Errorf("runtime: %w", err)
	}
	return pid, live, nil
}

// firstLines returns the first n lines of s.
func firstLines(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	return strings.Join(lines[:min(n, len(lines))], "\n")
}

// Apply makes the listed slot changes, one command per connection so that
// each answer can be checked.
func (r Runtime) Apply(ctx context.Context, changes []SlotChange) error {
	for _, c := range changes {
		id := c.Backend + "/" + c.Slot
		if c.To.Empty() {
			if err := r.expectEmpty(ctx, "set server "+id+" state maint"); err != nil {
				return err
			}
			continue
		}
		cmd := fmt.Sprintf("set server %s addr %s port %d", id, c.To.Addr.Addr(), c.To.Addr.Port())
		out, err := socketCmd(ctx, r.Socket, cmd)
		if err != nil {
			return fmt.Errorf("runtime: %w", err)
		}
		if !strings.Contains(out, "changed") && !strings.Contains(out, "no need to change") {
			return fmt.Errorf("runtime: %s: %s", cmd, strings.TrimSpace(out))
		}
		if err := r.expectEmpty(ctx, "set server "+id+" state ready"); err != nil {
			return err
		}
	}
	return nil
}

// expectEmpty runs a command that answers nothing on success.
func (r Runtime) expectEmpty(ctx context.Context, cmd string) error {
	out, err := socketCmd(ctx, r.Socket, cmd)
	if err != nil {
		return fmt.Errorf("runtime: %w", err)
	}
	if s := strings.TrimSpace(out); s != "" {
		return fmt.Errorf("runtime: %s: %s", cmd, s)
	}
	return nil
}
