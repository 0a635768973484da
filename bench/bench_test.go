package bench

import (
	"context"
	"fmt"
	"os"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/etcdclient"
	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/sandbox"
	"github.com/meshd/meshd/pkg/sandbox/sandboxtest"
)

// TestSmoke runs the floor and scale benchmarks at a tiny size against a
// real etcd: the harness works and its numbers are sane. It is part of
// make test; the real runs are make bench.
func TestSmoke(t *testing.T) {
	s := etcdtest.New(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	newClient := func() (*clientv3.Client, error) { return s.Client() }

	floor, err := Floor(ctx, FloorOptions{NewClient: newClient, N: 3, Trials: 5})
	if err != nil {
		t.Fatal(err)
	}
	if len(floor.Samples) != 5 || floor.Quantile(0.5) <= 0 || floor.Max() > 5*time.Second {
		t.Errorf("floor: %s", floor.Summary())
	}
	t.Log(floor.Summary())

	res, err := Scale(ctx, ScaleOptions{
		NewClient: newClient, MetricsURL: s.Endpoint() + "/metrics", N: 3, Trials: 3,
		StateDir: t.TempDir(), Log: t.Logf, Idle: 2 * time.Second, Joins: 2,
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, ser := range []Series{res.Added, res.Removed, res.AddedStatus} {
		if len(ser.Samples) != 3 || ser.Quantile(0.5) <= 0 {
			t.Errorf("scale: %s", ser.Summary())
		}
	}
	// An added instance is at least as fast to apply as to be published.
	if res.Added.Quantile(0.5) > res.AddedStatus.Quantile(0.5) {
		t.Errorf("applied p50 %v after published p50 %v", res.Added.Quantile(0.5), res.AddedStatus.Quantile(0.5))
	}
	// One change: the instance write plus one status per agent, give or
	// take a heartbeat; never N².
	if res.WritesPerChange < 1 || res.WritesPerChange > float64(1+2*res.N) {
		t.Errorf("writes per change %.1f with N=%d", res.WritesPerChange, res.N)
	}
	if res.EventsPerChange <= 0 {
		t.Errorf("events per change %.1f", res.EventsPerChange)
	}
	// The agents publish the real overlay and HAProxy status: the peers
	// are there, the value is small, and an idle cluster writes none.
	if res.SamplePeers != res.N-1 {
		t.Errorf("published overlay status has %d peers, want %d", res.SamplePeers, res.N-1)
	}
	if res.StatusBytesPerNode <= 0 || res.StatusValueBytes < 200 || res.StatusValueBytes > 4096 {
		t.Errorf("status bytes: %.0f per node per change, %.0f per value", res.StatusBytesPerNode, res.StatusValueBytes)
	}
	if res.IdleStatusWrites != 0 {
		t.Errorf("%d status writes in %v idle", res.IdleStatusWrites, res.Idle)
	}
	// Two agents joined after the trials: each applied by the others,
	// and each join wrote the joiner's records and at least one status of
	// every other agent, but O(N) in all, not a storm.
	if len(res.Join.Samples) != 2 || res.Join.Quantile(0.5) <= 0 {
		t.Errorf("joins: %s", res.Join.Summary())
	}
	if res.JoinStatusWrites < float64(res.N) || res.JoinWrites < res.JoinStatusWrites+2 || res.JoinWrites > float64(8*(res.N+2)) {
		t.Errorf("a join wrote %.1f revisions, %.1f of them statuses, with N=%d", res.JoinWrites, res.JoinStatusWrites, res.N)
	}
	t.Logf("cpu/change %v, writes/change %.1f, events/change %.1f, heap/agent %d KiB",
		res.CPUPerChange, res.WritesPerChange, res.EventsPerChange, res.HeapPerAgent>>10)

	// Part live, part registered by the harness: the live agents see every
	// node, and etcd delivers to every watcher.
	part, err := Scale(ctx, ScaleOptions{
		NewClient: newClient, MetricsURL: s.Endpoint() + "/metrics", N: 6, Live: 2, Trials: 2,
		StateDir: t.TempDir(), Log: t.Logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(part.Added.Samples) != 2 || part.Live != 2 {
		t.Errorf("partly live: %s, live %d", part.Added.Summary(), part.Live)
	}
	if part.SamplePeers != part.N-1 {
		t.Errorf("partly live: overlay status has %d peers, want %d", part.SamplePeers, part.N-1)
	}
	// Events reach the 4 idle watchers and the 2 agents: more than 2 per
	// live agent.
	if part.EventsPerChange < 6 {
		t.Errorf("events per change %.1f with 6 watchers", part.EventsPerChange)
	}

	// The same through etcd's gRPC proxy: watchers and agents connect to
	// it, the harness writes to etcd.
	proxy, err := StartGRPCProxy(s.Endpoint(), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer proxy.Close()
	viaProxy := func() (*clientv3.Client, error) { // as the bench builds them
		return etcdclient.New(etcdclient.Options{Endpoints: []string{proxy.Endpoint}})
	}
	pf, err := Floor(ctx, FloorOptions{NewClient: viaProxy, Control: newClient, Label: " via grpc-proxy", N: 3, Trials: 3})
	if err != nil {
		t.Fatal(err)
	}
	if len(pf.Samples) != 3 || pf.Name != "etcd watch floor N=3 via grpc-proxy" {
		t.Errorf("floor via proxy: %s", pf.Summary())
	}
	ps, err := Scale(ctx, ScaleOptions{
		NewClient: viaProxy, Control: newClient, Label: " via grpc-proxy", MetricsURL: s.Endpoint() + "/metrics",
		N: 5, Live: 2, Trials: 2, StateDir: t.TempDir(), Log: t.Logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(ps.Added.Samples) != 2 || len(ps.AddedStatus.Samples) != 2 || ps.SamplePeers != 4 {
		t.Errorf("scale via proxy: %s, %s, %d peers", ps.Added.Summary(), ps.AddedStatus.Summary(), ps.SamplePeers)
	}
}

// TestFidelitySmoke runs the full-fidelity benchmark on a 2-node sandbox
// with two trials (root only).
func TestFidelitySmoke(t *testing.T) {
	meshd := sandboxtest.Need(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	res, err := Fidelity(ctx, FidelityOptions{
		Sandbox: sandbox.Options{Name: fmt.Sprintf("mdtb%d", os.Getpid()%100000), MeshdBinary: meshd},
		N:       2, Trials: 2, KillTrials: 1, Log: t.Logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []Series{res.Added, res.AddedServes, res.ServedFloor, res.Removed, res.RemovedServes, res.Join} {
		if len(s.Samples) != 2 {
			t.Errorf("%s: want 2 samples", s.Summary())
		}
	}
	if len(res.Killed.Samples) != 1 || res.Killed.Max() > 30*time.Second {
		t.Errorf("%s", res.Killed.Summary())
	}
	if res.ServedFloorCPU == nil || res.ServedFloorCPU.Changes != 2 {
		t.Errorf("served floor CPU: %+v", res.ServedFloorCPU)
	}
	if res.JoinCPU == nil || res.JoinCPU.Changes != 2 || sum(res.JoinCPU.Apart) > res.JoinCPU.Total() {
		t.Errorf("join CPU: %+v", res.JoinCPU)
	}
	if res.Overlay && len(res.JoinPing.Samples) != 2 {
		t.Errorf("%s: want 2 samples", res.JoinPing.Summary())
	}
}

// TestOneNodeSmoke runs one real meshd with a 20-node view for a few
// seconds (root only).
func TestOneNodeSmoke(t *testing.T) {
	meshd := sandboxtest.Need(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	res, err := OneNode(ctx, OneNodeOptions{
		Sandbox: sandbox.Options{Name: fmt.Sprintf("mdto%d", os.Getpid()%100000), MeshdBinary: meshd},
		N:       20, Idle: 3 * time.Second, Log: t.Logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	if res.Peers != 19 {
		t.Errorf("%d peers, want 19", res.Peers)
	}
	if res.RSS <= 0 || res.IdleCPU < 0 || res.IdleCPU > 1 {
		t.Errorf("RSS %d, idle CPU %.3f", res.RSS, res.IdleCPU)
	}
	if res.IdleStatusWrites != 0 {
		t.Errorf("%d status writes while idle", res.IdleStatusWrites)
	}
}
