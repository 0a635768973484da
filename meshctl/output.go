package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"text/tabwriter"
	"time"

	"github.com/spf13/pflag"
	clientv3 "go.etcd.io/etcd/client/v3"
	"sigs.k8s.io/yaml"

	"github.com/meshd/meshd/pkg/registry"
)

// Output formats of -o/--output, kubectl's names: table (the default),
// wide (the table with more columns), json and yaml (every field, for
// scripts; yaml is the json document in YAML, same field names).
var outputFormats = []string{"table", "wide", "json", "yaml"}

const outputUsage = "output format: table, wide, json or yaml"

// outputFlag adds -o/--output to a command that prints data.
func outputFlag(fs *pflag.FlagSet) *string {
	return fs.StringP("output", "o", "table", outputUsage)
}

func checkOutput(o string) error {
	if !slices.Contains(outputFormats, o) {
		return usagef("--output %q: want table, wide, json or yaml", o)
	}
	return nil
}

// isData reports whether o prints the data itself (json, yaml) rather
// than a table.
func isData(o string) bool { return o == "json" || o == "yaml" }

// printData prints v as json or yaml.
func printData(w io.Writer, o string, v any) error {
	if o == "yaml" {
		b, err := yaml.Marshal(v)
		if err != nil {
			return err
		}
		_, err = w.Write(b)
		return err
	}
	return printJSON(w, v)
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func newTable(w io.Writer) *tabwriter.Writer {
	return tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
}

// waitFlags adds --wait and --timeout to a registration command.
type waitFlags struct {
	wait    bool
	timeout time.Duration
}

func addWaitFlags(fs *pflag.FlagSet) *waitFlags {
	w := &waitFlags{}
	fs.BoolVar(&w.wait, "wait", false, "return only when every live node has applied the change")
	fs.DurationVar(&w.timeout, "timeout", 60*time.Second, "how long --wait waits before failing (exit 3) naming the nodes that lag")
	return w
}

// waitFor waits, if asked, until nodes (nil: every live meshd node) have
// applied rev.
func (w *waitFlags) waitFor(ctx context.Context, e *env, cli *clientv3.Client, rev int64, nodes []string) error {
	if !w.wait {
		return nil
	}
	wctx, cancel := context.WithTimeout(ctx, w.timeout)
	defer cancel()
	start := time.Now()
	err := registry.WaitApplied(wctx, cli, rev, nodes)
	if errors.Is(err, registry.ErrLagging) {
		return fmt.Errorf("%w after %v: %w", errTimeout, w.timeout, err)
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(e.Stderr, "applied by every node in %v (revision %d)\n", time.Since(start).Round(time.Millisecond), rev)
	return nil
}

// reqCtx bounds one etcd request.
func (e *env) reqCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, e.Timeout)
}

// readSnapshot returns the etcd client and the cluster as one snapshot.
func (e *env) readSnapshot(ctx context.Context) (*clientv3.Client, *registry.Snapshot, error) {
	cli, err := e.etcd()
	if err != nil {
		return nil, nil, err
	}
	rctx, cancel := e.reqCtx(ctx)
	defer cancel()
	snap, err := registry.ReadSnapshot(rctx, cli)
	if err != nil {
		return nil, nil, err
	}
	return cli, snap, nil
}
