package registry

import (
	"context"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// RemoveNode deletes every key of a node: its entry, its instances in
// every app, its member record, subnet claim and flannel lease, its
// status, its presence record and its secrets. nix-infra leaves these
// behind; here the subnet is released only by this call. It returns how
// many keys were deleted.
func RemoveNode(ctx context.Context, cli *clientv3.Client, name string) (int64, error) {
	return RemoveNodeWith(ctx, cli, name, RemoveOptions{})
}

// RemoveOptions tune RemoveNode.
type RemoveOptions struct {
	// KeepFlannelLease leaves the flannel lease of the node's subnet: a
	// node rolled back to flanneld has taken it over, and flanneld
	// rewrites it only at its next renewal.
	KeepFlannelLease bool
}

// RemoveNodeWith is RemoveNode with options.
func RemoveNodeWith(ctx context.Context, cli *clientv3.Client, name string, o RemoveOptions) (int64, error) {
	if err := ValidName(name); err != nil {
		return 0, err
	}
	snap, err := ReadSnapshot(ctx, cli)
	if err != nil {
		return 0, err
	}
	ops := []clientv3.Op{
		clientv3.OpDelete(NodeKey(name)),
		clientv3.OpDelete(MemberKey(name)),
		clientv3.OpDelete(StatusKey(name)),
		clientv3.OpDelete(SeenKey(name)),
		clientv3.OpDelete(SecretsNodePrefix(name), clientv3.WithPrefix()),
	}
	for p, owner := range snap.Subnets {
		if owner == name {
			// The flannel-format lease meshd keeps for the subnet goes
			// with it: flannel nodes drop the peer at once instead of
			// when its 24 h lease expires.
			ops = append(ops, clientv3.OpDelete(SubnetKey(p)))
			if !o.KeepFlannelLease {
				ops = append(ops, clientv3.OpDelete(FlannelSubnetKey(p)))
			}
		}
	}
	for id, app := range snap.Apps {
		if _, ok := app.Instances[name]; ok {
			ops = append(ops, clientv3.OpDelete(InstanceKey(id.Group, id.Name, name)))
		}
	}
	// Instances that failed to decode are not in the snapshot but must go
	// too: scan the raw keys of every group.
	for _, g := range Groups {
		resp, err := cli.Get(ctx, ClusterPrefix+string(g)+"/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
		if err != nil {
			return 0, fmt.Errorf("remove node %s: %w", name, err)
		}
		for _, kv := range resp.Kvs {
			pk, err := ParseKey(string(kv.Key))
			if err == nil && pk.Kind == KindInstance && pk.Node == name {
				if _, ok := snap.Apps[AppID{pk.Group, pk.App}].instance(name); !ok {
					ops = append(ops, clientv3.OpDelete(string(kv.Key)))
				}
			}
		}
	}
	resp, err := cli.Txn(ctx).Then(ops...).Commit()
	if err != nil {
		return 0, fmt.Errorf("remove node %s: %w", name, err)
	}
	var n int64
	for _, r := range resp.Responses {
		n += r.GetResponseDeleteRange().Deleted
	}
	return n, nil
}

func (a *App) instance(node string) (Instance, bool) {
	if a == nil {
		return Instance{}, false
	}
	in, ok := a.Instances[node]
	return in, ok
}
