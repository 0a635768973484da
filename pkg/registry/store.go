package registry

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
)

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

// problemOf is the Problem for a key whose entry did not decode.
func problemOf(key string, e entry) Problem {
	r := ReasonBadValue
	if e.pk.Kind == KindUnknown {
		r = ReasonBadKey
	}
	return Problem{Key: key, Err: e.err.Error(), Reason: r}
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
	for p := range part(numParts) { // in order: apps are checked against the members
		if s.dirty[p] {
			s.rebuildLocked(p, &snap)
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

// rebuildLocked rebuilds part p of snap from the store's entries: the
// part's maps start empty, each decoded value goes in, each key that did
// not decode is a problem, and the part's cross-check with the parts
// before it runs last.
func (s *Store) rebuildLocked(p part, snap *Snapshot) {
	add, check := snap.resetPart(p, s.pool, len(s.entries[p]))
	var probs []Problem
	for k, e := range s.entries[p] {
		if e.err != nil {
			probs = append(probs, problemOf(k, e))
			continue
		}
		add(e)
	}
	if check != nil {
		probs = append(probs, check()...)
	}
	s.problems[p] = probs
}

// resetPart gives snap fresh, empty maps for part p (the previous ones
// stay untouched: older snapshots share them), sized for the part's n
// entries, and returns how one of the part's decoded entries goes into
// them and the part's cross-check, if it has one (pool: see
// NewOverlayStore).
func (snap *Snapshot) resetPart(p part, pool Pool, n int) (add func(entry), check func() []Problem) {
	switch p {
	case partNodes:
		snap.Nodes = make(map[string]Node, n)
		return func(e entry) {
			if v, ok := e.val.(Node); ok {
				snap.Nodes[e.pk.Node] = v
			}
		}, nil
	case partMembers:
		// A member record and a subnet claim per node, mostly.
		snap.Members, snap.Subnets = make(map[string]Member, n/2), make(map[netip.Prefix]string, n/2)
		claimed := make(map[netip.Prefix]int64, n/2) // each claim's create revision
		return func(e entry) {
				switch v := e.val.(type) {
				case Member:
					snap.Members[e.pk.Node] = v
				case SubnetClaim:
					snap.Subnets[e.pk.Subnet] = v.Node
					claimed[e.pk.Subnet] = e.created
				}
			}, func() []Problem {
				return append(checkMembers(snap), checkKeyClash(snap, claimed)...)
			}
	case partApps:
		snap.Apps = map[AppID]*App{}
		app := func(id AppID) *App {
			a := snap.Apps[id]
			if a == nil {
				a = &App{ID: id, Instances: map[string]Instance{}}
				snap.Apps[id] = a
			}
			return a
		}
		return func(e entry) {
			switch v := e.val.(type) {
			case AppMeta:
				app(AppID{e.pk.Group, e.pk.App}).Meta = &v
			case Instance:
				app(AppID{e.pk.Group, e.pk.App}).Instances[e.pk.Node] = v
			}
		}, func() []Problem { return checkInstances(snap, pool) }
	case partStatus:
		snap.Statuses = make(map[string]Status, n)
		return func(e entry) {
			if v, ok := e.val.(Status); ok {
				snap.Statuses[e.pk.Node] = v
			}
		}, nil
	case partSecrets:
		snap.Secrets = map[string]SealedSecret{}
		return func(e entry) {
			if v, ok := e.val.(SealedSecret); ok {
				snap.Secrets[e.pk.Name] = v
			}
		}, nil
	case partFlannel:
		snap.FlannelLeases, snap.FlannelConfig = make(map[netip.Prefix]FlannelLease, n), nil
		return func(e entry) {
			switch v := e.val.(type) {
			case FlannelLease:
				snap.FlannelLeases[v.Subnet] = v
			case FlannelConfig:
				snap.FlannelConfig = &v
			}
		}, nil
	}
	panic(fmt.Sprintf("registry: unknown snapshot part %d", p))
}
