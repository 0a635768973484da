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
	// Group selects the nodes whose entry consumes this group.
	Group registry.Group
	// All selects every member.
	All bool
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
	recipients, skipped, err := resolveTargets(snap, t)
	if err != nil {
		return PutResult{}, false, err
	}
	var version int64
	for _, c := range existing {
		version = max(version, c.Version)
	}
	version++
	res := PutResult{Version: version, Skipped: skipped}
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
// are returned as skipped.
func resolveTargets(snap *registry.Snapshot, t Targets) (map[string]string, []string, error) {
	out := map[string]string{}
	var skipped, missing []string
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
		for _, n := range snap.SortedNodeNames() {
			if slices.Contains(snap.Nodes[n].Services, t.Group) {
				add(n, false)
			}
		}
	case t.All:
		for _, m := range snap.SortedMembers() {
			add(m.Name, false)
		}
	}
	if len(missing) > 0 {
		return nil, nil, fmt.Errorf("no sealing recipient for %s: is meshd running there with secrets enabled?", strings.Join(missing, ", "))
	}
	if len(out) == 0 {
		if len(skipped) > 0 {
			return nil, nil, fmt.Errorf("no selected node has a sealing recipient (without one: %s)", strings.Join(skipped, ", "))
		}
		return nil, nil, errors.New("no node matches the targets")
	}
	slices.Sort(skipped)
	return out, slices.Compact(skipped), nil
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
