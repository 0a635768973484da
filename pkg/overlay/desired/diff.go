package desired

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// Op is what a PeerChange does to one peer.
type Op int

// The peer operations. There is deliberately no "replace all": every
// change names one peer, so the others keep their sessions.
const (
	OpAdd Op = iota + 1
	OpUpdate
	OpRemove
)

func (o Op) String() string {
	switch o {
	case OpAdd:
		return "add"
	case OpUpdate:
		return "update"
	case OpRemove:
		return "remove"
	}
	return fmt.Sprintf("op(%d)", int(o))
}

// PeerChange is one per-peer delta. For OpUpdate only the flagged fields
// are sent to the device; the rest of the peer is untouched.
type PeerChange struct {
	Op   Op
	Peer Peer
	// For OpUpdate: which fields differ.
	Endpoint   bool
	AllowedIPs bool
	Keepalive  bool
}

// Plan is the difference between a live and a desired State: exactly what
// the applier must change. A zero field means "leave alone".
type Plan struct {
	// ListenPort to set (0: unchanged).
	ListenPort int
	// MTU to set (0: unchanged).
	MTU int
	// Peers to add, update or remove, sorted by public key.
	Peers []PeerChange
	// Addresses and routes to add, then to delete (add before delete, so
	// a changed address never leaves the node without one).
	AddAddresses, DelAddresses []netip.Prefix
	AddRoutes, DelRoutes       []netip.Prefix
}

// Empty reports whether the plan changes nothing.
func (p Plan) Empty() bool {
	return p.ListenPort == 0 && p.MTU == 0 && len(p.Peers) == 0 &&
		len(p.AddAddresses) == 0 && len(p.DelAddresses) == 0 &&
		len(p.AddRoutes) == 0 && len(p.DelRoutes) == 0
}

// String renders the plan the way an operator would type it, one change
// a line; readable in test failures and debug logs. Keys are public.
func (p Plan) String() string {
	var b strings.Builder
	if p.ListenPort != 0 {
		fmt.Fprintf(&b, "wg set listen-port %d\n", p.ListenPort)
	}
	if p.MTU != 0 {
		fmt.Fprintf(&b, "ip link set mtu %d\n", p.MTU)
	}
	for _, c := range p.Peers {
		switch c.Op {
		case OpRemove:
			fmt.Fprintf(&b, "wg set peer %s remove\n", c.Peer.PublicKey)
		case OpAdd:
			fmt.Fprintf(&b, "wg set peer %s%s\n", c.Peer.PublicKey, peerArgs(c.Peer, true, true, true))
		case OpUpdate:
			fmt.Fprintf(&b, "wg set peer %s%s\n", c.Peer.PublicKey, peerArgs(c.Peer, c.Endpoint, c.AllowedIPs, c.Keepalive))
		}
	}
	for _, a := range p.AddAddresses {
		fmt.Fprintf(&b, "ip addr add %v\n", a)
	}
	for _, r := range p.AddRoutes {
		fmt.Fprintf(&b, "ip route add %v\n", r)
	}
	for _, a := range p.DelAddresses {
		fmt.Fprintf(&b, "ip addr del %v\n", a)
	}
	for _, r := range p.DelRoutes {
		fmt.Fprintf(&b, "ip route del %v\n", r)
	}
	return b.String()
}

func peerArgs(p Peer, endpoint, allowed, keepalive bool) string {
	var b strings.Builder
	if endpoint && p.Endpoint.IsValid() {
		fmt.Fprintf(&b, " endpoint %v", p.Endpoint)
	}
	if allowed {
		ips := make([]string, len(p.AllowedIPs))
		for i, a := range p.AllowedIPs {
			ips[i] = a.String()
		}
		fmt.Fprintf(&b, " allowed-ips %s", strings.Join(ips, ","))
	}
	if keepalive {
		fmt.Fprintf(&b, " persistent-keepalive %d", int(p.Keepalive.Seconds()))
	}
	return b.String()
}

// Diff returns the changes that turn live into want. live is what the
// applier read from the device and the kernel; want is Compute's result.
//
// Two rules keep the data plane steady. A peer's endpoint is only changed
// when want has one and it differs: a peer without a published endpoint
// keeps whatever WireGuard learnt from its packets. And peers present on
// both sides with equal fields produce no change at all, so reapplying the
// same State touches nothing.
func Diff(live, want State) Plan {
	var p Plan
	if want.ListenPort != 0 && want.ListenPort != live.ListenPort {
		p.ListenPort = want.ListenPort
	}
	if want.MTU != 0 && want.MTU != live.MTU {
		p.MTU = want.MTU
	}
	// A merge of the two peer lists sorted by key: no maps, and Compute's
	// output is sorted already. The plan comes out sorted by key.
	lps := sortedCopy(live.Peers, comparePeerKey)
	wps := sortedCopy(want.Peers, comparePeerKey)
	for i, j := 0, 0; i < len(lps) || j < len(wps); {
		switch {
		case j == len(wps) || (i < len(lps) && lps[i].PublicKey < wps[j].PublicKey):
			p.Peers = append(p.Peers, PeerChange{Op: OpRemove, Peer: lps[i]})
			i++
		case i == len(lps) || wps[j].PublicKey < lps[i].PublicKey:
			p.Peers = append(p.Peers, PeerChange{Op: OpAdd, Peer: wps[j]})
			j++
		default:
			lp, wp := lps[i], wps[j]
			c := PeerChange{
				Op:         OpUpdate,
				Peer:       wp,
				Endpoint:   wp.Endpoint.IsValid() && wp.Endpoint != lp.Endpoint,
				AllowedIPs: !samePrefixes(wp.AllowedIPs, lp.AllowedIPs),
				Keepalive:  wp.Keepalive != lp.Keepalive,
			}
			if c.Endpoint || c.AllowedIPs || c.Keepalive {
				p.Peers = append(p.Peers, c)
			}
			i++
			j++
		}
	}
	p.AddAddresses, p.DelAddresses = prefixDiff(live.Addresses, want.Addresses)
	p.AddRoutes, p.DelRoutes = prefixDiff(live.Routes, want.Routes)
	return p
}

// Unchanged reports whether applying want where applied is in place
// changes nothing: the same interface settings and an empty Diff.
func Unchanged(applied, want State) bool {
	return applied.MTU == want.MTU && applied.ListenPort == want.ListenPort &&
		applied.RouteTable == want.RouteTable && applied.Network == want.Network &&
		Diff(applied, want).Empty()
}

func comparePeerKey(a, b Peer) int { return cmp.Compare(a.PublicKey, b.PublicKey) }

// sortedCopy returns xs if it is sorted, else a sorted copy: the inputs
// are never modified.
func sortedCopy[T any](xs []T, cmp func(a, b T) int) []T {
	if slices.IsSortedFunc(xs, cmp) {
		return xs
	}
	c := slices.Clone(xs)
	slices.SortFunc(c, cmp)
	return c
}

// samePrefixes compares two prefix lists as sets.
func samePrefixes(a, b []netip.Prefix) bool {
	if slices.Equal(a, b) { // the usual case, without allocating
		return true
	}
	add, del := prefixDiff(a, b)
	return len(add) == 0 && len(del) == 0
}

// prefixDiff returns what is in want but not in have (add) and the
// reverse (del), both sorted and without duplicates.
func prefixDiff(have, want []netip.Prefix) (add, del []netip.Prefix) {
	h := sortedCopy(have, comparePrefix)
	w := sortedCopy(want, comparePrefix)
	for i, j := 0, 0; i < len(h) || j < len(w); {
		switch {
		case j == len(w) || (i < len(h) && comparePrefix(h[i], w[j]) < 0):
			if len(del) == 0 || del[len(del)-1] != h[i] {
				del = append(del, h[i])
			}
			i++
		case i == len(h) || comparePrefix(w[j], h[i]) < 0:
			if len(add) == 0 || add[len(add)-1] != w[j] {
				add = append(add, w[j])
			}
			j++
		default:
			x := h[i]
			for i < len(h) && h[i] == x {
				i++
			}
			for j < len(w) && w[j] == x {
				j++
			}
		}
	}
	return add, del
}
