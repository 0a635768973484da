// Package haproxycfg renders this node's HAProxy configuration from the
// registry and applies it hitlessly.
//
// The package has two halves. Compute and Render are pure: a registry
// snapshot and a few parameters go in, a sorted Desired value and a
// byte-for-byte stable haproxy.cfg come out. The Applier owns the rendered
// file and a running HAProxy in master-worker mode: an instance change is
// applied through the runtime API (pre-allocated server slots, no reload),
// a structural change is validated with `haproxy -c` and then reloaded
// through the master socket.
package haproxycfg

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/meshd/meshd/pkg/registry"
)

// Defaults for Params fields left zero.
const (
	DefaultServerSlots   = 8
	DefaultHardStopAfter = 30 * time.Second
	DefaultMaxReloads    = 3
	// MaxServerSlots bounds the slots of one backend, so a flood of bogus
	// instances cannot make a config of unbounded size.
	MaxServerSlots = 1024
)

// Params is everything besides the snapshot that shapes the rendered
// configuration. It comes from meshd's config file.
type Params struct {
	// Self is this node's name; it only appears in the header comment.
	Self string
	// Consume lists the groups whose apps get a listener on this node.
	Consume []registry.Group
	// ReservedPorts are loopback ports this node's own services use; an
	// app publishing one of them is reported and skipped.
	ReservedPorts []int
	// AllowLowPorts are ports below MinUnprivilegedPort that apps may
	// publish (an ingress node's 80 and 443); any other is refused.
	AllowLowPorts []int
	// ServerSlots is the slot granularity of a backend: a backend has the
	// smallest multiple of ServerSlots that holds its instances.
	ServerSlots int
	// StatsSocket is the runtime API socket: a unix socket path, or
	// "ipv4@127.0.0.1:PORT" (whose port is then reserved).
	StatsSocket string
	// MasterSocket is only used to reserve its port when it is TCP
	// ("ipv4@127.0.0.1:PORT"); HAProxy takes it on the command line (-S).
	MasterSocket string
	// HardStopAfter bounds how long an old worker may drain after a reload.
	HardStopAfter time.Duration
	// MaxReloads is mworker-max-reloads: an old worker that survived this
	// many reloads is terminated.
	MaxReloads int
	// User and Group are what HAProxy's processes that handle traffic run
	// as (its "user"/"group" directives): the worker drops root after the
	// listeners are bound. Empty leaves HAProxy as started.
	User, Group string
	// GlobalExtra are operator-supplied lines appended to the global
	// section (tuning such as "maxconn 20000"). The renderer only checks
	// that each is one printable line; `haproxy -c` is the judge of the rest.
	GlobalExtra []string
}

// withDefaults fills zero fields.
func (p Params) withDefaults() Params {
	if p.ServerSlots <= 0 {
		p.ServerSlots = DefaultServerSlots
	}
	if p.HardStopAfter <= 0 {
		p.HardStopAfter = DefaultHardStopAfter
	}
	if p.MaxReloads <= 0 {
		p.MaxReloads = DefaultMaxReloads
	}
	return p
}

// Desired is the complete HAProxy configuration this node should run, in
// canonical (sorted) order.
type Desired struct {
	Self          string
	StatsSocket   string
	HardStopAfter time.Duration
	MaxReloads    int
	User, Group   string
	GlobalExtra   []string
	// Listeners holds one entry per rendered app, sorted by group then app.
	Listeners []Listener
	// Problems says what was skipped and why, sorted.
	Problems []Problem
}

// Listener is one app as HAProxy serves it: a frontend on 127.0.0.1:Port
// and a backend of server slots.
type Listener struct {
	App  registry.AppID
	Port int
	// Slots has the backend's server slots; an empty Server is a free slot
	// (rendered disabled). Compute fills the first slots in node order;
	// Place may move instances to keep them where HAProxy already has them.
	Slots []Server
}

// Server is one slot's occupant.
type Server struct {
	Node string
	Addr netip.AddrPort
}

// Empty reports whether the slot is free.
func (s Server) Empty() bool { return !s.Addr.IsValid() }

// Problem is one thing Compute refused to render.
type Problem struct {
	App    string `json:"app,omitempty"`
	Reason string `json:"reason"`
}

// FrontendName is the frontend's name for an app. Group is part of every
// proxy name: nix-infra's bare-app backend names collide between groups.
func FrontendName(id registry.AppID) string { return "fe_" + string(id.Group) + "_" + id.Name }

// BackendName is the backend's name for an app.
func BackendName(id registry.AppID) string { return "be_" + string(id.Group) + "_" + id.Name }

// SlotName is the server name of slot i (0-based) of a backend.
func SlotName(i int) string { return "s" + strconv.Itoa(i+1) }

// Compute derives the desired configuration from a snapshot. It is pure:
// no I/O, no clock; the output is sorted.
func Compute(snap *registry.Snapshot, opts Params) Desired {
	opts = opts.withDefaults()
	d := Desired{
		Self:          opts.Self,
		StatsSocket:   opts.StatsSocket,
		HardStopAfter: opts.HardStopAfter,
		MaxReloads:    opts.MaxReloads,
		User:          opts.User,
		Group:         opts.Group,
		GlobalExtra:   slices.Clone(opts.GlobalExtra),
	}
	problem := func(app, format string, a ...any) {
		d.Problems = append(d.Problems, Problem{App: app, Reason: fmt.Sprintf(format, a...)})
	}
	if snap == nil {
		return d
	}
	reserved := map[int]string{}
	for _, p := range opts.ReservedPorts {
		reserved[p] = "reserved port"
	}
	for _, s := range []struct{ name, addr string }{{"stats socket", opts.StatsSocket}, {"master socket", opts.MasterSocket}} {
		if p, ok := tcpSocketPort(s.addr); ok {
			reserved[p] = s.name
		}
	}
	consume := map[registry.Group]bool{}
	for _, g := range opts.Consume {
		consume[g] = true
	}

	var cands []Listener
	for _, app := range snap.SortedApps() {
		if app == nil || !consume[app.ID.Group] {
			continue
		}
		id := app.ID.String()
		if _, err := registry.ParseGroup(string(app.ID.Group)); err != nil {
			problem(id, "group: %v", err)
			continue
		}
		if err := registry.ValidName(app.ID.Name); err != nil {
			problem(id, "app name: %v", err)
			continue
		}
		if app.Meta == nil {
			continue // instances without meta_data: nothing to publish yet
		}
		port := app.Meta.Publish.Port
		if port < 1 || port > 65535 {
			problem(id, "publish.port %d out of range", port)
			continue
		}
		cands = append(cands, Listener{App: app.ID, Port: port, Slots: servers(app, id, problem)})
	}

	// Port collisions: the first app in (group, app) order keeps the port,
	// so the outcome does not depend on map order or arrival order.
	taken := map[int]string{}
	for _, l := range cands {
		if why, ok := reserved[l.Port]; ok {
			problem(l.App.String(), "port %d collides with %s; not rendered", l.Port, why)
			continue
		}
		if l.Port < MinUnprivilegedPort && !slices.Contains(opts.AllowLowPorts, l.Port) {
			problem(l.App.String(), "publish.port %d is below %d and not in haproxy.allowLowPorts; not rendered", l.Port, MinUnprivilegedPort)
			continue
		}
		if other, ok := taken[l.Port]; ok {
			problem(l.App.String(), "port %d already used by %s; not rendered", l.Port, other)
			continue
		}
		taken[l.Port] = l.App.String()
		l.Slots = padSlots(l.Slots, opts.ServerSlots)
		d.Listeners = append(d.Listeners, l)
	}
	sortProblems(d.Problems)
	return d
}

func sortProblems(ps []Problem) {
	slices.SortFunc(ps, func(a, b Problem) int {
		return cmp.Or(cmp.Compare(a.App, b.App), cmp.Compare(a.Reason, b.Reason))
	})
}

// servers validates an app's instances and returns them sorted by node,
// one per distinct address.
func servers(app *registry.App, id string, problem func(app, format string, a ...any)) []Server {
	var out []Server
	seen := map[netip.AddrPort]string{}
	for _, in := range app.SortedInstances() {
		if err := registry.ValidName(in.Node); err != nil {
			problem(id, "instance node: %v", err)
			continue
		}
		a, err := netip.ParseAddr(in.IPv4)
		if err != nil || !a.Is4() || a.IsUnspecified() || a.IsMulticast() {
			problem(id, "instance %s: ipv4 %s is not a usable IPv4 address", in.Node, registry.Quoted([]byte(in.IPv4)))
			continue
		}
		if in.Port < 1 || in.Port > 65535 {
			problem(id, "instance %s: port %d out of range", in.Node, in.Port)
			continue
		}
		ap := netip.AddrPortFrom(a, uint16(in.Port))
		if other, ok := seen[ap]; ok {
			problem(id, "instance %s: address %v already served by %s", in.Node, ap, other)
			continue
		}
		seen[ap] = in.Node
		out = append(out, Server{Node: in.Node, Addr: ap})
	}
	if len(out) > MaxServerSlots {
		problem(id, "%d instances, only the first %d are rendered", len(out), MaxServerSlots)
		out = out[:MaxServerSlots]
	}
	return out
}

// padSlots extends s with free slots up to slotsFor(len(s), step).
func padSlots(s []Server, step int) []Server {
	out := make([]Server, slotsFor(len(s), step))
	copy(out, s)
	return out
}

// slotsFor is how many slots n instances get: the smallest multiple of
// step that holds them and one spare slot, so that one more instance (a
// replacement starting before the old one is gone) needs no reload.
func slotsFor(n, step int) int {
	return min((n+1+step-1)/step*step, max(MaxServerSlots, n))
}

// Hysteresis keeps each listener's slot count from prev where the
// instance count moved only a little, so that an app whose count flaps
// across a multiple of step does not change the structure (and reload
// every consuming node, cutting long connections of all apps) each time:
// slots grow at once when the instances need more, and shrink only once
// the instances fit with half a step to spare below the smaller size.
// It is pure; prev is the Desired computed last time.
func Hysteresis(d, prev Desired, step int) Desired {
	if step <= 0 {
		step = DefaultServerSlots
	}
	had := map[registry.AppID]int{}
	for _, l := range prev.Listeners {
		had[l.App] = len(l.Slots)
	}
	out := d
	out.Listeners = slices.Clone(d.Listeners)
	for i, l := range out.Listeners {
		c, ok := had[l.App]
		n := 0
		for _, s := range l.Slots {
			if !s.Empty() {
				n++
			}
		}
		if !ok || slotsFor(n, step) > c || slotsFor(n+max(1, step/2), step) < c || n > MaxServerSlots || c > MaxServerSlots {
			continue // new, growing, or shrinking well below: Compute's size
		}
		slots := make([]Server, c)
		copy(slots, l.Slots[:min(len(l.Slots), c)])
		out.Listeners[i].Slots = slots
	}
	return out
}

// tcpSocketPort returns the port of a socket address HAProxy would bind
// over TCP ("ipv4@127.0.0.1:9999").
func tcpSocketPort(addr string) (int, bool) {
	rest, ok := strings.CutPrefix(addr, "ipv4@")
	if !ok {
		return 0, false
	}
	ap, err := netip.ParseAddrPort(rest)
	if err != nil {
		return 0, false
	}
	return int(ap.Port()), true
}

// Servers counts the occupied slots of every listener.
func (d Desired) Servers() int {
	n := 0
	for _, l := range d.Listeners {
		for _, s := range l.Slots {
			if !s.Empty() {
				n++
			}
		}
	}
	return n
}
