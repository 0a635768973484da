package hetzner

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"

	"github.com/hetznercloud/hcloud-go/v2/hcloud"

	"github.com/meshd/meshd/pkg/registry"
)

// ErrNotInCluster is returned (wrapped) when asked to destroy a name that
// is neither a server of the cluster nor a node in its registry.
var ErrNotInCluster = errors.New("not in the cluster")

// ErrKeysLeft is returned (wrapped) by Destroy when servers were deleted
// but their registry keys could not be removed (etcd unreachable): the
// results say which keys remain and how to remove them later.
var ErrKeysLeft = errors.New("registry keys left behind")

// RegistryKeysOf describes the registry keys a node may have, for an
// operator who must remove them later.
func RegistryKeysOf(node string) []string {
	return []string{registry.NodeKey(node), registry.MemberKey(node), registry.StatusKey(node),
		registry.SecretsNodePrefix(node) + "*", registry.SubnetsPrefix + "<its subnet>",
		registry.ClusterPrefix + "<group>/<app>/instances/" + node}
}

// RemoveLaterHint is the command that removes a node's keys once etcd is
// reachable again: destroy of a name with keys and no server removes
// only the keys.
func RemoveLaterHint(node string) string { return "meshctl destroy " + node }

// NodeRemover deletes every registry key of a node. registry.RemoveNode
// is the real one.
type NodeRemover interface {
	RemoveNode(ctx context.Context, name string) (deleted int64, err error)
}

// DestroyPlan is what Destroy will delete.
type DestroyPlan struct {
	Cluster string
	// Servers are the cluster's servers to delete, then their keys.
	Servers []*hcloud.Server
	// RegistryOnly are nodes with registry keys and no server (a previous
	// destroy that deleted the server but not the keys, or a node that
	// never had a Hetzner server): only their keys are deleted.
	RegistryOnly []string
}

// Names returns every name in the plan, sorted.
func (p DestroyPlan) Names() []string {
	var out []string
	for _, s := range p.Servers {
		out = append(out, s.Name)
	}
	out = append(out, p.RegistryOnly...)
	slices.Sort(out)
	return out
}

// InRegistry reports whether the snapshot has any key of node.
func InRegistry(snap *registry.Snapshot, node string) bool {
	if snap == nil {
		return false
	}
	_, n := snap.Nodes[node]
	_, m := snap.Members[node]
	_, s := snap.Statuses[node]
	if n || m || s {
		return true
	}
	for _, a := range snap.Apps {
		if _, ok := a.Instances[node]; ok {
			return true
		}
	}
	return slices.Contains(slices.Collect(maps.Values(snap.Subnets)), node)
}

// PlanDestroy decides what destroying names means, from the cluster's
// servers (already filtered by label) and the registry. It refuses the
// whole request if any name is in neither, so a typo deletes nothing.
func PlanDestroy(cluster string, names []string, servers []*hcloud.Server, snap *registry.Snapshot) (DestroyPlan, error) {
	plan := DestroyPlan{Cluster: cluster}
	if len(names) == 0 {
		return plan, fmt.Errorf("%w: no server names given", ErrInvalid)
	}
	byName := map[string]*hcloud.Server{}
	for _, s := range servers {
		if s.Labels[LabelCluster] == cluster {
			byName[s.Name] = s
		}
	}
	var unknown []string
	seen := map[string]bool{}
	for _, n := range names {
		if seen[n] {
			continue
		}
		seen[n] = true
		if err := registry.ValidName(n); err != nil {
			return DestroyPlan{}, fmt.Errorf("%w: %v", ErrInvalid, err)
		}
		switch s, ok := byName[n]; {
		case ok:
			plan.Servers = append(plan.Servers, s)
		case InRegistry(snap, n):
			plan.RegistryOnly = append(plan.RegistryOnly, n)
		default:
			unknown = append(unknown, n)
		}
	}
	if len(unknown) > 0 {
		reg := "no registry entry"
		if snap == nil {
			reg = "the registry could not be read"
		}
		return DestroyPlan{}, fmt.Errorf("%w: %s: no server labelled %s=%s and %s; nothing deleted",
			ErrNotInCluster, strings.Join(unknown, ", "), LabelCluster, cluster, reg)
	}
	return plan, nil
}

// DestroyResult is what happened to one name.
type DestroyResult struct {
	Name          string `json:"name"`
	ID            int64  `json:"id,omitempty"`
	ServerDeleted bool   `json:"serverDeleted"`
	KeysDeleted   int64  `json:"keysDeleted"`
	// KeysLeft are the registry keys that may remain because the
	// registry could not be reached, and RemoveLater the command that
	// removes them once it can.
	KeysLeft    []string `json:"keysLeft,omitempty"`
	RemoveLater string   `json:"removeLater,omitempty"`
	Outcome     Outcome  `json:"outcome"`
	Error       string   `json:"error,omitempty"`
}

// Destroy deletes the plan's servers (in parallel, bounded) and then the
// registry keys of each one whose server is gone. A server that could not
// be deleted keeps its keys: it may still be running. With reg nil (the
// registry is unreachable) the servers are still deleted, and each result
// lists the keys left behind; the error then wraps ErrKeysLeft.
func (p *Provisioner) Destroy(ctx context.Context, plan DestroyPlan, reg NodeRemover, parallel int) ([]DestroyResult, error) {
	parallel = max(parallel, 1)
	var results []DestroyResult
	var errs []error
	var left []string
	var mu sync.Mutex
	record := func(r DestroyResult, err error) {
		mu.Lock()
		defer mu.Unlock()
		results = append(results, r)
		if err != nil {
			errs = append(errs, err)
		}
	}
	keysLeft := func(r *DestroyResult) {
		r.KeysLeft, r.RemoveLater = RegistryKeysOf(r.Name), RemoveLaterHint(r.Name)
		mu.Lock()
		left = append(left, r.Name)
		mu.Unlock()
	}
	removeKeys := func(r *DestroyResult) error {
		if reg == nil {
			keysLeft(r)
			return nil
		}
		n, err := reg.RemoveNode(ctx, r.Name)
		if err != nil {
			keysLeft(r)
			return fmt.Errorf("remove registry keys: %w", err)
		}
		r.KeysDeleted = n
		return nil
	}
	sem := make(chan struct{}, parallel)
	var wg sync.WaitGroup
	for _, s := range plan.Servers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sem <- struct{}{}
			defer func() { <-sem }()
			r := DestroyResult{Name: s.Name, ID: s.ID, Outcome: OutcomeFailed}
			p.progress().Server(s.Name, "deleting")
			err := p.deleteServer(ctx, s)
			if err == nil {
				r.ServerDeleted = true
				if reg != nil {
					p.progress().Server(s.Name, "deleted, removing registry keys")
				}
				err = removeKeys(&r)
			}
			if err != nil {
				r.Error = err.Error()
				p.progress().Server(s.Name, "failed: "+err.Error())
				record(r, fmt.Errorf("server %s: %w", s.Name, err))
				return
			}
			r.Outcome = OutcomeDeleted
			if r.KeysLeft != nil {
				p.progress().Server(s.Name, fmt.Sprintf("deleted; the registry is unreachable, so these keys may remain: %s; remove them later with: %s",
					strings.Join(r.KeysLeft, " "), r.RemoveLater))
			} else {
				p.progress().Server(s.Name, fmt.Sprintf("deleted (%d registry keys)", r.KeysDeleted))
			}
			record(r, nil)
		}()
	}
	wg.Wait()
	for _, n := range plan.RegistryOnly {
		r := DestroyResult{Name: n, Outcome: OutcomeDeleted}
		err := removeKeys(&r)
		if err != nil {
			r.Outcome, r.Error = OutcomeFailed, err.Error()
			err = fmt.Errorf("node %s: %w", n, err)
		}
		p.progress().Server(n, fmt.Sprintf("no server; %d registry keys deleted", r.KeysDeleted))
		record(r, err)
	}
	slices.SortFunc(results, func(a, b DestroyResult) int { return strings.Compare(a.Name, b.Name) })
	if len(left) > 0 {
		slices.Sort(left)
		var cmds []string
		for _, n := range left {
			cmds = append(cmds, RemoveLaterHint(n))
		}
		kerr := fmt.Errorf("%w for %s (the registry was not reachable): once etcd is back, run: %s",
			ErrKeysLeft, strings.Join(left, ", "), strings.Join(cmds, "; "))
		if len(errs) == 0 {
			return results, kerr
		}
		errs = append(errs, kerr)
	}
	if len(errs) > 0 {
		return results, fmt.Errorf("%d of %d failed: %w", len(errs), len(results), errors.Join(errs...))
	}
	return results, nil
}

func (p *Provisioner) deleteServer(ctx context.Context, s *hcloud.Server) error {
	res, _, err := p.Client.Server.DeleteWithResult(ctx, s)
	if hcloud.IsError(err, hcloud.ErrorCodeNotFound) {
		return nil // already gone
	}
	if err != nil {
		return fmt.Errorf("delete server %d: %w", s.ID, err)
	}
	if err := p.Client.Action.WaitFor(ctx, res.Action); err != nil {
		return fmt.Errorf("delete server %d: %w", s.ID, err)
	}
	return nil
}
