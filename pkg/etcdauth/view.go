package etcdauth

import (
	"cmp"
	"context"
	"fmt"
	"net/netip"
	"slices"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/registry"
)

// KV is one key-value pair as ViewOf reads it.
type KV struct {
	Key   string
	Value []byte
}

// ViewOf builds the View from the keys under /cluster/ (values are needed
// only for node entries and subnet claims). Nodes come from key names
// only (node entries and member records). Keys that do not parse are
// skipped: a hostile key must not widen or break anyone's role. It is
// pure, so the policy can be tested without etcd.
func ViewOf(kvs []KV) View {
	v := View{Claims: map[string][]netip.Prefix{}, ClaimNode: map[netip.Prefix]string{}, IPv4: map[string]string{}, Instances: map[string][]registry.AppID{}}
	apps := map[registry.AppID]bool{}
	nodes := map[string]bool{}
	for _, kv := range kvs {
		pk, err := registry.ParseKey(kv.Key)
		if err != nil {
			continue
		}
		switch pk.Kind {
		case registry.KindMeta:
			apps[registry.AppID{Group: pk.Group, Name: pk.App}] = true
		case registry.KindInstance:
			v.Instances[pk.Node] = append(v.Instances[pk.Node], registry.AppID{Group: pk.Group, Name: pk.App})
		case registry.KindNode:
			nodes[pk.Node] = true
			if n, err := registry.DecodeNode(pk.Node, kv.Value); err == nil {
				v.IPv4[pk.Node] = n.IPv4
			}
		case registry.KindMember:
			nodes[pk.Node] = true
		case registry.KindSubnet:
			c, err := registry.DecodeSubnetClaim(kv.Value)
			if err != nil {
				continue
			}
			// The value names a node, but the node that holds the key
			// may have written any name into it: it says who the claim
			// is for, never which nodes exist (see AssignClaims).
			v.ClaimNode[pk.Subnet] = c.Node
			v.Claims[c.Node] = append(v.Claims[c.Node], pk.Subnet)
		}
	}
	for a := range apps {
		v.Apps = append(v.Apps, a)
	}
	slices.SortFunc(v.Apps, compareApp)
	for _, as := range v.Instances {
		slices.SortFunc(as, compareApp)
	}
	for n := range nodes {
		v.Nodes = append(v.Nodes, n)
	}
	slices.Sort(v.Nodes)
	for _, ps := range v.Claims {
		slices.SortFunc(ps, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	}
	return v
}

// ReadView reads the View from etcd.
func ReadView(ctx context.Context, kv clientv3.KV) (View, error) {
	resp, err := kv.Get(ctx, registry.ClusterPrefix, clientv3.WithPrefix())
	if err != nil {
		return View{}, fmt.Errorf("read cluster: %w", err)
	}
	kvs := make([]KV, 0, len(resp.Kvs))
	for _, x := range resp.Kvs {
		kvs = append(kvs, KV{Key: string(x.Key), Value: x.Value})
	}
	return ViewOf(kvs), nil
}

func compareApp(x, y registry.AppID) int {
	return cmp.Or(cmp.Compare(x.Group, y.Group), cmp.Compare(x.Name, y.Name))
}
