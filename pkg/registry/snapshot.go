package registry

import (
	"cmp"
	"net/netip"
	"slices"
	"strings"
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

// problemOf is the Problem for a key whose entry did not decode.
func problemOf(key string, e entry) Problem {
	r := ReasonBadValue
	if e.pk.Kind == KindUnknown {
		r = ReasonBadKey
	}
	return Problem{Key: key, Err: e.err.Error(), Reason: r}
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

// entry is one decoded key: exactly one of the value fields is set, or err.
type entry struct {
	pk      ParsedKey
	val     any // Node, Member, SubnetClaim, AppMeta, Instance, Status, SealedSecret, FlannelLease, FlannelConfig
	err     error
	created int64
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
	case KindFlannelLease:
		var l FlannelLease
		l, e.err = DecodeFlannelLease(pk.Subnet, value)
		l.Lease = lease
		e.val = l
	case KindFlannelConfig:
		e.val, e.err = DecodeFlannelConfig(value)
	default:
		return entry{}, false
	}
	return e, true
}

// part is a slice of the registry that is rebuilt as a whole when one of
// its keys changes. Parts that did not change are shared, unchanged, with
// the previous snapshot: an instance change at N=1000 does not rebuild the
// node and member maps, and components can tell from a part's generation
// that their input did not change.
type part int

const (
	partNodes   part = iota
	partMembers      // member records and subnet claims
	partApps         // meta_data and instances (cross-checked against members)
	partStatus
	partSecrets
	partFlannel // flannel's config and subnet leases
	numParts
)

func partOfKey(key string) part {
	switch {
	case strings.HasPrefix(key, NodesPrefix):
		return partNodes
	case strings.HasPrefix(key, MembersPrefix), strings.HasPrefix(key, SubnetsPrefix):
		return partMembers
	case strings.HasPrefix(key, StatusPrefix):
		return partStatus
	case strings.HasPrefix(key, SecretsPrefix):
		return partSecrets
	case strings.HasPrefix(key, FlannelPrefix):
		return partFlannel
	}
	return partApps
}

// Generations identify the content of each part of a snapshot: equal
// generations mean the very same (shared, read-only) maps.
type Generations struct {
	Nodes, Members, Apps, Statuses, Secrets, Flannel uint64
}

// Store holds the decoded keys of one or more watched prefixes and builds
// snapshots from them. It is safe for concurrent use.
type Store struct {
	mu       sync.Mutex
	entries  [numParts]map[string]entry
	dirty    [numParts]bool
	gen      [numParts]uint64
	problems [numParts][]Problem
	last     *Snapshot
	revision int64
	listed   map[string]bool
	pool     Pool
}

// NewStore returns an empty store.
func NewStore() *Store {
	s := &Store{listed: map[string]bool{}}
	for i := range s.entries {
		s.entries[i] = map[string]entry{}
		s.dirty[i] = true
	}
	return s
}

// NewOverlayStore returns an empty store for a node whose overlay
// carves subnets from pool: an instance of a node without a member record
// must then point into the pool, outside every subnet claimed by another
// node (see checkInstances).
func NewOverlayStore(pool Pool) *Store {
	s := NewStore()
	s.pool = pool
	return s
}

// Listed reports whether prefix has been listed and is not being
// re-listed. A snapshot taken before the first list lacks the prefix's
// keys and must not be applied: an empty view would tear down a working
// node. One taken while the prefix is re-listed after a compaction lacks
// the changes the compaction hid, while another prefix's newer list has
// already moved the store's revision past them: applying it would publish
// that revision as applied without them.
func (s *Store) Listed(prefix string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.listed[prefix]
}

// Relisting marks prefix as being re-listed: Listed reports false for it
// until the next Replace of that prefix.
func (s *Store) Relisting(prefix string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.listed[prefix] = false
}

// KV is a key-value pair as read from etcd.
type KV struct {
	Key   string
	Value []byte
	Lease int64
	// Created is the key's create revision (0: unknown). For subnet
	// claims it says which of two clashing members came first.
	Created int64
}

// Put records one key's new value.
func (s *Store) Put(kv KV, rev int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.putLocked(kv)
	s.revision = max(s.revision, rev)
}

func (s *Store) putLocked(kv KV) {
	p := partOfKey(kv.Key)
	e, ok := decodeEntry(kv.Key, kv.Value, kv.Lease)
	e.created = kv.Created
	if !ok {
		if _, had := s.entries[p][kv.Key]; had {
			delete(s.entries[p], kv.Key)
			s.dirty[p] = true
		}
		return
	}
	s.entries[p][kv.Key] = e
	s.dirty[p] = true
}

// Delete records a key's deletion.
func (s *Store) Delete(key string, rev int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	p := partOfKey(key)
	if _, had := s.entries[p][key]; had {
		delete(s.entries[p], key)
		s.dirty[p] = true
	}
	s.revision = max(s.revision, rev)
}

// Replace sets every key under prefix to exactly kvs, as read at rev: keys
// under prefix that kvs does not hold are removed. It is how a watcher
// re-lists after a compaction without losing a deletion.
func (s *Store) Replace(prefix string, kvs []KV, rev int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for p := range s.entries {
		for k := range s.entries[p] {
			if strings.HasPrefix(k, prefix) {
				delete(s.entries[p], k)
				s.dirty[p] = true
			}
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

// Snapshot returns the typed cluster view of the store's current entries.
// Only the parts that changed since the previous call are rebuilt; the
// others are shared with the previous snapshot. Snapshots are read-only.
func (s *Store) Snapshot() *Snapshot {
	s.mu.Lock()
	defer s.mu.Unlock()
	// Apps are cross-checked against members: rebuild them together.
	if s.dirty[partMembers] {
		s.dirty[partApps] = true
	}
	var snap Snapshot
	if s.last != nil {
		snap = *s.last
	}
	snap.Revision = s.revision
	if s.dirty[partNodes] {
		snap.Nodes = map[string]Node{}
		s.problems[partNodes] = s.problems[partNodes][:0:0]
		for k, e := range s.entries[partNodes] {
			if e.err != nil {
				s.problems[partNodes] = append(s.problems[partNodes], problemOf(k, e))
			} else if v, ok := e.val.(Node); ok {
				snap.Nodes[e.pk.Node] = v
			}
		}
	}
	if s.dirty[partMembers] {
		snap.Members, snap.Subnets = map[string]Member{}, map[netip.Prefix]string{}
		claimed := map[netip.Prefix]int64{}
		var probs []Problem
		for k, e := range s.entries[partMembers] {
			if e.err != nil {
				probs = append(probs, problemOf(k, e))
				continue
			}
			switch v := e.val.(type) {
			case Member:
				snap.Members[e.pk.Node] = v
			case SubnetClaim:
				snap.Subnets[e.pk.Subnet] = v.Node
				claimed[e.pk.Subnet] = e.created
			}
		}
		probs = append(probs, checkMembers(&snap)...)
		s.problems[partMembers] = append(probs, checkKeyClash(&snap, claimed)...)
	}
	if s.dirty[partApps] {
		snap.Apps = map[AppID]*App{}
		var probs []Problem
		app := func(id AppID) *App {
			a := snap.Apps[id]
			if a == nil {
				a = &App{ID: id, Instances: map[string]Instance{}}
				snap.Apps[id] = a
			}
			return a
		}
		for k, e := range s.entries[partApps] {
			if e.err != nil {
				probs = append(probs, problemOf(k, e))
				continue
			}
			switch v := e.val.(type) {
			case AppMeta:
				app(AppID{e.pk.Group, e.pk.App}).Meta = &v
			case Instance:
				app(AppID{e.pk.Group, e.pk.App}).Instances[e.pk.Node] = v
			}
		}
		s.problems[partApps] = append(probs, checkInstances(&snap, s.pool)...)
	}
	if s.dirty[partStatus] {
		snap.Statuses = map[string]Status{}
		s.problems[partStatus] = s.problems[partStatus][:0:0]
		for k, e := range s.entries[partStatus] {
			if e.err != nil {
				s.problems[partStatus] = append(s.problems[partStatus], problemOf(k, e))
			} else if v, ok := e.val.(Status); ok {
				snap.Statuses[e.pk.Node] = v
			}
		}
	}
	if s.dirty[partSecrets] {
		snap.Secrets = map[string]SealedSecret{}
		s.problems[partSecrets] = s.problems[partSecrets][:0:0]
		for k, e := range s.entries[partSecrets] {
			if e.err != nil {
				s.problems[partSecrets] = append(s.problems[partSecrets], problemOf(k, e))
			} else if v, ok := e.val.(SealedSecret); ok {
				snap.Secrets[e.pk.Name] = v
			}
		}
	}
	if s.dirty[partFlannel] {
		snap.FlannelLeases, snap.FlannelConfig = map[netip.Prefix]FlannelLease{}, nil
		s.problems[partFlannel] = s.problems[partFlannel][:0:0]
		for k, e := range s.entries[partFlannel] {
			if e.err != nil {
				s.problems[partFlannel] = append(s.problems[partFlannel], problemOf(k, e))
				continue
			}
			switch v := e.val.(type) {
			case FlannelLease:
				snap.FlannelLeases[v.Subnet] = v
			case FlannelConfig:
				snap.FlannelConfig = &v
			}
		}
	}
	changed := false
	for p := range s.dirty {
		if s.dirty[p] {
			s.gen[p]++
			s.dirty[p] = false
			changed = true
		}
	}
	if !changed && s.last != nil && s.last.Revision == snap.Revision {
		return s.last
	}
	snap.Gen = Generations{Nodes: s.gen[partNodes], Members: s.gen[partMembers], Apps: s.gen[partApps],
		Statuses: s.gen[partStatus], Secrets: s.gen[partSecrets], Flannel: s.gen[partFlannel]}
	snap.Problems = nil
	for _, ps := range s.problems {
		snap.Problems = append(snap.Problems, ps...)
	}
	slices.SortFunc(snap.Problems, func(a, b Problem) int { return cmp.Compare(a.Key, b.Key) })
	s.last = &snap
	return s.last
}

// SnapshotOf decodes a list of key-values read at rev into a snapshot. It
// is what one-shot readers (meshctl) use.
func SnapshotOf(kvs []KV, rev int64) *Snapshot {
	s := NewStore()
	s.Replace("", kvs, rev)
	return s.Snapshot()
}
