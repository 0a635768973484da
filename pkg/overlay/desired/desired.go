// Package desired computes what a node's WireGuard overlay should look
// like from a registry snapshot: interface addresses, MTU, listen port,
// peers and routes. It is pure (no I/O, no clock, no logging) and imports
// neither netlink nor wgctrl, so meshctl can show what a node would
// configure with exactly the code the daemon runs.
package desired

import (
	"cmp"
	"encoding/base64"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/meshd/meshd/pkg/registry"
)

// Defaults shared by the daemon and meshctl.
const (
	// DefaultListenPort is WireGuard's (and flannel's) UDP port.
	DefaultListenPort = 51820
	// DefaultRouteTable holds meshd's routes, away from the main table.
	DefaultRouteTable = 51820
	// DefaultKeepalive is the persistent keepalive sent to every peer.
	DefaultKeepalive = 25 * time.Second
	// MTUOverhead is what WireGuard over IPv4/IPv6 UDP costs: the
	// interface MTU is the uplink MTU minus this.
	MTUOverhead = 80
	// FallbackMTU is used when no uplink can be found (1500 - 80).
	FallbackMTU = 1420
)

// ErrNoSelf is returned by Compute when the snapshot holds no member
// record for this node yet: there is nothing to configure until the node
// has claimed its subnet.
var ErrNoSelf = errors.New("no member record for this node")

// Params are the node-local settings Compute combines with the snapshot.
type Params struct {
	// ListenPort is the UDP port of the interface (0: DefaultListenPort).
	ListenPort int
	// MTU of the interface. 0 leaves it to the applier, which uses the
	// uplink MTU minus MTUOverhead.
	MTU int
	// Keepalive is the persistent keepalive of every peer (0: none).
	Keepalive time.Duration
	// RouteTable is the routing table the routes go into
	// (0: DefaultRouteTable).
	RouteTable int
	// RouteNetwork routes the whole Network through the interface instead
	// of one route per peer subnet.
	RouteNetwork bool
	// Network is the cluster prefix. Every peer subnet must lie inside it:
	// a member claiming anything else (0.0.0.0/0, a Hetzner private
	// network) is skipped, so a bad record cannot hijack traffic.
	Network netip.Prefix
	// Pool is the subnet pool (meshd's overlay.subnetMin/Max/Len). When
	// set, every member's subnet must be one of its subnets, of its
	// length: a claim of any other width (10.0.0.0/16, where etcd lives)
	// is skipped, never routed.
	Pool registry.Pool
}

// State is the complete desired (or live) configuration of the overlay
// interface. Slices are sorted, so two States compare with cmp.Diff and
// serialise deterministically.
type State struct {
	// Addresses are the interface's addresses: this node's overlay IP as a
	// /32 (nix-infra's subnet .0), so overlayIp placeholders stay true.
	Addresses []netip.Prefix `json:"addresses"`
	// MTU of the interface (0: uplink MTU - MTUOverhead).
	MTU int `json:"mtu"`
	// ListenPort is the interface's UDP port.
	ListenPort int `json:"listenPort"`
	// Peers, sorted by public key.
	Peers []Peer `json:"peers"`
	// Routes go through the interface in RouteTable, with the overlay IP
	// as preferred source. Sorted.
	Routes []netip.Prefix `json:"routes"`
	// RouteTable is the table holding Routes.
	RouteTable int `json:"routeTable"`
	// Network is the cluster prefix the policy rule sends to RouteTable.
	Network netip.Prefix `json:"network"`
	// Problems lists members that were skipped, sorted by member name.
	// Not part of the applied state.
	Problems []Problem `json:"problems,omitempty"`
}

// Peer is one WireGuard peer.
type Peer struct {
	// Name is the member's node name (informational: WireGuard knows
	// peers only by key).
	Name string `json:"name"`
	// PublicKey is the peer's base64 public key.
	PublicKey string `json:"publicKey"`
	// Endpoint is where to send handshakes; zero when the member published
	// none (the peer can still reach us).
	Endpoint netip.AddrPort `json:"endpoint"`
	// AllowedIPs is the peer's subnet.
	AllowedIPs []netip.Prefix `json:"allowedIPs"`
	// Keepalive is the persistent keepalive interval (0: off).
	Keepalive time.Duration `json:"keepalive"`
}

// Problem is a member that Compute skipped, and why.
type Problem struct {
	Member string `json:"member"`
	Err    string `json:"error"`
}

// SelfAddress returns the first interface address (the overlay IP), or
// the zero Addr.
func (s State) SelfAddress() netip.Addr {
	if len(s.Addresses) == 0 {
		return netip.Addr{}
	}
	return s.Addresses[0].Addr()
}

// Compute returns the desired overlay of node self in snap. Peers come
// from the durable member records, not from the leased node entries: a
// node that only lost its presence lease keeps its peer (the data plane
// does not flap with the control plane); a removed member loses it.
//
// Members with an invalid or duplicate key, or a subnet outside
// p.Network or overlapping another member's, are skipped and listed in
// State.Problems; they never prevent the rest from being configured.
// Flannel leases of nodes that have no member record become peers too
// (flannel.go), under the same rules.
// The error is ErrNoSelf when self has no (valid) member record, or a
// description of unusable Params.
func Compute(snap *registry.Snapshot, self string, p Params) (State, error) {
	if err := checkParams(p); err != nil {
		return State{}, err
	}
	me, ok := snap.Members[self]
	if !ok {
		return State{}, fmt.Errorf("%w: %q", ErrNoSelf, self)
	}
	if _, err := checkMember(me, p); err != nil {
		return State{}, fmt.Errorf("%w: %q: %v", ErrNoSelf, self, err)
	}
	st := State{
		Addresses:  []netip.Prefix{netip.PrefixFrom(me.OverlayIP, me.OverlayIP.BitLen())},
		MTU:        p.MTU,
		ListenPort: cmp.Or(p.ListenPort, DefaultListenPort),
		RouteTable: cmp.Or(p.RouteTable, DefaultRouteTable),
		Network:    p.Network,
	}
	addPeers(&st, snap, self, me.PublicKey, me.Subnet, p)
	addFlannelPeers(&st, snap, me, p)
	if len(st.Peers) == 0 {
		st.Peers = nil
	}
	if len(st.Routes) == 0 {
		st.Routes = nil
	}
	if p.RouteNetwork {
		st.Routes = []netip.Prefix{p.Network}
	}
	slices.SortFunc(st.Problems, func(a, b Problem) int { return cmp.Compare(a.Member, b.Member) })
	return st, nil
}

// BeforeClaim returns the overlay of node self, whose WireGuard public
// key is selfKey, before it has a member record: the listen port, MTU and
// the peers Compute would give it, and no address or route (those need
// the node's own subnet). Members whose subnet overlaps the one self will
// claim cannot be known yet; the claim picks a free subnet, so there are
// none unless a claim races. Flannel leases are left to Compute. A node
// configures this before it claims, so that every peer that learns of the
// new node reaches a device that knows it (docs/overlay.md, "First
// handshakes").
func BeforeClaim(snap *registry.Snapshot, self, selfKey string, p Params) (State, error) {
	if err := checkParams(p); err != nil {
		return State{}, err
	}
	if err := ValidKey(selfKey); err != nil {
		return State{}, fmt.Errorf("own key: %w", err)
	}
	st := State{
		MTU:        p.MTU,
		ListenPort: cmp.Or(p.ListenPort, DefaultListenPort),
		RouteTable: cmp.Or(p.RouteTable, DefaultRouteTable),
		Network:    p.Network,
	}
	addPeers(&st, snap, self, selfKey, netip.Prefix{}, p)
	st.Routes = nil
	if len(st.Peers) == 0 {
		st.Peers = nil
	}
	slices.SortFunc(st.Problems, func(a, b Problem) int { return cmp.Compare(a.Member, b.Member) })
	return st, nil
}

// addPeers adds to st the members of snap other than self as peers (and
// their subnets as routes, unless p.RouteNetwork), skipping and listing in
// st.Problems those with an invalid record, self's key, a subnet
// overlapping selfSubnet (when valid) or another member's, or a key
// another member shares.
func addPeers(st *State, snap *registry.Snapshot, self, selfKey string, selfSubnet netip.Prefix, p Params) {
	// Every rule below skips all members involved in a conflict, so the
	// result does not depend on map iteration order; Problems and Peers
	// are sorted at the end. Sorting works on indexes: moving whole
	// records around costs more than the rest of the computation at 1000
	// nodes.
	members := make([]registry.Member, 0, len(snap.Members))
	endpoints := make([]netip.AddrPort, 0, len(snap.Members))
	sameBits := true
	bits := -1 // self's subnet length
	if selfSubnet.IsValid() {
		bits = selfSubnet.Bits()
	}
	for name, m := range snap.Members {
		if name == self {
			continue
		}
		ep, err := checkMember(m, p)
		if err != nil {
			st.Problems = append(st.Problems, Problem{name, err.Error()})
			continue
		}
		if m.PublicKey == selfKey {
			st.Problems = append(st.Problems, Problem{name, msgOwnKey})
			continue
		}
		if selfSubnet.IsValid() && m.Subnet.Overlaps(selfSubnet) {
			st.Problems = append(st.Problems, Problem{name, msgOverlapsSelf(m.Subnet, selfSubnet)})
			continue
		}
		if bits < 0 { // before the claim: the first member's length
			bits = m.Subnet.Bits()
		}
		sameBits = sameBits && m.Subnet.Bits() == bits
		members = append(members, m)
		endpoints = append(endpoints, ep)
	}
	idx := make([]int, len(members))
	for i := range idx {
		idx[i] = i
	}
	// Overlaps between two other members: skip both, since nothing says
	// which one is right.
	bad := make([]bool, len(members))
	if sameBits {
		// The usual case (every subnet a /24): prefixes of one length
		// overlap only when equal.
		first := make(map[netip.Prefix]int, len(members))
		for i, m := range members {
			if j, ok := first[m.Subnet]; ok {
				bad[i], bad[j] = true, true
				continue
			}
			first[m.Subnet] = i
		}
	} else {
		// Sorted by prefix, overlapping subnets form adjacent runs.
		slices.SortFunc(idx, func(a, b int) int {
			return cmp.Compare(prefixKey4(members[a].Subnet), prefixKey4(members[b].Subnet))
		})
		for i := 0; i < len(idx); i++ {
			for j := i + 1; j < len(idx) && members[idx[i]].Subnet.Overlaps(members[idx[j]].Subnet); j++ {
				bad[idx[i]], bad[idx[j]] = true, true
			}
		}
	}
	// Duplicate keys: WireGuard knows a peer only by its key, so two
	// members sharing one cannot both be peers; skip all of them. Sorted
	// by key, duplicates are adjacent.
	// The first 8 bytes of a key, packed big-endian, order like the
	// string: most comparisons never touch the strings.
	heads := make([]uint64, len(members))
	for i, m := range members {
		heads[i] = keyHead(m.PublicKey)
	}
	slices.SortFunc(idx, func(a, b int) int {
		if c := cmp.Compare(heads[a], heads[b]); c != 0 {
			return c
		}
		return cmp.Compare(members[a].PublicKey, members[b].PublicKey)
	})
	dup := make([]bool, len(members))
	for k := 1; k < len(idx); k++ {
		if members[idx[k]].PublicKey == members[idx[k-1]].PublicKey {
			dup[idx[k]], dup[idx[k-1]] = true, true
		}
	}
	st.Peers = make([]Peer, 0, len(members))
	allowed := make([]netip.Prefix, len(members)) // one backing array for every peer's AllowedIPs
	var routeKeys []uint64
	if !p.RouteNetwork {
		routeKeys = make([]uint64, 0, len(members))
		st.Routes = make([]netip.Prefix, 0, len(members))
	}
	for _, i := range idx {
		m := members[i]
		switch {
		case dup[i]:
			st.Problems = append(st.Problems, Problem{m.Name, msgSharedKey(sharing(snap, m.PublicKey))})
			continue
		case bad[i]:
			st.Problems = append(st.Problems, Problem{m.Name, msgOverlapsOther(m.Subnet)})
			continue
		}
		allowed[i] = m.Subnet
		st.Peers = append(st.Peers, Peer{
			Name:       m.Name,
			PublicKey:  m.PublicKey,
			Endpoint:   endpoints[i],
			AllowedIPs: allowed[i : i+1 : i+1],
			Keepalive:  p.Keepalive,
		})
		if !p.RouteNetwork {
			routeKeys = append(routeKeys, prefixKey4(m.Subnet))
		}
	}
	// Sorting packed integers instead of netip.Prefix values is several
	// times faster; every subnet is IPv4 (checkMember).
	slices.Sort(routeKeys)
	for _, k := range routeKeys {
		st.Routes = append(st.Routes, unpackPrefix4(k))
	}
}

// checkParams describes the first unusable setting in p, or returns nil.
// Compute and NewComputer share it, so both reject the same Params with
// the same message.
func checkParams(p Params) error {
	if !p.Network.IsValid() || p.Network != p.Network.Masked() {
		return fmt.Errorf("overlay network %v: want a masked prefix", p.Network)
	}
	if p.MTU != 0 && (p.MTU < 1280 || p.MTU > 65535) {
		return fmt.Errorf("mtu %d: want 1280..65535 or 0", p.MTU)
	}
	if p.ListenPort < 0 || p.ListenPort > 65535 {
		return fmt.Errorf("listen port %d out of range", p.ListenPort)
	}
	if p.Keepalive < 0 || p.Keepalive > 65535*time.Second {
		return fmt.Errorf("keepalive %v out of range", p.Keepalive)
	}
	if p.RouteTable < 0 {
		return fmt.Errorf("route table %d out of range", p.RouteTable)
	}
	return nil
}

// checkMember validates what Compute relies on. The registry's decoder
// checks most of it already; a Snapshot built by other means (a test, a
// cache) gets the same guarantees.
// It returns the parsed endpoint (zero when the member has none).
func checkMember(m registry.Member, p Params) (netip.AddrPort, error) {
	network := p.Network
	if err := ValidKey(m.PublicKey); err != nil {
		return netip.AddrPort{}, fmt.Errorf("public key: %w", err)
	}
	if !m.Subnet.IsValid() || !m.Subnet.Addr().Is4() || m.Subnet != m.Subnet.Masked() {
		return netip.AddrPort{}, fmt.Errorf("subnet %v: want a masked IPv4 prefix", m.Subnet)
	}
	if m.Subnet.Bits() < network.Bits() || !network.Contains(m.Subnet.Addr()) {
		return netip.AddrPort{}, fmt.Errorf("subnet %v is outside the overlay network %v", m.Subnet, network)
	}
	if p.Pool.Bits != 0 && !p.Pool.Contains(m.Subnet) {
		return netip.AddrPort{}, fmt.Errorf("subnet %v is not a /%d of the pool %v-%v", m.Subnet, p.Pool.Bits, p.Pool.Min, p.Pool.Max)
	}
	if !m.OverlayIP.IsValid() || !m.Subnet.Contains(m.OverlayIP) {
		return netip.AddrPort{}, fmt.Errorf("overlay IP %v is not in subnet %v", m.OverlayIP, m.Subnet)
	}
	if m.Endpoint == "" {
		return netip.AddrPort{}, nil
	}
	ap, err := netip.ParseAddrPort(m.Endpoint)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("endpoint: %w", err)
	}
	if ap.Port() == 0 || ap.Addr().IsUnspecified() {
		return netip.AddrPort{}, fmt.Errorf("endpoint %v: want a host and a port", ap)
	}
	return ap, nil
}

// The Problem texts Compute and Computer give for conflicts.
const msgOwnKey = "public key is this node's own"

func msgOverlapsSelf(subnet, self netip.Prefix) string {
	return fmt.Sprintf("subnet %v overlaps this node's %v", subnet, self)
}

func msgSharedKey(members []string) string {
	return fmt.Sprintf("public key shared by members %v", members)
}

func msgOverlapsOther(subnet netip.Prefix) string {
	return fmt.Sprintf("subnet %v overlaps another member's", subnet)
}

// sharing lists the members (sorted) whose public key is key.
func sharing(snap *registry.Snapshot, key string) []string {
	var out []string
	for n, m := range snap.Members {
		if m.PublicKey == key {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out
}

// ValidKey checks a base64 Curve25519 key: 32 bytes, standard encoding.
func ValidKey(s string) error {
	if len(s) != base64.StdEncoding.EncodedLen(32) {
		return fmt.Errorf("%d characters, want 44", len(s))
	}
	var buf [33]byte
	n, err := base64.StdEncoding.Decode(buf[:], []byte(s))
	if err != nil || n != 32 {
		return fmt.Errorf("not base64 of 32 bytes")
	}
	return nil
}

// keyHead packs the first 8 bytes of s (a validated 44-byte key) into an
// integer that sorts like the string.
func keyHead(s string) uint64 {
	var h uint64
	for i := 0; i < 8 && i < len(s); i++ {
		h |= uint64(s[i]) << (56 - 8*i)
	}
	return h
}

// prefixKey4 packs an IPv4 prefix into an integer that sorts like
// comparePrefix: address, then length.
func prefixKey4(p netip.Prefix) uint64 {
	a := p.Addr().As4()
	return uint64(a[0])<<40 | uint64(a[1])<<32 | uint64(a[2])<<24 | uint64(a[3])<<16 | uint64(p.Bits())
}

func unpackPrefix4(k uint64) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(k >> 40), byte(k >> 32), byte(k >> 24), byte(k >> 16)}), int(k&0xff))
}

// comparePrefix orders prefixes by address, then length.
func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}
