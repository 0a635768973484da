package main

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/registry"
)

// errUnhealthy makes `meshctl status` exit 1: a node is down or a
// component fails.
var errUnhealthy = errors.New("cluster unhealthy")

func cmdStatus(ctx context.Context, e *env, args []string) error {
	fs := flags(e, "status")
	out := outputFlag(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := checkOutput(*out); err != nil {
		return err
	}
	cli, err := e.etcd()
	if err != nil {
		return err
	}
	rctx, cancel := e.reqCtx(ctx)
	defer cancel()
	in, err := readStatusInput(rctx, cli)
	if err != nil {
		return err
	}
	so := buildStatus(in)
	if isData(*out) {
		err = printData(e.Stdout, *out, so)
	} else {
		err = printStatusTable(e.Stdout, so, time.Now(), *out == "wide")
	}
	if err != nil {
		return err
	}
	return statusVerdict(so)
}

// statusVerdict is the command's result: nil when every node is up (or
// starting, or not run by meshd), errUnhealthy naming the nodes otherwise.
func statusVerdict(so statusOut) error {
	if so.Down == 0 && so.Failing == 0 {
		return nil
	}
	var down, failing []string
	for _, r := range so.Nodes {
		switch r.State {
		case stateDown:
			down = append(down, registry.Printable(r.Node))
		case stateFailing:
			failing = append(failing, registry.Printable(r.Node))
		}
	}
	msg := ""
	if len(down) > 0 {
		msg = fmt.Sprintf("down: %s", listSome(down, len(down)))
	}
	if len(failing) > 0 {
		if msg != "" {
			msg += "; "
		}
		msg += fmt.Sprintf("failing: %s", listSome(failing, len(failing)))
	}
	return fmt.Errorf("%w: %s", errUnhealthy, msg)
}

// readStatusInput reads, in one transaction, the cluster, every status,
// every presence record and the revisions of every secret (keys only),
// then how many keys each node read at the revision it applied.
func readStatusInput(ctx context.Context, cli *clientv3.Client) (statusInput, error) {
	resp, err := cli.Txn(ctx).Then(
		clientv3.OpGet(registry.ClusterPrefix, clientv3.WithPrefix()),
		clientv3.OpGet(registry.StatusPrefix, clientv3.WithPrefix()),
		clientv3.OpGet(registry.SeenPrefix, clientv3.WithPrefix()),
		clientv3.OpGet(registry.SecretsPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly()),
	).Commit()
	if err != nil {
		return statusInput{}, fmt.Errorf("read cluster: %w", err)
	}
	rev := resp.Header.Revision
	in := statusInput{Seen: map[string]registry.Seen{}, Secrets: map[string][]keyRevs{}, CountThen: map[string]int64{}}
	var kvs []registry.KV
	for i, r := range resp.Responses {
		for _, kv := range r.GetResponseRange().Kvs {
			key := string(kv.Key)
			switch i {
			case 0, 1:
				kvs = append(kvs, registry.KV{Key: key, Value: kv.Value, Lease: kv.Lease})
				if i == 0 {
					in.Cluster = append(in.Cluster, keyRevs{kv.ModRevision, kv.CreateRevision})
				}
			case 2:
				pk, err := registry.ParseKey(key)
				if err == nil && pk.Kind == registry.KindSeen {
					var s registry.Seen
					if s, err = registry.DecodeSeen(pk.Node, kv.Value); err == nil {
						in.Seen[pk.Node] = s
						continue
					}
				}
				if err == nil {
					err = errors.New("not a presence record key")
				}
				in.Problems = append(in.Problems, registry.Problem{Key: key, Err: err.Error()})
			case 3:
				if pk, err := registry.ParseKey(key); err == nil && pk.Kind == registry.KindSecret {
					in.Secrets[pk.Node] = append(in.Secrets[pk.Node], keyRevs{kv.ModRevision, kv.CreateRevision})
				}
			}
		}
	}
	in.Snap = registry.SnapshotOf(kvs, rev)
	if err := countThen(ctx, cli, in.Snap, rev, in.CountThen); err != nil {
		return statusInput{}, err
	}
	return in, nil
}

// maxPastReads bounds the reads at past revisions one status makes;
// nodes beyond it have their deletions left uncounted.
const maxPastReads = 16

// countThen fills, for each node with a status, how many of the keys it
// reads existed at the revision it applied: one count-only transaction
// per distinct applied revision. A compacted revision leaves the node out
// (its deletions are then not counted).
func countThen(ctx context.Context, cli *clientv3.Client, snap *registry.Snapshot, rev int64, out map[string]int64) error {
	byRev := map[int64][]string{}
	for n, st := range snap.Statuses {
		if st.Revision > 0 && st.Revision < rev {
			byRev[st.Revision] = append(byRev[st.Revision], n)
		}
	}
	revs := slices.Sorted(maps.Keys(byRev))
	if len(revs) > maxPastReads {
		revs = revs[:maxPastReads] // the oldest: the nodes most behind
	}
	for _, r := range revs {
		// etcd bounds the operations of one transaction (128 by default).
		for nodes := range slices.Chunk(byRev[r], 100) {
			ops := []clientv3.Op{clientv3.OpGet(registry.ClusterPrefix, clientv3.WithPrefix(), clientv3.WithCountOnly(), clientv3.WithRev(r))}
			for _, n := range nodes {
				ops = append(ops, clientv3.OpGet(registry.SecretsNodePrefix(n), clientv3.WithPrefix(), clientv3.WithCountOnly(), clientv3.WithRev(r)))
			}
			resp, err := cli.Txn(ctx).Then(ops...).Commit()
			if errors.Is(err, rpctypes.ErrCompacted) {
				break
			}
			if err != nil {
				return fmt.Errorf("read revision %d: %w", r, err)
			}
			cluster := resp.Responses[0].GetResponseRange().Count
			for i, n := range nodes {
				out[n] = cluster + resp.Responses[i+1].GetResponseRange().Count
			}
		}
	}
	return nil
}
