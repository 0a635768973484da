package main

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/meshd/meshd/pkg/registry"
)

// statusRow is one node as `meshctl status` shows it.
type statusRow struct {
	Node       string                     `json:"node"`
	Live       bool                       `json:"live"`
	Lease      string                     `json:"lease,omitempty"`
	Revision   int64                      `json:"revision"`
	Seen       int64                      `json:"seen"`
	Behind     int64                      `json:"behind"`
	UpdatedAt  *time.Time                 `json:"updatedAt,omitempty"`
	Version    string                     `json:"version,omitempty"`
	Errors     map[string]string          `json:"errors,omitempty"`
	Problems   int                        `json:"problems,omitempty"`
	Components map[string]json.RawMessage `json:"components,omitempty"`
}

type statusOut struct {
	Revision int64              `json:"revision"`
	Nodes    []statusRow        `json:"nodes"`
	Problems []registry.Problem `json:"problems,omitempty"`
}

func cmdStatus(ctx context.Context, e *env, args []string) error {
	fs := flags(e, "status")
	out := outputFlag(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := checkOutput(*out); err != nil {
		return err
	}
	_, snap, err := e.readSnapshot(ctx)
	if err != nil {
		return err
	}
	so := statusOut{Revision: snap.Revision, Nodes: []statusRow{}, Problems: snap.Problems}
	names := map[string]bool{}
	for n := range snap.Nodes {
		names[n] = true
	}
	for n := range snap.Statuses {
		names[n] = true
	}
	for _, n := range sortedKeys(names) {
		r := statusRow{Node: n}
		if nd, ok := snap.Nodes[n]; ok {
			r.Live = true
			if nd.Lease != 0 {
				r.Lease = fmt.Sprintf("%x", nd.Lease)
			}
		}
		if st, ok := snap.Statuses[n]; ok {
			r.Revision, r.Seen, r.Version, r.Errors, r.Problems, r.Components = st.Revision, st.Seen, st.Version, st.Errors, st.Problems, st.Components
			r.Behind = snap.Revision - st.Revision
			t := st.UpdatedAt
			r.UpdatedAt = &t
		}
		so.Nodes = append(so.Nodes, r)
	}
	if isData(*out) {
		return printData(e.Stdout, *out, so)
	}
	wide := *out == "wide"
	fmt.Fprintf(e.Stdout, "cluster revision %d\n", snap.Revision)
	t := newTable(e.Stdout)
	fmt.Fprint(t, "NODE\tLIVE\tLEASE\tAPPLIED\tSEEN\tUPDATED\tCOMPONENTS\tERRORS")
	if wide {
		fmt.Fprint(t, "\tVERSION")
	}
	fmt.Fprintln(t)
	for _, r := range so.Nodes {
		updated := "-"
		if r.UpdatedAt != nil {
			updated = time.Since(*r.UpdatedAt).Round(time.Second).String() + " ago"
		}
		applied, seen := "-", "-"
		if r.UpdatedAt != nil {
			applied, seen = fmt.Sprint(r.Revision), fmt.Sprint(r.Seen)
		}
		fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s", r.Node, yesNo(r.Live), dash(r.Lease), applied, seen, updated,
			dash(summarize(r.Components)), dash(errorsLine(r.Errors)))
		if wide {
			fmt.Fprintf(t, "\t%s", dash(registry.Printable(r.Version)))
		}
		fmt.Fprintln(t)
	}
	if err := t.Flush(); err != nil {
		return err
	}
	fmt.Fprintln(e.Stdout, "UPDATED is the last change; per-peer WireGuard detail stays on each node: GET /status/peers and meshd_wireguard_peer_* on its metricsAddr (docs/overlay.md)")
	if len(snap.Problems) > 0 {
		fmt.Fprintf(e.Stdout, "\n%d invalid registry key(s) skipped by every node:\n", len(snap.Problems))
		for _, p := range snap.Problems {
			fmt.Fprintf(e.Stdout, "  %q: %s\n", p.Key, p.Err)
		}
	}
	return nil
}

// summarize shows a few numbers each component reports, whatever they are:
// integer fields at the top level of its status.
func summarize(c map[string]json.RawMessage) string {
	var parts []string
	for _, name := range sortedKeys(c) {
		var m map[string]any
		if json.Unmarshal(c[name], &m) != nil {
			continue
		}
		var nums []string
		for _, k := range sortedKeys(m) {
			if f, ok := m[k].(float64); ok && f == float64(int64(f)) {
				nums = append(nums, fmt.Sprintf("%s=%d", k, int64(f)))
			}
		}
		if len(nums) > 3 {
			nums = nums[:3]
		}
		parts = append(parts, name+"("+strings.Join(nums, ",")+")")
	}
	return strings.Join(parts, " ")
}

func errorsLine(errs map[string]string) string {
	var parts []string
	for k, v := range errs {
		parts = append(parts, k+": "+v)
	}
	slices.Sort(parts)
	return strings.Join(parts, "; ")
}
