package main

import (
	"context"
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/meshd/meshd/pkg/registry"
)

// version is set at build time with -ldflags "-X main.version=..." (the
// Makefile does).
var version = "dev"

// buildInfo is meshctl's own version: the linker's version, and the VCS
// revision Go records in the binary.
type buildInfo struct {
	Version   string `json:"version"`
	Revision  string `json:"revision,omitempty"`
	Time      string `json:"time,omitempty"`
	Modified  bool   `json:"modified,omitempty"`
	GoVersion string `json:"goVersion"`
}

func (b buildInfo) String() string {
	s := b.Version
	if b.Revision != "" {
		r := b.Revision
		if len(r) > 12 {
			r = r[:12]
		}
		s += " (" + r
		if b.Modified {
			s += ", modified"
		}
		s += ")"
	}
	return s + " " + b.GoVersion
}

func clientVersion() buildInfo {
	b := buildInfo{Version: version, GoVersion: runtime.Version()}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return b
	}
	if b.Version == "dev" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		b.Version = bi.Main.Version
	}
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			b.Revision = s.Value
		case "vcs.time":
			b.Time = s.Value
		case "vcs.modified":
			b.Modified = s.Value == "true"
		}
	}
	return b
}

// nodeVersion is the meshd version a node reports in its status.
type nodeVersion struct {
	Node    string `json:"node"`
	Version string `json:"version"`
}

type versionOut struct {
	Client buildInfo     `json:"client"`
	Nodes  []nodeVersion `json:"nodes,omitempty"`
}

func cmdVersion(ctx context.Context, e *env, args []string) error {
	fs := flags(e, "version")
	clientOnly := fs.Bool("client", false, "print only meshctl's version (no etcd)")
	out := outputFlag(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return usagef("usage: meshctl version [--client] [-o json]")
	}
	if err := checkOutput(*out); err != nil {
		return err
	}
	vo := versionOut{Client: clientVersion()}
	var snapErr error
	if !*clientOnly {
		var snap *registry.Snapshot
		if _, snap, snapErr = e.readSnapshot(ctx); snapErr == nil {
			vo.Nodes = []nodeVersion{}
			for _, n := range sortedKeys(snap.Statuses) {
				vo.Nodes = append(vo.Nodes, nodeVersion{Node: n, Version: snap.Statuses[n].Version})
			}
		}
	}
	if isData(*out) {
		if err := printData(e.Stdout, *out, vo); err != nil {
			return err
		}
	} else {
		fmt.Fprintf(e.Stdout, "meshctl %s\n", vo.Client)
		if vo.Nodes != nil {
			if len(vo.Nodes) == 0 {
				fmt.Fprintln(e.Stdout, "no meshd node reports a status")
			}
			t := newTable(e.Stdout)
			if len(vo.Nodes) > 0 {
				fmt.Fprintln(t, "NODE\tMESHD")
			}
			for _, n := range vo.Nodes {
				fmt.Fprintf(t, "%s\t%s\n", n.Node, dash(registry.Printable(n.Version)))
			}
			if err := t.Flush(); err != nil {
				return err
			}
		}
	}
	if snapErr != nil {
		return fmt.Errorf("cluster unreachable, meshd versions unknown: %w", snapErr)
	}
	return nil
}
