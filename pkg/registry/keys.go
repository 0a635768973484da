package registry

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Key layout. Everything under ClusterPrefix is watched by every meshd node
// (one prefix watch). Everything under MeshdPrefix is either per-node and
// private (secrets) or written often and read only by meshctl (status), so
// it is kept out of the watched prefix: a node's status write never wakes
// the other nodes' reconcile loops.
//
//	/cluster/nodes/<node>                         nix-infra node entry (+ "meshd" object), leased
//	/cluster/<group>/<app>/meta_data              nix-infra app metadata
//	/cluster/<group>/<app>/instances/<node>       nix-infra instance, leased by the serving node
//	/cluster/meshd/members/<node>                 durable overlay record (WireGuard key, endpoint, subnet, age recipient)
//	/cluster/meshd/subnets/<a.b.c.d-len>          subnet claim, created once in a transaction
//	/meshd/status/<node>                          applied revision and health, leased
//	/meshd/secrets/<node>/<name>                  a secret sealed to that node's age recipient
//	/meshd/revoked/<node>                         the operator revoked the node (operator only)
//	/meshd/identity/<node>                        the CN of the node's current certificate (operator only)
//	/meshd/groups/<node>                          the groups the operator assigned the node (operator only)
//	/meshd/seen/<node>                            when the node last registered or stopped, unleased
//	/coreos.com/network/config                    flannel's network config (WireGuard port, keepalive)
//	/coreos.com/network/subnets/<a.b.c.d-len>     flannel's lease: flannel nodes' peers; meshd keeps one for its own subnet
const (
	ClusterPrefix       = "/cluster/"
	NodesPrefix         = "/cluster/nodes/"
	MembersPrefix       = "/cluster/meshd/members/"
	SubnetsPrefix       = "/cluster/meshd/subnets/"
	MeshdPrefix         = "/meshd/"
	StatusPrefix        = "/meshd/status/"
	SecretsPrefix       = "/meshd/secrets/"
	RevokedPrefix       = "/meshd/revoked/"
	IdentityPrefix      = "/meshd/identity/"
	GroupsPrefix        = "/meshd/groups/"
	SeenPrefix          = "/meshd/seen/"
	FlannelSubnetPrefix = "/coreos.com/network/subnets/"
	FlannelConfigKey    = "/coreos.com/network/config"
)

// NodeKey is the key of a node's (leased) entry.
func NodeKey(node string) string { return NodesPrefix + node }

// MemberKey is the key of a node's durable overlay record.
func MemberKey(node string) string { return MembersPrefix + node }

// StatusKey is the key under which a node publishes what it has applied.
func StatusKey(node string) string { return StatusPrefix + node }

// RevokedKey marks a node the operator revoked: no role is set up for it
// until the operator re-admits it.
func RevokedKey(node string) string { return RevokedPrefix + node }

// IdentityKey holds the common name of a node's current certificate when
// it is not the node's name (after a rotation).
func IdentityKey(node string) string { return IdentityPrefix + node }

// GroupsKey holds the groups the operator assigned node, a JSON list.
// Nodes cannot write it: it is what group secrets are sealed by, never
// the groups a node's own entry claims.
func GroupsKey(node string) string { return GroupsPrefix + node }

// SeenKey is the key of a node's durable presence record (Seen).
func SeenKey(node string) string { return SeenPrefix + node }

// SecretsNodePrefix is the prefix holding every secret sealed to node.
func SecretsNodePrefix(node string) string { return SecretsPrefix + node + "/" }

// SecretKey is the key of one secret sealed to one node.
func SecretKey(node, name string) string { return SecretsNodePrefix(node) + name }

// AppPrefix is the prefix of every key of one app.
func AppPrefix(g Group, app string) string { return ClusterPrefix + string(g) + "/" + app + "/" }

// MetaKey is the key of an app's metadata.
func MetaKey(g Group, app string) string { return AppPrefix(g, app) + "meta_data" }

// InstanceKey is the key of the instance of app served by node.
func InstanceKey(g Group, app, node string) string {
	return AppPrefix(g, app) + "instances/" + node
}

// SubnetKey is the key of a subnet claim, in flannel's spelling
// (10.10.3.0-24) so operators recognise it.
func SubnetKey(p netip.Prefix) string { return SubnetsPrefix + PrefixName(p) }

// FlannelSubnetKey is the key of flannel's lease for p.
func FlannelSubnetKey(p netip.Prefix) string { return FlannelSubnetPrefix + PrefixName(p) }

// PrefixName spells a prefix the way flannel does in keys: 10.10.3.0-24.
func PrefixName(p netip.Prefix) string {
	return p.Addr().String() + "-" + strconv.Itoa(p.Bits())
}

// ParsePrefixName parses flannel's key spelling of a prefix.
func ParsePrefixName(s string) (netip.Prefix, error) {
	addr, bits, ok := strings.Cut(s, "-")
	if !ok {
		return netip.Prefix{}, fmt.Errorf("subnet %s: want a.b.c.d-len", Quoted([]byte(s)))
	}
	p, err := netip.ParsePrefix(addr + "/" + bits)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("subnet %s: %w", Quoted([]byte(s)), err)
	}
	if p != p.Masked() {
		return netip.Prefix{}, fmt.Errorf("subnet %s: host bits set", Quoted([]byte(s)))
	}
	return p, nil
}

// KeyKind says what a key under ClusterPrefix or MeshdPrefix is.
type KeyKind int

// The kinds of keys meshd understands.
const (
	KindUnknown KeyKind = iota
	KindNode
	KindMeta
	KindInstance
	KindMember
	KindSubnet
	KindStatus
	KindSecret
	KindFlannelLease
	KindFlannelConfig
	KindSeen
)

// ParsedKey is a key split into its parts. Only the fields that the kind
// uses are set.
type ParsedKey struct {
	Kind   KeyKind
	Group  Group
	App    string
	Node   string
	Name   string       // secret name
	Subnet netip.Prefix // subnet claims and flannel leases
}

// ParseKey splits a key and validates every name in it. Keys meshd does not
// know (KindUnknown with a nil error) are ignored by callers: other tools
// may keep their own keys under /cluster. Known shapes with bad names return
// an error.
func ParseKey(key string) (ParsedKey, error) {
	switch {
	case key == FlannelConfigKey:
		return ParsedKey{Kind: KindFlannelConfig}, nil
	case strings.HasPrefix(key, FlannelSubnetPrefix):
		p, err := ParsePrefixName(strings.TrimPrefix(key, FlannelSubnetPrefix))
		if err != nil || !p.Addr().Is4() {
			return ParsedKey{}, fmt.Errorf("flannel lease key %q: want an IPv4 a.b.c.d-len", key)
		}
		return ParsedKey{Kind: KindFlannelLease, Subnet: p}, nil
	case strings.HasPrefix(key, NodesPrefix):
		n := strings.TrimPrefix(key, NodesPrefix)
		if err := ValidName(n); err != nil {
			return ParsedKey{}, fmt.Errorf("node key %s: %w", Quoted([]byte(key)), err)
		}
		return ParsedKey{Kind: KindNode, Node: n}, nil
	case strings.HasPrefix(key, MembersPrefix):
		n := strings.TrimPrefix(key, MembersPrefix)
		if err := ValidName(n); err != nil {
			return ParsedKey{}, fmt.Errorf("member key %s: %w", Quoted([]byte(key)), err)
		}
		return ParsedKey{Kind: KindMember, Node: n}, nil
	case strings.HasPrefix(key, SubnetsPrefix):
		p, err := ParsePrefixName(strings.TrimPrefix(key, SubnetsPrefix))
		if err != nil {
			return ParsedKey{}, fmt.Errorf("subnet key %s: %w", Quoted([]byte(key)), err)
		}
		return ParsedKey{Kind: KindSubnet, Subnet: p}, nil
	case strings.HasPrefix(key, StatusPrefix):
		n := strings.TrimPrefix(key, StatusPrefix)
		if err := ValidName(n); err != nil {
			return ParsedKey{}, fmt.Errorf("status key %s: %w", Quoted([]byte(key)), err)
		}
		return ParsedKey{Kind: KindStatus, Node: n}, nil
	case strings.HasPrefix(key, SeenPrefix):
		n := strings.TrimPrefix(key, SeenPrefix)
		if err := ValidName(n); err != nil {
			return ParsedKey{}, fmt.Errorf("presence key %q: %w", key, err)
		}
		return ParsedKey{Kind: KindSeen, Node: n}, nil
	case strings.HasPrefix(key, SecretsPrefix):
		rest := strings.TrimPrefix(key, SecretsPrefix)
		n, name, ok := strings.Cut(rest, "/")
		if !ok {
			return ParsedKey{}, fmt.Errorf("secret key %s: want %s<node>/<name>", Quoted([]byte(key)), SecretsPrefix)
		}
		if err := ValidName(n); err != nil {
			return ParsedKey{}, fmt.Errorf("secret key %s: node: %w", Quoted([]byte(key)), err)
		}
		if err := ValidName(name); err != nil {
			return ParsedKey{}, fmt.Errorf("secret key %s: name: %w", Quoted([]byte(key)), err)
		}
		return ParsedKey{Kind: KindSecret, Node: n, Name: name}, nil
	case strings.HasPrefix(key, ClusterPrefix):
		parts := strings.Split(strings.TrimPrefix(key, ClusterPrefix), "/")
		g, err := ParseGroup(parts[0])
		if err != nil {
			return ParsedKey{}, nil // not an app group: someone else's key
		}
		if len(parts) < 3 {
			return ParsedKey{}, fmt.Errorf("app key %s: too short", Quoted([]byte(key)))
		}
		if err := ValidName(parts[1]); err != nil {
			return ParsedKey{}, fmt.Errorf("app key %s: app: %w", Quoted([]byte(key)), err)
		}
		switch {
		case len(parts) == 3 && parts[2] == "meta_data":
			return ParsedKey{Kind: KindMeta, Group: g, App: parts[1]}, nil
		case len(parts) == 4 && parts[2] == "instances":
			if err := ValidName(parts[3]); err != nil {
				return ParsedKey{}, fmt.Errorf("instance key %s: node: %w", Quoted([]byte(key)), err)
			}
			return ParsedKey{Kind: KindInstance, Group: g, App: parts[1], Node: parts[3]}, nil
		}
		return ParsedKey{}, fmt.Errorf("app key %s: unknown shape", Quoted([]byte(key)))
	}
	return ParsedKey{}, nil
}
