package main

import (
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/meshd/meshd/pkg/creds"
	"github.com/meshd/meshd/pkg/haproxycfg"
	"github.com/meshd/meshd/pkg/overlay"
	"github.com/meshd/meshd/pkg/registry"
)

// The states a node can be in, as `meshctl status` shows them.
const (
	stateUp        = "up"
	stateStarting  = "starting"  // leased entry, nothing applied yet
	stateFailing   = "FAILING"   // a component fails
	stateDown      = "DOWN"      // no leased entry: meshd is not running there
	stateUnmanaged = "unmanaged" // an entry without lease and without meshd (nix-infra's)
)

// statusRow is one node as `meshctl status` shows it.
type statusRow struct {
	Node  string `json:"node"`
	State string `json:"state"`
	Live  bool   `json:"live"`
	Lease string `json:"lease,omitempty"`
	// Revision is the newest revision the node applied; Seen the newest it
	// received; Behind how many revisions that concern it (writes to
	// /cluster/ and to its own secrets) it has not applied.
	Revision  int64      `json:"revision"`
	Seen      int64      `json:"seen"`
	Behind    int64      `json:"behind"`
	UpdatedAt *time.Time `json:"updatedAt,omitempty"`
	// LastSeen, for a node that is not up, is when it was last known up:
	// its clean stop, or else its last registration (LastSeenAs says
	// which). Nil when nothing recorded it.
	LastSeen   *time.Time        `json:"lastSeen,omitempty"`
	LastSeenAs string            `json:"lastSeenAs,omitempty"`
	Version    string            `json:"version,omitempty"`
	Errors     map[string]string `json:"errors,omitempty"`
	// Problems counts the registry keys the node rejected as invalid.
	Problems int `json:"problems,omitempty"`
	// Issues names what is wrong, one line each.
	Issues     []string                   `json:"issues,omitempty"`
	Components map[string]json.RawMessage `json:"components,omitempty"`
	failing    bool
}

type statusOut struct {
	Revision int64              `json:"revision"`
	Nodes    []statusRow        `json:"nodes"`
	Problems []registry.Problem `json:"problems,omitempty"`
	// Down and Failing count the nodes in those states: either makes the
	// command exit 1.
	Down    int `json:"down"`
	Failing int `json:"failing"`
}

// keyRevs are the revisions of one key that exists now.
type keyRevs struct{ Mod, Create int64 }

// statusInput is everything the view is computed from, read at one
// revision.
type statusInput struct {
	Snap *registry.Snapshot
	Seen map[string]registry.Seen
	// Cluster holds the revisions of every key under /cluster/ and
	// Secrets those of each node's secrets: the keys a node reads.
	Cluster []keyRevs
	Secrets map[string][]keyRevs
	// CountThen is, per node, how many keys it reads existed at the
	// revision it applied (absent: unknown, e.g. compacted).
	CountThen map[string]int64
	// Problems are presence records that did not decode.
	Problems []registry.Problem
}

// behind counts the revisions after applied that changed a key the node
// reads: the distinct revisions of keys written since, plus one per key
// deleted since (countThen < 0: deletions unknown). Writes that do not
// concern the node (other nodes' status, other nodes' secrets) never
// count, so two converged nodes are 0 behind.
func behind(applied int64, now []keyRevs, countThen int64) int64 {
	revs := map[int64]bool{}
	created := int64(0)
	for _, k := range now {
		if k.Mod > applied {
			revs[k.Mod] = true
		}
		if k.Create > applied {
			created++
		}
	}
	n := int64(len(revs))
	if countThen >= 0 {
		if deleted := countThen + created - int64(len(now)); deleted > 0 {
			n += deleted
		}
	}
	return n
}

// nodeKeys returns the revisions of the keys node reads.
func (in statusInput) nodeKeys(node string) []keyRevs {
	return append(slices.Clip(in.Cluster), in.Secrets[node]...)
}

// buildStatus computes the view: every node any record names, its state
// and what is wrong with it.
func buildStatus(in statusInput) statusOut {
	snap := in.Snap
	so := statusOut{Revision: snap.Revision, Nodes: []statusRow{}, Problems: append(slices.Clip(snap.Problems), in.Problems...)}
	for _, n := range snap.KnownNodes(slices.Collect(maps.Keys(in.Seen))...) {
		r := statusRow{Node: n}
		nd, hasEntry := snap.Nodes[n]
		st, hasStatus := snap.Statuses[n]
		if hasEntry {
			r.Live = true
			if nd.Lease != 0 {
				r.Lease = fmt.Sprintf("%x", nd.Lease)
			}
		}
		if hasStatus {
			r.Revision, r.Seen, r.Version, r.Errors, r.Problems, r.Components = st.Revision, st.Seen, st.Version, st.Errors, st.Problems, st.Components
			countThen := int64(-1)
			if c, ok := in.CountThen[n]; ok {
				countThen = c
			}
			r.Behind = behind(st.Revision, in.nodeKeys(n), countThen)
			t := st.UpdatedAt
			r.UpdatedAt = &t
			r.Issues, r.failing = issuesOf(st)
		}
		switch {
		case !hasEntry:
			r.State = stateDown
			r.Live = false
			if s, ok := in.Seen[n]; ok {
				if s.StoppedAt.After(s.RegisteredAt) {
					r.LastSeen, r.LastSeenAs = &s.StoppedAt, "stopped"
				} else if !s.RegisteredAt.IsZero() {
					r.LastSeen, r.LastSeenAs = &s.RegisteredAt, "registered"
				}
			}
			so.Down++
		case nd.Lease == 0:
			r.State = stateUnmanaged
		case r.failing:
			r.State = stateFailing
			so.Failing++
		case !hasStatus || st.Revision == 0:
			r.State = stateStarting
		default:
			r.State = stateUp
		}
		so.Nodes = append(so.Nodes, r)
	}
	return so
}

// maxIssueList bounds the names listed in one issue.
const maxIssueList = 4

// listSome joins at most maxIssueList names, saying how many more there
// are out of total.
func listSome(names []string, total int) string {
	shown := names[:min(len(names), maxIssueList)]
	s := strings.Join(shown, ", ")
	if total > len(shown) {
		s += fmt.Sprintf(" and %d more", total-len(shown))
	}
	return s
}

// issuesOf names what is wrong in a node's status. failing is true when
// a component fails (an apply error, a component's own error, a secret
// not delivered); the other issues (stale handshakes, skipped keys) are
// reported without failing the node.
func issuesOf(st registry.Status) (issues []string, failing bool) {
	add := func(fail bool, format string, a ...any) {
		issues = append(issues, fmt.Sprintf(format, a...))
		failing = failing || fail
	}
	for _, name := range sortedKeys(st.Errors) {
		add(true, "%s failing: %s", name, st.Errors[name])
	}
	if raw, ok := st.Components["overlay"]; ok {
		var o overlay.Status
		if err := json.Unmarshal(raw, &o); err != nil {
			add(false, "overlay status unreadable: %v", err)
		} else {
			if o.LastError != "" && st.Errors["overlay"] == "" {
				add(true, "overlay failing: %s", o.LastError)
			}
			if o.Waiting {
				add(false, "overlay waiting for its member record")
			}
			if n := o.Peers.StaleCount; n > 0 {
				add(false, "%d of %d peers without a handshake for %v: %s", n, o.Peers.Count, overlay.RecentHandshake, listSome(o.Peers.Stale, n))
			}
			if o.ProblemCount > 0 {
				var ms []string
				for _, p := range o.Problems {
					ms = append(ms, p.Member+" ("+p.Err+")")
				}
				add(false, "overlay skipped %d member(s): %s", o.ProblemCount, listSome(ms, o.ProblemCount))
			}
			if o.CacheError != "" {
				add(false, "overlay cache not written: %s", o.CacheError)
			}
		}
	}
	if raw, ok := st.Components["haproxy"]; ok {
		var h haproxycfg.Status
		if err := json.Unmarshal(raw, &h); err != nil {
			add(false, "haproxy status unreadable: %v", err)
		} else {
			if h.LastError != "" && st.Errors["haproxy"] == "" {
				add(true, "haproxy failing: %s", h.LastError)
			}
			if h.RejectedHash != "" {
				add(false, "haproxy rejected config %s", h.RejectedHash)
			}
			if len(h.Problems) > 0 {
				var ps []string
				for _, p := range h.Problems {
					ps = append(ps, strings.TrimSpace(p.App+" "+p.Reason))
				}
				add(false, "haproxy skipped %d: %s", len(ps), listSome(ps, len(ps)))
			}
		}
	}
	if raw, ok := st.Components["creds"]; ok {
		var c creds.Status
		if err := json.Unmarshal(raw, &c); err != nil {
			add(false, "creds status unreadable: %v", err)
		} else {
			for _, name := range sortedKeys(c.Errors) {
				add(true, "secret %s failed: %s", name, c.Errors[name])
			}
		}
	}
	if st.Problems > 0 {
		add(false, "%d registry key(s) rejected as invalid", st.Problems)
	}
	return issues, failing
}

// ago renders how long before now t was, in whole seconds.
func ago(now, t time.Time) string {
	d := max(now.Sub(t), 0)
	return d.Round(time.Second).String() + " ago"
}

// printStatusTable writes the table; wide adds the lease, the newest
// revision seen and the meshd version. Every string that comes from etcd
// goes through registry.Printable.
func printStatusTable(w io.Writer, so statusOut, now time.Time, wide bool) error {
	fmt.Fprintf(w, "cluster revision %d\n", so.Revision)
	t := newTable(w)
	fmt.Fprint(t, "NODE\tSTATE\tAPPLIED\tBEHIND\tUPDATED\tLAST SEEN")
	if wide {
		fmt.Fprint(t, "\tLEASE\tSEEN\tVERSION")
	}
	fmt.Fprintln(t, "\tPROBLEMS")
	for _, r := range so.Nodes {
		applied, behindS, updated, seen := "-", "-", "-", "-"
		if r.UpdatedAt != nil {
			applied, behindS, updated = fmt.Sprint(r.Revision), fmt.Sprint(r.Behind), ago(now, *r.UpdatedAt)
		}
		if r.LastSeen != nil {
			seen = r.LastSeenAs + " " + ago(now, *r.LastSeen)
		} else if r.State == stateDown {
			seen = "unknown"
		}
		fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%s\t%s", registry.Printable(r.Node), r.State, applied, behindS, updated, seen)
		if wide {
			seenRev := "-"
			if r.UpdatedAt != nil {
				seenRev = fmt.Sprint(r.Seen)
			}
			fmt.Fprintf(t, "\t%s\t%s\t%s", dash(r.Lease), seenRev, dash(registry.Printable(r.Version)))
		}
		fmt.Fprintf(t, "\t%s\n", dash(registry.Printable(strings.Join(r.Issues, "; "))))
	}
	if err := t.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(w, "UPDATED is the node's last status change; per-peer WireGuard detail stays on each node: GET /status/peers and meshd_wireguard_peer_* on its metricsAddr (docs/overlay.md)")
	if len(so.Problems) > 0 {
		fmt.Fprintf(w, "\n%d invalid registry key(s) skipped:\n", len(so.Problems))
		for _, p := range so.Problems {
			fmt.Fprintf(w, "  %s: %s\n", registry.Printable(p.Key), registry.Printable(p.Err))
		}
	}
	if so.Down > 0 || so.Failing > 0 {
		fmt.Fprintf(w, "\n%d node(s) down, %d failing\n", so.Down, so.Failing)
	}
	return nil
}
