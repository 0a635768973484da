package etcdauth

import (
	"context"
	"fmt"
	"slices"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/pki"
	"github.com/meshd/meshd/pkg/registry"
)

// etcd takes a request's user from the client certificate's common name
// and nothing else, so a rotated certificate gets a new CN (pki.NodeCN)
// and RotateNode moves the node's role to it and deletes the old user.

// readMarks reads the operator-only per-node marks: which nodes are
// revoked and which certificate CN each rotated node uses.
func readMarks(ctx context.Context, kv clientv3.KV) (revoked map[string]bool, ident map[string]string, err error) {
	revoked, ident = map[string]bool{}, map[string]string{}
	resp, err := kv.Get(ctx, registry.RevokedPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, nil, fmt.Errorf("read revoked nodes: %w", err)
	}
	for _, x := range resp.Kvs {
		revoked[strings.TrimPrefix(string(x.Key), registry.RevokedPrefix)] = true
	}
	resp, err = kv.Get(ctx, registry.IdentityPrefix, clientv3.WithPrefix())
	if err != nil {
		return nil, nil, fmt.Errorf("read node identities: %w", err)
	}
	for _, x := range resp.Kvs {
		n := strings.TrimPrefix(string(x.Key), registry.IdentityPrefix)
		if cn, gen, err := pki.ParseNodeCN(string(x.Value)); err == nil && cn == n {
			ident[n] = pki.NodeCN(n, gen)
		}
	}
	return revoked, ident, nil
}

// nodeUsers returns the users that are certificates of node (its name or
// node@gen), sorted.
func nodeUsers(users []string, node string) []string {
	var out []string
	for _, u := range users {
		if n, _, err := pki.ParseNodeCN(u); err == nil && n == node {
			out = append(out, u)
		}
	}
	slices.Sort(out)
	return out
}

// RevokeNode cuts a node off for good: it marks the node revoked (so no
// later `roles apply`, nor the refresh after `meshctl app register`, sets
// it up again until AdmitNode), deletes every etcd user that is one of its
// certificates and its role (so each of its certificates authenticates as
// nobody at once), and deletes its durable keys (member record, subnet
// claims, entry, instances, status, secrets: registry.RemoveNode), so
// nothing in the registry names it any more. It returns what it did; a
// second call only re-checks.
func RevokeNode(ctx context.Context, cli *clientv3.Client, node string) ([]string, error) {
	if err := CheckNodeName(node, nil); err != nil {
		return nil, err
	}
	var done []string
	ul, err := cli.UserList(ctx)
	if err != nil {
		return nil, fmt.Errorf("list users: %w", err)
	}
	users := nodeUsers(ul.Users, node)
	for _, u := range users {
		ug, err := cli.UserGet(ctx, u)
		if err != nil {
			return nil, fmt.Errorf("get user %s: %w", u, err)
		}
		if slices.Contains(ug.Roles, RootRole) {
			return nil, fmt.Errorf("user %s holds %s: an operator, not a node; nothing changed", u, RootRole)
		}
	}
	r, err := cli.Get(ctx, registry.RevokedKey(node), clientv3.WithCountOnly())
	if err != nil {
		return nil, fmt.Errorf("read revoked mark: %w", err)
	}
	if r.Count == 0 {
		if _, err := cli.Put(ctx, registry.RevokedKey(node), "revoked"); err != nil {
			return nil, fmt.Errorf("mark %s revoked: %w", node, err)
		}
		done = append(done, "mark node "+node+" revoked")
	}
	for _, u := range users {
		if _, err := cli.UserDelete(ctx, u); err != nil {
			return done, fmt.Errorf("delete user %s: %w", u, err)
		}
		done = append(done, "delete user "+u)
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
	if _, err := cli.Delete(ctx, registry.IdentityKey(node)); err != nil {
		return done, fmt.Errorf("delete identity of %s: %w", node, err)
	}
	n, err := registry.RemoveNode(ctx, cli, node)
	if err != nil {
		return done, err
	}
	if n > 0 {
		done = append(done, fmt.Sprintf("delete %d registry keys of node %s", n, node))
	}
	return done, nil
}

// AdmitNode lifts a revocation: the next Apply sets the node up again. It
// reports whether the node was revoked.
func AdmitNode(ctx context.Context, cli *clientv3.Client, node string) (bool, error) {
	if err := CheckNodeName(node, nil); err != nil {
		return false, err
	}
	r, err := cli.Delete(ctx, registry.RevokedKey(node))
	if err != nil {
		return false, fmt.Errorf("re-admit %s: %w", node, err)
	}
	return r.Deleted > 0, nil
}

// RotateNode makes cn (node@gen, from a certificate issued with
// `meshctl pki issue --rotate`) the node's only etcd user: it creates the
// user with the node's role, records it, and deletes every other user of
// the node, so its older certificates authenticate as nobody. Install the
// new certificate on the node before calling it. The node must have been
// set up (its role exists) and not be revoked.
func RotateNode(ctx context.Context, cli *clientv3.Client, cn string) ([]string, error) {
	node, _, err := pki.ParseNodeCN(cn)
	if err != nil {
		return nil, err
	}
	if err := CheckNodeName(node, nil); err != nil {
		return nil, err
	}
	revoked, _, err := readMarks(ctx, cli)
	if err != nil {
		return nil, err
	}
	if revoked[node] {
		return nil, fmt.Errorf("node %s is revoked: re-admit it first (meshctl etcd roles admit %s)", node, node)
	}
	rl, err := cli.RoleList(ctx)
	if err != nil {
		return nil, fmt.Errorf("list roles: %w", err)
	}
	if !slices.Contains(rl.Roles, NodeRole(node)) {
		return nil, fmt.Errorf("node %s has no role: run meshctl etcd roles apply --node %s first", node, node)
	}
	ul, err := cli.UserList(ctx)
	if err != nil {
		return nil, fmt.Errorf("list users: %w", err)
	}
	var done []string
	if !slices.Contains(ul.Users, cn) {
		if _, err := cli.UserAddWithOptions(ctx, cn, "", &clientv3.UserAddOptions{NoPassword: true}); err != nil {
			return done, fmt.Errorf("add user %s: %w", cn, err)
		}
		done = append(done, "add user "+cn)
	}
	ug, err := cli.UserGet(ctx, cn)
	if err != nil {
		return done, fmt.Errorf("get user %s: %w", cn, err)
	}
	if slices.Contains(ug.Roles, RootRole) {
		return done, fmt.Errorf("user %s holds %s: it cannot become a node", cn, RootRole)
	}
	if !slices.Contains(ug.Roles, NodeRole(node)) {
		if _, err := cli.UserGrantRole(ctx, cn, NodeRole(node)); err != nil {
			return done, fmt.Errorf("grant role %s to user %s: %w", NodeRole(node), cn, err)
		}
		done = append(done, fmt.Sprintf("grant role %s to user %s", NodeRole(node), cn))
	}
	if _, err := cli.Put(ctx, registry.IdentityKey(node), cn); err != nil {
		return done, fmt.Errorf("record identity of %s: %w", node, err)
	}
	for _, u := range nodeUsers(ul.Users, node) {
		if u == cn {
			continue
		}
		if _, err := cli.UserDelete(ctx, u); err != nil {
			return done, fmt.Errorf("delete user %s: %w", u, err)
		}
		done = append(done, "delete user "+u)
	}
	return done, nil
}
