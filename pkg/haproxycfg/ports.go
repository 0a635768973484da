package haproxycfg

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// MinUnprivilegedPort is the first port an app may publish without being
// allowed explicitly (Params.AllowLowPorts): below it live sshd (22),
// DNS, HTTP and the like, which an app must not shadow on loopback.
const MinUnprivilegedPort = 1024

// PortProbe reports whether 127.0.0.1:port can be bound right now (nil)
// or why not.
type PortProbe func(port int) error

// ProbeLoopback binds 127.0.0.1:port the way HAProxy does (SO_REUSEADDR
// and SO_REUSEPORT) and closes the socket at once: a port some other
// process listens on (etcd's 2379, sshd's 22 on 0.0.0.0, meshd's own
// metrics) fails with "address already in use", while a port another
// HAProxy holds (the legacy one a migrating node is handing over from)
// binds, as it would for HAProxy. `haproxy -c` does not bind, so without
// this check a busy port passes validation and fails the reload, and
// every later change of the node fails with it.
//
// The socket is bound, never listened on: a listening socket would join
// the other HAProxy's reuseport group, be handed some of its incoming
// connections, and reset them on close.
func ProbeLoopback(port int) error { return probeLoopback(port, true) }

// probeAlone binds 127.0.0.1:port without SO_REUSEPORT: unlike
// ProbeLoopback it fails when another HAProxy listens on the port too.
func probeAlone(port int) error { return probeLoopback(port, false) }

func probeLoopback(port int, reusePort bool) error {
	if port < 0 || port > 65535 {
		return fmt.Errorf("port %d out of range", port)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("probe port %d: %w", port, err)
	}
	defer unix.Close(fd)
	if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
		return fmt.Errorf("probe port %d: %w", port, err)
	}
	if reusePort {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); err != nil {
			return fmt.Errorf("probe port %d: %w", port, err)
		}
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Port: port, Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		return fmt.Errorf("bind 127.0.0.1:%d: %w", port, err)
	}
	return nil
}

// LeaveOutBusy removes from d every listener whose port is neither held
// by the running HAProxy (held) nor free (probe), and reports it as a
// Problem, so that the rest of the configuration still applies.
func LeaveOutBusy(d Desired, held map[int]bool, probe PortProbe) Desired {
	out := d
	out.Listeners = out.Listeners[:0:0]
	out.Problems = append([]Problem(nil), d.Problems...)
	for _, l := range d.Listeners {
		if !held[l.Port] {
			if err := probe(l.Port); err != nil {
				out.Problems = append(out.Problems, Problem{App: l.App.String(),
					Reason: fmt.Sprintf("port %d cannot be bound on this node (%v); not rendered", l.Port, err)})
				continue
			}
		}
		out.Listeners = append(out.Listeners, l)
	}
	sortProblems(out.Problems)
	return out
}

// HeldPorts returns the loopback ports the configuration HAProxy runs
// binds: what it last applied, or after a meshd restart the file on disk
// (which only ever holds a configuration HAProxy accepted).
func (a *Applier) HeldPorts() map[int]bool {
	a.mu.Lock()
	b := a.lastGood
	a.mu.Unlock()
	if b == nil {
		b, _ = os.ReadFile(a.ConfigPath)
	}
	held := map[int]bool{}
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		rest, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "bind 127.0.0.1:")
		if !ok {
			continue
		}
		if p, err := strconv.Atoi(strings.Fields(rest + " ")[0]); err == nil {
			held[p] = true
		}
	}
	return held
}

// ValidUnixName reports whether s is a user or group name that may go
// into the config: lower-case letters, digits, '_' and '-', starting with
// a letter or '_', at most 32 bytes.
func ValidUnixName(s string) bool {
	if s == "" || len(s) > 32 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z', c == '_':
		case (c >= '0' && c <= '9' || c == '-') && i > 0:
		default:
			return false
		}
	}
	return true
}
