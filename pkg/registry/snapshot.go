package registry

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"sync"
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
}

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
	Secrets  map[string]SealedSecret
	Problems []Problem
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

// entry is one decoded key: exactly one of the value fields is set, or err.
type entry struct {
	pk  ParsedKey
	val any // Node, Member, SubnetClaim, AppMeta, Instance, Status, SealedSecret
	err error
}

// decodeEntry parses and decodes one key/value. ok is false for keys meshd
// does not know, which are ignored.
func decodeEntry(key string, value []byte, lease int64) (e entry, ok bool) {
	pk, err := ParseKey(key)
	if err != nil {
		return entry{err: err}, true
	}
	e.pk = pk
	switch pk.Kind {
	case KindNode:
		var n Node
		n, e.err = DecodeNode(pk.Node, value)
		n.Lease = lease
		e.val = n
	case KindMember:
		e.val, e.err = DecodeMember(pk.Node, value)
	case KindSubnet:
		e.val, e.err = DecodeSubnetClaim(value)
	case KindMeta:
		e.val, e.err = DecodeMeta(value)
	case KindInstance:
		e.val, e.err = DecodeInstance(pk.Node, value)
	case KindStatus:
		e.val, e.err = DecodeStatus(pk.Node, value)
	case KindSecret:
		e.val, e.err = DecodeSealedSecret(value)
	default:
		return entry{}, false
	}
	return e, true
}

// Store holds the decoded keys of one or more watched prefixes and builds
// snapshots from them. It is safe for concurrent use.
type Store struct {
	mu       sync.Mutex
	entries  map[string]entry
	revision int64
	listed   map[string]bool
}

// NewStore returns an empty store.
func NewStore() *Store { return &Store{entries: map[string]entry{}, listed: map[string]bool{}} }

// Listed reports whether prefix has been listed at least once. A snapshot
// taken before that lacks the prefix's keys and must not be applied: an
// empty view would tear down a working node.
func (s *Store) Listed(prefix string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.listed[prefix]
}

// KV is a key-value pair as read from etcd.
type KV struct {
	Key   string
	Value []byte
	Lease int64
}

// Put records one key's new value.
func (s *Store) Put(kv KV, rev int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.putLocked(kv)
	s.revision = max(s.revision, rev)
}

func (s *Store) putLocked(kv KV) {
	e, ok := decodeEntry(kv.Key, kv.Value, kv.Lease)
	if !ok {
		delete(s.entries, kv.Key)
		return
	}
	s.entries[kv.Key] = e
}

// Delete records a key's deletion.
func (s *Store) Delete(key string, rev int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.entries, key)
	s.revision = max(s.revision, rev)
}

// Replace sets every key under prefix to exactly kvs, as read at rev: keys
// under prefix that kvs does not hold are removed. It is how a watcher
// re-lists after a compaction without losing a deletion.
func (s *Store) Replace(prefix string, kvs []KV, rev int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k := range s.entries {
		if len(k) >= len(prefix) && k[:len(prefix)] == prefix {
			delete(s.entries, k)
		}
	}
	for _, kv := range kvs {
		s.putLocked(kv)
	}
	s.revision = max(s.revision, rev)
	s.listed[prefix] = true
}

// Revision returns the newest revision the store has seen.
func (s *Store) Revision() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.revision
}

// Snapshot builds the typed cluster view from the store's current entries.
func (s *Store) Snapshot() *Snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	snap := &Snapshot{
		Revision: s.revision,
		Nodes:    map[string]Node{},
		Members:  map[string]Member{},
		Subnets:  map[netip.Prefix]string{},
		Apps:     map[AppID]*App{},
		Statuses: map[string]Status{},
		Secrets:  map[string]SealedSecret{},
	}
	app := func(id AppID) *App {
		a := snap.Apps[id]
		if a == nil {
			a = &App{ID: id, Instances: map[string]Instance{}}
			snap.Apps[id] = a
		}
		return a
	}
	for k, e := range s.entries {
		if e.err != nil {
			snap.Problems = append(snap.Problems, Problem{Key: k, Err: e.err.Error()})
			continue
		}
		switch v := e.val.(type) {
		case Node:
			snap.Nodes[e.pk.Node] = v
		case Member:
			snap.Members[e.pk.Node] = v
		case SubnetClaim:
			snap.Subnets[e.pk.Subnet] = v.Node
		case AppMeta:
			app(AppID{e.pk.Group, e.pk.App}).Meta = &v
		case Instance:
			app(AppID{e.pk.Group, e.pk.App}).Instances[e.pk.Node] = v
		case Status:
			snap.Statuses[e.pk.Node] = v
		case SealedSecret:
			snap.Secrets[e.pk.Name] = v
		}
	}
	crossCheck(snap)
	slices.SortFunc(snap.Problems, func(a, b Problem) int { return cmp.Compare(a.Key, b.Key) })
	return snap
}

// crossCheck drops values that decode but contradict the rest of the
// registry, so that one node's keys cannot hijack another's traffic:
//   - a member record must hold the subnet claimed for it (a node copying
//     another node's subnet or key into its own record is skipped, not the
//     victim);
//   - an instance of a node that has a member record must point at that
//     node's overlay address (a node cannot send consumers of an app to an
//     address of its choosing).
func crossCheck(snap *Snapshot) {
	for name, m := range snap.Members {
		if owner := snap.Subnets[m.Subnet]; owner != name {
			delete(snap.Members, name)
			snap.Problems = append(snap.Problems, Problem{Key: MemberKey(name),
				Err: fmt.Sprintf("subnet %v is claimed by %q, not by this node", m.Subnet, owner)})
		}
	}
	for id, app := range snap.Apps {
		for node, in := range app.Instances {
			m, ok := snap.Members[node]
			if !ok || in.Addr().Addr() == m.OverlayIP {
				continue
			}
			delete(app.Instances, node)
			snap.Problems = append(snap.Problems, Problem{Key: InstanceKey(id.Group, id.Name, node),
				Err: fmt.Sprintf("ipv4 %s is not node %s's overlay address %v", in.IPv4, node, m.OverlayIP)})
		}
	}
}

// SnapshotOf decodes a list of key-values read at rev into a snapshot. It
// is what one-shot readers (meshctl) use.
func SnapshotOf(kvs []KV, rev int64) *Snapshot {
	s := NewStore()
	s.Replace("", kvs, rev)
	return s.Snapshot()
}
