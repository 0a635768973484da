package haproxycfg

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
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

// Session is one connection to the stats socket in HAProxy's interactive
// mode (`prompt`): the commands of one pass run in turn on it, each answer
// read up to the prompt that follows it. A pass costs one connection
// instead of one per command, and every answer (the slot occupancy read,
// the changes made from it) comes from the same worker.
type Session struct {
	c   net.Conn
	buf []byte
	// skip is the number of answers still due to commands sent without
	// waiting (`prompt`); the next run reads and drops them first.
	skip int
}

// prompt ends every answer in interactive mode. No answer meshd reads
// (show info, show servers state, set server) has a line that begins with
// "> ".
const prompt = "\n> "

// Open connects to the stats socket and enters interactive mode. The
// session ends at ctx's deadline, or 10 s from now if that is sooner.
func (r Runtime) Open(ctx context.Context) (*Session, error) {
	c, err := dialSocket(ctx, r.Socket)
	if err != nil {
		return nil, fmt.Errorf("runtime: %w", err)
	}
	c.SetDeadline(socketDeadline(ctx))
	// Its empty answer is read with the first command's: one round trip
	// fewer.
	if _, err := io.WriteString(c, "prompt\n"); err != nil {
		c.Close()
		return nil, fmt.Errorf("runtime: send prompt: %w", err)
	}
	return &Session{c: c, skip: 1}, nil
}

// Close ends the session.
func (s *Session) Close() error { return s.c.Close() }

// run sends one line of n commands (HAProxy runs `a;b` in turn, each
// whatever the one before answered) and returns their n answers.
func (s *Session) run(line string, n int) ([]string, error) {
	if _, err := io.WriteString(s.c, line+"\n"); err != nil {
		return nil, fmt.Errorf("runtime: send %q: %w", firstWord(line), err)
	}
	var chunk [64 << 10]byte
	for bytes.Count(s.buf, []byte(prompt)) < s.skip+n {
		k, err := s.c.Read(chunk[:])
		s.buf = append(s.buf, chunk[:k]...)
		if err != nil {
			return nil, fmt.Errorf("runtime: read answer to %q: %w", firstWord(line), err)
		}
	}
	a := splitAnswers(&s.buf, s.skip+n)[s.skip:]
	s.skip = 0
	return a, nil
}

// splitAnswers takes the first n prompt-terminated answers off *buf.
func splitAnswers(buf *[]byte, n int) []string {
	out := make([]string, 0, n)
	for range n {
		i := bytes.Index(*buf, []byte(prompt))
		out = append(out, string((*buf)[:i]))
		*buf = (*buf)[i+len(prompt):]
	}
	return out
}

// State reads the pid of the worker answering and every meshd backend's
// slot occupancy in that worker, in one round trip.
func (s *Session) State() (pid int, live Live, err error) {
	a, err := s.run("show info;show servers state", 2)
	if err != nil {
		return 0, nil, err
	}
	return parseState(a[0], a[1])
}

// parseState parses the answers to `show info` and `show servers state`.
func parseState(info, servers string) (int, Live, error) {
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
		return 0, nil, fmt.Errorf("runtime: no Pid in show info (answer begins %q)", firstLines(info, 3))
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

// Apply makes the listed slot changes in up to three round trips, each a
// line of commands whose every answer is checked before the next line is
// sent: the filled slots' new addresses, then their `state ready`, then
// the freed slots' `state maint`. A slot whose address change failed is
// never made ready (it would send traffic to its previous occupant), and
// no slot is freed before the new ones serve: a backend never drops below
// the servers it is about to have.
func (s *Session) Apply(changes []SlotChange) error {
	var addrs, ready, maint []string
	for _, c := range changes {
		id := c.Backend + "/" + c.Slot
		if c.To.Empty() {
			maint = append(maint, "set server "+id+" state maint")
			continue
		}
		addrs = append(addrs, fmt.Sprintf("set server %s addr %s port %d", id, c.To.Addr.Addr(), c.To.Addr.Port()))
		ready = append(ready, "set server "+id+" state ready")
	}
	addrChanged := func(out string) bool {
		return strings.Contains(out, "changed") || strings.Contains(out, "no need to change")
	}
	empty := func(out string) bool { return out == "" }
	for _, step := range []struct {
		cmds []string
		ok   func(string) bool
	}{{addrs, addrChanged}, {ready, empty}, {maint, empty}} {
		if len(step.cmds) == 0 {
			continue
		}
		answers, err := s.run(strings.Join(step.cmds, ";"), len(step.cmds))
		if err != nil {
			return err
		}
		for i, cmd := range step.cmds {
			if out := strings.TrimSpace(answers[i]); !step.ok(out) {
				return fmt.Errorf("runtime: %s: %s", cmd, out)
			}
		}
	}
	return nil
}
