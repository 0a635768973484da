package etcdauth

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"slices"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/registry"
)

// Options says what Apply sets up.
type Options struct {
	// Nodes are the nodes whose users and roles are set up. Empty means
	// every node the registry mentions plus every node that already has
	// a role.
	Nodes []string
	// Operators are extra users (certificate CNs) granted the root role
	// besides "root" itself.
	Operators []string
	// Subnets says how nodes without a subnet claim get one.
	Subnets SubnetMode
	// Pool is the subnet pool of the cluster's meshd config, for
	// pre-claims; the zero value means registry.DefaultPool.
	Pool registry.Pool
	// KeepAuthState leaves auth disabled if it is: used when roles are
	// refreshed as a side effect (after `meshctl app register`).
	KeepAuthState bool
	// DryRun reports the changes without making them.
	DryRun bool
	// Logger gets one line per change; nil discards.
	Logger *slog.Logger
}

// Result is what Apply did (or, with DryRun, would do).
type Result struct {
	// Changes are human-readable, one per etcd call, in order.
	Changes []string
	// Nodes are the nodes that were set up.
	Nodes []string
	// AuthEnabled reports whether auth is on at the end.
	AuthEnabled bool
}

type applier struct {
	ctx  context.Context
	cli  *clientv3.Client
	o    Options
	log  *slog.Logger
	res  *Result
	user map[string][]string // existing users and their roles
	role map[string]bool     // existing roles
}

// do records a change and makes it unless this is a dry run.
func (a *applier) do(desc string, f func() error) error {
	a.res.Changes = append(a.res.Changes, desc)
	if a.o.DryRun {
		return nil
	}
	a.log.Info("etcd auth change", "change", desc)
	if err := f(); err != nil {
		return fmt.Errorf("%s: %w", desc, err)
	}
	return nil
}

// Apply makes etcd's users and roles match the policy: a root user (no
// password: it authenticates with the operator's certificate), the
// operators, and for each node a user of the node's name holding exactly
// one role with exactly NodePerms. It then enables auth. Every step is
// checked against what exists, so a second run changes nothing. Grants
// come before revokes, so a running node never loses a permission it
// keeps.
func Apply(ctx context.Context, cli *clientv3.Client, o Options) (Result, error) {
	res := Result{}
	a := &applier{ctx: ctx, cli: cli, o: o, res: &res, log: o.Logger}
	if a.log == nil {
		a.log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if o.Pool == (registry.Pool{}) {
		a.o.Pool = registry.DefaultPool
	}
	for _, op := range o.Operators {
		if err := registry.ValidName(op); err != nil {
			return res, fmt.Errorf("operator %q: %w", op, err)
		}
	}
	for _, n := range o.Nodes {
		if err := CheckNodeName(n, o.Operators); err != nil {
			return res, err
		}
	}
	st, err := cli.AuthStatus(ctx)
	if err != nil {
		return res, fmt.Errorf("auth status: %w", err)
	}
	if err := a.load(); err != nil {
		return res, err
	}
	view, err := ReadView(ctx, cli)
	if err != nil {
		return res, err
	}
	nodes := a.nodes(view)
	res.Nodes = nodes

	if err := a.operator(RootUser); err != nil {
		return res, err
	}
	for _, op := range o.Operators {
		if err := a.operator(op); err != nil {
			return res, err
		}
	}
	for _, n := range nodes {
		if a.o.Subnets == Preclaim {
			p, isNew, err := preclaim(ctx, cli, n, view.IPv4[n], a.o.Pool, o.DryRun)
			if err != nil {
				return res, err
			}
			if isNew {
				a.res.Changes = append(a.res.Changes, fmt.Sprintf("claim subnet %v for node %s", p, n))
				a.log.Info("pre-claimed subnet", "node", n, "subnet", p.String(), "dryRun", o.DryRun)
				if !slices.Contains(view.Claims[n], p) {
					view.Claims[n] = append(slices.Clone(view.Claims[n]), p)
					slices.SortFunc(view.Claims[n], func(x, y netip.Prefix) int { return x.Addr().Compare(y.Addr()) })
				}
			}
		}
		if err := a.node(n, NodePerms(n, view, a.o.Subnets)); err != nil {
			return res, err
		}
	}
	res.AuthEnabled = st.Enabled
	if !st.Enabled && !o.KeepAuthState {
		if err := a.do("enable auth", func() error { _, err := cli.AuthEnable(ctx); return err }); err != nil {
			return res, err
		}
		res.AuthEnabled = !o.DryRun
	}
	return res, nil
}

// load reads the existing users (with their roles) and roles.
func (a *applier) load() error {
	ul, err := a.cli.UserList(a.ctx)
	if err != nil {
		return fmt.Errorf("list users: %w", err)
	}
	a.user = map[string][]string{}
	for _, u := range ul.Users {
		ug, err := a.cli.UserGet(a.ctx, u)
		if err != nil {
			return fmt.Errorf("get user %s: %w", u, err)
		}
		a.user[u] = ug.Roles
	}
	rl, err := a.cli.RoleList(a.ctx)
	if err != nil {
		return fmt.Errorf("list roles: %w", err)
	}
	a.role = map[string]bool{}
	for _, r := range rl.Roles {
		a.role[r] = true
	}
	return nil
}

// nodes returns the nodes to set up: the ones asked for, or every node
// the registry mentions and every node with a role already. Discovered
// names that cannot be node users are logged and skipped.
func (a *applier) nodes(v View) []string {
	if len(a.o.Nodes) > 0 {
		out := slices.Clone(a.o.Nodes)
		slices.Sort(out)
		return slices.Compact(out)
	}
	set := map[string]bool{}
	for _, n := range v.Nodes {
		set[n] = true
	}
	for r := range a.role {
		if n, ok := strings.CutPrefix(r, RolePrefix); ok {
			set[n] = true
		}
	}
	var out []string
	for n := range set {
		if err := CheckNodeName(n, a.o.Operators); err != nil {
			a.log.Warn("skipping node", "node", n, "err", err)
			continue
		}
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

func (a *applier) ensureUser(name string) error {
	if _, ok := a.user[name]; ok {
		return nil
	}
	// No password: the user authenticates only with a certificate whose
	// CN is its name, so there is no password to leak.
	return a.do("add user "+name, func() error {
		_, err := a.cli.UserAddWithOptions(a.ctx, name, "", &clientv3.UserAddOptions{NoPassword: true})
		return err
	})
}

func (a *applier) operator(name string) error {
	if err := a.ensureUser(name); err != nil {
		return err
	}
	if slices.Contains(a.user[name], RootRole) {
		return nil
	}
	return a.do(fmt.Sprintf("grant role %s to user %s", RootRole, name), func() error {
		_, err := a.cli.UserGrantRole(a.ctx, name, RootRole)
		return err
	})
}

func (a *applier) node(n string, want []Perm) error {
	role := NodeRole(n)
	var have []Perm
	if !a.role[role] {
		if err := a.do("add role "+role, func() error { _, err := a.cli.RoleAdd(a.ctx, role); return err }); err != nil {
			return err
		}
	} else {
		rg, err := a.cli.RoleGet(a.ctx, role)
		if err != nil {
			return fmt.Errorf("get role %s: %w", role, err)
		}
		for _, p := range rg.Perm {
			have = append(have, Perm{Key: string(p.Key), RangeEnd: string(p.RangeEnd), Type: PermType(p.PermType)})
		}
	}
	grant, revoke := Diff(want, have)
	for _, p := range grant {
		if err := a.do(fmt.Sprintf("grant %s: %s", role, p), func() error {
			_, err := a.cli.RoleGrantPermission(a.ctx, role, p.Key, p.RangeEnd, clientv3.PermissionType(p.Type))
			return err
		}); err != nil {
			return err
		}
	}
	for _, p := range revoke {
		if err := a.do(fmt.Sprintf("revoke %s: %s", role, p), func() error {
			_, err := a.cli.RoleRevokePermission(a.ctx, role, p.Key, p.RangeEnd)
			return err
		}); err != nil {
			return err
		}
	}
	if err := a.ensureUser(n); err != nil {
		return err
	}
	if !slices.Contains(a.user[n], role) {
		if err := a.do(fmt.Sprintf("grant role %s to user %s", role, n), func() error {
			_, err := a.cli.UserGrantRole(a.ctx, n, role)
			return err
		}); err != nil {
			return err
		}
	}
	// A node user holds its own role and nothing else: a stray root or
	// another node's role would undo the whole policy.
	for _, r := range a.user[n] {
		if r == role {
			continue
		}
		if err := a.do(fmt.Sprintf("revoke role %s from user %s", r, n), func() error {
			_, err := a.cli.UserRevokeRole(a.ctx, n, r)
			return err
		}); err != nil {
			return err
		}
	}
	return nil
}

// RevokeNode deletes a node's etcd user and role, so that its certificate
// no longer authenticates as anything (etcd rejects a CN that is not a
// user). This is how a lost or compromised node is cut off before its
// certificate expires. It does not touch the node's registry keys (see
// registry.RemoveNode). Missing users or roles are not an error.
func RevokeNode(ctx context.Context, cli *clientv3.Client, node string) ([]string, error) {
	if err := CheckNodeName(node, nil); err != nil {
		return nil, err
	}
	var done []string
	ul, err := cli.UserList(ctx)
	if err != nil {
		return nil, fmt.Errorf("list users: %w", err)
	}
	if slices.Contains(ul.Users, node) {
		if _, err := cli.UserDelete(ctx, node); err != nil {
			return done, fmt.Errorf("delete user %s: %w", node, err)
		}
		done = append(done, "delete user "+node)
	}
	rl, err := cli.RoleList(ctx)
	if err != nil {
		return done, fmt.Errorf("list roles: %w", err)
	}
	if slices.Contains(rl.Roles, NodeRole(node)) {
		if _, err := cli.RoleDelete(ctx, NodeRole(node)); err != nil {
			return done, fmt.Errorf("delete role %s: %w", NodeRole(node), err)
		}
		done = append(done, "delete role "+NodeRole(node))
	}
	return done, nil
}

// RefreshIfEnabled re-applies every node's role when auth is enabled, and
// does nothing otherwise. Commands that change what the policy depends
// on (registering an app adds an instance key per node) call it so that
// nodes may advertise the new app at once.
func RefreshIfEnabled(ctx context.Context, cli *clientv3.Client, o Options) (Result, error) {
	st, err := cli.AuthStatus(ctx)
	if err != nil {
		return Result{}, fmt.Errorf("auth status: %w", err)
	}
	if !st.Enabled {
		return Result{}, nil
	}
	o.KeepAuthState = true
	return Apply(ctx, cli, o)
}
