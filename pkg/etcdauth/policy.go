// Package etcdauth sets up etcd's role-based access control for a meshd
// cluster: one etcd user per node (the common name of the node's client
// certificate, see pkg/pki) whose role lets it write only its own keys and
// read the cluster view and its own secrets, and the operator's root user,
// which may do everything.
//
// The policy is computed purely from a View of the registry (policy.go);
// applying it diffs the wanted permissions against each role's current ones
// and changes only the difference (apply.go), so running it again is a
// no-op.
package etcdauth

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/registry"
)

// PermType is what a permission allows. The values are etcd's.
type PermType int32

// The permission types etcd knows.
const (
	Read      PermType = PermType(clientv3.PermRead)
	Write     PermType = PermType(clientv3.PermWrite)
	ReadWrite PermType = PermType(clientv3.PermReadWrite)
)

func (t PermType) String() string {
	switch t {
	case Read:
		return "read"
	case Write:
		return "write"
	case ReadWrite:
		return "readwrite"
	}
	return fmt.Sprintf("perm(%d)", int32(t))
}

// Perm is one etcd permission: a single key (RangeEnd empty) or the range
// [Key, RangeEnd).
type Perm struct {
	Key      string
	RangeEnd string
	Type     PermType
}

// Exact is a permission on the single key k.
func Exact(k string, t PermType) Perm { return Perm{Key: k, Type: t} }

// Prefix is a permission on every key that starts with p.
func Prefix(p string, t PermType) Perm {
	return Perm{Key: p, RangeEnd: clientv3.GetPrefixRangeEnd(p), Type: t}
}

// String spells a permission the way meshctl prints it.
func (p Perm) String() string {
	switch {
	case p.RangeEnd == "":
		return fmt.Sprintf("%-9s %s", p.Type, p.Key)
	case p.RangeEnd == clientv3.GetPrefixRangeEnd(p.Key):
		return fmt.Sprintf("%-9s %s*", p.Type, p.Key)
	}
	return fmt.Sprintf("%-9s [%s, %s)", p.Type, p.Key, p.RangeEnd)
}

func comparePerm(a, b Perm) int {
	return cmp.Or(strings.Compare(a.Key, b.Key), strings.Compare(a.RangeEnd, b.RangeEnd), cmp.Compare(a.Type, b.Type))
}

// RolePrefix starts the name of every node role. A node's user is the
// node name itself (its certificate's CN); its role is RolePrefix+node.
const RolePrefix = "meshd-node-"

// RootUser is etcd's superuser, and RootRole the role that makes a user
// one. The operator's certificate has CN "root" (or another name given
// to Apply as an operator, which is then granted RootRole).
const (
	RootUser = "root"
	RootRole = "root"
)

// NodeRole is the name of node's role.
func NodeRole(node string) string { return RolePrefix + node }

// View is what the policy depends on, read from the registry.
type View struct {
	// Apps are the apps that have metadata, sorted. A node may write its
	// instance of each of them.
	Apps []registry.AppID
	// Instances are the apps each node has an instance key of, sorted.
	// A node keeps write access to its existing instance keys even when
	// the app lost its metadata: etcd refuses to renew a lease that has a
	// key the holder may not write, so revoking it would cost the node
	// its whole lease (entry, status and every instance).
	Instances map[string][]registry.AppID
	// Claims are the subnet claims, by the node that holds them.
	// ViewOf fills it from the claims' values; Apply replaces it with
	// AssignClaims' answer.
	Claims map[string][]netip.Prefix
	// ClaimNode is the node each claim's value names.
	ClaimNode map[netip.Prefix]string
	// Nodes are the nodes named by the keys of node entries and member
	// records, sorted. Values never add a node.
	Nodes []string
	// IPv4 is each node entry's public IPv4, used to adopt a node's
	// flannel subnet when the operator pre-claims it.
	IPv4 map[string]string
}

// SubnetMode says how a node that holds no subnet claim yet gets one.
type SubnetMode int

const (
	// Preclaim: the operator (Apply, as root) claims the subnet for the
	// node, and the node may write only that one claim key. A node can
	// never touch another node's claim. This is the default.
	Preclaim SubnetMode = iota
	// OpenSubnets: a node without a claim may write anywhere under
	// /cluster/meshd/subnets/ so that it can claim one itself; the next
	// Apply after it joined narrows the grant to its own claim. Until
	// then a compromised new node could overwrite or delete other
	// nodes' claims.
	OpenSubnets
)

// NodePerms is the complete permission set of node's role, sorted:
//
//   - read the cluster view (/cluster/*), flannel's subnet leases and
//     network config (flannel nodes are peers during a migration);
//   - write its own node entry, member record and instance of every app
//     that has metadata (etcd ranges cannot say "any app, this node", so
//     this list grows with the apps: re-apply after registering one),
//     and of every instance key it already has;
//   - write its own subnet claim(s) and the flannel lease of each, or
//     the whole claim prefix while it has none and mode is OpenSubnets;
//   - read and write its own status;
//   - read its own sealed secrets.
//
// Anything else, in particular another node's keys and secrets and every
// delete outside its own keys, is denied by etcd.
func NodePerms(node string, v View, mode SubnetMode) []Perm {
	perms := []Perm{
		Prefix(registry.ClusterPrefix, Read),
		Prefix(registry.FlannelSubnetPrefix, Read),
		Prefix(registry.FlannelConfigKey, Read),
		Exact(registry.NodeKey(node), Write),
		Exact(registry.MemberKey(node), Write),
		Exact(registry.StatusKey(node), ReadWrite),
		Exact(registry.SeenKey(node), Write),
		Prefix(registry.SecretsNodePrefix(node), Read),
	}
	for _, a := range v.Apps {
		perms = append(perms, Exact(registry.InstanceKey(a.Group, a.Name, node), Write))
	}
	for _, a := range v.Instances[node] {
		perms = append(perms, Exact(registry.InstanceKey(a.Group, a.Name, node), Write))
	}
	claims := v.Claims[node]
	for _, p := range claims {
		perms = append(perms, Exact(registry.SubnetKey(p), Write), Exact(registry.FlannelSubnetKey(p), Write))
	}
	if len(claims) == 0 && mode == OpenSubnets {
		perms = append(perms, Prefix(registry.SubnetsPrefix, Write))
	}
	slices.SortFunc(perms, comparePerm)
	return slices.CompactFunc(perms, func(a, b Perm) bool { return comparePerm(a, b) == 0 })
}

// Diff returns what to grant and what to revoke so that a role holding
// have ends up holding exactly want. etcd keys a permission by its range:
// granting a range the role already has with another type replaces the
// type, so a changed type is a grant, not a revoke plus a grant.
func Diff(want, have []Perm) (grant, revoke []Perm) {
	type rng struct{ k, e string }
	haveBy := map[rng]PermType{}
	for _, p := range have {
		haveBy[rng{p.Key, p.RangeEnd}] = p.Type
	}
	wantBy := map[rng]bool{}
	for _, p := range want {
		wantBy[rng{p.Key, p.RangeEnd}] = true
		if t, ok := haveBy[rng{p.Key, p.RangeEnd}]; !ok || t != p.Type {
			grant = append(grant, p)
		}
	}
	for _, p := range have {
		if !wantBy[rng{p.Key, p.RangeEnd}] {
			revoke = append(revoke, p)
		}
	}
	slices.SortFunc(grant, comparePerm)
	slices.SortFunc(revoke, comparePerm)
	return grant, revoke
}

// CheckNodeName refuses names that cannot be a node's etcd user: invalid
// registry names and the names of operators (root).
func CheckNodeName(node string, operators []string) error {
	if err := registry.ValidName(node); err != nil {
		return fmt.Errorf("node %q: %w", node, err)
	}
	if node == RootUser || slices.Contains(operators, node) {
		return fmt.Errorf("node %q: that name is an operator user", node)
	}
	return nil
}

// AssignClaims decides which node each subnet claim belongs to. The node
// a claim's value names is believed only when no other node already
// holds write access to the claim key (held, from the existing roles) and
// that node is one of nodes: a node can rewrite its own claim's value to
// any name, and that must neither hand the claim (or a role) to someone
// else nor take it away from the holder. Every disagreement is returned
// as a problem to report; the claim stays with its holder.
func AssignClaims(named map[netip.Prefix]string, held map[netip.Prefix]string, nodes []string) (map[string][]netip.Prefix, []string) {
	out := map[string][]netip.Prefix{}
	var problems []string
	for p, v := range named {
		h := held[p]
		switch {
		case h != "" && h != v:
			problems = append(problems, fmt.Sprintf("subnet claim %s names node %s but is held by node %s: left with %s", p, registry.Printable(v), h, h))
			out[h] = append(out[h], p)
		case h != "":
			out[h] = append(out[h], p)
		case slices.Contains(nodes, v):
			out[v] = append(out[v], p)
		default:
			problems = append(problems, fmt.Sprintf("subnet claim %s names %s, which is no node being set up: ignored", p, registry.Printable(v)))
		}
	}
	for _, ps := range out {
		slices.SortFunc(ps, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	}
	slices.Sort(problems)
	return out, problems
}

// heldClaims returns, for each subnet claim key some node role may write
// by exact key, the node holding it (a key held by two roles is left out:
// Apply then goes by the claim's value).
func heldClaims(roles map[string][]Perm) map[netip.Prefix]string {
	out := map[netip.Prefix]string{}
	dup := map[netip.Prefix]bool{}
	for n, perms := range roles {
		for _, p := range perms {
			if p.RangeEnd != "" || (p.Type != Write && p.Type != ReadWrite) {
				continue
			}
			pk, err := registry.ParseKey(p.Key)
			if err != nil || pk.Kind != registry.KindSubnet {
				continue
			}
			if o, ok := out[pk.Subnet]; ok && o != n {
				dup[pk.Subnet] = true
			}
			out[pk.Subnet] = n
		}
	}
	for p := range dup {
		delete(out, p)
	}
	return out
}
