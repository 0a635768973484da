package haproxycfg

import (
	"cmp"
	"net/netip"
	"slices"
)

// Live is the slot occupancy HAProxy reports, by backend name: element i
// is slot i's address, or the zero AddrPort when the slot is in
// maintenance (free).
type Live map[string][]netip.AddrPort

// Canonical returns d with every backend's occupants packed into its first
// slots in node order, the layout Compute produces. Hash uses it so that
// where an instance sits does not count as a change.
func Canonical(d Desired) Desired {
	out := d
	out.Listeners = make([]Listener, len(d.Listeners))
	for i, l := range d.Listeners {
		occ := occupants(l.Slots)
		slots := make([]Server, len(l.Slots))
		copy(slots, occ)
		l.Slots = slots
		out.Listeners[i] = l
	}
	return out
}

// Place returns d with each backend's instances moved into the slots where
// live already has them, and new instances in the lowest free slots, so
// that applying it changes as few slots as possible. A backend live does
// not know, or knows with a different slot count, keeps d's layout (it
// needs a reload anyway). Place is pure.
func Place(d Desired, live Live) Desired {
	out := d
	out.Listeners = make([]Listener, len(d.Listeners))
	for i, l := range d.Listeners {
		cur, ok := live[BackendName(l.App)]
		if !ok || len(cur) != len(l.Slots) {
			out.Listeners[i] = l
			continue
		}
		want := occupants(l.Slots)
		used := make([]bool, len(want))
		slots := make([]Server, len(l.Slots))
		filled := make([]bool, len(l.Slots))
		for si, a := range cur {
			if !a.IsValid() {
				continue
			}
			for wi, w := range want {
				if !used[wi] && w.Addr == a {
					slots[si], filled[si], used[wi] = w, true, true
					break
				}
			}
		}
		next := 0
		for wi, w := range want {
			if used[wi] {
				continue
			}
			for filled[next] {
				next++
			}
			slots[next], filled[next] = w, true
		}
		l.Slots = slots
		out.Listeners[i] = l
	}
	return out
}

// occupants lists the non-empty slots in node order.
func occupants(slots []Server) []Server {
	var out []Server
	for _, s := range slots {
		if !s.Empty() {
			out = append(out, s)
		}
	}
	slices.SortStableFunc(out, func(a, b Server) int {
		return cmp.Or(cmp.Compare(a.Node, b.Node), a.Addr.Compare(b.Addr))
	})
	return out
}

// SlotChange is one slot whose occupant must change at runtime.
type SlotChange struct {
	Backend string
	Slot    string
	// To is the new occupant; an empty Server frees the slot.
	To Server
}

// Diff lists the runtime changes that turn live into d (d already placed
// with Place). Fills come before frees so that a backend never drops to
// fewer servers than it is about to have. ok is false when some backend
// of d is missing from live or has another slot count: only a reload gets
// there.
func Diff(d Desired, live Live) (changes []SlotChange, ok bool) {
	var fills, frees []SlotChange
	for _, l := range d.Listeners {
		be := BackendName(l.App)
		cur, found := live[be]
		if !found || len(cur) != len(l.Slots) {
			return nil, false
		}
		for i, s := range l.Slots {
			if s.Addr == cur[i] {
				continue
			}
			c := SlotChange{Backend: be, Slot: SlotName(i), To: s}
			if s.Empty() {
				frees = append(frees, c)
			} else {
				fills = append(fills, c)
			}
		}
	}
	return append(fills, frees...), true
}
