package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/config"
	"github.com/meshd/meshd/pkg/registry"
	"github.com/meshd/meshd/pkg/sandbox"
)

// TestEtcdMembers is fault 5 of docs/faults.md at the meshd level: three real
// meshd nodes (userspace WireGuard, haproxy) against a three-member etcd
// in the hub namespace (sandbox.StartEtcdCluster). A follower restarts,
// the leader is stopped (leader change) and comes back, and finally every
// member restarts in turn. After each, every node must hold a live lease
// (kept or re-registered), with exactly one node entry, member record,
// subnet claim and instance each, no leaked lease, every node applying new
// changes, and the demo load through HAProxy must not fail.
func TestEtcdMembers(t *testing.T) {
	c, _ := startCluster(t, "q", faultTTL)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	ec, err := c.StartEtcdCluster(ctx, 3)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ec.Close) // before the sandbox's own teardown (cleanups run last-in first-out)
	cli := ec.Client()
	meta, _ := json.Marshal(sandbox.DemoMeta())
	if _, err := cli.Put(ctx, registry.MetaKey(sandbox.DemoGroup, sandbox.DemoApp), string(meta)); err != nil {
		t.Fatal(err)
	}
	edit := func(cfg *config.Config) { cfg.Etcd.Endpoints = ec.Endpoints() }
	for i := range 3 {
		no := sandbox.NodeOptions{Consume: []registry.Group{sandbox.DemoGroup}, Edit: edit}
		if i == 0 {
			no = sandbox.NodeOptions{
				Instances: []config.Instance{{App: sandbox.DemoApp, Group: sandbox.DemoGroup, Port: sandbox.DemoPort,
					Check: config.Check{TCP: fmt.Sprintf("127.0.0.1:%d", sandbox.DemoPort)}}},
				BeforeStart: func(n *sandbox.Node) error { return n.ServeDemo(sandbox.DemoPort) },
				Edit:        edit,
			}
		}
		if _, err := c.AddNode(ctx, no); err != nil {
			t.Fatal(err)
		}
	}
	leases, err := checkRegistry(ctx, cli, c, 30*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"n2", "n3"} {
		if err := steady(ctx, c.Node(n), demoURL, 2*time.Second, 20*time.Second); err != nil {
			t.Fatalf("%s does not reach the demo app steadily: %v", n, err)
		}
	}

	step := func(t *testing.T, what string, fault func() error) {
		loads := []*load{
			startLoad(c.Node("n2"), demoURL, 2, 20*time.Millisecond, 15*time.Second),
			startLoad(c.Node("n3"), demoURL, 2, 20*time.Millisecond, 15*time.Second),
		}
		start := time.Now()
		if err := fault(); err != nil {
			t.Fatal(err)
		}
		faultTook, recovered := time.Since(start), time.Now()
		after, err := checkRegistry(ctx, cli, c, 20*time.Second)
		if err != nil {
			t.Fatalf("after %s: %v", what, err)
		}
		t.Logf("%s (took %v): registry consistent and every node applied a new change %v after the members were back",
			what, faultTook.Round(time.Millisecond), time.Since(recovered).Round(time.Millisecond))
		for n, l := range after {
			if l == leases[n] {
				t.Logf("%s kept its lease %x", n, l)
			} else {
				t.Logf("%s re-registered: lease %x, was %x", n, l, leases[n])
			}
		}
		leases = after
		for i, l := range loads {
			r := l.stop()
			t.Logf("load %d: %s", i, r)
			if r.Failed > 0 {
				t.Errorf("load %d failed across %s: %s %v", i, what, r, r.Errors)
			}
		}
		// Leases of abandoned registrations would expire by themselves;
		// after a TTL none may be left besides the nodes' own.
		time.Sleep(faultTTL + time.Second)
		resp, err := cli.Leases(ctx)
		if err != nil {
			t.Fatal(err)
		}
		// Besides its session lease each node holds the 24 h lease of its
		// flannel-format subnet lease, which it keeps across etcd outages.
		fl, err := cli.Get(ctx, registry.FlannelSubnetPrefix, clientv3.WithPrefix())
		if err != nil {
			t.Fatal(err)
		}
		flannelLeases := map[int64]bool{}
		for _, kv := range fl.Kvs {
			flannelLeases[kv.Lease] = true
		}
		if len(flannelLeases) != len(leases) {
			t.Errorf("after %s: %d flannel-format subnet leases, want one per node (%d)", what, len(flannelLeases), len(leases))
		}
		if len(resp.Leases) != len(leases)+len(flannelLeases) {
			t.Errorf("after %s: %d leases in etcd, want one session lease and one flannel lease per node (%d)", what, len(resp.Leases), 2*len(leases))
		}
	}
	t.Run("follower restart", func(t *testing.T) {
		step(t, "follower restart", func() error {
			l, err := ec.Leader(ctx)
			if err != nil {
				return err
			}
			f := (l + 1) % 3
			ec.StopMember(f)
			time.Sleep(2 * time.Second)
			return ec.StartMember(f)
		})
	})
	t.Run("leader change", func(t *testing.T) {
		step(t, "leader stop", func() error {
			l, err := ec.Leader(ctx)
			if err != nil {
				return err
			}
			ec.StopMember(l)
			nl, err := ec.Leader(ctx)
			if err != nil {
				return err
			}
			t.Logf("leader m%d stopped, m%d elected", l+1, nl+1)
			time.Sleep(2 * time.Second)
			return ec.StartMember(l)
		})
	})
	t.Run("rolling restart", func(t *testing.T) {
		step(t, "rolling restart", func() error {
			for i := range 3 {
				ec.StopMember(i)
				time.Sleep(time.Second)
				if err := ec.StartMember(i); err != nil {
					return err
				}
				if _, err := ec.Leader(ctx); err != nil {
					return err
				}
			}
			return nil
		})
	})
}

// checkRegistry waits (up to d) until the 3-node registry is consistent
// and every node applied a fresh write: exactly the nodes' entries, each
// on a live lease, one member record and one subnet claim per node, n1's
// one demo instance. It returns each node's lease.
func checkRegistry(ctx context.Context, cli *clientv3.Client, c *sandbox.Cluster, d time.Duration) (map[string]clientv3.LeaseID, error) {
	nodes := c.NodeNames()
	var leases map[string]clientv3.LeaseID
	// One write every node must apply (a key meshd ignores, which still
	// advances its revision), retried while etcd has no quorum.
	var probeRev int64
	_, err := eventually(d, 100*time.Millisecond, func() error {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		w, err := cli.Put(rctx, "/cluster/e2e/probe", fmt.Sprint(time.Now().UnixNano()))
		if err == nil {
			probeRev = w.Header.Revision
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	_, err = eventually(d, 100*time.Millisecond, func() error {
		rctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		resp, err := cli.Get(rctx, "/", clientv3.WithPrefix())
		if err != nil {
			return err
		}
		snap := registry.SnapshotOf(kvs(resp), resp.Header.Revision)
		st := map[string]registry.Status{}
		for _, kv := range resp.Kvs {
			if name, ok := strings.CutPrefix(string(kv.Key), registry.StatusPrefix); ok {
				if s, err := registry.DecodeStatus(name, kv.Value); err == nil {
					st[name] = s
				}
			}
		}
		if len(snap.Nodes) != len(nodes) || len(snap.Members) != len(nodes) {
			return fmt.Errorf("%d node entries and %d members, want %d each", len(snap.Nodes), len(snap.Members), len(nodes))
		}
		claims := map[string]int{}
		for _, owner := range snap.Subnets {
			claims[owner]++
		}
		leases = map[string]clientv3.LeaseID{}
		for _, n := range nodes {
			if claims[n] != 1 {
				return fmt.Errorf("%s holds %d subnet claims", n, claims[n])
			}
			e, ok := snap.Nodes[n]
			if !ok || e.Lease == 0 {
				return fmt.Errorf("%s has no leased entry", n)
			}
			ttl, err := cli.TimeToLive(rctx, clientv3.LeaseID(e.Lease))
			if err != nil || ttl.TTL <= 0 {
				return fmt.Errorf("%s's lease %x is not alive (%v)", n, e.Lease, err)
			}
			leases[n] = clientv3.LeaseID(e.Lease)
			if st[n].Revision < probeRev {
				return fmt.Errorf("%s applied %d, want %d", n, st[n].Revision, probeRev)
			}
		}
		app := snap.Apps[registry.AppID{Group: sandbox.DemoGroup, Name: sandbox.DemoApp}]
		if app == nil || len(app.Instances) != 1 {
			return fmt.Errorf("demo app instances: %v", app)
		}
		if len(snap.Problems) > 0 {
			return fmt.Errorf("registry problems: %v", snap.Problems)
		}
		return nil
	})
	return leases, err
}

func kvs(resp *clientv3.GetResponse) []registry.KV {
	out := make([]registry.KV, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		out = append(out, registry.KV{Key: string(kv.Key), Value: kv.Value, Lease: kv.Lease})
	}
	return out
}
