package haproxycfg

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/netip"
	"path"
	"strconv"
	"strings"
	"time"

	"github.com/meshd/meshd/pkg/registry"
)

// Render writes d as a complete haproxy.cfg. The output depends only on d
// and is byte-for-byte stable.
//
// Names are checked again here (defence in depth: Compute already drops
// them, but a Desired can be built by hand): a listener whose group, app or
// node does not pass registry.ValidName, a socket path or extra global line
// with characters that could start a new directive, is left out entirely —
// never quoted, escaped or echoed into a comment.
func Render(d Desired) []byte {
	var b bytes.Buffer
	slots := 0
	for _, l := range d.Listeners {
		slots += len(l.Slots)
	}
	b.Grow(renderBase + renderPerListener*len(d.Listeners) + renderPerSlot*slots)
	fmt.Fprintf(&b, "# Rendered by meshd")
	if registry.ValidName(d.Self) == nil {
		fmt.Fprintf(&b, " for node %s", d.Self)
	}
	b.WriteString(". Do not edit: meshd rewrites this file.\n")
	fmt.Fprintf(&b, "# structure %s\n\n", StructureHash(d))

	b.WriteString("global\n")
	b.WriteString("    master-worker\n")
	if safeSocket(d.StatsSocket) {
		// 660: the socket's group is HAProxy's own group (root's when
		// meshd supervises it; meshd-haproxy under the NixOS module,
		// where HAProxy runs as its own user and meshd joins that group).
		fmt.Fprintf(&b, "    stats socket %s mode 660 level admin expose-fd listeners\n", d.StatsSocket)
	}
	fmt.Fprintf(&b, "    hard-stop-after %s\n", haDuration(d.HardStopAfter, DefaultHardStopAfter))
	maxReloads := d.MaxReloads
	if maxReloads <= 0 {
		maxReloads = DefaultMaxReloads
	}
	fmt.Fprintf(&b, "    mworker-max-reloads %d\n", maxReloads)
	if ValidUnixName(d.User) {
		fmt.Fprintf(&b, "    user %s\n", d.User)
	}
	if ValidUnixName(d.Group) {
		fmt.Fprintf(&b, "    group %s\n", d.Group)
	}
	for _, l := range d.GlobalExtra {
		if safeLine(l) {
			fmt.Fprintf(&b, "    %s\n", l)
		}
	}

	b.WriteString("\ndefaults\n")
	b.WriteString("    mode tcp\n")
	b.WriteString("    timeout connect 5s\n")
	b.WriteString("    timeout client 50s\n")
	b.WriteString("    timeout server 50s\n")
	// A connection refused by one instance is retried on another one
	// instead of failing the client: slots move at runtime.
	b.WriteString("    retries 3\n")
	b.WriteString("    option redispatch 1\n")
	// Health checks: a server that is down (or whose slot was just filled
	// and whose first check failed) is re-checked every 500 ms, not every
	// 2 s, so it serves again within about a second of being reachable.
	b.WriteString("    default-server inter 2s fastinter 500ms downinter 500ms rise 2 fall 3\n")

	for _, l := range d.Listeners {
		if !renderable(l) {
			continue
		}
		fe, be := FrontendName(l.App), BackendName(l.App)
		fmt.Fprintf(&b, "\n# %s/%s (nix-infra: listener tcp-in-%s-%s, backend %s)\n",
			l.App.Group, l.App.Name, l.App.Group, l.App.Name, l.App.Name)
		fmt.Fprintf(&b, "frontend %s\n", fe)
		fmt.Fprintf(&b, "    bind 127.0.0.1:%d\n", l.Port)
		fmt.Fprintf(&b, "    default_backend %s\n", be)
		fmt.Fprintf(&b, "\nbackend %s\n", be)
		b.WriteString("    balance roundrobin\n")
		for i, s := range l.Slots {
			b.WriteString("    server ")
			b.WriteString(SlotName(i))
			if s.Empty() {
				b.WriteString(" 0.0.0.0:0 check disabled\n")
				continue
			}
			b.WriteByte(' ')
			b.Write(s.Addr.AppendTo(b.AvailableBuffer()))
			b.WriteString(" check # ")
			b.WriteString(s.Node)
			b.WriteByte('\n')
		}
	}
	return b.Bytes()
}

// Render's buffer is sized from these, so that a pass renders into one
// allocation: the global and defaults sections, and about what one
// listener's frontend and backend and one server line take.
const (
	renderBase        = 1024
	renderPerListener = 320
	renderPerSlot     = 64
)

// renderable re-checks everything of a listener that reaches the file.
func renderable(l Listener) bool {
	if _, err := registry.ParseGroup(string(l.App.Group)); err != nil {
		return false
	}
	if registry.ValidName(l.App.Name) != nil || l.Port < 1 || l.Port > 65535 {
		return false
	}
	if len(l.Slots) == 0 || len(l.Slots) > MaxServerSlots {
		return false
	}
	for _, s := range l.Slots {
		if s.Empty() {
			continue
		}
		if registry.ValidName(s.Node) != nil || !s.Addr.Addr().Is4() || s.Addr.Port() == 0 {
			return false
		}
	}
	return true
}

// safeSocket accepts an absolute unix socket path of the characters
// [A-Za-z0-9/._-] (optionally "unix@"), or "ipv4@A.B.C.D:PORT" with a
// literal address: nothing that could end the directive, and no host name
// that HAProxy would resolve (and hang on) at startup.
func safeSocket(s string) bool {
	if rest, ok := strings.CutPrefix(s, "ipv4@"); ok {
		a, err := netip.ParseAddrPort(rest)
		return err == nil && a.Addr().Is4() && a.Port() != 0
	}
	s = strings.TrimPrefix(s, "unix@")
	if !strings.HasPrefix(s, "/") || len(s) > 107 || s == "/" || path.Clean(s) != s {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
			c == '/' || c == '.' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// safeLine accepts one line of printable ASCII.
func safeLine(s string) bool {
	if s == "" || len(s) > 1024 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if s[i] < 0x20 || s[i] > 0x7e {
			return false
		}
	}
	return true
}

// haDuration spells d in HAProxy's time format, in whole milliseconds.
func haDuration(d, def time.Duration) string {
	if d <= 0 {
		d = def
	}
	if d%time.Second == 0 {
		return strconv.FormatInt(int64(d/time.Second), 10) + "s"
	}
	return strconv.FormatInt(max(1, int64(d/time.Millisecond)), 10) + "ms"
}

// Hash is the hex SHA-256 of the rendered configuration with slots in
// canonical order: two Desired values with the same hash need nothing done.
func Hash(d Desired) string {
	return hashOf(Render(Canonical(d)))
}

// StructureHash hashes everything a reload is needed for: d with every
// slot emptied. Two configurations with the same structure hash differ
// only in slot occupants, which the runtime API can change.
func StructureHash(d Desired) string {
	s := WithoutServers(d)
	s.Problems = nil
	for i, l := range d.Listeners {
		if !renderable(l) {
			s.Listeners[i].Port = 0 // not rendered: must still differ from a rendered one
		}
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "%q %q %d %d\n", s.Self, s.StatsSocket, s.HardStopAfter, s.MaxReloads)
	if s.User != "" || s.Group != "" {
		fmt.Fprintf(&b, "u %q %q\n", s.User, s.Group)
	}
	for _, l := range s.GlobalExtra {
		fmt.Fprintf(&b, "g %q\n", l)
	}
	for _, l := range s.Listeners {
		fmt.Fprintf(&b, "l %q %q %d %d\n", l.App.Group, l.App.Name, l.Port, len(l.Slots))
	}
	return hashOf(b.Bytes())[:16]
}

// WithoutServers is d with every slot free: the same structure
// (StructureHash), no server, so no health check.
func WithoutServers(d Desired) Desired {
	s := d
	s.Listeners = make([]Listener, len(d.Listeners))
	for i, l := range d.Listeners {
		s.Listeners[i] = Listener{App: l.App, Port: l.Port, Slots: make([]Server, len(l.Slots))}
	}
	return s
}

func hashOf(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}
