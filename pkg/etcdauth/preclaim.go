package etcdauth

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/registry"
)

// preclaim claims a subnet for node as the operator, following the same
// rules as registry.ClaimMember (keep a claim the node holds, adopt the
// flannel lease of the node's public IPv4, else the lowest free subnet;
// create-only transaction), so that the node itself only ever needs write
// access to that one claim key: ClaimMember reuses a claim that names the
// node. It returns the claim and whether it is new. With dry set nothing
// is written.
func preclaim(ctx context.Context, cli *clientv3.Client, node, publicIPv4 string, pool registry.Pool, dry bool) (netip.Prefix, bool, error) {
	claimVal, err := json.Marshal(registry.SubnetClaim{Node: node})
	if err != nil {
		return netip.Prefix{}, false, err
	}
	for attempt := 0; attempt < 16; attempt++ {
		resp, err := cli.Txn(ctx).Then(
			clientv3.OpGet(registry.SubnetsPrefix, clientv3.WithPrefix()),
			clientv3.OpGet(registry.FlannelSubnetPrefix, clientv3.WithPrefix()),
		).Commit()
		if err != nil {
			return netip.Prefix{}, false, fmt.Errorf("pre-claim subnet for %s: %w", node, err)
		}
		used := map[netip.Prefix]bool{}
		claimed := map[netip.Prefix]bool{}
		for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
			pk, err := registry.ParseKey(string(kv.Key))
			if err != nil || pk.Kind != registry.KindSubnet {
				continue
			}
			used[pk.Subnet], claimed[pk.Subnet] = true, true
			if c, err := registry.DecodeSubnetClaim(kv.Value); err == nil && c.Node == node && pool.Contains(pk.Subnet) {
				return pk.Subnet, false, nil
			}
		}
		var prefer netip.Prefix
		for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
			pk, err := registry.ParseKey(string(kv.Key))
			if err != nil || pk.Kind != registry.KindFlannelLease {
				continue
			}
			p := pk.Subnet
			if registry.AdoptsFlannelLease(p, kv.Value, publicIPv4) && !claimed[p] {
				prefer = p
				continue
			}
			used[p] = true // a flannel node still running there
		}
		p, err := registry.PickSubnet(pool, used, prefer)
		if err != nil {
			return netip.Prefix{}, false, fmt.Errorf("pre-claim subnet for %s: %w", node, err)
		}
		if dry {
			return p, true, nil
		}
		tr, err := cli.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(registry.SubnetKey(p)), "=", 0)).
			Then(clientv3.OpPut(registry.SubnetKey(p), string(claimVal))).Commit()
		if err != nil {
			return netip.Prefix{}, false, fmt.Errorf("pre-claim subnet %v for %s: %w", p, node, err)
		}
		if tr.Succeeded {
			return p, true, nil
		}
	}
	return netip.Prefix{}, false, fmt.Errorf("pre-claim subnet for %s: too much contention", node)
}
