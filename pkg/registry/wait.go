package registry

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// ErrLagging is returned (wrapped) by WaitApplied when nodes did not reach
// the revision in time.
var ErrLagging = errors.New("nodes have not applied the revision")

// LiveMeshdNodes returns the nodes that run meshd and hold a live lease:
// the ones a --wait waits for. Entries written by nix-infra (no lease, no
// meshd object) never report and are not waited for.
func LiveMeshdNodes(s *Snapshot) []string {
	var out []string
	for _, name := range s.SortedNodeNames() {
		n := s.Nodes[name]
		if n.Lease != 0 && n.Meshd != nil {
			out = append(out, name)
		}
	}
	return out
}

// Lagging returns the nodes among want whose status has not reached rev.
func Lagging(s *Snapshot, want []string, rev int64) []string {
	var out []string
	for _, n := range want {
		if st, ok := s.Statuses[n]; !ok || st.Revision < rev {
			out = append(out, n)
		}
	}
	return out
}

// WaitApplied blocks until every node in nodes (nil: every live meshd node,
// re-evaluated as nodes come and go) publishes a status revision >= rev.
// When ctx ends first it returns an error wrapping ErrLagging that names
// the nodes that lag and what they last reported.
func WaitApplied(ctx context.Context, cli *clientv3.Client, rev int64, nodes []string) error {
	for {
		snap, err := ReadSnapshot(ctx, cli)
		if err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("%w: %v", ErrLagging, err)
			}
			return err
		}
		want := nodes
		if want == nil {
			want = LiveMeshdNodes(snap)
		}
		lag := Lagging(snap, want, rev)
		if len(lag) == 0 {
			return nil
		}
		// Watch status and node changes from the snapshot's revision on,
		// then re-read: no polling loop, no missed update.
		wctx, cancel := context.WithCancel(ctx)
		sw := cli.Watch(wctx, StatusPrefix, clientv3.WithPrefix(), clientv3.WithRev(snap.Revision+1))
		nw := cli.Watch(wctx, NodesPrefix, clientv3.WithPrefix(), clientv3.WithRev(snap.Revision+1))
		select {
		case <-sw:
		case <-nw:
		case <-ctx.Done():
		}
		cancel()
		if ctx.Err() != nil {
			return fmt.Errorf("%w %d: %s", ErrLagging, rev, describeLag(snap, lag))
		}
	}
}

func describeLag(s *Snapshot, lag []string) string {
	slices.Sort(lag)
	parts := make([]string, 0, len(lag))
	for _, n := range lag {
		st, ok := s.Statuses[n]
		switch {
		case !ok:
			parts = append(parts, n+" (no status)")
		case len(st.Errors) > 0:
			var errs []string
			for c, e := range st.Errors {
				errs = append(errs, c+": "+e)
			}
			slices.Sort(errs)
			parts = append(parts, fmt.Sprintf("%s (at %d; %s)", n, st.Revision, strings.Join(errs, "; ")))
		default:
			parts = append(parts, fmt.Sprintf("%s (at %d)", n, st.Revision))
		}
	}
	return strings.Join(parts, ", ")
}
