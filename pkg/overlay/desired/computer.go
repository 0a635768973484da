package desired

import (
	"cmp"
	"net/netip"
	"slices"

	"github.com/meshd/meshd/pkg/registry"
)

// Computer is Compute with memory: it keeps what the previous call
// learned about every member (validation, conflicts, the sorted peers,
// routes and problems) and, on the next call, redoes the work only for
// the members whose record changed and for those sharing a key or a
// subnet with them.
//
// The contract: for any sequence of snapshots, c.Compute(snap) returns
// a State equal (cmp.Diff) to Compute(snap, self, p) and an error of the
// same class and text. When few members changed since the previous call
// it costs one pass of map lookups and struct compares over the members
// plus copying the result; no unchanged member is re-validated and
// nothing is re-sorted. Where incremental work would be intricate it
// does more for that call: when this node's own key or subnet changed it
// reclassifies every cached member and sorts the output afresh; while
// candidate subnets of different lengths are in play, a member's Name
// differs from its key in the snapshot, or a flannel lease that no member
// holds is present (a cluster in the middle of a migration), it returns
// Compute's result.
//
// Every returned State owns its slices: the Computer never modifies them
// afterwards and never hands their backing arrays out again, so callers
// may keep (and the applier diff against) any earlier result.
//
// A Computer is not safe for concurrent use.
type Computer struct {
	self     string
	p        Params
	maxEdits int // see defaultMaxEdits; tests lower it

	haveMe bool            // me holds the record the classification used
	me     registry.Member // this node's record as of the last success
	stamp  uint64          // incremented by every call; marks seen entries

	entries  map[string]*entry
	byKey    map[string][]*entry       // every member by public key, sorted by name
	candKeys map[string]int            // candidates per public key
	bySubnet map[netip.Prefix][]*entry // candidates by subnet
	mixed    int                       // candidates whose subnet length differs from self's
	misnamed int                       // entries whose Member.Name is not their key

	// The current output, valid when outValid, sorted like State and
	// updated in place. Peers lack AllowedIPs, which are in nets (same
	// order). A result is a copy made with a few memmoves.
	outValid bool
	peers    []Peer
	nets     []netip.Prefix
	routes   []netip.Prefix
	problems []Problem

	// stats counts which path each call took, for the tests.
	stats computerStats

	// Per-call scratch, kept to save allocations.
	dirty       []*entry
	touchKeys   map[string]struct{}
	touchSubnet map[netip.Prefix]struct{}
	peerDel     []string // public keys
	peerIns     []peerRec
	peerUpd     []peerRec // same key, other endpoint or name
	routeDel    []netip.Prefix
	routeIns    []netip.Prefix
	probDel     []string
	probIns     []Problem
}

// computerStats counts calls by path: Compute's fallback, a rebuild of
// the whole output from the cached entries, or an incremental merge.
type computerStats struct{ full, rebuild, incremental, broken int }

// entry is what the Computer knows about one member other than self.
type entry struct {
	name  string // key in Snapshot.Members
	m     registry.Member
	stamp uint64 // last call that saw the member in the snapshot
	evalt uint64 // last call that re-evaluated its output
	gone  bool   // removed from the snapshot during this call

	// From checkMember (depends only on m and Params).
	ep  netip.AddrPort
	err string // "" when valid

	// Classification against self's record.
	cand    bool   // a peer unless it conflicts with another candidate
	problem string // why not, when !cand

	shown shown // what the current output holds for this member
}

// shown is a member's part of the output: nothing, a peer or a problem.
type shown struct {
	kind uint8
	peer peerRec
	prob Problem
}

const (
	shownNone uint8 = iota
	shownPeer
	shownProblem
)

// peerRec is a Peer without the parts every peer shares.
type peerRec struct {
	key    string
	name   string
	ep     netip.AddrPort
	subnet netip.Prefix
}

// NewComputer returns a Computer for node self with Params p. It rejects
// the Params Compute rejects, with the same message.
func NewComputer(self string, p Params) (*Computer, error) {
	if err := checkParams(p); err != nil {
		return nil, err
	}
	c := &Computer{self: self, p: p, maxEdits: defaultMaxEdits}
	c.reset()
	return c, nil
}

// reset forgets everything learned from earlier snapshots.
func (c *Computer) reset() {
	c.haveMe, c.outValid = false, false
	c.entries = map[string]*entry{}
	c.byKey = map[string][]*entry{}
	c.candKeys = map[string]int{}
	c.bySubnet = map[netip.Prefix][]*entry{}
	c.touchKeys = map[string]struct{}{}
	c.touchSubnet = map[netip.Prefix]struct{}{}
	c.mixed, c.misnamed = 0, 0
	c.peers, c.nets, c.routes, c.problems = nil, nil, nil, nil
}

// Compute returns what the package-level Compute returns for snap, self
// and the Computer's Params, reusing the previous call's work.
func (c *Computer) Compute(snap *registry.Snapshot) (State, error) {
	me, ok := snap.Members[c.self]
	if !ok {
		return Compute(snap, c.self, c.p) // ErrNoSelf
	}
	// Only self's key and subnet decide how the others are classified;
	// a new endpoint or overlay IP of its own changes nothing else.
	reclassify := !c.haveMe || me.PublicKey != c.me.PublicKey || me.Subnet != c.me.Subnet
	if !c.haveMe || me != c.me {
		if _, err := checkMember(me, c.p); err != nil {
			return Compute(snap, c.self, c.p) // ErrNoSelf, with the reason
		}
		c.me, c.haveMe = me, true
	}
	if reclassify {
		c.outValid = false
	}
	c.stamp++
	c.scan(snap, reclassify)
	if reclassify {
		c.classifyAll()
	}
	if c.mixed > 0 || c.misnamed > 0 || len(flannelCandidates(snap)) > 0 {
		c.outValid = false
		c.stats.full++
		return Compute(snap, c.self, c.p)
	}
	if !c.outValid {
		c.stats.rebuild++
		c.rebuild()
	} else if c.stats.incremental++; !c.update() {
		// An internal invariant broke: never return a wrong State.
		c.reset()
		c.stats.broken++
		return Compute(snap, c.self, c.p)
	}
	return c.state(), nil
}

// scan brings the entries in line with snap. Unless reclassify (which
// redoes every classification afterwards) it keeps the conflict indexes
// current and collects the members to re-evaluate.
func (c *Computer) scan(snap *registry.Snapshot, reclassify bool) {
	c.dirty = c.dirty[:0]
	clear(c.touchKeys)
	clear(c.touchSubnet)
	seen, added := 0, 0
	for name, m := range snap.Members {
		if name == c.self {
			continue
		}
		e := c.entries[name]
		switch {
		case e == nil:
			e = &entry{name: name}
			c.entries[name] = e
			added++
		case e.m == m:
			seen++
			e.stamp = c.stamp
			continue
		default:
			seen++
			if !reclassify {
				c.detach(e)
			}
		}
		e.stamp = c.stamp
		e.m = m
		e.ep, e.err = netip.AddrPort{}, ""
		if ep, err := checkMember(m, c.p); err != nil {
			e.err = err.Error()
		} else {
			e.ep = ep
		}
		if !reclassify {
			c.attach(e)
			c.dirty = append(c.dirty, e)
		}
	}
	if seen+added == len(c.entries) {
		return
	}
	for name, e := range c.entries {
		if e.stamp == c.stamp {
			continue
		}
		if !reclassify {
			c.detach(e)
			e.gone = true
			c.dirty = append(c.dirty, e)
		}
		delete(c.entries, name)
	}
}

// classifyAll rebuilds the conflict indexes from the entries, after
// self's record changed.
func (c *Computer) classifyAll() {
	clear(c.byKey)
	clear(c.candKeys)
	clear(c.bySubnet)
	c.mixed, c.misnamed = 0, 0
	for _, e := range c.entries {
		c.attach(e)
	}
	// Everything is re-evaluated anyway; do not keep maps that large.
	c.touchKeys = map[string]struct{}{}
	c.touchSubnet = map[netip.Prefix]struct{}{}
}

// attach classifies e against self's record and adds it to the indexes.
// It applies Compute's per-member rules in Compute's order.
func (c *Computer) attach(e *entry) {
	m := e.m
	e.cand, e.problem = false, ""
	switch {
	case e.err != "":
		e.problem = e.err
	case m.PublicKey == c.me.PublicKey:
		e.problem = msgOwnKey
	case m.Subnet.Overlaps(c.me.Subnet):
		e.problem = msgOverlapsSelf(m.Subnet, c.me.Subnet)
	default:
		e.cand = true
	}
	if m.Name != e.name {
		c.misnamed++
	}
	c.byKey[m.PublicKey] = insertByName(c.byKey[m.PublicKey], e)
	c.touchKeys[m.PublicKey] = struct{}{}
	if !e.cand {
		return
	}
	c.candKeys[m.PublicKey]++
	c.bySubnet[m.Subnet] = insertByName(c.bySubnet[m.Subnet], e)
	c.touchSubnet[m.Subnet] = struct{}{}
	if m.Subnet.Bits() != c.me.Subnet.Bits() {
		c.mixed++
	}
}

// detach undoes attach, before e's record changes or e goes away.
func (c *Computer) detach(e *entry) {
	m := e.m
	if m.Name != e.name {
		c.misnamed--
	}
	removeFrom(c.byKey, m.PublicKey, e)
	c.touchKeys[m.PublicKey] = struct{}{}
	if !e.cand {
		return
	}
	if c.candKeys[m.PublicKey]--; c.candKeys[m.PublicKey] == 0 {
		delete(c.candKeys, m.PublicKey)
	}
	removeFrom(c.bySubnet, m.Subnet, e)
	c.touchSubnet[m.Subnet] = struct{}{}
	if m.Subnet.Bits() != c.me.Subnet.Bits() {
		c.mixed--
	}
}

// want is e's part of the output under the current indexes, decided as
// Compute decides it (every subnet has self's length here, so candidate
// subnets overlap only when equal).
func (c *Computer) want(e *entry) shown {
	m := e.m
	switch {
	case e.gone:
		return shown{}
	case !e.cand:
		return shown{kind: shownProblem, prob: Problem{e.name, e.problem}}
	case c.candKeys[m.PublicKey] > 1:
		sharers := c.byKey[m.PublicKey]
		names := make([]string, len(sharers))
		for i, s := range sharers {
			names[i] = s.name
		}
		return shown{kind: shownProblem, prob: Problem{m.Name, msgSharedKey(names)}}
	case len(c.bySubnet[m.Subnet]) > 1:
		return shown{kind: shownProblem, prob: Problem{m.Name, msgOverlapsOther(m.Subnet)}}
	}
	return shown{kind: shownPeer, peer: peerRec{key: m.PublicKey, name: m.Name, ep: e.ep, subnet: m.Subnet}}
}

// rebuild computes the whole output from the entries and sorts it.
func (c *Computer) rebuild() {
	recs := make([]peerRec, 0, len(c.entries))
	keys := make([]uint64, 0, len(c.entries))
	c.problems = c.problems[:0]
	for _, e := range c.entries {
		e.shown = c.want(e)
		switch e.shown.kind {
		case shownPeer:
			recs = append(recs, e.shown.peer)
			keys = append(keys, prefixKey4(e.shown.peer.subnet))
		case shownProblem:
			c.problems = append(c.problems, e.shown.prob)
		}
	}
	slices.SortFunc(recs, func(a, b peerRec) int { return cmp.Compare(a.key, b.key) })
	c.peers, c.nets = c.peers[:0], c.nets[:0]
	for _, r := range recs {
		c.peers = append(c.peers, c.peerOf(r))
		c.nets = append(c.nets, r.subnet)
	}
	slices.Sort(keys)
	c.routes = c.routes[:0]
	for _, k := range keys {
		c.routes = append(c.routes, unpackPrefix4(k))
	}
	slices.SortFunc(c.problems, compareProblem)
	c.outValid = true
}

// peerOf is r as a Peer, without AllowedIPs.
func (c *Computer) peerOf(r peerRec) Peer {
	return Peer{Name: r.name, PublicKey: r.key, Endpoint: r.ep, Keepalive: c.p.Keepalive}
}

// defaultMaxEdits is how many output changes update applies one by one
// (each moves part of a sorted slice) before sorting everything is
// cheaper.
const defaultMaxEdits = 64

// update re-evaluates the changed members and those sharing a key or a
// subnet with them (before or after the change), then edits the sorted
// output in place. It reports false if the output and the entries
// disagree, which would be a bug.
func (c *Computer) update() bool {
	c.peerDel, c.peerIns, c.peerUpd = c.peerDel[:0], c.peerIns[:0], c.peerUpd[:0]
	c.routeDel, c.routeIns = c.routeDel[:0], c.routeIns[:0]
	c.probDel, c.probIns = c.probDel[:0], c.probIns[:0]
	for _, e := range c.dirty {
		c.reevaluate(e)
	}
	for k := range c.touchKeys {
		for _, e := range c.byKey[k] {
			c.reevaluate(e)
		}
	}
	for s := range c.touchSubnet {
		for _, e := range c.bySubnet[s] {
			c.reevaluate(e)
		}
	}
	if len(c.peerDel)+len(c.peerIns)+len(c.routeDel)+len(c.routeIns)+len(c.probDel)+len(c.probIns) > c.maxEdits {
		c.rebuild()
		return true
	}
	// Deletions first, so an insertion never meets a stale element.
	byKey := func(p Peer, k string) int { return cmp.Compare(p.PublicKey, k) }
	for _, k := range c.peerDel {
		i, found := slices.BinarySearchFunc(c.peers, k, byKey)
		if !found {
			return false
		}
		c.peers = slices.Delete(c.peers, i, i+1)
		c.nets = slices.Delete(c.nets, i, i+1)
	}
	for _, r := range c.peerUpd {
		i, found := slices.BinarySearchFunc(c.peers, r.key, byKey)
		if !found || c.nets[i] != r.subnet {
			return false
		}
		c.peers[i] = c.peerOf(r)
	}
	for _, r := range c.peerIns {
		i, found := slices.BinarySearchFunc(c.peers, r.key, byKey)
		if found {
			return false
		}
		c.peers = slices.Insert(c.peers, i, c.peerOf(r))
		c.nets = slices.Insert(c.nets, i, r.subnet)
	}
	for _, p := range c.routeDel {
		i, found := slices.BinarySearchFunc(c.routes, p, comparePrefix)
		if !found {
			return false
		}
		c.routes = slices.Delete(c.routes, i, i+1)
	}
	for _, p := range c.routeIns {
		i, found := slices.BinarySearchFunc(c.routes, p, comparePrefix)
		if found {
			return false
		}
		c.routes = slices.Insert(c.routes, i, p)
	}
	for _, name := range c.probDel {
		i, found := slices.BinarySearchFunc(c.problems, name, func(p Problem, n string) int { return cmp.Compare(p.Member, n) })
		if !found {
			return false
		}
		c.problems = slices.Delete(c.problems, i, i+1)
	}
	for _, p := range c.probIns {
		i, found := slices.BinarySearchFunc(c.problems, p, compareProblem)
		if found {
			return false
		}
		c.problems = slices.Insert(c.problems, i, p)
	}
	return true
}

// reevaluate recomputes e's part of the output once per call and records
// how the output changes. A peer whose key and subnet stay keeps its
// place in peers and routes.
func (c *Computer) reevaluate(e *entry) {
	if e.evalt == c.stamp {
		return
	}
	e.evalt = c.stamp
	w := c.want(e)
	old := e.shown
	if w == old {
		return
	}
	e.shown = w
	bothPeers := old.kind == shownPeer && w.kind == shownPeer
	if bothPeers && old.peer.key == w.peer.key && old.peer.subnet == w.peer.subnet {
		c.peerUpd = append(c.peerUpd, w.peer)
		return
	}
	sameRoute := bothPeers && old.peer.subnet == w.peer.subnet
	switch old.kind {
	case shownPeer:
		c.peerDel = append(c.peerDel, old.peer.key)
		if !sameRoute {
			c.routeDel = append(c.routeDel, old.peer.subnet)
		}
	case shownProblem:
		c.probDel = append(c.probDel, old.prob.Member)
	}
	switch w.kind {
	case shownPeer:
		c.peerIns = append(c.peerIns, w.peer)
		if !sameRoute {
			c.routeIns = append(c.routeIns, w.peer.subnet)
		}
	case shownProblem:
		c.probIns = append(c.probIns, w.prob)
	}
}

// state copies the output into a State of its own.
func (c *Computer) state() State {
	st := State{
		Addresses:  []netip.Prefix{netip.PrefixFrom(c.me.OverlayIP, c.me.OverlayIP.BitLen())},
		MTU:        c.p.MTU,
		ListenPort: cmp.Or(c.p.ListenPort, DefaultListenPort),
		RouteTable: cmp.Or(c.p.RouteTable, DefaultRouteTable),
		Network:    c.p.Network,
	}
	if len(c.peers) > 0 {
		st.Peers = slices.Clone(c.peers)
		allowed := slices.Clone(c.nets) // one backing array, as Compute
		for i := range st.Peers {
			st.Peers[i].AllowedIPs = allowed[i : i+1 : i+1]
		}
	}
	if c.p.RouteNetwork {
		st.Routes = []netip.Prefix{c.p.Network}
	} else if len(c.routes) > 0 {
		st.Routes = slices.Clone(c.routes)
	}
	if len(c.problems) > 0 {
		st.Problems = slices.Clone(c.problems)
	}
	return st
}

func compareProblem(a, b Problem) int { return cmp.Compare(a.Member, b.Member) }

// insertByName adds e to list, kept sorted by name.
func insertByName(list []*entry, e *entry) []*entry {
	i, _ := slices.BinarySearchFunc(list, e.name, func(x *entry, name string) int { return cmp.Compare(x.name, name) })
	return slices.Insert(list, i, e)
}

// removeFrom deletes e from the list idx[k], and the list once empty.
func removeFrom[K comparable](idx map[K][]*entry, k K, e *entry) {
	list := idx[k]
	i := slices.Index(list, e)
	if i < 0 {
		return
	}
	if len(list) == 1 {
		delete(idx, k)
		return
	}
	idx[k] = slices.Delete(list, i, i+1)
}
