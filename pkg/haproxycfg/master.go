package haproxycfg

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"strconv"
	"strings"
	"time"
)

// ErrReloadFailed is returned (wrapped) when the master reports that a
// reload failed; the previous worker keeps serving.
var ErrReloadFailed = errors.New("haproxy reload failed")

// socketCmd sends one command to an HAProxy CLI socket (a unix path or
// "ipv4@host:port") and returns the whole answer. It half-closes its side
// after the command: HAProxy's master CLI answers only then.
func socketCmd(ctx context.Context, addr, cmd string) (string, error) {
	network, address := "unix", addr
	if rest, ok := strings.CutPrefix(addr, "unix@"); ok {
		address = rest
	} else if rest, ok := strings.CutPrefix(addr, "ipv4@"); ok {
		network, address = "tcp", rest
	}
	var d net.Dialer
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := d.DialContext(dctx, network, address)
	if err != nil {
		return "", fmt.Errorf("dial %s: %w", addr, err)
	}
	defer c.Close()
	deadline := time.Now().Add(10 * time.Second)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	c.SetDeadline(deadline)
	if _, err := io.WriteString(c, cmd+"\n"); err != nil {
		return "", fmt.Errorf("send %q: %w", firstWord(cmd), err)
	}
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		if err := cw.CloseWrite(); err != nil {
			return "", fmt.Errorf("half-close: %w", err)
		}
	}
	b, err := io.ReadAll(c)
	if err != nil {
		return string(b), fmt.Errorf("read answer to %q: %w", firstWord(cmd), err)
	}
	return string(b), nil
}

func firstWord(s string) string {
	w, _, _ := strings.Cut(s, " ")
	return w
}

// Proc is one line of the master's `show proc`.
type Proc struct {
	PID  int
	Type string // "master" or "worker"
	// Reloads is, for the master, how many reloads it went through; for a
	// worker, how many reloads it survived (0: the current worker).
	Reloads int
	// Failed is the master's count of failed reloads.
	Failed int
}

// Procs is the master's `show proc`.
type Procs struct {
	Master  Proc
	Workers []Proc
}

// Current returns the newest worker (fewest reloads survived).
func (p Procs) Current() (Proc, bool) {
	if len(p.Workers) == 0 {
		return Proc{}, false
	}
	best := p.Workers[0]
	for _, w := range p.Workers[1:] {
		if w.Reloads < best.Reloads {
			best = w
		}
	}
	return best, true
}

// parseShowProc parses HAProxy 2.6's `show proc`:
//
//	#<PID>          <type>          <reloads>       <uptime>        <version>
//	12757           master          2 [failed: 1]   0d00h00m11s     2.6.12
//	# workers
//	12858           worker          1               0d00h00m04s     2.6.12
//	# programs
func parseShowProc(s string) (Procs, error) {
	var out Procs
	section := "master"
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "":
			continue
		case strings.HasPrefix(line, "#<PID>"):
			continue
		case strings.HasPrefix(line, "#"):
			section = strings.TrimSpace(strings.TrimPrefix(line, "#"))
			continue
		}
		f := strings.Fields(line)
		if len(f) < 3 {
			return Procs{}, fmt.Errorf("show proc: malformed line %q", line)
		}
		pid, err1 := strconv.Atoi(f[0])
		reloads, err2 := strconv.Atoi(f[2])
		if err1 != nil || err2 != nil {
			return Procs{}, fmt.Errorf("show proc: malformed line %q", line)
		}
		p := Proc{PID: pid, Type: f[1], Reloads: reloads}
		switch {
		case f[1] == "master":
			if i := strings.Index(line, "[failed:"); i >= 0 {
				rest := strings.TrimSpace(line[i+len("[failed:"):])
				n, _, _ := strings.Cut(rest, "]")
				p.Failed, _ = strconv.Atoi(strings.TrimSpace(n))
			}
			out.Master = p
		case f[1] == "worker" && (section == "workers" || section == "old workers"):
			out.Workers = append(out.Workers, p)
		}
	}
	if out.Master.PID == 0 {
		return Procs{}, fmt.Errorf("show proc: no master line in %q", s)
	}
	return out, nil
}

// Master talks to HAProxy's master CLI socket (-S).
type Master struct {
	// Socket is the master socket path (or "ipv4@host:port").
	Socket string
}

// Procs returns the master's process list.
func (m Master) Procs(ctx context.Context) (Procs, error) {
	out, err := socketCmd(ctx, m.Socket, "show proc")
	if err != nil {
		return Procs{}, fmt.Errorf("master: %w", err)
	}
	return parseShowProc(out)
}

// ProcsWait is Procs retried for up to wait: while the master re-executes
// itself during a reload its socket is briefly refused or absent.
func (m Master) ProcsWait(ctx context.Context, wait time.Duration) (Procs, error) {
	deadline := time.Now().Add(wait)
	for {
		p, err := m.Procs(ctx)
		// No socket file at all: no master, nothing to wait for.
		if err == nil || errors.Is(err, fs.ErrNotExist) || time.Now().After(deadline) {
			return p, err
		}
		select {
		case <-ctx.Done():
			return Procs{}, err
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// Reload asks the master to re-read its configuration and waits until it
// has: HAProxy 2.6 answers `reload` with nothing, so success is read from
// `show proc` — the master's reload count went up, its failed count did
// not, and a new worker is running. The old worker drains in the
// background (bounded by hard-stop-after).
func (m Master) Reload(ctx context.Context) (Procs, error) {
	before, err := m.ProcsWait(ctx, 2*time.Second)
	if err != nil {
		return Procs{}, err
	}
	if _, err := socketCmd(ctx, m.Socket, "reload"); err != nil {
		return Procs{}, fmt.Errorf("master: %w", err)
	}
	return m.waitReloaded(ctx, before)
}

// waitReloaded polls `show proc` until the reload after before has ended.
func (m Master) waitReloaded(ctx context.Context, before Procs) (Procs, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	old := map[int]bool{}
	for _, w := range before.Workers {
		old[w.PID] = true
	}
	var lastErr error
	for {
		p, err := m.Procs(ctx)
		switch {
		case err != nil:
			lastErr = err // the master re-executes itself: the socket is briefly gone
		case p.Master.Failed > before.Master.Failed:
			return p, fmt.Errorf("%w: master counts %d failed reloads (was %d); the previous worker keeps serving",
				ErrReloadFailed, p.Master.Failed, before.Master.Failed)
		case p.Master.Reloads > before.Master.Reloads:
			if cur, ok := p.Current(); ok && !old[cur.PID] && cur.Reloads == 0 {
				return p, nil
			}
			lastErr = errors.New("no new worker yet")
		default:
			lastErr = errors.New("reload not yet counted")
		}
		select {
		case <-ctx.Done():
			return Procs{}, fmt.Errorf("wait for reload: %w (last: %v)", ctx.Err(), lastErr)
		case <-time.After(10 * time.Millisecond):
		}
	}
}
