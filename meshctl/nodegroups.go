package main

import (
	"context"
	"fmt"
	"strings"

	"github.com/meshd/meshd/pkg/creds"
	"github.com/meshd/meshd/pkg/registry"
)

// nodeGroups records which groups a node belongs to for group secrets
// (`secret put --group`). Only the operator can write this: a node's own
// entry saying it consumes a group does not make it a recipient.
func nodeGroups(ctx context.Context, e *env, args []string) error {
	fs := flags(e, "node groups")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() < 1 {
		return usagef("usage: meshctl node groups NODE [GROUP...]   (no GROUP: clear)")
	}
	node := fs.Arg(0)
	if err := registry.ValidName(node); err != nil {
		return usagef("node: %w", err)
	}
	groups, err := parseGroups(fs.Args()[1:])
	if err != nil {
		return err
	}
	cli, err := e.etcd()
	if err != nil {
		return err
	}
	rctx, cancel := e.reqCtx(ctx)
	defer cancel()
	if err := creds.SetGroups(rctx, cli, node, groups); err != nil {
		return err
	}
	if len(groups) == 0 {
		fmt.Fprintf(e.Stdout, "node %s belongs to no group for secrets\n", node)
		return nil
	}
	fmt.Fprintf(e.Stdout, "node %s receives group secrets of %s\n", node, joinGroups(groups))
	return nil
}

func parseGroups(args []string) ([]registry.Group, error) {
	var out []registry.Group
	for _, a := range args {
		g, err := registry.ParseGroup(a)
		if err != nil {
			return nil, usagef("group: %w", err)
		}
		out = append(out, g)
	}
	return out, nil
}

func joinGroups(gs []registry.Group) string {
	s := make([]string, len(gs))
	for i, g := range gs {
		s[i] = string(g)
	}
	return strings.Join(s, ", ")
}
