package registry

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// The cross-checks a snapshot makes between the values nodes write about
// themselves (member records, instances) and what they may claim.

// checkMembers drops member records that contradict the subnet claims, so
// that one node's keys cannot hijack another's traffic: a member record
// must hold the subnet claimed for it (a node copying another node's
// subnet or key into its own record is skipped, not the victim).
func checkMembers(snap *Snapshot) []Problem {
	var probs []Problem
	for name, m := range snap.Members {
		if owner := snap.Subnets[m.Subnet]; owner != name {
			delete(snap.Members, name)
			probs = append(probs, Problem{Key: MemberKey(name),
				Err:    fmt.Sprintf("subnet %v is claimed by %s, not by this node", m.Subnet, Quoted([]byte(owner))),
				Reason: ReasonSubnetConflict})
		}
	}
	return probs
}

// checkKeyClash settles members that share a WireGuard public key: a
// node that copies another node's key into its own record must not cut
// that node off. The member whose subnet claim is older (lower create
// revision) keeps the key; the others are dropped and reported. When the
// claims' ages are unknown or equal, every member of the clash is
// dropped, as nothing says which one is right.
func checkKeyClash(snap *Snapshot, claimed map[netip.Prefix]int64) []Problem {
	// The first holder of each key, and every holder of a key held twice:
	// no slice per member.
	holder := make(map[string]string, len(snap.Members))
	var byKey map[string][]string
	for name, m := range snap.Members {
		first, ok := holder[m.PublicKey]
		if !ok {
			holder[m.PublicKey] = name
			continue
		}
		if byKey == nil {
			byKey = map[string][]string{}
		}
		if byKey[m.PublicKey] == nil {
			byKey[m.PublicKey] = []string{first}
		}
		byKey[m.PublicKey] = append(byKey[m.PublicKey], name)
	}
	var probs []Problem
	for _, names := range byKey {
		slices.SortFunc(names, func(a, b string) int {
			return cmp.Or(cmp.Compare(claimed[snap.Members[a].Subnet], claimed[snap.Members[b].Subnet]), cmp.Compare(a, b))
		})
		first := claimed[snap.Members[names[0]].Subnet]
		keep := first != 0 && first != claimed[snap.Members[names[1]].Subnet]
		for i, name := range names {
			if i == 0 && keep {
				continue
			}
			why := "its public key is also node " + names[0] + "'s, whose subnet claim is older"
			if !keep {
				why = "its public key is also another node's (" + strings.Join(names, ", ") + ") and no claim is older"
			}
			probs = append(probs, Problem{Key: MemberKey(name), Err: why, Reason: ReasonKeyClash})
		}
		for i, name := range names {
			if i > 0 || !keep {
				delete(snap.Members, name)
			}
		}
	}
	return probs
}

// checkInstances drops instances that point where their node may not
// send consumers: a node cannot send consumers of an app to an address
// of its choosing. An instance of a node with a member record must point
// at that node's overlay address. An instance of a node without one (a
// flannel node during a migration, or a meshd node that deleted its own
// record) must not point into a subnet claimed by another node and, when
// the store knows the overlay pool, must point into the pool: never at
// etcd, the private network or the internet.
func checkInstances(snap *Snapshot, pool Pool) []Problem {
	var probs []Problem
	for id, app := range snap.Apps {
		for node, in := range app.Instances {
			addr := in.Addr().Addr()
			var why string
			if m, ok := snap.Members[node]; ok {
				if addr != m.OverlayIP {
					why = fmt.Sprintf("ipv4 %s is not node %s's overlay address %v", in.IPv4, node, m.OverlayIP)
				}
			} else if owner, p := claimOf(snap, addr); owner != "" && owner != node {
				why = fmt.Sprintf("ipv4 %s lies in subnet %v of node %s", in.IPv4, p, Printable(owner))
			} else if pool.Bits != 0 && !inPool(pool, addr) {
				why = fmt.Sprintf("ipv4 %s of node %s (no member record) is outside the overlay pool %v-%v", in.IPv4, node, pool.Min, pool.Max)
			}
			if why == "" {
				continue
			}
			delete(app.Instances, node)
			probs = append(probs, Problem{Key: InstanceKey(id.Group, id.Name, node), Err: why, Reason: ReasonForeignAddress})
		}
	}
	return probs
}

// claimOf returns the node holding the subnet claim that contains addr.
func claimOf(snap *Snapshot, addr netip.Addr) (string, netip.Prefix) {
	for p, owner := range snap.Subnets {
		if p.Contains(addr) {
			return owner, p
		}
	}
	return "", netip.Prefix{}
}

// inPool reports whether addr lies in one of pool's subnets.
func inPool(pool Pool, addr netip.Addr) bool {
	if !addr.Is4() {
		return false
	}
	p, err := addr.Prefix(pool.Bits)
	return err == nil && pool.Contains(p)
}
