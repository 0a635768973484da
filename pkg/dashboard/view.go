// Package dashboard serves `meshctl dashboard`: one web page showing the
// mesh as it is, updated live from an etcd watch through server-sent
// events. The view is computed purely from a registry snapshot (Build);
// the page renders it with textContent only, so no etcd text is ever
// parsed as markup.
package dashboard

import (
	"cmp"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/meshd/meshd/pkg/overlay"
	"github.com/meshd/meshd/pkg/registry"
)

// View is what the page shows, sent as JSON on every change.
type View struct {
	Revision int64       `json:"revision"`
	At       time.Time   `json:"at"`
	Since    time.Time   `json:"since"` // when this dashboard started watching
	Nodes    []NodeView  `json:"nodes"`
	Peers    PeerMatrix  `json:"peers"`
	Groups   []GroupView `json:"groups"`
	Problems []Problem   `json:"problems"`
}

// NodeView is one node's row.
type NodeView struct {
	Name       string          `json:"name"`
	Up         bool            `json:"up"`
	Lease      string          `json:"lease,omitempty"`
	Applied    int64           `json:"applied"`
	Seen       int64           `json:"seen"`
	Lagging    bool            `json:"lagging,omitempty"`
	Version    string          `json:"version,omitempty"`
	Components []ComponentView `json:"components,omitempty"`
	UpdatedAt  *time.Time      `json:"updatedAt,omitempty"`
}

// ComponentView is one component of a node: its error, if failing.
type ComponentView struct {
	Name  string `json:"name"`
	Error string `json:"error,omitempty"`
}

// Peer matrix cell states, row node's view of column node.
const (
	CellSelf    = "self"
	CellUp      = "up"      // a handshake within overlay.RecentHandshake
	CellStale   = "stale"   // listed in the row node's Stale peers
	CellUnknown = "unknown" // the row node's status cannot tell
)

// PeerMatrix is the handshake grid: Cells[i][j] is Nodes[i]'s view of
// Nodes[j]. Of a cluster larger than MaxMatrixNodes it holds only the
// nodes whose row or column is not all up (at most MaxMatrixNodes of
// them), and Total says how many there are in all.
type PeerMatrix struct {
	Nodes []string   `json:"nodes"`
	Cells [][]string `json:"cells"`
	Total int        `json:"total"`
}

// MaxMatrixNodes bounds the matrix, whose size grows with the square of
// the cluster: beyond it a grid is neither small to send nor readable.
const MaxMatrixNodes = 64

// GroupView is one app group.
type GroupView struct {
	Group string    `json:"group"`
	Apps  []AppView `json:"apps"`
	// Consumers are the live nodes consuming the group (their HAProxy has
	// a listener for each of its apps).
	Consumers []string `json:"consumers"`
}

// AppView is one app and its instances.
type AppView struct {
	Name      string         `json:"name"`
	Port      int            `json:"port,omitempty"`
	Instances []InstanceView `json:"instances"`
}

// InstanceView is one instance; Down means its node has no lease, or it
// was registered earlier in this dashboard's run and has been withdrawn.
type InstanceView struct {
	Node string `json:"node"`
	Addr string `json:"addr,omitempty"`
	Down bool   `json:"down,omitempty"`
}

// Problem is one thing wrong, with when this dashboard first saw it.
type Problem struct {
	Kind    string    `json:"kind"`
	Subject string    `json:"subject"`
	Detail  string    `json:"detail,omitempty"`
	Since   time.Time `json:"since"`
}

// Problem kinds.
const (
	KindNodeDown     = "node down"
	KindRejectedKey  = "rejected key"
	KindComponent    = "component failing"
	KindStale        = "stale handshakes"
	KindLagging      = "node lagging"
	KindInstanceDown = "instance down"
)

// maxText bounds every etcd-sourced string in the view.
const maxText = 300

// memory is what the dashboard remembers between snapshots: when each
// problem was first seen, and the nodes and instances seen so far (so a
// node or instance that vanished shows as down rather than not at all).
type memory struct {
	started   time.Time
	problems  map[string]time.Time
	nodes     map[string]bool
	instances map[registry.AppID]map[string]string // app -> node -> addr
}

func newMemory(now time.Time) *memory {
	return &memory{started: now, problems: map[string]time.Time{}, nodes: map[string]bool{},
		instances: map[registry.AppID]map[string]string{}}
}

// text makes etcd text safe to carry: control characters escaped, length
// bounded. It is still untrusted: the page sets it as text, never markup.
func text(s string) string {
	s = registry.Printable(s)
	if len(s) > maxText {
		s = strings.ToValidUTF8(s[:maxText], "") + "…"
	}
	return s
}

// Build computes the view of snap. It updates mem (first-seen times,
// nodes and instances seen) and is otherwise pure.
func Build(snap *registry.Snapshot, mem *memory, now time.Time) View {
	v := View{Revision: snap.Revision, At: now, Since: mem.started, Nodes: []NodeView{},
		Groups: []GroupView{}, Problems: []Problem{}}
	var probs []Problem
	problem := func(kind, subject, detail string) {
		probs = append(probs, Problem{Kind: kind, Subject: subject, Detail: detail})
	}

	order := snap.KnownNodes(slices.Collect(maps.Keys(mem.nodes))...)
	overlays := map[string]*overlay.Status{}
	for _, name := range order {
		mem.nodes[name] = true
		nv := NodeView{Name: text(name)}
		if nd, ok := snap.Nodes[name]; ok {
			nv.Up = true
			if nd.Lease != 0 {
				nv.Lease = fmt.Sprintf("%x", nd.Lease)
			}
		} else {
			problem(KindNodeDown, nv.Name, "no live entry under /cluster/nodes")
		}
		if st, ok := snap.Statuses[name]; ok {
			nv.Applied, nv.Seen, nv.Version = st.Revision, st.Seen, text(st.Version)
			if t := st.UpdatedAt; !t.IsZero() {
				nv.UpdatedAt = &t
			}
			if st.Seen > st.Revision {
				nv.Lagging = true
				problem(KindLagging, nv.Name, fmt.Sprintf("received revision %d, applied %d", st.Seen, st.Revision))
			}
			comps := map[string]bool{}
			for c := range st.Components {
				comps[c] = true
			}
			for c := range st.Errors {
				comps[c] = true
			}
			for _, c := range slices.Sorted(maps.Keys(comps)) {
				cv := ComponentView{Name: text(c), Error: text(st.Errors[c])}
				if cv.Error != "" {
					problem(KindComponent, nv.Name+" "+cv.Name, cv.Error)
				}
				nv.Components = append(nv.Components, cv)
			}
			if raw, ok := st.Components["overlay"]; ok {
				var os overlay.Status
				if json.Unmarshal(raw, &os) == nil {
					overlays[name] = &os
					if os.Peers.StaleCount > 0 {
						stale := make([]string, len(os.Peers.Stale))
						for i, s := range os.Peers.Stale {
							stale[i] = text(s)
						}
						problem(KindStale, nv.Name, fmt.Sprintf("%d of %d peers without a handshake for %v: %s",
							os.Peers.StaleCount, os.Peers.Count, overlay.RecentHandshake, strings.Join(stale, ", ")))
					}
				}
			}
		}
		v.Nodes = append(v.Nodes, nv)
	}
	v.Peers = peerMatrix(order, snap, overlays)

	for _, p := range snap.Problems {
		problem(KindRejectedKey, text(p.Key), text(cmp.Or(p.Reason, "invalid")+": "+p.Err))
	}
	v.Groups = groups(snap, mem, problem)

	// First-seen times: a problem keeps its start while it lasts.
	keep := map[string]time.Time{}
	for i := range probs {
		id := probs[i].Kind + "\x00" + probs[i].Subject
		since, ok := mem.problems[id]
		if !ok {
			since = now
		}
		keep[id] = since
		probs[i].Since = since
	}
	mem.problems = keep
	slices.SortStableFunc(probs, func(a, b Problem) int {
		return cmp.Or(a.Since.Compare(b.Since), cmp.Compare(a.Kind, b.Kind), cmp.Compare(a.Subject, b.Subject))
	})
	v.Problems = append(v.Problems, probs...)
	return v
}

// peerMatrix reads each node's overlay summary. A row node with no
// status says nothing ("unknown"). A peer listed in its Stale names is
// stale. A peer not listed is up only when the list is complete
// (StaleCount == len(Stale)) and the node has as many peers as there are
// other members; otherwise it may be one of the unlisted stale peers, or
// not configured yet: "unknown".
func peerMatrix(order []string, snap *registry.Snapshot, overlays map[string]*overlay.Status) PeerMatrix {
	var nodes []string
	for _, n := range order {
		if _, member := snap.Members[n]; member || overlays[n] != nil {
			nodes = append(nodes, n)
		}
	}
	others := len(snap.Members)
	cell := func(row, col string) string {
		os := overlays[row]
		_, rowMember := snap.Members[row]
		switch {
		case row == col:
			return CellSelf
		case os == nil:
			return CellUnknown
		case slices.Contains(os.Peers.Stale, col):
			return CellStale
		case os.Peers.StaleCount == len(os.Peers.Stale) && rowMember && os.Peers.Count >= others-1 &&
			os.Peers.Recent == os.Peers.Count-os.Peers.StaleCount:
			return CellUp
		}
		return CellUnknown
	}
	m := PeerMatrix{Total: len(nodes)}
	if len(nodes) > MaxMatrixNodes {
		// Keep the nodes that take part in a cell that is not up.
		bad := map[string]bool{}
		for _, row := range nodes {
			os := overlays[row]
			if os == nil || os.Peers.StaleCount > len(os.Peers.Stale) || os.Peers.Recent != os.Peers.Count-os.Peers.StaleCount {
				bad[row] = true
			}
			if os != nil {
				for _, s := range os.Peers.Stale {
					bad[row], bad[s] = true, true
				}
			}
		}
		var keep []string
		for _, n := range nodes {
			if bad[n] && len(keep) < MaxMatrixNodes {
				keep = append(keep, n)
			}
		}
		nodes = keep
	}
	m.Nodes, m.Cells = make([]string, len(nodes)), make([][]string, len(nodes))
	for i, row := range nodes {
		m.Nodes[i] = text(row)
		m.Cells[i] = make([]string, len(nodes))
		for j, col := range nodes {
			m.Cells[i][j] = cell(row, col)
		}
	}
	return m
}

// groups lists the apps by group, with their consumers and instances.
func groups(snap *registry.Snapshot, mem *memory, problem func(kind, subject, detail string)) []GroupView {
	byGroup := map[registry.Group][]*registry.App{}
	for id, a := range snap.Apps {
		byGroup[id.Group] = append(byGroup[id.Group], a)
	}
	// Forget instances of apps that are gone.
	for id := range mem.instances {
		if _, ok := snap.Apps[id]; !ok {
			delete(mem.instances, id)
		}
	}
	var out []GroupView
	for _, g := range slices.Sorted(maps.Keys(byGroup)) {
		gv := GroupView{Group: text(string(g)), Consumers: []string{}}
		for _, name := range slices.Sorted(maps.Keys(snap.Nodes)) {
			if slices.Contains(snap.Nodes[name].Services, g) {
				gv.Consumers = append(gv.Consumers, text(name))
			}
		}
		apps := byGroup[g]
		slices.SortFunc(apps, func(a, b *registry.App) int { return cmp.Compare(a.ID.Name, b.ID.Name) })
		for _, a := range apps {
			av := AppView{Name: text(a.ID.Name), Instances: []InstanceView{}}
			if a.Meta != nil {
				av.Port = a.Meta.Publish.Port
			}
			seen := mem.instances[a.ID]
			if seen == nil {
				seen = map[string]string{}
				mem.instances[a.ID] = seen
			}
			for _, in := range a.SortedInstances() {
				seen[in.Node] = in.Addr().String()
			}
			for _, node := range slices.Sorted(maps.Keys(seen)) {
				iv := InstanceView{Node: text(node), Addr: seen[node]}
				_, live := a.Instances[node]
				_, nodeUp := snap.Nodes[node]
				if !live || !nodeUp {
					iv.Down = true
					why := "withdrawn (its lease expired or its check failed)"
					if live {
						why = "its node has no live entry"
					}
					problem(KindInstanceDown, gv.Group+"/"+av.Name+" on "+iv.Node, why)
				}
				av.Instances = append(av.Instances, iv)
			}
			gv.Apps = append(gv.Apps, av)
		}
		out = append(out, gv)
	}
	return out
}
