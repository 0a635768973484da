package overlay

import (
	"github.com/meshd/meshd/pkg/overlay/desired"
	"github.com/meshd/meshd/pkg/registry"
)

// Desired is the overlay's desired (or live) state; see desired.State.
// The pure computation lives in package desired so that meshctl can use
// it without linking netlink, wgctrl and wireguard-go; these names are
// here for callers that already import overlay.
type Desired = desired.State

// Params are the node-local inputs of Compute; see desired.Params.
type Params = desired.Params

// Compute is desired.Compute: the desired overlay of node self in snap.
func Compute(snap *registry.Snapshot, self string, p Params) (Desired, error) {
	return desired.Compute(snap, self, p)
}

// Diff is desired.Diff: the per-peer, per-address and per-route changes
// that turn live into want.
func Diff(live, want Desired) desired.Plan { return desired.Diff(live, want) }
