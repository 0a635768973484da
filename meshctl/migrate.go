package main

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	"github.com/meshd/meshd/pkg/overlay"
	"github.com/meshd/meshd/pkg/overlay/desired"
	"github.com/meshd/meshd/pkg/registry"
)

// `meshctl migrate status`: where a live migration from flanneld to meshd
// stands (docs/migration.md). Everything is computed purely from one
// registry snapshot by migrationReport; the command only reads and prints.

func migrateStatus(ctx context.Context, e *env, args []string) error {
	fs := flags(e, "migrate status")
	out := outputFlag(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return usagef("usage: meshctl migrate status [-o table|json|yaml]")
	}
	if err := checkOutput(*out); err != nil {
		return err
	}
	_, snap, err := e.readSnapshot(ctx)
	if err != nil {
		return err
	}
	rep := migrationReport(snap)
	if isData(*out) {
		return printData(e.Stdout, *out, rep)
	}
	printMigration(e, rep)
	return nil
}

// Node modes in a migration.
const (
	modeFlannel = "flannel" // a flannel WireGuard lease, no meshd member record
	modeMeshd   = "meshd"   // a meshd member record
	modeNone    = "none"    // a node entry with neither (no overlay, or not started)
)

// Handshake states of a meshd node with a flannel peer.
const (
	hsRecent  = "recent"  // not among the node's stale peers
	hsStale   = "stale"   // named in the node's stale peers
	hsUnknown = "unknown" // no overlay status, or the stale list was cut short
)

// migrateNode is one node of the report.
type migrateNode struct {
	Name   string `json:"name"`
	Mode   string `json:"mode"`
	IPv4   string `json:"ipv4,omitempty"`
	Subnet string `json:"subnet,omitempty"`
	// Peer is the name the node has as a peer of meshd nodes
	// (desired.FlannelPeerName) while it runs flannel.
	Peer string `json:"peer,omitempty"`
	// Handshakes, for a meshd node: each flannel peer's state.
	Handshakes map[string]string `json:"handshakes,omitempty"`
}

// staleLease is a flannel lease that no longer describes a running node.
type staleLease struct {
	Subnet string `json:"subnet"`
	Reason string `json:"reason"`
}

// migrateReport is the output of `meshctl migrate status`.
type migrateReport struct {
	Revision    int64         `json:"revision"`
	Nodes       []migrateNode `json:"nodes"`
	StaleLeases []staleLease  `json:"staleLeases,omitempty"`
	// Blockers say what must be fixed before the next node is migrated.
	Blockers []string `json:"blockers,omitempty"`
	// Next is the suggested next step.
	Next string `json:"next"`
}

// migrationReport computes the report from a snapshot, purely.
func migrationReport(snap *registry.Snapshot) migrateReport {
	rep := migrateReport{Revision: snap.Revision, Nodes: []migrateNode{}}
	byIP := map[string]string{} // node entry public IPv4 -> name
	for _, n := range snap.SortedNodeNames() {
		if ip := snap.Nodes[n].IPv4; ip != "" {
			if _, dup := byIP[ip]; !dup {
				byIP[ip] = n
			}
		}
	}
	memberBySubnet := map[netip.Prefix]registry.Member{}
	for _, m := range snap.Members {
		memberBySubnet[m.Subnet] = m
	}
	subnets := slices.SortedFunc(maps.Keys(snap.FlannelLeases), func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })

	nodes := map[string]*migrateNode{}
	var flannelPeers []string
	for _, p := range subnets {
		l := snap.FlannelLeases[p]
		if l.BackendType != registry.FlannelBackendWireGuard {
			rep.StaleLeases = append(rep.StaleLeases, staleLease{registry.PrefixName(p), fmt.Sprintf("backend %q is not wireguard: meshd does not peer with it", registry.Printable(l.BackendType))})
			continue
		}
		if m, ok := memberBySubnet[p]; ok {
			if l.WireGuard.PublicKey != m.PublicKey {
				rep.StaleLeases = append(rep.StaleLeases, staleLease{registry.PrefixName(p),
					fmt.Sprintf("member %s holds the subnet but the lease has another key: meshd has not rewritten it (is meshd running there, may its etcd role write the lease?)", m.Name)})
			}
			continue
		}
		name, ok := byIP[l.PublicIP]
		if !ok {
			rep.StaleLeases = append(rep.StaleLeases, staleLease{registry.PrefixName(p),
				fmt.Sprintf("no node entry has PublicIP %s: a node that is gone? meshd still peers with it until the lease expires or is deleted", l.PublicIP)})
			name = desired.FlannelPeerName(p)
		}
		peer := desired.FlannelPeerName(p)
		flannelPeers = append(flannelPeers, peer)
		nodes[name] = &migrateNode{Name: name, Mode: modeFlannel, IPv4: l.PublicIP, Subnet: p.String(), Peer: peer}
	}
	for name, m := range snap.Members {
		n := &migrateNode{Name: name, Mode: modeMeshd, Subnet: m.Subnet.String()}
		if nd, ok := snap.Nodes[name]; ok {
			n.IPv4 = nd.IPv4
		}
		n.Handshakes = map[string]string{}
		view, hasStatus := overlayView(snap, name)
		for _, peer := range flannelPeers {
			switch {
			case !hasStatus:
				n.Handshakes[peer] = hsUnknown
			case slices.Contains(view.Peers.Stale, peer):
				n.Handshakes[peer] = hsStale
			case view.Peers.StaleCount > len(view.Peers.Stale):
				n.Handshakes[peer] = hsUnknown
			default:
				n.Handshakes[peer] = hsRecent
			}
		}
		if len(n.Handshakes) == 0 {
			n.Handshakes = nil
		}
		nodes[name] = n
	}
	for name, nd := range snap.Nodes {
		if _, ok := nodes[name]; !ok {
			nodes[name] = &migrateNode{Name: name, Mode: modeNone, IPv4: nd.IPv4}
		}
	}
	for _, name := range slices.Sorted(maps.Keys(nodes)) {
		rep.Nodes = append(rep.Nodes, *nodes[name])
	}
	rep.Blockers, rep.Next = migrationBlockers(snap, rep)
	return rep
}

// overlayView decodes node's overlay status; ok is false when the node
// publishes none (not running, or no overlay).
func overlayView(snap *registry.Snapshot, node string) (overlay.Status, bool) {
	var v overlay.Status
	st, ok := snap.Statuses[node]
	if !ok {
		return v, false
	}
	raw, ok := st.Components["overlay"]
	if !ok || json.Unmarshal(raw, &v) != nil {
		return v, false
	}
	return v, true
}

// migrationBlockers lists what stands in the way of the next step, and
// names that step.
func migrationBlockers(snap *registry.Snapshot, rep migrateReport) ([]string, string) {
	var blockers []string
	flannel := 0
	var nextFlannel string
	for _, n := range rep.Nodes {
		switch n.Mode {
		case modeFlannel:
			flannel++
			if nextFlannel == "" && !strings.HasPrefix(n.Name, "flannel:") {
				nextFlannel = n.Name
			}
		case modeMeshd:
			st, ok := snap.Statuses[n.Name]
			if _, live := snap.Nodes[n.Name]; !live || !ok {
				blockers = append(blockers, fmt.Sprintf("meshd node %s is not running (no live entry or status)", n.Name))
				continue
			}
			for _, c := range slices.Sorted(maps.Keys(st.Errors)) {
				blockers = append(blockers, fmt.Sprintf("meshd node %s: %s failing: %s", n.Name, c, registry.Printable(st.Errors[c])))
			}
			for _, peer := range slices.Sorted(maps.Keys(n.Handshakes)) {
				switch n.Handshakes[peer] {
				case hsStale:
					blockers = append(blockers, fmt.Sprintf("meshd node %s has no recent handshake with %s (UDP port open both ways? key in the lease current?)", n.Name, peer))
				case hsUnknown:
					blockers = append(blockers, fmt.Sprintf("meshd node %s: handshake with %s unknown (no overlay status, or too many stale peers to list)", n.Name, peer))
				}
			}
		}
	}
	for _, p := range snap.Problems {
		if strings.HasPrefix(p.Key, registry.FlannelPrefix) {
			blockers = append(blockers, fmt.Sprintf("invalid flannel key %s: %s", registry.Printable(p.Key), registry.Printable(p.Err)))
		}
	}
	for _, s := range rep.StaleLeases {
		blockers = append(blockers, fmt.Sprintf("stale flannel lease %s: %s", s.Subnet, s.Reason))
	}
	switch {
	case len(blockers) > 0:
		return blockers, "fix the blockers, then run meshctl migrate status again"
	case flannel == 0:
		return nil, "every node runs meshd: apply least-privilege etcd roles (meshctl etcd roles apply) and remove flannel's config key once no rollback is wanted (docs/migration.md)"
	case nextFlannel != "":
		return nil, fmt.Sprintf("migrate the next flannel node, e.g. %s (docs/migration.md, step 3)", nextFlannel)
	}
	return nil, "the remaining flannel leases name no node entry: register those nodes or delete their leases"
}

func printMigration(e *env, rep migrateReport) {
	fmt.Fprintf(e.Stdout, "cluster revision %d\n", rep.Revision)
	t := newTable(e.Stdout)
	fmt.Fprintln(t, "NODE\tMODE\tIPV4\tSUBNET\tFLANNEL PEERS (handshake)")
	for _, n := range rep.Nodes {
		hs := "-"
		if n.Mode == modeFlannel {
			hs = "is peer " + n.Peer
		} else if len(n.Handshakes) > 0 {
			var parts []string
			for _, p := range slices.Sorted(maps.Keys(n.Handshakes)) {
				parts = append(parts, p+"="+n.Handshakes[p])
			}
			hs = strings.Join(parts, " ")
		}
		fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%s\n", registry.Printable(n.Name), n.Mode, orDash(n.IPv4), orDash(n.Subnet), hs)
	}
	t.Flush()
	for _, s := range rep.StaleLeases {
		fmt.Fprintf(e.Stdout, "stale lease %s: %s\n", s.Subnet, s.Reason)
	}
	for _, b := range rep.Blockers {
		fmt.Fprintf(e.Stdout, "BLOCKED: %s\n", b)
	}
	fmt.Fprintf(e.Stdout, "next: %s\n", rep.Next)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
