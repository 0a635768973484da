package creds

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/registry"
)

// Copy is one node's copy of a secret as `meshctl secret list` shows it:
// versions and delivery state, never a value or a ciphertext.
type Copy struct {
	Node string `json:"node"`
	// Version is the version sealed to the node (0: the key does not decode).
	Version int64 `json:"version"`
	// Delivered is the version the node reports as written to its
	// credential store (0: none, or the node reports no status).
	Delivered int64 `json:"delivered"`
	// Reported is false when the node publishes no creds status (down, or
	// not running meshd).
	Reported bool `json:"reported"`
	// Error is the node's error for this secret, if any.
	Error string `json:"error,omitempty"`
}

// State summarises a copy: "delivered", "pending", "error" or "unknown".
func (c Copy) State() string {
	switch {
	case c.Error != "":
		return "error"
	case !c.Reported:
		return "unknown"
	case c.Delivered == c.Version && c.Version > 0:
		return "delivered"
	}
	return "pending"
}

// SecretInfo is one secret and its copies, sorted by node.
type SecretInfo struct {
	Name   string `json:"name"`
	Copies []Copy `json:"nodes"`
}

// ListSecrets reads every sealed secret and every node's status at one
// revision and reports, per secret, which nodes hold which version and
// what each has delivered. It returns the revision read.
func ListSecrets(ctx context.Context, cli *clientv3.Client) ([]SecretInfo, int64, error) {
	resp, err := cli.Txn(ctx).Then(
		clientv3.OpGet(registry.SecretsPrefix, clientv3.WithPrefix()),
		clientv3.OpGet(registry.StatusPrefix, clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		return nil, 0, fmt.Errorf("read secrets: %w", err)
	}
	statuses := credsStatuses(resp.Responses[1].GetResponseRange().Kvs)
	byName := map[string]*SecretInfo{}
	for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
		pk, err := registry.ParseKey(string(kv.Key))
		if err != nil || pk.Kind != registry.KindSecret {
			continue
		}
		info := byName[pk.Name]
		if info == nil {
			info = &SecretInfo{Name: pk.Name}
			byName[pk.Name] = info
		}
		c := Copy{Node: pk.Node}
		if s, err := registry.DecodeSealedSecret(kv.Value); err == nil {
			c.Version = s.Version
		} else {
			c.Error = "sealed value does not decode: " + err.Error()
		}
		if st, ok := statuses[pk.Node]; ok {
			c.Reported = true
			c.Delivered = st.Delivered[pk.Name]
			if e := st.Errors[pk.Name]; e != "" && c.Error == "" {
				c.Error = e
			}
		}
		info.Copies = append(info.Copies, c)
	}
	out := make([]SecretInfo, 0, len(byName))
	for _, info := range byName {
		slices.SortFunc(info.Copies, func(a, b Copy) int { return cmp.Compare(a.Node, b.Node) })
		out = append(out, *info)
	}
	slices.SortFunc(out, func(a, b SecretInfo) int { return cmp.Compare(a.Name, b.Name) })
	return out, resp.Header.Revision, nil
}

// credsStatuses decodes the creds component's status of every node that
// publishes one.
func credsStatuses(kvs []*mvccpb.KeyValue) map[string]Status {
	out := map[string]Status{}
	for _, kv := range kvs {
		pk, err := registry.ParseKey(string(kv.Key))
		if err != nil || pk.Kind != registry.KindStatus {
			continue
		}
		st, err := registry.DecodeStatus(pk.Node, kv.Value)
		if err != nil {
			continue
		}
		raw, ok := st.Components["creds"]
		if !ok {
			continue
		}
		var cs Status
		if json.Unmarshal(raw, &cs) != nil {
			continue
		}
		out[pk.Node] = cs
	}
	return out
}

// RemoveResult says what RemoveSecret deleted.
type RemoveResult struct {
	Revision int64
	Nodes    []string
}

// ErrNoSecret is returned (wrapped) when there is nothing to remove.
var ErrNoSecret = errors.New("no such secret")

// RemoveSecret deletes secret name from the given nodes (nil: from every
// node) in one transaction.
func RemoveSecret(ctx context.Context, cli *clientv3.Client, name string, nodes []string) (RemoveResult, error) {
	if err := registry.ValidName(name); err != nil {
		return RemoveResult{}, fmt.Errorf("secret name: %w", err)
	}
	for _, n := range nodes {
		if err := registry.ValidName(n); err != nil {
			return RemoveResult{}, fmt.Errorf("node: %w", err)
		}
	}
	resp, err := cli.Get(ctx, registry.SecretsPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return RemoveResult{}, fmt.Errorf("read secrets: %w", err)
	}
	var ops []clientv3.Op
	var res RemoveResult
	for _, c := range secretCopies(resp.Kvs, name) {
		if nodes != nil && !slices.Contains(nodes, c.node) {
			continue
		}
		ops = append(ops, clientv3.OpDelete(c.key))
		res.Nodes = append(res.Nodes, c.node)
	}
	if len(ops) == 0 {
		return RemoveResult{}, fmt.Errorf("%w %q on the selected nodes", ErrNoSecret, name)
	}
	tr, err := cli.Txn(ctx).Then(ops...).Commit()
	if err != nil {
		return RemoveResult{}, fmt.Errorf("remove secret %s: %w", name, err)
	}
	slices.Sort(res.Nodes)
	res.Revision = tr.Header.Revision
	return res, nil
}

// DeliveryProblems reads the nodes' statuses and returns, sorted, a line
// for every node in want that has not reached the wanted state of secret
// name: want maps a node to the version it must report delivered, or to
// 0 when the secret must be gone from it.
func DeliveryProblems(ctx context.Context, cli *clientv3.Client, name string, want map[string]int64) ([]string, error) {
	resp, err := cli.Get(ctx, registry.StatusPrefix, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("read status: %w", err)
	}
	statuses := credsStatuses(resp.Kvs)
	var out []string
	for _, node := range slices.Sorted(maps.Keys(want)) {
		v := want[node]
		st, ok := statuses[node]
		switch {
		case !ok:
			out = append(out, node+": reports no credentials status")
		case st.Errors[name] != "":
			out = append(out, node+": "+st.Errors[name])
		case v == 0 && st.Delivered[name] != 0:
			out = append(out, fmt.Sprintf("%s: still holds version %d", node, st.Delivered[name]))
		case v != 0 && st.Delivered[name] != v:
			out = append(out, fmt.Sprintf("%s: delivered version %d, want %d", node, st.Delivered[name], v))
		}
	}
	return out, nil
}
