package desired

import (
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/meshd/meshd/pkg/registry"
)

// choices feeds the random walk: a seeded generator or fuzz bytes.
type choices interface {
	// intn returns a number in [0, n); ok is false once exhausted.
	intn(n int) (v int, ok bool)
}

type randChoices struct{ r *rand.Rand }

func (c randChoices) intn(n int) (int, bool) { return c.r.IntN(n), true }

type byteChoices struct{ b []byte }

func (c *byteChoices) intn(n int) (int, bool) {
	if len(c.b) == 0 {
		return 0, false
	}
	v := int(c.b[0]) % n
	c.b = c.b[1:]
	return v, true
}

// world is a cluster whose member records a random walk edits; self is
// n0 (member(0)).
type world struct {
	snap  *registry.Snapshot
	fresh int   // source of never-used keys, subnets and names
	odd   []int // members edited into a fallback case, to restore
}

func newWorld(n int) *world {
	ms := make([]registry.Member, n)
	for i := range ms {
		ms[i] = member(i)
	}
	return &world{snap: snapOf(ms...), fresh: n}
}

// pick returns a member name (self included when withSelf), or "".
func (w *world) pick(ch choices, withSelf bool) string {
	names := slices.Sorted(maps.Keys(w.snap.Members))
	if !withSelf {
		names = slices.DeleteFunc(names, func(n string) bool { return n == "n0" })
	}
	if len(names) == 0 {
		return ""
	}
	i, _ := ch.intn(len(names))
	return names[i]
}

// op applies one random edit and describes it. Duplicate keys and
// subnets are drawn from the existing members, so conflicts form; the
// "restore" and "fresh" edits dissolve them again.
func (w *world) op(ch choices) (string, bool) {
	kind, ok := ch.intn(20)
	if !ok {
		return "", false
	}
	// Edits that force a fallback stay rare, and restores frequent, so
	// that most steps take the incremental path.
	if kind >= 17 || (kind == 8 || kind == 14) && w.fresh%3 != 0 {
		kind = 1
	}
	w.fresh++
	ms := w.snap.Members
	target := w.pick(ch, false)
	if kind == 12 && w.fresh%2 == 0 {
		target = "n0"
	}
	m, exists := ms[target]
	set := func(desc string) (string, bool) {
		if exists {
			ms[target] = m
		}
		return fmt.Sprintf("%s %s", desc, target), true
	}
	switch kind {
	case 0:
		nm := member(w.fresh)
		ms[nm.Name] = nm
		return "add " + nm.Name, true
	case 1: // restore a member's original record (self too)
		i, _ := ch.intn(w.fresh)
		nm := member(i % 40)
		if _, ok := ms["n0"]; !ok {
			nm = member(0)
		} else if len(w.odd) > 0 { // first those that force a fallback
			nm, w.odd = member(w.odd[0]), w.odd[1:]
		}
		ms[nm.Name] = nm
		return "restore " + nm.Name, true
	case 2:
		delete(ms, target)
		return "remove " + target, true
	case 3:
		m.PublicKey = key(100000 + w.fresh)
		return set("fresh key")
	case 4:
		m.PublicKey = ms[w.pick(ch, true)].PublicKey
		return set("duplicate key")
	case 5:
		m.PublicKey = []string{"AAAA", strings.Repeat("!", 44), ""}[w.fresh%3]
		return set("invalid key")
	case 6:
		m.Subnet = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 200, byte(w.fresh), 0}), 24)
		m.OverlayIP = m.Subnet.Addr()
		return set("fresh subnet")
	case 7:
		m.Subnet = ms[w.pick(ch, true)].Subnet
		if m.Subnet.IsValid() {
			m.OverlayIP = m.Subnet.Addr().Next()
		}
		if m.Subnet.Bits() != 24 {
			w.markOdd(target)
		}
		return set("duplicate subnet")
	case 8: // another length: the Computer falls back to Compute
		bits := []int{16, 25, 23}[w.fresh%3]
		m.Subnet = netip.PrefixFrom(m.OverlayIP, bits).Masked()
		w.markOdd(target)
		return set(fmt.Sprintf("subnet /%d", bits))
	case 9:
		m.Subnet = netip.PrefixFrom(netip.AddrFrom4([4]byte{192, 168, byte(w.fresh), 0}), 24)
		m.OverlayIP = m.Subnet.Addr()
		return set("subnet outside")
	case 10:
		m.Endpoint = fmt.Sprintf("198.51.100.%d:%d", w.fresh%250+1, 51820+w.fresh%3)
		return set("endpoint")
	case 11:
		m.Endpoint = []string{"", "nope", "0.0.0.0:51820", "192.0.2.1:0"}[w.fresh%4]
		return set(fmt.Sprintf("endpoint %q", m.Endpoint))
	case 12: // may be self: its key, subnet, endpoint or overlay IP
		what, _ := ch.intn(4)
		switch what {
		case 0:
			m.PublicKey = ms[w.pick(ch, true)].PublicKey
		case 1:
			m.Subnet = ms[w.pick(ch, true)].Subnet
			m.OverlayIP = m.Subnet.Addr()
			if m.Subnet.Bits() != 24 {
				w.markOdd(target)
			}
		case 2:
			m.Endpoint = fmt.Sprintf("203.0.113.%d:51820", w.fresh%250+1)
		case 3:
			m.OverlayIP = m.OverlayIP.Next()
		}
		return set("edit")
	case 13:
		if _, ok := ms["n0"]; ok {
			delete(ms, "n0")
			return "remove self", true
		}
		ms["n0"] = member(0)
		return "restore self", true
	case 14: // Name unlike the key: the Computer falls back to Compute
		m.Name = "x" + target
		w.markOdd(target)
		return set("misname")
	case 15:
		w.snap = &registry.Snapshot{Members: maps.Clone(ms), FlannelLeases: maps.Clone(w.snap.FlannelLeases)}
		return "new snapshot", true
	case 16:
		return w.flannelOp(ch)
	default:
		return "no change", true
	}
}

// flannelOp edits the flannel leases: a flannel-only node, a lease at a
// member's subnet (the member wins), hostile leases (a member's key, a
// subnet outside the network or overlapping self), an expiry. Leases
// that are not a member's make the Computer fall back to Compute, so
// they are cleared often.
func (w *world) flannelOp(ch choices) (string, bool) {
	if w.snap.FlannelLeases == nil {
		w.snap.FlannelLeases = map[netip.Prefix]registry.FlannelLease{}
	}
	fl := w.snap.FlannelLeases
	what, ok := ch.intn(7)
	if !ok {
		return "", false
	}
	var l registry.FlannelLease
	switch what {
	case 0: // a node still on flannel
		l = lease(200 + w.fresh%50)
	case 1: // a lease for a member's subnet, with another key
		m := w.snap.Members[w.pick(ch, true)]
		l = lease(300 + w.fresh%50)
		l.Subnet = m.Subnet
	case 2: // a member's key
		l = lease(200 + w.fresh%50)
		l.WireGuard = &registry.FlannelWireGuard{PublicKey: w.snap.Members[w.pick(ch, true)].PublicKey}
	case 3: // outside the network, or over self
		l = lease(200 + w.fresh%50)
		l.Subnet = []netip.Prefix{netip.MustParsePrefix("192.168.0.0/24"), netip.MustParsePrefix("10.10.0.0/25")}[w.fresh%2]
	case 4: // one expires
		for _, s := range slices.SortedFunc(maps.Keys(fl), comparePrefix) {
			delete(fl, s)
			return "flannel lease expired " + s.String(), true
		}
		return "no flannel lease to expire", true
	default: // every flannel node migrated or gone
		w.snap.FlannelLeases = nil
		return "flannel leases cleared", true
	}
	fl[l.Subnet] = l
	return "flannel lease " + l.Subnet.String(), true
}

// markOdd remembers that member name was edited into a fallback case.
func (w *world) markOdd(name string) {
	var i int
	if _, err := fmt.Sscanf(name, "n%d", &i); err == nil {
		w.odd = append(w.odd, i)
	}
}

// checkStep compares c against Compute on snap, and checks that the
// State c returned before is still what it was. It returns a
// description of the first difference.
func checkStep(c *Computer, snap *registry.Snapshot, p Params, prev, prevCopy *State) (State, error, string) {
	want, wantErr := Compute(snap, "n0", p)
	got, err := c.Compute(snap)
	if (err == nil) != (wantErr == nil) || (err != nil && (err.Error() != wantErr.Error() || errors.Is(err, ErrNoSelf) != errors.Is(wantErr, ErrNoSelf))) {
		return got, err, fmt.Sprintf("error = %v, Compute's = %v", err, wantErr)
	}
	if diff := cmp.Diff(want, got, cmpOpts...); diff != "" {
		return got, err, fmt.Sprintf("Computer differs from Compute (-Compute +Computer):\n%s", diff)
	}
	if diff := cmp.Diff(*prevCopy, *prev, cmpOpts...); diff != "" {
		return got, err, fmt.Sprintf("an earlier result changed afterwards:\n%s", diff)
	}
	return got, err, ""
}

// deepCopy copies every slice of s, so later changes to s show.
func deepCopy(s State) State {
	s.Addresses = slices.Clone(s.Addresses)
	s.Routes = slices.Clone(s.Routes)
	s.Problems = slices.Clone(s.Problems)
	s.Peers = slices.Clone(s.Peers)
	for i := range s.Peers {
		s.Peers[i].AllowedIPs = slices.Clone(s.Peers[i].AllowedIPs)
	}
	return s
}

// walk runs steps of 1-3 random edits and checks every result.
func walk(t *testing.T, ch choices, n, steps int, p Params) (seen map[string]int, c *Computer) {
	t.Helper()
	w := newWorld(n)
	c, err := NewComputer("n0", p)
	if err != nil {
		t.Fatal(err)
	}
	// Sometimes resort to rebuilding after a few edits already.
	if v, _ := ch.intn(2); v == 0 {
		c.maxEdits = 3
	}
	seen = map[string]int{}
	var prev, prevCopy State
	var log []string
	for step := 0; step < steps; step++ {
		k, ok := ch.intn(3)
		for range k + 1 {
			desc, more := w.op(ch)
			if !more {
				ok = false
				break
			}
			log = append(log, desc)
		}
		if !ok && step > 0 {
			return seen, c
		}
		if len(log) > 12 {
			log = log[len(log)-12:]
		}
		got, err, problem := checkStep(c, w.snap, p, &prev, &prevCopy)
		if problem == "" && c.stats.broken > 0 {
			problem = "the incremental output broke an invariant (Computer fell back)"
		}
		if problem != "" {
			t.Fatalf("step %d, after %s:\n%s", step, strings.Join(log, "; "), problem)
		}
		if err != nil {
			seen["error"]++
			continue
		}
		prev, prevCopy = got, deepCopy(got)
		for _, pe := range got.Peers {
			if strings.HasPrefix(pe.Name, "flannel:") {
				seen["flannel peer"]++
			}
		}
		for _, pr := range got.Problems {
			switch {
			case strings.Contains(pr.Err, "shared by"):
				seen["shared key"]++
			case strings.Contains(pr.Err, "another member's"):
				seen["overlap"]++
			}
		}
	}
	return seen, c
}

// TestComputerMatchesCompute drives random sequences of snapshots
// through a Computer and Compute and requires identical results.
func TestComputerMatchesCompute(t *testing.T) {
	params := map[string]Params{
		"default":       defaultParams,
		"route network": {RouteNetwork: true, MTU: 1380, ListenPort: 4000, RouteTable: 7, Network: netip.MustParsePrefix("10.0.0.0/8")},
		"narrow":        {Keepalive: time.Second, Network: netip.MustParsePrefix("10.10.0.0/16")},
	}
	for name, p := range params {
		t.Run(name, func(t *testing.T) {
			for seed := uint64(1); seed <= 8; seed++ {
				ch := randChoices{rand.New(rand.NewPCG(seed, 42))}
				seen, c := walk(t, ch, 20+int(seed)*3, 300, p)
				if t.Failed() {
					return
				}
				// The walk must exercise what it claims to: conflicts,
				// errors, and every path of the Computer.
				for _, what := range []string{"shared key", "overlap", "error", "flannel peer"} {
					if seen[what] == 0 {
						t.Errorf("seed %d: no step saw a %s", seed, what)
					}
				}
				t.Logf("seed %d: paths taken %+v", seed, c.stats)
				if c.stats.incremental == 0 || c.stats.rebuild == 0 || c.stats.full == 0 {
					t.Errorf("seed %d: paths taken %+v, want each at least once", seed, c.stats)
				}
			}
		})
	}
}

// FuzzComputer drives a sequence of edits chosen by the fuzz bytes.
func FuzzComputer(f *testing.F) {
	f.Add([]byte{5, 0, 4, 1, 0, 7, 2, 1, 2, 3, 0, 13, 0, 13, 1, 6, 3})
	f.Add([]byte{30, 2, 4, 4, 7, 7, 1, 3, 1, 2, 5, 0, 8, 3, 0, 1, 9})
	f.Add([]byte{12, 0, 12, 0, 12, 1, 0, 14, 2, 0, 15, 0, 10, 1, 11, 2})
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) == 0 {
			return
		}
		walk(t, &byteChoices{data[1:]}, int(data[0])%40+1, 200, defaultParams)
	})
}

// TestComputerPaths walks through the cases the Computer hands to
// Compute or rebuilds from its cache, and checks both the result and the
// path taken at every step.
func TestComputerPaths(t *testing.T) {
	edit := func(i int, f func(*registry.Member)) func(*registry.Snapshot) {
		return func(s *registry.Snapshot) {
			name := fmt.Sprintf("n%d", i)
			m := s.Members[name]
			f(&m)
			s.Members[name] = m
		}
	}
	restore := func(i int) func(*registry.Snapshot) {
		return func(s *registry.Snapshot) { s.Members[fmt.Sprintf("n%d", i)] = member(i) }
	}
	type step struct {
		edit func(*registry.Snapshot)
		path string // "full", "rebuild", "incremental" or "error"
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"first call rebuilds, then incremental", []step{
			{nil, "rebuild"},
			{edit(3, func(m *registry.Member) { m.Endpoint = "198.51.100.3:1" }), "incremental"},
			{nil, "incremental"},
		}},
		{"mixed subnet lengths fall back until gone", []step{
			{nil, "rebuild"},
			{edit(3, func(m *registry.Member) { m.Subnet = netip.MustParsePrefix("10.10.0.0/16") }), "incremental"}, // overlaps self: not a candidate
			{edit(3, func(m *registry.Member) {
				m.Subnet, m.OverlayIP = netip.MustParsePrefix("10.10.4.0/23"), netip.MustParseAddr("10.10.4.1")
			}), "full"},
			{edit(4, func(m *registry.Member) { m.Endpoint = "nope" }), "full"},
			{restore(3), "rebuild"},
			{restore(4), "incremental"},
		}},
		{"self's key changes", []step{
			{nil, "rebuild"},
			{edit(0, func(m *registry.Member) { m.PublicKey = key(5) }), "rebuild"},
			{restore(0), "rebuild"},
		}},
		{"self's subnet changes", []step{
			{nil, "rebuild"},
			{edit(0, func(m *registry.Member) { m.Subnet, m.OverlayIP = member(6).Subnet, member(6).OverlayIP }), "rebuild"},
			{edit(0, func(m *registry.Member) {
				m.Subnet, m.OverlayIP = netip.MustParsePrefix("10.10.0.0/23"), member(0).OverlayIP
			}), "full"},
			{restore(0), "rebuild"},
		}},
		{"self's endpoint and overlay IP change incrementally", []step{
			{nil, "rebuild"},
			{edit(0, func(m *registry.Member) { m.Endpoint = "203.0.113.1:51820" }), "incremental"},
			{edit(0, func(m *registry.Member) { m.OverlayIP = m.OverlayIP.Next() }), "incremental"},
		}},
		{"self missing or invalid", []step{
			{func(s *registry.Snapshot) { delete(s.Members, "n0") }, "error"},
			{restore(0), "rebuild"},
			{edit(0, func(m *registry.Member) { m.PublicKey = "AAAA" }), "error"},
			{edit(5, func(m *registry.Member) { m.Endpoint = "nope" }), "error"},
			{restore(0), "incremental"},
		}},
		{"name unlike its key falls back", []step{
			{nil, "rebuild"},
			{edit(2, func(m *registry.Member) { m.Name = "other" }), "full"},
			{restore(2), "rebuild"},
		}},
		{"conflicts form and dissolve incrementally", []step{
			{nil, "rebuild"},
			{edit(2, func(m *registry.Member) { m.PublicKey = key(3) }), "incremental"},
			{edit(4, func(m *registry.Member) { m.PublicKey = key(3); m.Endpoint = "nope" }), "incremental"},
			{edit(5, func(m *registry.Member) { m.Subnet = member(6).Subnet }), "incremental"},
			{edit(7, func(m *registry.Member) { m.Subnet = member(6).Subnet }), "incremental"},
			{restore(2), "incremental"},
			{restore(5), "incremental"},
			{func(s *registry.Snapshot) { delete(s.Members, "n7") }, "incremental"},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newWorld(8)
			c, err := NewComputer("n0", defaultParams)
			if err != nil {
				t.Fatal(err)
			}
			var prev, prevCopy State
			for i, s := range tt.steps {
				if s.edit != nil {
					s.edit(w.snap)
				}
				before := c.stats
				got, err, problem := checkStep(c, w.snap, defaultParams, &prev, &prevCopy)
				if problem != "" {
					t.Fatalf("step %d: %s", i, problem)
				}
				path := "error"
				switch after := c.stats; {
				case err != nil:
				case after.full > before.full:
					path = "full"
				case after.rebuild > before.rebuild:
					path = "rebuild"
				case after.incremental > before.incremental:
					path = "incremental"
				}
				if path != s.path || c.stats.broken > 0 {
					t.Errorf("step %d took path %s (%+v), want %s", i, path, c.stats, s.path)
				}
				if err == nil {
					prev, prevCopy = got, deepCopy(got)
				}
			}
		})
	}
}

// TestNewComputerParams checks that NewComputer rejects what Compute
// rejects, with the same message.
func TestNewComputerParams(t *testing.T) {
	net8 := defaultParams.Network
	for _, p := range []Params{
		{},
		{Network: netip.MustParsePrefix("10.1.2.3/8")},
		{Network: net8, MTU: 100},
		{Network: net8, ListenPort: 70000},
		{Network: net8, Keepalive: -time.Second},
		{Network: net8, RouteTable: -1},
	} {
		_, want := Compute(snapOf(member(0)), "n0", p)
		c, err := NewComputer("n0", p)
		if want == nil || err == nil || err.Error() != want.Error() || c != nil {
			t.Errorf("NewComputer(%+v) = %v, %v; Compute's error %v", p, c, err, want)
		}
	}
	if _, err := NewComputer("n0", defaultParams); err != nil {
		t.Errorf("NewComputer(defaultParams): %v", err)
	}
}

// benchSnap is a cluster of n members (self n0).
func benchSnap(n int) *registry.Snapshot {
	ms := make([]registry.Member, n)
	for i := range ms {
		ms[i] = member(i)
	}
	return snapOf(ms...)
}

// BenchmarkComputerOneChange is one reconcile after one peer changed:
// every iteration flips one member's endpoint between two values.
func BenchmarkComputerOneChange(b *testing.B) {
	for _, n := range []int{10, 100, 1000} {
		snap := benchSnap(n)
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			c, calls := benchOneChange(b, snap, n/2)
			if c.stats.incremental < calls || c.stats.broken > 0 {
				b.Fatalf("paths %+v after %d calls: not incremental", c.stats, calls)
			}
		})
	}
}

// benchOneChange primes a Computer with snap, then times calls that each
// see member i's endpoint flipped between two values. It returns the
// Computer and the number of timed calls.
func benchOneChange(b *testing.B, snap *registry.Snapshot, i int) (*Computer, int) {
	c, err := NewComputer("n0", defaultParams)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := c.Compute(snap); err != nil {
		b.Fatal(err)
	}
	x, y := member(i), member(i)
	y.Endpoint = "198.51.100.1:51820"
	b.ReportAllocs()
	cpu := startCPU()
	calls := 0
	for b.Loop() {
		if calls++; calls%2 == 0 {
			snap.Members[x.Name] = x
		} else {
			snap.Members[y.Name] = y
		}
		if _, err := c.Compute(snap); err != nil {
			b.Fatal(err)
		}
	}
	cpu.report(b)
	return c, calls
}

// BenchmarkComputerNoChange is a reconcile when no member changed.
func BenchmarkComputerNoChange(b *testing.B) {
	for _, n := range []int{10, 100, 1000} {
		snap := benchSnap(n)
		b.Run(fmt.Sprintf("nodes=%d", n), func(b *testing.B) {
			c, err := NewComputer("n0", defaultParams)
			if err != nil {
				b.Fatal(err)
			}
			if _, err := c.Compute(snap); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			cpu := startCPU()
			for b.Loop() {
				if _, err := c.Compute(snap); err != nil {
					b.Fatal(err)
				}
			}
			cpu.report(b)
		})
	}
}

// BenchmarkComputerDaemonHeap compares Compute and the Computer (one
// change) at 1000 nodes with 64 MiB of other live heap, as in the daemon.
// In the bare benchmarks the heap is a few MiB, so the garbage collector
// runs every few dozen calls and its fixed cost per cycle dominates the
// cpu-ns/op of whatever allocates most.
func BenchmarkComputerDaemonHeap(b *testing.B) {
	other := make([]byte, 64<<20) // no pointers: nothing to mark
	defer runtime.KeepAlive(other)
	snap := benchSnap(1000)
	b.Run("Compute", func(b *testing.B) {
		b.ReportAllocs()
		cpu := startCPU()
		for b.Loop() {
			if _, err := Compute(snap, "n0", defaultParams); err != nil {
				b.Fatal(err)
			}
		}
		cpu.report(b)
	})
	b.Run("ComputerOneChange", func(b *testing.B) { benchOneChange(b, snap, 500) })
}
