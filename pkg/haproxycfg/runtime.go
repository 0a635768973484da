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
	pid, servers, err := cutInfo(out)
	if err != nil {
		return 0, nil, err
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

// cutInfo takes the answer to `show info` off the front of out (it ends
// at the first empty line and has none inside) and returns its Pid and
// the answers after it.
func cutInfo(out string) (pid int, rest string, err error) {
	info, rest, ok := strings.Cut(out, "\n\n")
	if !ok {
		return 0, "", fmt.Errorf("runtime: no end of show info in %q", firstLines(out, 3))
	}
	for _, line := range strings.Split(info, "\n") {
		if v, ok := strings.CutPrefix(line, "Pid: "); ok {
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil || n <= 0 {
				return 0, "", fmt.Errorf("runtime: show info: bad %q", line)
			}
			return n, rest, nil
		}
	}
	return 0, "", fmt.Errorf("runtime: no Pid in show info (answer begins %q)", firstLines(out, 3))
}

// firstLines returns the first n lines of s.
func firstLines(s string, n int) string {
	lines := strings.SplitN(s, "\n", n+1)
	return strings.Join(lines[:min(n, len(lines))], "\n")
}

// ErrNotCurrentWorker is returned (wrapped) when the stats socket was
// answered by another worker than the master's current one. Right after a
// reload both the old and the new worker hold the socket's listener (the
// new one inherits it: "expose-fd listeners") until the master stops the
// old one, so a connection may reach either: what the old worker says or
// is told is lost with it.
var ErrNotCurrentWorker = errors.New("stats socket answered by a worker that is not the current one")

// batchBytes bounds the commands sent over one connection: HAProxy reads
// a CLI line in chunks of its buffer size and runs the commands as they
// come, but one answer per command has to come back whole.
const batchBytes = 8 << 10

// Apply makes the listed slot changes in worker pid (the master's current
// worker). The commands go over as few connections as can carry them,
// each connection beginning with `show info`, so that its answers are
// known to come from one process and that process is known: if it is not
// pid, Apply stops and returns ErrNotCurrentWorker. The changes are
// idempotent, so the caller reads the slots again and retries.
func (r Runtime) Apply(ctx context.Context, pid int, changes []SlotChange) error {
	var cmds []string
	for _, c := range changes {
		id := c.Backend + "/" + c.Slot
		if c.To.Empty() {
			cmds = append(cmds, "set server "+id+" state maint")
			continue
		}
		cmds = append(cmds,
			fmt.Sprintf("set server %s addr %s port %d", id, c.To.Addr.Addr(), c.To.Addr.Port()),
			"set server "+id+" state ready")
	}
	for len(cmds) > 0 {
		n, size := 0, 0
		for n < len(cmds) && (n == 0 || size+len(cmds[n])+1 <= batchBytes) {
			size += len(cmds[n]) + 1
			n++
		}
		if err := r.applyBatch(ctx, pid, cmds[:n]); err != nil {
			return err
		}
		cmds = cmds[n:]
	}
	return nil
}

func (r Runtime) applyBatch(ctx context.Context, pid int, cmds []string) error {
	out, err := socketCmd(ctx, r.Socket, "show info;"+strings.Join(cmds, ";"))
	if err != nil {
		return fmt.Errorf("runtime: %w", err)
	}
	got, answers, err := parseBatch(out)
	if err != nil {
		return err
	}
	if got != pid {
		return fmt.Errorf("%w: worker %d answered, the current worker is %d", ErrNotCurrentWorker, got, pid)
	}
	if len(answers) != len(cmds) {
		return fmt.Errorf("runtime: %d answers to %d commands (answer begins %q)", len(answers), len(cmds), firstLines(out, 3))
	}
	for i, cmd := range cmds {
		if err := checkAnswer(cmd, answers[i]); err != nil {
			return err
		}
	}
	return nil
}

// parseBatch splits the answer to `show info;cmd1;cmd2…`: in
// non-interactive mode the CLI ends every command's answer with an empty
// line, so a command that answers nothing answers just that line.
func parseBatch(out string) (pid int, answers []string, err error) {
	pid, rest, err := cutInfo(out)
	if err != nil {
		return 0, nil, err
	}
	var cur []string
	for _, line := range strings.SplitAfter(rest, "\n") {
		if !strings.HasSuffix(line, "\n") {
			if line != "" {
				return 0, nil, fmt.Errorf("runtime: answer cut short: %q", line)
			}
			break
		}
		if line = strings.TrimSuffix(line, "\n"); line == "" {
			answers = append(answers, strings.Join(cur, "\n"))
			cur = nil
			continue
		}
		cur = append(cur, line)
	}
	if len(cur) > 0 {
		return 0, nil, fmt.Errorf("runtime: answer cut short: %q", strings.Join(cur, "\n"))
	}
	return pid, answers, nil
}

// checkAnswer checks one command's answer: `set server … addr` says what
// changed (or that nothing needed to), `set server … state` says nothing.
func checkAnswer(cmd, answer string) error {
	if strings.Contains(cmd, " addr ") {
		if !strings.Contains(answer, "changed") && !strings.Contains(answer, "no need to change") {
			return fmt.Errorf("runtime: %s: %s", cmd, strings.TrimSpace(answer))
		}
		return nil
	}
	if s := strings.TrimSpace(answer); s != "" {
		return fmt.Errorf("runtime: %s: %s", cmd, s)
	}
	return nil
}
