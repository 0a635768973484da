package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/creds"
	"github.com/meshd/meshd/pkg/registry"
)

// targetFlags adds --node, --group and --all.
type targetFlags struct {
	nodes []string
	group string
	all   bool
}

func addTargetFlags(fs *pflag.FlagSet) *targetFlags {
	t := &targetFlags{}
	fs.StringSliceVar(&t.nodes, "node", nil, "seal to this node (repeatable, or comma-separated)")
	fs.StringVar(&t.group, "group", "", "seal to every node the operator assigned to this group with meshctl node groups (frontends, backends, services)")
	fs.BoolVar(&t.all, "all", false, "seal to every meshd member")
	return t
}

func (t *targetFlags) targets() (creds.Targets, error) {
	tg := creds.Targets{Nodes: t.nodes, Group: registry.Group(t.group), All: t.all}
	if err := tg.Validate(); err != nil {
		return creds.Targets{}, usageError{err}
	}
	return tg, nil
}

// errDryRun stops a put after the recipients were shown.
var errDryRun = errors.New("dry run: nothing sealed")

// showRecipients prints who a secret is about to be sealed to, before
// anything is sealed; with dry set it then stops the put.
func showRecipients(e *env, name string, dry bool) func([]string) error {
	return func(nodes []string) error {
		fmt.Fprintf(e.Stderr, "sealing %s to %d node(s): %s\n", name, len(nodes), strings.Join(nodes, ", "))
		if dry {
			return errDryRun
		}
		return nil
	}
}

func secretPut(ctx context.Context, e *env, args []string) error {
	fs := flags(e, "secret put")
	tf := addTargetFlags(fs)
	from := fs.String("from-file", "", "read the value from this file (default: standard input, byte for byte)")
	dry := fs.Bool("dry-run", false, "show the recipients and stop without sealing")
	wf := addWaitFlags(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usagef("usage: meshctl secret put NAME (--node N... | --group G | --all) [--from-file F] [--wait]")
	}
	name := fs.Arg(0)
	if err := registry.ValidName(name); err != nil {
		return usagef("secret name: %w", err)
	}
	tg, err := tf.targets()
	if err != nil {
		return err
	}
	tg.Confirm = showRecipients(e, name, *dry)
	value, err := readValue(e, *from)
	if err != nil {
		return err
	}
	defer clear(value)
	cli, err := e.etcd()
	if err != nil {
		return err
	}
	return putOne(ctx, e, cli, name, value, tg, wf)
}

// putOne seals and writes one secret, reports it, and waits if asked.
func putOne(ctx context.Context, e *env, cli *clientv3.Client, name string, value []byte, tg creds.Targets, wf *waitFlags) error {
	rctx, cancel := e.reqCtx(ctx)
	res, err := creds.PutSecret(rctx, cli, name, value, tg)
	cancel()
	if errors.Is(err, errDryRun) {
		fmt.Fprintln(e.Stdout, "dry run: nothing sealed")
		return nil
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(e.Stdout, "secret %s version %d sealed to %s (revision %d)\n", name, res.Version, strings.Join(res.Nodes, ", "), res.Revision)
	if len(res.Unassigned) > 0 {
		fmt.Fprintf(e.Stderr, "warning: not sealed to %s: their entries claim group %s but the operator never assigned it (meshctl node groups NODE %s)\n",
			strings.Join(res.Unassigned, ", "), tg.Group, tg.Group)
	}
	if len(res.Skipped) > 0 {
		fmt.Fprintf(e.Stderr, "warning: skipped nodes without a sealing recipient: %s\n", strings.Join(res.Skipped, ", "))
	}
	if len(res.Others) > 0 {
		fmt.Fprintf(e.Stderr, "warning: %s still hold an older version of %s (include them, or meshctl secret rm %s --node ...)\n",
			strings.Join(res.Others, ", "), name, name)
	}
	want := map[string]int64{}
	for _, n := range res.Nodes {
		want[n] = res.Version
	}
	return waitDelivered(ctx, e, cli, wf, res.Revision, name, want)
}

// waitDelivered waits, if asked, until the nodes have applied rev, then
// checks that each reports the wanted version of the secret (0: gone):
// a node that applied the revision but could not open the secret is
// named with its error.
func waitDelivered(ctx context.Context, e *env, cli *clientv3.Client, wf *waitFlags, rev int64, name string, want map[string]int64) error {
	if !wf.wait {
		return nil
	}
	nodes := make([]string, 0, len(want))
	for n := range want {
		nodes = append(nodes, n)
	}
	if err := wf.waitFor(ctx, e, cli, rev, nodes); err != nil {
		return err
	}
	rctx, cancel := e.reqCtx(ctx)
	defer cancel()
	problems, err := creds.DeliveryProblems(rctx, cli, name, want)
	if err != nil {
		return err
	}
	if len(problems) > 0 {
		return fmt.Errorf("secret %s not delivered everywhere:\n  %s", name, strings.Join(problems, "\n  "))
	}
	return nil
}

// readValue reads the secret value from a file or standard input, byte
// for byte (a trailing newline is part of the value).
func readValue(e *env, from string) ([]byte, error) {
	var r io.Reader = e.Stdin
	if from != "" {
		f, err := os.Open(from)
		if err != nil {
			return nil, err
		}
		defer f.Close()
		r = f
	}
	if r == nil {
		return nil, usagef("no value: use --from-file or standard input")
	}
	b, err := io.ReadAll(io.LimitReader(r, creds.MaxSecretSize+1))
	if err != nil {
		return nil, fmt.Errorf("read value: %w", err)
	}
	switch {
	case len(b) == 0:
		return nil, usagef("empty value")
	case len(b) > creds.MaxSecretSize:
		clear(b)
		return nil, usagef("value larger than %d bytes", creds.MaxSecretSize)
	}
	return b, nil
}

func secretList(ctx context.Context, e *env, args []string) error {
	fs := flags(e, "secret list")
	out := outputFlag(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 0 {
		return usagef("usage: meshctl secret list [-o json]")
	}
	if err := checkOutput(*out); err != nil {
		return err
	}
	cli, err := e.etcd()
	if err != nil {
		return err
	}
	rctx, cancel := e.reqCtx(ctx)
	defer cancel()
	infos, _, err := creds.ListSecrets(rctx, cli)
	if err != nil {
		return err
	}
	if isData(*out) {
		if infos == nil {
			infos = []creds.SecretInfo{}
		}
		return printData(e.Stdout, *out, infos)
	}
	tw := newTable(e.Stdout)
	fmt.Fprintln(tw, "NAME\tNODE\tVERSION\tDELIVERED\tSTATE\tERROR")
	for _, s := range infos {
		for _, c := range s.Copies {
			delivered := "-"
			if c.Reported {
				delivered = fmt.Sprint(c.Delivered)
			}
			fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\n", registry.Printable(s.Name), registry.Printable(c.Node), c.Version, delivered, c.State(), oneLine(c.Error))
		}
	}
	return tw.Flush()
}

// oneLine makes text a node reported fit one table cell: whitespace
// runs become one space, it is cut to about 120 bytes and every control
// character or escape is written out (registry.Printable), so a node
// cannot fake rows or send escape sequences to the operator's terminal.
func oneLine(s string) string {
	s = strings.Join(strings.Fields(s), " ")
	if len(s) > 120 {
		s = s[:117] + "..."
	}
	return registry.Printable(s)
}

func secretRemove(ctx context.Context, e *env, args []string) error {
	fs := flags(e, "secret rm")
	nodes := fs.StringSlice("node", nil, "remove only from these nodes (default: everywhere)")
	wf := addWaitFlags(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usagef("usage: meshctl secret rm NAME [--node N...] [--wait]")
	}
	name := fs.Arg(0)
	if err := registry.ValidName(name); err != nil {
		return usagef("secret name: %w", err)
	}
	cli, err := e.etcd()
	if err != nil {
		return err
	}
	rctx, cancel := e.reqCtx(ctx)
	res, err := creds.RemoveSecret(rctx, cli, name, *nodes)
	cancel()
	if err != nil {
		return err
	}
	fmt.Fprintf(e.Stdout, "secret %s removed from %s (revision %d)\n", name, strings.Join(res.Nodes, ", "), res.Revision)
	want := map[string]int64{}
	for _, n := range res.Nodes {
		want[n] = 0
	}
	return waitDelivered(ctx, e, cli, wf, res.Revision, name, want)
}

// importWarning is printed by every import: the operator must know that
// the values sat on disk in the clear (base64 is an encoding, not a cipher).
const importWarning = `warning: nix-infra's secrets/ files are base64 only: the command that wrote them names
no cipher, so these values were never really encrypted. Anyone who could read that directory
(or a backup or git history of it) has them: rotate them, then delete the directory.
`

func secretImport(ctx context.Context, e *env, args []string) error {
	fs := flags(e, "secret import")
	tf := addTargetFlags(fs)
	wf := addWaitFlags(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usagef("usage: meshctl secret import DIR (--node N... | --group G | --all) [--wait]")
	}
	tg, err := tf.targets()
	if err != nil {
		return err
	}
	// Every file is read and checked before anything is written.
	values, err := creds.ReadNixInfraDir(fs.Arg(0))
	if err != nil {
		return err
	}
	defer func() {
		for _, v := range values {
			clear(v.Value)
		}
	}()
	fmt.Fprint(e.Stderr, importWarning)
	cli, err := e.etcd()
	if err != nil {
		return err
	}
	start := time.Now()
	var errs []error
	for _, v := range values {
		tg.Confirm = showRecipients(e, v.Name, false)
		if err := putOne(ctx, e, cli, v.Name, v.Value, tg, wf); err != nil {
			if errors.Is(err, errTimeout) {
				return err
			}
			errs = append(errs, fmt.Errorf("%s: %w", v.Name, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	fmt.Fprintf(e.Stdout, "imported %d secrets in %v\n", len(values), time.Since(start).Round(time.Millisecond))
	return nil
}
