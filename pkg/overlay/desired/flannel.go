package desired

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"

	"github.com/meshd/meshd/pkg/registry"
)

// Peers with nodes that still run flanneld. During a migration a node
// that has no meshd member record yet is known only by its flannel lease
// (/coreos.com/network/subnets/<subnet>); its WireGuard backend peers
// with every other lease's key and accepts that lease's subnet from it
// (flannel pkg/backend/wireguard/wireguard_network.go,
// handleSubnetEvents). meshd does the same from its side: such a lease
// becomes a peer with the lease's key, endpoint PublicIP:port and the
// lease's subnet as AllowedIPs.
//
// A member record always wins: a lease whose subnet a member holds is
// that member's (meshd keeps a lease for its own subnet, and a migrated
// node's old flannel lease names the subnet its member record kept), and
// gives no second peer.

// FlannelPeerName is the name a flannel-only peer has in State.Peers and
// in State.Problems (and so in the overlay status' stale list): "flannel:"
// and the lease's key spelling of its subnet, stable for as long as the
// lease exists. No member name can take this form.
func FlannelPeerName(subnet netip.Prefix) string {
	return "flannel:" + registry.PrefixName(subnet)
}

// flannelCandidates returns the WireGuard leases that are not a member's
// (sorted by subnet). Computer falls back to Compute exactly when this is
// not empty.
func flannelCandidates(snap *registry.Snapshot) []registry.FlannelLease {
	if len(snap.FlannelLeases) == 0 {
		return nil
	}
	// A registry snapshot has a claim for every member's subnet, so the
	// claim finds the member without a pass over all members: after a
	// migration every meshd node keeps a lease, and the Computer asks
	// this on every call.
	var held map[netip.Prefix]struct{}
	var out []registry.FlannelLease
	for s, l := range snap.FlannelLeases {
		if l.BackendType != registry.FlannelBackendWireGuard {
			continue // flannel itself ignores other backends' leases
		}
		if m, ok := snap.Members[snap.Subnets[s]]; ok && m.Subnet == s {
			continue
		}
		if held == nil {
			held = make(map[netip.Prefix]struct{}, len(snap.Members))
			for _, m := range snap.Members {
				held[m.Subnet] = struct{}{}
			}
		}
		if _, ok := held[s]; ok {
			continue
		}
		l.Subnet = s
		out = append(out, l)
	}
	slices.SortFunc(out, func(a, b registry.FlannelLease) int { return comparePrefix(a.Subnet, b.Subnet) })
	return out
}

// addFlannelPeers adds a peer for every flannel-only lease to st (whose
// member peers are final) and re-sorts Peers and Routes. A lease is
// skipped, and listed in Problems, when its key is invalid, this node's,
// a member's or another lease's; when its subnet lies outside the
// network, overlaps this node's, a member's, another lease's or is
// claimed by a node; or when its public IP cannot be an endpoint.
func addFlannelPeers(st *State, snap *registry.Snapshot, me registry.Member, p Params) {
	leases := flannelCandidates(snap)
	if len(leases) == 0 {
		return
	}
	memberKeys := make(map[string]struct{}, len(snap.Members))
	var memberNets []netip.Prefix
	for _, m := range snap.Members {
		memberKeys[m.PublicKey] = struct{}{}
		if m.Subnet.IsValid() {
			memberNets = append(memberNets, m.Subnet)
		}
	}
	keyCount := map[string]int{}
	for _, l := range leases {
		if l.WireGuard != nil {
			keyCount[l.WireGuard.PublicKey]++
		}
	}
	keepalive := p.Keepalive
	if c := snap.FlannelConfig; c != nil && c.Keepalive > 0 {
		keepalive = c.Keepalive
	}
	added := false
	for i, l := range leases {
		name := FlannelPeerName(l.Subnet)
		problem := func(msg string) { st.Problems = append(st.Problems, Problem{name, msg}) }
		var key string
		if l.WireGuard != nil {
			key = l.WireGuard.PublicKey
		}
		ep := registry.FlannelEndpoint(l, snap.FlannelConfig)
		if err := ValidKey(key); err != nil {
			problem(fmt.Sprintf("flannel lease: public key: %v", err))
			continue
		}
		if !l.Subnet.IsValid() || !l.Subnet.Addr().Is4() || l.Subnet != l.Subnet.Masked() ||
			l.Subnet.Bits() < p.Network.Bits() || !p.Network.Contains(l.Subnet.Addr()) {
			problem(fmt.Sprintf("flannel lease: subnet %v is outside the overlay network %v", l.Subnet, p.Network))
			continue
		}
		if !ep.Addr().Is4() || ep.Addr().IsUnspecified() || ep.Port() == 0 {
			problem(fmt.Sprintf("flannel lease: PublicIP %q is not an endpoint", l.PublicIP))
			continue
		}
		if key == me.PublicKey {
			problem("flannel lease: " + msgOwnKey)
			continue
		}
		if _, ok := memberKeys[key]; ok {
			problem(fmt.Sprintf("flannel lease: public key is that of members %v", sharing(snap, key)))
			continue
		}
		if keyCount[key] > 1 {
			problem("flannel lease: public key shared with another flannel lease")
			continue
		}
		if l.Subnet.Overlaps(me.Subnet) {
			problem("flannel lease: " + msgOverlapsSelf(l.Subnet, me.Subnet))
			continue
		}
		if owner, ok := snap.Subnets[l.Subnet]; ok {
			problem(fmt.Sprintf("flannel lease: subnet %v is claimed by node %s", l.Subnet, registry.Printable(owner)))
			continue
		}
		if slices.ContainsFunc(memberNets, l.Subnet.Overlaps) {
			problem(fmt.Sprintf("flannel lease: subnet %v overlaps a member's", l.Subnet))
			continue
		}
		if overlapsOtherLease(leases, i) {
			problem(fmt.Sprintf("flannel lease: subnet %v overlaps another flannel lease", l.Subnet))
			continue
		}
		st.Peers = append(st.Peers, Peer{
			Name:       name,
			PublicKey:  key,
			Endpoint:   ep,
			AllowedIPs: []netip.Prefix{l.Subnet},
			Keepalive:  keepalive,
		})
		if !p.RouteNetwork {
			st.Routes = append(st.Routes, l.Subnet)
		}
		added = true
	}
	if added {
		slices.SortFunc(st.Peers, func(a, b Peer) int { return cmp.Compare(a.PublicKey, b.PublicKey) })
		slices.SortFunc(st.Routes, comparePrefix)
	}
}

// overlapsOtherLease reports whether leases[i]'s subnet overlaps another
// lease's. Leases are keyed by subnet, so when all have one length none
// overlap; mixed lengths (not something flannel writes) cost a scan.
func overlapsOtherLease(leases []registry.FlannelLease, i int) bool {
	if leases[0].Subnet.Bits() == leases[len(leases)-1].Subnet.Bits() && slices.IndexFunc(leases, func(l registry.FlannelLease) bool {
		return l.Subnet.Bits() != leases[0].Subnet.Bits()
	}) < 0 {
		return false
	}
	for j, o := range leases {
		if j != i && o.Subnet.Overlaps(leases[i].Subnet) {
			return true
		}
	}
	return false
}
