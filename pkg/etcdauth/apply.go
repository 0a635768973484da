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
	// Problems are things Apply refused or left alone and the operator
	// should look at: a name that holds root, a revoked node, a subnet
	// claim whose value names another node than the one holding it.
	Problems []string
}

type applier struct {
	ctx   context.Context
	cli   *clientv3.Client
	o     Options
	log   *slog.Logger
	res   *Result
	user  map[string][]string // existing users and their roles
	role  map[string]bool     // existing roles
	held  map[string][]Perm   // existing node roles' permissions, by node
	ident map[string]string   // node -> CN of its current certificate, when rotated
	revok map[string]bool     // revoked nodes
}

// problem records something Apply refused or left alone.
func (a *applier) problem(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	a.res.Problems = append(a.res.Problems, msg)
	a.log.Warn(msg)
}

// userOf is the etcd user of node: the CN of its current certificate.
func (a *applier) userOf(node string) string {
	if cn, ok := a.ident[node]; ok {
		return cn
	}
	return node
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
	if a.revok, a.ident, err = readMarks(ctx, cli); err != nil {
		return res, err
	}
	view, err := ReadView(ctx, cli)
	if err != nil {
		return res, err
	}
	nodes, err := a.nodes(view)
	if err != nil {
		return res, err
	}
	res.Nodes = nodes
	var owners []string
	view.Claims, owners = AssignClaims(view.ClaimNode, heldClaims(a.held), nodes)
	for _, o := range owners {
		a.problem("%s", o)
	}

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
	if !o.DryRun {
		// The pool, the subnet mode and the operators are the cluster's:
		// keep them for refreshes.
		if err := storeSettings(ctx, cli, a.o); err != nil {
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
	a.held = map[string][]Perm{}
	for _, r := range rl.Roles {
		a.role[r] = true
		n, ok := strings.CutPrefix(r, RolePrefix)
		if !ok {
			continue
		}
		rg, err := a.cli.RoleGet(a.ctx, r)
		if err != nil {
			return fmt.Errorf("get role %s: %w", r, err)
		}
		for _, p := range rg.Perm {
			a.held[n] = append(a.held[n], Perm{Key: string(p.Key), RangeEnd: string(p.RangeEnd), Type: PermType(p.PermType)})
		}
	}
	return nil
}

// nodes returns the nodes to set up: the ones asked for, or every node
// named by a node entry's or member record's key and every node with a
// role already. Values are never read for this: a node controls its own
// values. A name whose user holds root, or that the operator revoked, is
// refused when asked for and skipped (and reported) when discovered.
func (a *applier) nodes(v View) ([]string, error) {
	if len(a.o.Nodes) > 0 {
		out := slices.Clone(a.o.Nodes)
		slices.Sort(out)
		out = slices.Compact(out)
		for _, n := range out {
			if err := a.admissible(n); err != nil {
				return nil, err
			}
		}
		return out, nil
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
			a.problem("skipping node %s: %v", registry.Printable(n), err)
			continue
		}
		if err := a.admissible(n); err != nil {
			a.problem("skipping %v", err)
			continue
		}
		out = append(out, n)
	}
	slices.Sort(out)
	return out, nil
}

// admissible refuses a node that was revoked or whose user holds root.
func (a *applier) admissible(n string) error {
	if a.revok[n] {
		return fmt.Errorf("node %s: revoked (re-admit it with meshctl etcd roles admit %s)", n, n)
	}
	if slices.Contains(a.user[a.userOf(n)], RootRole) {
		return fmt.Errorf("node %s: user %s holds the %s role, it cannot become a node", n, a.userOf(n), RootRole)
	}
	return nil
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
	have := a.held[n]
	if !a.role[role] {
		if err := a.do("add role "+role, func() error { _, err := a.cli.RoleAdd(a.ctx, role); return err }); err != nil {
			return err
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
	u := a.userOf(n)
	if err := a.ensureUser(u); err != nil {
		return err
	}
	if !slices.Contains(a.user[u], role) {
		if err := a.do(fmt.Sprintf("grant role %s to user %s", role, u), func() error {
			_, err := a.cli.UserGrantRole(a.ctx, u, role)
			return err
		}); err != nil {
			return err
		}
	}
	// A node user holds its own role and nothing else: another node's
	// role would undo the whole policy. (A user holding root is never
	// made a node: admissible refused it.)
	for _, r := range slices.Clone(a.user[u]) {
		if r == role {
			continue
		}
		if err := a.revokeRole(u, r); err != nil {
			return err
		}
	}
	// The node's role belongs to its current certificate's user only.
	for other, roles := range a.user {
		if other == u || !slices.Contains(roles, role) {
			continue
		}
		if err := a.revokeRole(other, role); err != nil {
			return err
		}
	}
	return nil
}

// revokeRole takes role r from user u and forgets it, so that a later
// node's pass does not revoke it twice.
func (a *applier) revokeRole(u, r string) error {
	if err := a.do(fmt.Sprintf("revoke role %s from user %s", r, u), func() error {
		_, err := a.cli.UserRevokeRole(a.ctx, u, r)
		return err
	}); err != nil {
		return err
	}
	a.user[u] = slices.DeleteFunc(slices.Clone(a.user[u]), func(x string) bool { return x == r })
	return nil
}

// RefreshIfEnabled re-applies every node's role when auth is enabled, and
// does nothing otherwise. Commands that change what the policy depends
// on (registering an app adds an instance key per node) call it so that
// nodes may advertise the new app at once. It uses the settings the last
// whole-cluster Apply stored (pool, subnet mode, operators), never
// defaults, and fails with ErrNoSettings when there are none; only
// Logger is taken from o.
func RefreshIfEnabled(ctx context.Context, cli *clientv3.Client, o Options) (Result, error) {
	st, err := cli.AuthStatus(ctx)
	if err != nil {
		return Result{}, fmt.Errorf("auth status: %w", err)
	}
	if !st.Enabled {
		return Result{}, nil
	}
	stored, err := LoadSettings(ctx, cli)
	if err != nil {
		return Result{}, err
	}
	stored.Logger = o.Logger
	stored.KeepAuthState = true
	return Apply(ctx, cli, stored)
}
