package registry

import (
	"cmp"
	"maps"
	"net/netip"
	"slices"
)

// AppID names an app: nix-infra's app names are unique per group, not
// across groups.
type AppID struct {
	Group Group
	Name  string
}

func (a AppID) String() string { return string(a.Group) + "/" + a.Name }

// App is one app as the snapshot sees it. Meta is nil while the app has
// instances but no (valid) metadata.
type App struct {
	ID        AppID
	Meta      *AppMeta
	Instances map[string]Instance // by node
}

// SortedInstances returns the app's instances sorted by node name.
func (a *App) SortedInstances() []Instance {
	out := make([]Instance, 0, len(a.Instances))
	for _, in := range a.Instances {
		out = append(out, in)
	}
	slices.SortFunc(out, func(x, y Instance) int { return cmp.Compare(x.Node, y.Node) })
	return out
}

// Problem is a key that was skipped because it did not parse or decode.
type Problem struct {
	Key string `json:"key"`
	Err string `json:"error"`
	// Reason is one of ProblemReasons: a short fixed word, safe as a
	// metric label (Err is free text from etcd and is not).
	Reason string `json:"reason,omitempty"`
}

// Why a key was skipped (Problem.Reason).
const (
	// ReasonBadKey: the key's path does not parse (a bad node, group or app name).
	ReasonBadKey = "bad_key"
	// ReasonBadValue: the value does not decode or fails validation.
	ReasonBadValue = "bad_value"
	// ReasonSubnetConflict: a member record holds a subnet claimed for another node.
	ReasonSubnetConflict = "subnet_conflict"
	// ReasonForeignAddress: an instance points away from its node's overlay address.
	ReasonForeignAddress = "foreign_address"
	// ReasonKeyClash: a member record holds another member's WireGuard key
	// and its subnet claim is not the older one.
	ReasonKeyClash = "key_clash"
)

// ProblemReasons lists every Problem.Reason, in a fixed order.
var ProblemReasons = []string{ReasonBadKey, ReasonBadValue, ReasonSubnetConflict, ReasonForeignAddress, ReasonKeyClash}

// Snapshot is the cluster as one node sees it at one etcd revision. It is
// a value: components compute their desired state from it without I/O.
type Snapshot struct {
	Revision int64
	Nodes    map[string]Node
	Members  map[string]Member
	Subnets  map[netip.Prefix]string // claim -> node
	Apps     map[AppID]*App
	Statuses map[string]Status
	// Secrets holds the secrets sealed to this node, by name.
	Secrets map[string]SealedSecret
	// FlannelLeases are flannel's subnet leases, by subnet (meshd's own
	// included); FlannelConfig is flannel's network config, nil if absent
	// or invalid.
	FlannelLeases map[netip.Prefix]FlannelLease
	FlannelConfig *FlannelConfig
	Problems      []Problem
	// Gen identifies each part's content: a component may skip work when
	// the parts it reads have the same generation as last time.
	Gen Generations
}

// SortedApps returns the apps sorted by group then name.
func (s *Snapshot) SortedApps() []*App {
	out := make([]*App, 0, len(s.Apps))
	for _, a := range s.Apps {
		out = append(out, a)
	}
	slices.SortFunc(out, func(x, y *App) int {
		return cmp.Or(cmp.Compare(x.ID.Group, y.ID.Group), cmp.Compare(x.ID.Name, y.ID.Name))
	})
	return out
}

// SortedMembers returns the members sorted by name.
func (s *Snapshot) SortedMembers() []Member {
	out := make([]Member, 0, len(s.Members))
	for _, m := range s.Members {
		out = append(out, m)
	}
	slices.SortFunc(out, func(x, y Member) int { return cmp.Compare(x.Name, y.Name) })
	return out
}

// SortedNodeNames returns the names of the node entries, sorted.
func (s *Snapshot) SortedNodeNames() []string {
	out := make([]string, 0, len(s.Nodes))
	for n := range s.Nodes {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// KnownNodes returns the names of every node the snapshot mentions (a
// node entry, a member record or a status), with extra names added,
// sorted: the nodes a status table or page lists, up or down.
func (s *Snapshot) KnownNodes(extra ...string) []string {
	names := map[string]bool{}
	for n := range s.Nodes {
		names[n] = true
	}
	for n := range s.Members {
		names[n] = true
	}
	for n := range s.Statuses {
		names[n] = true
	}
	for _, n := range extra {
		names[n] = true
	}
	return slices.Sorted(maps.Keys(names))
}

// Generations identify the content of each part of a snapshot: equal
// generations mean the very same (shared, read-only) maps.
type Generations struct {
	Nodes, Members, Apps, Statuses, Secrets, Flannel uint64
}

// SnapshotOf decodes a list of key-values read at rev into a snapshot. It
// is what one-shot readers (meshctl) use.
func SnapshotOf(kvs []KV, rev int64) *Snapshot {
	s := NewStore()
	s.Replace("", kvs, rev)
	return s.Snapshot()
}
