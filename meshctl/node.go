package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/meshd/meshd/pkg/registry"
)

// nodeRow is one node as `node list` shows it.
type nodeRow struct {
	Name      string           `json:"name"`
	IPv4      string           `json:"ipv4"`
	Services  []registry.Group `json:"services"`
	Live      bool             `json:"live"`
	Meshd     bool             `json:"meshd"`
	Subnet    string           `json:"subnet,omitempty"`
	OverlayIP string           `json:"overlayIp,omitempty"`
	PublicKey string           `json:"publicKey,omitempty"`
	Endpoint  string           `json:"endpoint,omitempty"`
}

func nodeRows(snap *registry.Snapshot) []nodeRow {
	names := map[string]bool{}
	for n := range snap.Nodes {
		names[n] = true
	}
	for n := range snap.Members {
		names[n] = true
	}
	var rows []nodeRow
	for _, n := range sortedKeys(names) {
		r := nodeRow{Name: n}
		if nd, ok := snap.Nodes[n]; ok {
			r.IPv4, r.Services, r.Live, r.Meshd = nd.IPv4, nd.Services, true, nd.Meshd != nil
		}
		if m, ok := snap.Members[n]; ok {
			r.Subnet, r.OverlayIP, r.PublicKey, r.Endpoint = m.Subnet.String(), m.OverlayIP.String(), m.PublicKey, m.Endpoint
			r.Meshd = true
		}
		rows = append(rows, r)
	}
	return rows
}

func nodeList(ctx context.Context, e *env, args []string) error {
	fs := flags(e, "node list")
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
	rows := nodeRows(snap)
	if isData(*out) {
		return printData(e.Stdout, *out, rows)
	}
	wide := *out == "wide"
	t := newTable(e.Stdout)
	fmt.Fprint(t, "NAME\tLIVE\tIPV4\tSERVICES\tSUBNET\tOVERLAY IP\tENDPOINT")
	if wide {
		fmt.Fprint(t, "\tMESHD\tPUBLIC KEY")
	}
	fmt.Fprintln(t)
	for _, r := range rows {
		svc := make([]string, len(r.Services))
		for i, s := range r.Services {
			svc[i] = string(s)
		}
		fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%s\t%s\t%s", r.Name, yesNo(r.Live), dash(r.IPv4), dash(strings.Join(svc, ",")),
			dash(r.Subnet), dash(r.OverlayIP), dash(r.Endpoint))
		if wide {
			fmt.Fprintf(t, "\t%s\t%s", yesNo(r.Meshd), dash(r.PublicKey))
		}
		fmt.Fprintln(t)
	}
	return t.Flush()
}

func nodeRemove(ctx context.Context, e *env, args []string) error {
	fs := flags(e, "node remove")
	force := fs.Bool("force", false, "remove a node whose meshd is still running (it will register again unless stopped)")
	keepFlannel := fs.Bool("keep-flannel-lease", false, "leave the flannel lease of the node's subnet (a node rolled back to flanneld holds it)")
	wf := addWaitFlags(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usagef("usage: meshctl node remove NAME [--force] [--keep-flannel-lease] [--wait]")
	}
	name := fs.Arg(0)
	if err := registry.ValidName(name); err != nil {
		return usagef("node name: %w", err)
	}
	cli, snap, err := e.readSnapshot(ctx)
	if err != nil {
		return err
	}
	n, live := snap.Nodes[name]
	_, member := snap.Members[name]
	if !live && !member {
		return fmt.Errorf("no node %q in the registry", name)
	}
	if live && n.Lease != 0 && !*force {
		return fmt.Errorf("node %q is live (its meshd holds a lease): stop meshd there first, or pass --force", name)
	}
	rctx, cancel := e.reqCtx(ctx)
	defer cancel()
	deleted, err := registry.RemoveNodeWith(rctx, cli, name, registry.RemoveOptions{KeepFlannelLease: *keepFlannel})
	if err != nil {
		return err
	}
	resp, err := cli.Get(rctx, registry.NodeKey(name))
	if err != nil {
		return err
	}
	fmt.Fprintf(e.Stdout, "removed node %s (%d keys)\n", name, deleted)
	others := registry.LiveMeshdNodes(snap)
	others = removeString(others, name)
	return wf.waitFor(ctx, e, cli, resp.Header.Revision, others)
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func removeString(list []string, s string) []string {
	out := list[:0:0]
	for _, x := range list {
		if x != s {
			out = append(out, x)
		}
	}
	return out
}
