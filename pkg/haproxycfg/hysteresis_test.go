package haproxycfg

import (
	"fmt"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/registry"
)

// TestSlotFlappingDoesNotReload: an app whose instance count flaps across
// a multiple of the slot count (4 and 5 instances, 4 slots a step) makes
// at most one reload (the first growth), not one per flap: every later
// change is a runtime update, and every instance is served.
func TestSlotFlappingDoesNotReload(t *testing.T) {
	c := newComponent(t, testOptions(testDir(t))) // ServerSlots 4
	ctx := t.Context()
	port := freePort(t)
	var bs []*backend
	for i := range 5 {
		bs = append(bs, startBackend(t, fmt.Sprintf("b%d", i)))
	}
	if err := c.Apply(ctx, snapshot(map[string]appSpec{"api": {port, bs[:3]}})); err != nil {
		t.Fatal(err)
	}
	base := status(c).Reloads
	for flap := range 6 {
		n := 4 + flap%2
		if err := c.Apply(ctx, snapshot(map[string]appSpec{"api": {port, bs[:n]}})); err != nil {
			t.Fatal(err)
		}
	}
	askUntil(t, port, "b0", 5*time.Second)
	st := status(c)
	if st.Reloads-base > 1 {
		t.Errorf("%d reloads for 6 flaps between 4 and 5 instances, want at most 1 (runtime updates %d)", st.Reloads-base, st.RuntimeUpdates)
	}
	if st.RuntimeUpdates < 5 {
		t.Errorf("runtime updates %d, want the flaps applied at runtime", st.RuntimeUpdates)
	}
}

// TestHysteresisShrinksLate: slots grow at once, keep their size while
// the count moves a little, and shrink once the count is well below.
func TestHysteresisShrinksLate(t *testing.T) {
	id := registry.AppID{Group: registry.GroupServices, Name: "api"}
	desired := func(n int) Desired {
		s := make([]Server, n)
		for i := range s {
			s[i] = srv(fmt.Sprintf("n%d", i), fmt.Sprintf("10.0.0.%d:80", i+1))
		}
		return Desired{Listeners: []Listener{{App: id, Port: 8080, Slots: padSlots(s, 8)}}}
	}
	var prev Desired
	for _, step := range []struct{ n, slots int }{
		{3, 8}, {7, 8}, {8, 16}, {7, 16}, {9, 16}, {5, 16}, {4, 16}, {3, 8}, {4, 8}, {16, 24}, {15, 24},
	} {
		d := Hysteresis(desired(step.n), prev, 8)
		if got := len(d.Listeners[0].Slots); got != step.slots {
			t.Errorf("%d instances after %d slots: %d slots, want %d", step.n, slotsOf(prev), got, step.slots)
		}
		prev = d
	}
}

func slotsOf(d Desired) int {
	if len(d.Listeners) == 0 {
		return 0
	}
	return len(d.Listeners[0].Slots)
}
