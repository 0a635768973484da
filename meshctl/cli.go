package main

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/meshd/meshd/pkg/pki"
)

// A command's function declares its flags with flags(e, name), calls
// parse(fs, args) and only then does anything. That lets meshctl show every
// command's flags in its help and in shell completion without running it:
// newRoot calls each function once in declare mode, where parse hands the
// declared flags to cobra and returns errDeclared. When the command runs,
// cobra has parsed the whole line (global flags anywhere, the command's own
// flags); parse copies the values cobra read into the function's own flag
// set and parses the positional arguments.

// errDeclared ends a command function's declare-mode call.
var errDeclared = errors.New("flags declared")

// runFunc is a command's logic: the positional arguments and its flags.
type runFunc func(ctx context.Context, e *env, args []string) error

// leafSpec is one runnable command as help and completion show it.
type leafSpec struct {
	use     string // name and arguments, cobra's Use
	aliases []string
	short   string
	long    string
	example string
	run     runFunc
}

// groupSpec is a command that only holds subcommands (node, app, ...).
type groupSpec struct {
	use, short, long, example string
	leaves                    []leafSpec
	groups                    []groupSpec
}

func withoutCtx(f func(e *env, args []string) error) runFunc {
	return func(_ context.Context, e *env, args []string) error { return f(e, args) }
}

func pkiIssueAs(u pki.Usage) runFunc {
	return func(_ context.Context, e *env, args []string) error { return pkiIssue(e, args, u) }
}

// flagOwners maps a flag set from flags to its env until parse.
var flagOwners sync.Map

// flags returns a flag set for a command's own flags.
func flags(e *env, name string) *pflag.FlagSet {
	fs := pflag.NewFlagSet("meshctl "+name, pflag.ContinueOnError)
	fs.SetOutput(e.Stderr)
	flagOwners.Store(fs, e)
	return fs
}

// parse fills fs from the command line: in declare mode it hands fs to
// cobra; when the command runs it takes the values cobra parsed and the
// positional arguments.
func parse(fs *pflag.FlagSet, args []string) error {
	v, _ := flagOwners.LoadAndDelete(fs)
	e, _ := v.(*env)
	if e != nil && e.declaring != nil {
		e.declaring.AddFlagSet(fs)
		return errDeclared
	}
	if e != nil && e.parsed != nil {
		parsed := e.parsed
		var err error
		fs.VisitAll(func(f *pflag.Flag) {
			src := parsed.Lookup(f.Name)
			if err != nil || src == nil || !src.Changed {
				return
			}
			if sv, ok := src.Value.(pflag.SliceValue); ok {
				if dv, ok := f.Value.(pflag.SliceValue); ok {
					err = dv.Replace(sv.GetSlice())
					f.Changed = true
					return
				}
			}
			err = fs.Set(f.Name, src.Value.String())
		})
		if err != nil {
			return usageError{err}
		}
		// Everything cobra left is positional, even if it starts with "-".
		args = append([]string{"--"}, args...)
	}
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
	return nil
}

// tree is meshctl's commands; each command's logic lives in its group's file.
func tree() []groupSpec {
	return []groupSpec{{
		use: "node", short: "List and remove nodes, assign their secret groups",
		long: "Nodes are the entries under /cluster/nodes/ (written by meshd or nix-infra) and meshd's member records.",
		leaves: []leafSpec{
			{use: "list", aliases: []string{"ls"}, short: "List nodes: entry, subnet, overlay IP, endpoint",
				example: "meshctl node list\nmeshctl node list -o wide", run: nodeList},
			{use: "remove NAME", aliases: []string{"rm"}, short: "Remove every key of a node: entry, instances, subnet, member, flannel lease, status, secrets",
				long:    "Refuses a node whose meshd still holds a lease unless --force (it would register again).",
				example: "meshctl node remove worker003 --wait", run: nodeRemove},
			{use: "groups NODE [GROUP...]", short: "Assign the groups whose secrets a node receives (operator-only data; none: clear)",
				long:    "secret put --group G seals to the nodes assigned to G here, never to a node because its own entry says it consumes G.",
				example: "meshctl node groups worker001 backends services\nmeshctl node groups worker001", run: nodeGroups},
		},
	}, {
		use: "app", short: "Register, unregister and list apps",
		leaves: []leafSpec{
			{use: "register NAME", short: "Register an app in a group (writes its meta_data as nix-infra does)",
				example: "meshctl app register mongodb --group services --port 27017 --protocol tcp --wait", run: appRegister},
			{use: "unregister NAME", short: "Remove an app and its instances",
				example: "meshctl app unregister mongodb --group services --wait", run: appUnregister},
			{use: "list", aliases: []string{"ls"}, short: "List apps, their ports and instances",
				example: "meshctl app list --group backends -o yaml", run: appList},
		},
	}, {
		use: "secret", short: "Put, list, remove and import sealed secrets",
		leaves: []leafSpec{
			{use: "put NAME", short: "Seal a value (standard input or --from-file) to nodes",
				example: "meshctl secret put db-password --group backends --from-file pw.txt --wait", run: secretPut},
			{use: "list", aliases: []string{"ls"}, short: "List secrets and each node's copy",
				example: "meshctl secret list -o json", run: secretList},
			{use: "rm NAME", aliases: []string{"remove"}, short: "Remove a secret from every node or from some",
				example: "meshctl secret rm db-password --node worker003 --wait", run: secretRemove},
			{use: "import DIR", short: "Import nix-infra's secret files from DIR",
				example: "meshctl secret import ./secrets --all", run: secretImport},
		},
	}, {
		use: "migrate", short: "Follow a live migration from flanneld + confd to meshd",
		long: "See docs/migration.md for the runbook.",
		leaves: []leafSpec{
			{use: "status", short: "Each node's mode, meshd nodes' handshakes with flannel peers, stale flannel leases, what blocks the next step",
				example: "meshctl migrate status\nmeshctl migrate status -o json", run: migrateStatus},
		},
	}, {
		use: "pki", short: "Create the cluster CA and node certificates (files only, never etcd)",
		leaves: []leafSpec{
			{use: "init", short: "Create the cluster CA in --dir",
				example: "meshctl pki init --dir ./pki --cluster prod", run: withoutCtx(pkiInit)},
			{use: "issue NAME", short: "Issue a client certificate (a node's, or root: the operator's)",
				example: "meshctl pki issue worker001 --dir ./pki\nmeshctl pki issue root --dir ./pki\nmeshctl pki issue worker001@2 --dir ./pki", run: pkiIssueAs(pki.Client)},
			{use: "issue-server NAME", short: "Issue an etcd server certificate",
				example: "meshctl pki issue-server etcd1 --dir ./pki --ip 10.0.0.2 --dns etcd1.internal", run: pkiIssueAs(pki.Server)},
			{use: "list", aliases: []string{"ls"}, short: "List certificates and when they expire",
				example: "meshctl pki list --dir ./pki --expiring 30", run: withoutCtx(pkiList)},
		},
	}, {
		use: "etcd", short: "Set up etcd users and roles (least privilege per node)",
		groups: []groupSpec{{
			use: "roles", short: "Apply, show, revoke, admit and rotate the per-node etcd roles",
			leaves: []leafSpec{
				{use: "apply", short: "Create or update a user and role per node and enable auth",
					example: "meshctl etcd roles apply --dry-run\nmeshctl etcd roles apply", run: rolesApply},
				{use: "show", short: "Show the nodes' roles",
					example: "meshctl etcd roles show --node worker001", run: rolesShow},
				{use: "revoke NODE", short: "Cut a node off for good: delete its users and role, its registry keys, and mark it revoked",
					long:    "No later roles apply (nor the refresh after app register) sets the node up again until roles admit.",
					example: "meshctl etcd roles revoke worker003", run: rolesRevoke},
				{use: "admit NODE", short: "Lift a revocation, so that roles apply sets the node up again",
					example: "meshctl etcd roles admit worker003\nmeshctl etcd roles apply --node worker003", run: rolesAdmit},
				{use: "rotate NODE@GEN", short: "Move a node's role to its new certificate's CN and delete the old user",
					long:    "etcd knows a certificate only by its CN: issue the new one as NODE@GEN (meshctl pki issue worker001@2), install it, then rotate; the old certificate authenticates as nobody.",
					example: "meshctl pki issue worker001@2 --dir ./pki\nmeshctl etcd roles rotate worker001@2", run: rolesRotate},
			},
		}},
	}}
}

// topLeaves are runnable commands directly under meshctl.
func topLeaves() []leafSpec {
	return []leafSpec{
		{use: "status", short: "Show every node's lease, applied revision and health",
			example: "meshctl status\nmeshctl status -o wide\nmeshctl status --endpoints https://10.0.0.2:2379 -o json", run: cmdStatus},
		{use: "dashboard", short: "Serve a live web page of the mesh (loopback; reach it over SSH)",
			long:    "Serves one read-only page of every node, the WireGuard handshake matrix, apps by group and current problems, updated from an etcd watch. It binds to loopback by default: from another machine use ssh -L. See docs/dashboard.md.",
			example: "meshctl dashboard\nmeshctl dashboard --listen 127.0.0.1:9090", run: cmdDashboard},
		{use: "version", short: "Print meshctl's version and the meshd versions the cluster runs",
			long:    "Prints meshctl's version and VCS revision, then each node's meshd version from its status. With --client, or when etcd cannot be reached (exit 1), only meshctl's.",
			example: "meshctl version\nmeshctl version --client -o json", run: cmdVersion},
		{use: "provision NAME...", short: "Create Hetzner Cloud servers for the cluster",
			example: "meshctl provision worker004 --cluster prod --type cpx22 --location hel1 --ssh-key-file ~/.ssh/id_ed25519.pub", run: cmdProvision},
		{use: "destroy NAME...", short: "Delete Hetzner Cloud servers and their registry keys",
			example: "meshctl destroy worker004 --cluster prod", run: cmdDestroy},
		{use: "cloud [list]", short: "List the cluster's Hetzner servers next to their registry state",
			example: "meshctl cloud --cluster prod -o wide", run: cmdCloud},
		{use: "sandbox", short: "Run a local meshd cluster in network namespaces",
			example: "meshctl sandbox --nodes 3\nmeshctl sandbox --check", run: cmdSandbox},
	}
}

// hint is what a usage error ends with.
func hint(c *cobra.Command) string {
	return fmt.Sprintf("See '%s --help' for usage and examples.", c.CommandPath())
}

func newLeaf(e *env, s leafSpec) *cobra.Command {
	c := &cobra.Command{
		Use: s.use, Aliases: s.aliases, Short: s.short, Long: s.long, Example: indent(s.example),
		Args: cobra.ArbitraryArgs, // each command checks its own
	}
	e.declaring = c.Flags()
	err := s.run(context.Background(), e, nil)
	e.declaring = nil
	if !errors.Is(err, errDeclared) {
		panic(fmt.Sprintf("meshctl %s: its function did not call parse first (%v)", s.use, err))
	}
	if c.Flags().Lookup("output") != nil {
		c.RegisterFlagCompletionFunc("output", cobra.FixedCompletions(outputFormats, cobra.ShellCompDirectiveNoFileComp))
	}
	c.RunE = func(c *cobra.Command, args []string) error {
		e.ran = true
		e.parsed = c.Flags()
		return s.run(c.Context(), e, args)
	}
	return c
}

func newGroup(e *env, g groupSpec) *cobra.Command {
	if g.example == "" {
		g.example = groupExample(g)
	}
	c := &cobra.Command{Use: g.use, Short: g.short, Long: g.long, Example: indent(g.example)}
	c.Args = func(c *cobra.Command, args []string) error {
		return unknownCommand(c, args)
	}
	// A group alone is a usage error (exit 2) that lists its commands.
	c.RunE = func(c *cobra.Command, args []string) error {
		var names []string
		for _, sc := range c.Commands() {
			if sc.IsAvailableCommand() {
				names = append(names, sc.Name())
			}
		}
		return usagef("missing command: want %s", strings.Join(names, ", "))
	}
	for _, l := range g.leaves {
		c.AddCommand(newLeaf(e, l))
	}
	for _, sg := range g.groups {
		c.AddCommand(newGroup(e, sg))
	}
	return c
}

// groupExample is the first example of each of a group's commands.
func groupExample(g groupSpec) string {
	var ex []string
	for _, l := range g.leaves {
		first, _, _ := strings.Cut(l.example, "\n")
		ex = append(ex, first)
	}
	for _, sg := range g.groups {
		ex = append(ex, groupExample(sg))
	}
	return strings.Join(ex, "\n")
}

// unknownCommand rejects an argument where a command was expected, with
// cobra's suggestions.
func unknownCommand(c *cobra.Command, args []string) error {
	if len(args) == 0 {
		return nil
	}
	msg := fmt.Sprintf("unknown command %q for %q", args[0], c.CommandPath())
	c.SuggestionsMinimumDistance = 2 // cobra's default, which SuggestionsFor does not apply itself
	if s := c.SuggestionsFor(args[0]); len(s) > 0 {
		msg += "\n\nDid you mean this?\n\t" + strings.Join(s, "\n\t")
	}
	return usageError{errors.New(msg)}
}

func indent(s string) string {
	if s == "" {
		return ""
	}
	return "  " + strings.ReplaceAll(s, "\n", "\n  ")
}

// newRoot builds meshctl's command tree around e.
func newRoot(e *env) *cobra.Command {
	root := &cobra.Command{
		Use:   "meshctl",
		Short: "Operate a meshd cluster: nodes, apps, secrets, status, provisioning, etcd PKI and roles, the sandbox",
		Long: `meshctl is the operator's tool for a meshd cluster. It talks to etcd
(--endpoints, TLS with --cacert/--cert/--key, like etcdctl) and, for
provision/destroy/cloud, to the Hetzner Cloud API.

Exit codes: 0 ok, 1 failed, 2 usage error, 3 --wait timed out.`,
		Example: indent("meshctl status\nmeshctl node list -o wide\nmeshctl app register api --group backends --port 8080 --wait\nmeshctl help secret put"),
		Version: clientVersion().String(),
		Args:    unknownCommand,
		RunE: func(c *cobra.Command, args []string) error {
			return usagef("missing command (see the list in meshctl --help)")
		},
		SilenceErrors: true,
		SilenceUsage:  true,
	}
	root.SetVersionTemplate("meshctl {{.Version}}\n")
	globalFlags(root.PersistentFlags(), e)
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error { return usageError{err} })
	for _, g := range tree() {
		root.AddCommand(newGroup(e, g))
	}
	for _, l := range topLeaves() {
		root.AddCommand(newLeaf(e, l))
	}
	return root
}
