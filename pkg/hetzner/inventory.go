package hetzner

import (
	"cmp"
	"slices"

	"github.com/hetznercloud/hcloud-go/v2/hcloud"

	"github.com/meshd/meshd/pkg/registry"
)

// Inventory states: how a name looks from the cloud and the registry.
const (
	// StateJoined: a server whose meshd holds its leased node entry.
	StateJoined = "joined"
	// StateDown: a server that joined once (member record) but whose
	// node entry has expired: meshd is not running there now.
	StateDown = "down"
	// StateNeverJoined: a server with no registry keys at all.
	StateNeverJoined = "never joined"
	// StateNoServer: registry keys and no server of this cluster.
	StateNoServer = "no server"
	// StateUnknown: a server whose registry state is unknown because the
	// registry could not be read.
	StateUnknown = "unknown"
)

// InventoryRow is one name seen by the cloud, the registry, or both.
type InventoryRow struct {
	Name         string `json:"name"`
	ServerID     int64  `json:"serverId,omitempty"`
	ServerStatus string `json:"serverStatus,omitempty"`
	Role         string `json:"role,omitempty"`
	IPv4         string `json:"ipv4,omitempty"`
	PrivateIP    string `json:"privateIp,omitempty"`
	// NodeIPv4 is the public address in the node's registry entry.
	NodeIPv4  string `json:"nodeIpv4,omitempty"`
	Subnet    string `json:"subnet,omitempty"`
	OverlayIP string `json:"overlayIp,omitempty"`
	// Applied is the etcd revision the node last reported applied.
	Applied int64  `json:"applied,omitempty"`
	State   string `json:"state"`
}

// Inventory joins the cluster's servers with the registry, by name. It is
// a pure function; rows are sorted by name. A nil snap means the registry
// could not be read: every server's state is then StateUnknown.
func Inventory(servers []*hcloud.Server, snap *registry.Snapshot) []InventoryRow {
	unknown := snap == nil
	if snap == nil {
		snap = &registry.Snapshot{}
	}
	rows := map[string]*InventoryRow{}
	row := func(n string) *InventoryRow {
		if rows[n] == nil {
			rows[n] = &InventoryRow{Name: n}
		}
		return rows[n]
	}
	for _, s := range servers {
		r := row(s.Name)
		res := resultOf(s, "")
		r.ServerID, r.ServerStatus, r.Role, r.IPv4, r.PrivateIP = s.ID, res.Status, res.Role, res.IPv4, res.PrivateIP
	}
	for n, node := range snap.Nodes {
		row(n).NodeIPv4 = node.IPv4
	}
	for n, m := range snap.Members {
		r := row(n)
		r.Subnet, r.OverlayIP = m.Subnet.String(), m.OverlayIP.String()
	}
	for n, st := range snap.Statuses {
		row(n).Applied = st.Revision
	}
	out := make([]InventoryRow, 0, len(rows))
	for n, r := range rows {
		_, live := snap.Nodes[n]
		_, member := snap.Members[n]
		switch {
		case unknown:
			r.State = StateUnknown
		case r.ServerID == 0:
			r.State = StateNoServer
		case live:
			r.State = StateJoined
		case member || InRegistry(snap, n):
			r.State = StateDown
		default:
			r.State = StateNeverJoined
		}
		out = append(out, *r)
	}
	slices.SortFunc(out, func(a, b InventoryRow) int { return cmp.Compare(a.Name, b.Name) })
	return out
}
