package creds

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/registry"
)

// Targets selects the nodes a secret is sealed to: exactly one of Nodes,
// Group or All.
type Targets struct {
	// Nodes names nodes explicitly; each must have a recipient.
	Nodes []string
	// Group selects the nodes the operator assigned to this group
	// (registry.GroupsKey), never the nodes whose own entry says so.
	Group registry.Group
	// All selects every member.
	All bool
	// Confirm, when set, is shown the recipients (sorted) before
	// anything is sealed; an error from it stops the put, writing
	// nothing.
	Confirm func(nodes []string) error
}

// Validate checks that exactly one selector is set and every name is valid.
func (t Targets) Validate() error {
	n := 0
	if len(t.Nodes) > 0 {
		n++
	}
	if t.Group != "" {
		n++
	}
	if t.All {
		n++
	}
	if n != 1 {
		return errors.New("choose the targets with exactly one of --node, --group or --all")
	}
	for _, node := range t.Nodes {
		if err := registry.ValidName(node); err != nil {
			return fmt.Errorf("node: %w", err)
		}
	}
	if t.Group != "" {
		if _, err := registry.ParseGroup(string(t.Group)); err != nil {
			return err
		}
	}
	return nil
}

// PutResult says what PutSecret wrote.
type PutResult struct {
	Version  int64
	Revision int64
	// Nodes got the new version, sorted.
	Nodes []string
	// Skipped are nodes a --group or --all selected that have no
	// recipient (meshd not running there, or secrets disabled).
	Skipped []string
	// Others still hold an older version of the secret: they were not
	// targeted this time.
	Others []string
	// Unassigned are nodes whose own entry says they consume the group
	// but that the operator never assigned to it: not sealed to.
	Unassigned []string
}

// maxPutAttempts bounds the retries when another writer changes the same
// secret between our read and our transaction.
const maxPutAttempts = 5

// PutSecret seals value to the recipient of every target node and writes
// one SealedSecret per node in one transaction, at the previous highest
// version of the secret plus one. The transaction only commits if no
// other writer touched the secret since it was read; it is retried a few
// times otherwise. The clear value is only ever held in memory.
func PutSecret(ctx context.Context, cli *clientv3.Client, name string, value []byte, t Targets) (PutResult, error) {
	if err := registry.ValidName(name); err != nil {
		return PutResult{}, fmt.Errorf("secret name: %w", err)
	}
	if err := t.Validate(); err != nil {
		return PutResult{}, err
	}
	if len(value) == 0 {
		return PutResult{}, errors.New("empty value")
	}
	if len(value) > MaxSecretSize {
		return PutResult{}, fmt.Errorf("value is %d bytes, at most %d", len(value), MaxSecretSize)
	}
	for range maxPutAttempts {
		res, ok, err := putOnce(ctx, cli, name, value, t)
		if err != nil || ok {
			return res, err
		}
	}
	return PutResult{}, fmt.Errorf("secret %s: changed concurrently %d times, giving up", name, maxPutAttempts)
}

func putOnce(ctx context.Context, cli *clientv3.Client, name string, value []byte, t Targets) (PutResult, bool, error) {
	resp, err := cli.Txn(ctx).Then(
		clientv3.OpGet(registry.NodesPrefix, clientv3.WithPrefix()),
		clientv3.OpGet(registry.MembersPrefix, clientv3.WithPrefix()),
		// Subnet claims let the snapshot cross-check member records: a
		// record that copies another node's subnet is not trusted.
		clientv3.OpGet(registry.SubnetsPrefix, clientv3.WithPrefix()),
		clientv3.OpGet(registry.SecretsPrefix, clientv3.WithPrefix()),
		clientv3.OpGet(registry.GroupsPrefix, clientv3.WithPrefix()),
	).Commit()
	if err != nil {
		return PutResult{}, false, fmt.Errorf("read registry: %w", err)
	}
	var kvs []registry.KV
	for _, r := range resp.Responses[:3] {
		for _, kv := range r.GetResponseRange().Kvs {
			kvs = append(kvs, registry.KV{Key: string(kv.Key), Value: kv.Value, Lease: kv.Lease, Created: kv.CreateRevision})
		}
	}
	snap := registry.SnapshotOf(kvs, resp.Header.Revision)
	existing := secretCopies(resp.Responses[3].GetResponseRange().Kvs, name)
	assigned, err := decodeGroups(resp.Responses[4].GetResponseRange().Kvs)
	if err != nil {
		return PutResult{}, false, err
	}
	recipients, skipped, unassigned, err := resolveTargets(snap, assigned, t)
	if err != nil {
		return PutResult{}, false, err
	}
	if t.Confirm != nil {
		if err := t.Confirm(slices.Sorted(maps.Keys(recipients))); err != nil {
			return PutResult{}, false, err
		}
	}
	var version int64
	for _, c := range existing {
		version = max(version, c.Version)
	}
	version++
	res := PutResult{Version: version, Skipped: skipped, Unassigned: unassigned}
	var cmps []clientv3.Cmp
	var ops []clientv3.Op
	for _, c := range existing {
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(c.key), "=", c.modRev))
	}
	for _, node := range slices.Sorted(maps.Keys(recipients)) {
		key := registry.SecretKey(node, name)
		if !slices.ContainsFunc(existing, func(c secretCopy) bool { return c.key == key }) {
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(key), "=", 0))
		}
		ct, err := Seal(value, recipients[node])
		if err != nil {
			return PutResult{}, false, fmt.Errorf("node %s: %w", node, err)
		}
		b, err := json.Marshal(registry.SealedSecret{Version: version, Ciphertext: ct})
		if err != nil {
			return PutResult{}, false, err
		}
		ops = append(ops, clientv3.OpPut(key, string(b)))
		res.Nodes = append(res.Nodes, node)
	}
	for _, c := range existing {
		if _, ok := recipients[c.node]; !ok {
			res.Others = append(res.Others, c.node)
		}
	}
	slices.Sort(res.Others)
	tr, err := cli.Txn(ctx).If(cmps...).Then(ops...).Commit()
	if err != nil {
		return PutResult{}, false, fmt.Errorf("write secret %s: %w", name, err)
	}
	if !tr.Succeeded {
		return PutResult{}, false, nil
	}
	res.Revision = tr.Header.Revision
	return res, true, nil
}

// resolveTargets maps each selected node to its recipient. Nodes named
// explicitly must have one; nodes selected by group or --all without one
// are returned as skipped. A group selects the nodes assigned to it by
// the operator (assigned, node -> groups); nodes whose own entry claims
// the group without that assignment are returned as unassigned.
func resolveTargets(snap *registry.Snapshot, assigned map[string][]registry.Group, t Targets) (map[string]string, []string, []string, error) {
	out := map[string]string{}
	var skipped, missing, unassigned []string
	add := func(node string, explicit bool) {
		m, ok := snap.Members[node]
		switch {
		case ok && m.Recipient != "":
			if _, err := ParseRecipient(m.Recipient); err != nil {
				missing = append(missing, node+" (bad recipient)")
				return
			}
			out[node] = m.Recipient
		case explicit:
			missing = append(missing, node)
		default:
			skipped = append(skipped, node)
		}
	}
	switch {
	case len(t.Nodes) > 0:
		for _, n := range t.Nodes {
			add(n, true)
		}
	case t.Group != "":
		for _, n := range slices.Sorted(maps.Keys(assigned)) {
			if slices.Contains(assigned[n], t.Group) {
				add(n, false)
			}
		}
		for _, n := range snap.SortedNodeNames() {
			if slices.Contains(snap.Nodes[n].Services, t.Group) && !slices.Contains(assigned[n], t.Group) {
				unassigned = append(unassigned, n)
			}
		}
	case t.All:
		for _, m := range snap.SortedMembers() {
			add(m.Name, false)
		}
	}
	if len(missing) > 0 {
		return nil, nil, nil, fmt.Errorf("no sealing recipient for %s: is meshd running there with secrets enabled?", strings.Join(missing, ", "))
	}
	if len(out) == 0 {
		if len(skipped) > 0 {
			return nil, nil, nil, fmt.Errorf("no selected node has a sealing recipient (without one: %s)", strings.Join(skipped, ", "))
		}
		if len(unassigned) > 0 {
			return nil, nil, nil, fmt.Errorf("no node is assigned to group %s by the operator (%s say they consume it: assign with meshctl node groups NODE %s)", t.Group, strings.Join(unassigned, ", "), t.Group)
		}
		return nil, nil, nil, errors.New("no node matches the targets")
	}
	slices.Sort(skipped)
	return out, slices.Compact(skipped), unassigned, nil
}

// decodeGroups reads the operator's group assignments (registry.GroupsKey).
// A malformed assignment is an error: sealing by a guess is worse than not
// sealing.
func decodeGroups(kvs []*mvccpb.KeyValue) (map[string][]registry.Group, error) {
	out := map[string][]registry.Group{}
	for _, kv := range kvs {
		node := strings.TrimPrefix(string(kv.Key), registry.GroupsPrefix)
		if err := registry.ValidName(node); err != nil {
			return nil, fmt.Errorf("group assignment %s: %w", registry.Quoted(kv.Key), err)
		}
		var gs []registry.Group
		if err := json.Unmarshal(kv.Value, &gs); err != nil {
			return nil, fmt.Errorf("group assignment of %s: %s: %w", node, registry.Quoted(kv.Value), err)
		}
		for _, g := range gs {
			if _, err := registry.ParseGroup(string(g)); err != nil {
				return nil, fmt.Errorf("group assignment of %s: %w", node, err)
			}
		}
		out[node] = gs
	}
	return out, nil
}

// SetGroups records (as the operator) the groups node belongs to for
// group secrets. An empty list deletes the assignment.
func SetGroups(ctx context.Context, cli *clientv3.Client, node string, groups []registry.Group) error {
	if err := registry.ValidName(node); err != nil {
		return fmt.Errorf("node: %w", err)
	}
	for _, g := range groups {
		if _, err := registry.ParseGroup(string(g)); err != nil {
			return err
		}
	}
	if len(groups) == 0 {
		_, err := cli.Delete(ctx, registry.GroupsKey(node))
		return err
	}
	gs := slices.Clone(groups)
	slices.Sort(gs)
	b, err := json.Marshal(slices.Compact(gs))
	if err != nil {
		return err
	}
	_, err = cli.Put(ctx, registry.GroupsKey(node), string(b))
	return err
}

// secretCopy is one node's copy of a secret as read from etcd.
type secretCopy struct {
	node    string
	key     string
	modRev  int64
	Version int64
}

// secretCopies returns the copies of secret name among the keys of a read
// of SecretsPrefix. A copy that does not decode still counts (its key is
// guarded and overwritten) with version 0.
func secretCopies(kvs []*mvccpb.KeyValue, name string) []secretCopy {
	var out []secretCopy
	for _, kv := range kvs {
		pk, err := registry.ParseKey(string(kv.Key))
		if err != nil || pk.Kind != registry.KindSecret || pk.Name != name {
			continue
		}
		c := secretCopy{node: pk.Node, key: string(kv.Key), modRev: kv.ModRevision}
		if s, err := registry.DecodeSealedSecret(kv.Value); err == nil {
			c.Version = s.Version
		}
		out = append(out, c)
	}
	return out
}
