package registry

import (
	"context"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// kvsOf converts etcd key-values.
func kvsOf(resp *clientv3.GetResponse) []KV {
	out := make([]KV, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		out = append(out, KV{Key: string(kv.Key), Value: kv.Value, Lease: kv.Lease, Created: kv.CreateRevision})
	}
	return out
}

// ReadSnapshot reads the cluster view, every node's status and flannel's
// keys at one revision (one transaction), for one-shot readers such as
// meshctl. Secrets are not read.
func ReadSnapshot(ctx context.Context, cli *clientv3.Client) (*Snapshot, error) {
	resp, err := cli.Txn(ctx).Then(
		clientv3.OpGet(ClusterPrefix, clientv3.WithPrefix()),
		clientv3.OpGet(StatusPrefix, clientv3.WithPrefix()),
		clientv3.OpGet(FlannelSubnetPrefix, clientv3.WithPrefix()),
		clientv3.OpGet(FlannelConfigKey),
	).Commit()
	if err != nil {
		return nil, fmt.Errorf("read cluster: %w", err)
	}
	var kvs []KV
	for _, r := range resp.Responses {
		kvs = append(kvs, kvsOf((*clientv3.GetResponse)(r.GetResponseRange()))...)
	}
	return SnapshotOf(kvs, resp.Header.Revision), nil
}
