package bench

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/registry"
)

// TestScrapeHistograms reads sums and counts of plain and labelled
// histograms from a Prometheus text exposition and ignores the rest
// (buckets, other metrics sharing a prefix).
func TestScrapeHistograms(t *testing.T) {
	text := []byte(`# HELP meshd_reconcile_seconds Time of one reconcile pass.
meshd_reconcile_seconds_bucket{le="0.001"} 3
meshd_reconcile_seconds_sum 0.012
meshd_reconcile_seconds_count 4
meshd_reconcile_seconds_total_other 99
meshd_component_apply_seconds_sum{component="haproxy"} 0.5
meshd_component_apply_seconds_count{component="haproxy"} 10
meshd_component_apply_seconds_sum{component="overlay"} 0.001
meshd_component_apply_seconds_count{component="overlay"} 10
`)
	got := scrapeHistograms(text, "meshd_reconcile_seconds", "meshd_component_apply_seconds")
	want := map[string]histogram{
		"meshd_reconcile_seconds":                {0.012, 4},
		"meshd_component_apply_seconds{haproxy}": {0.5, 10},
		"meshd_component_apply_seconds{overlay}": {0.001, 10},
	}
	if len(got) != len(want) {
		t.Fatalf("got %v, want %v", got, want)
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("%s = %v, want %v", k, got[k], w)
		}
	}
	before := histogram{0.012, 4}
	after := histogram{0.032, 8}
	if d := meanDelta(before, after); d != 5*time.Millisecond {
		t.Errorf("meanDelta = %v, want 5ms", d)
	}
	if d := meanDelta(after, after); d != 0 {
		t.Errorf("meanDelta without samples = %v, want 0", d)
	}
}

// TestPoolSubnet: the harness's registered nodes take the pool's subnets
// in order, and none beyond it.
func TestPoolSubnet(t *testing.T) {
	for i, want := range map[int]string{0: "10.10.0.0/24", 1: "10.10.1.0/24", 256: "10.11.0.0/24", 9999: "10.49.15.0/24"} {
		p, err := poolSubnet(registry.DefaultPool, i)
		if err != nil || p.String() != want {
			t.Errorf("subnet %d = %v, %v; want %s", i, p, err, want)
		}
	}
	if p, err := poolSubnet(registry.DefaultPool, 90*256); err == nil {
		t.Errorf("subnet beyond the pool: %v, want an error", p)
	}
}

// TestBenchInstanceIsValid: the scale bench's instance passes meshd's
// check at every size the bench runs (it lies in the pool and in no
// subnet the bench's 10,000 nodes claim), so its change is one agents
// apply, not one they drop.
// TestBenchInstanceIsValid runs meshd's own instance check (a registry
// snapshot of an overlay store, as every agent keeps) over what the scale
// bench writes: its instance, in the name of a node without a member
// record, beside 10,000 subnet claims. meshd must keep it, or every agent
// drops it and the change measured changes nothing.
func TestBenchInstanceIsValid(t *testing.T) {
	const nodes = 10000
	kvs := []registry.KV{{Key: registry.MetaKey(registry.GroupBackends, "benchapp"), Value: []byte(`{"publish":{"port":19999}}`)}}
	for i := range nodes {
		p, err := poolSubnet(registry.DefaultPool, i)
		if err != nil {
			t.Fatal(err)
		}
		claim, _ := json.Marshal(registry.SubnetClaim{Node: fmt.Sprintf("node-%d", i)})
		kvs = append(kvs, registry.KV{Key: registry.SubnetKey(p), Value: claim, Created: int64(i + 1)})
	}
	for _, k := range []int{1, 250} { // the trials' first and last address
		value := fmt.Sprintf(`{"ipv4":"%s.%d","node":"worker-x","port":8080}`, benchInstanceNet, k)
		store := registry.NewOverlayStore(registry.DefaultPool)
		key := registry.InstanceKey(registry.GroupBackends, "benchapp", "worker-x")
		store.Replace("/", append(slices.Clone(kvs), registry.KV{Key: key, Value: []byte(value)}), 1)
		snap := store.Snapshot()
		app := snap.Apps[registry.AppID{Group: registry.GroupBackends, Name: "benchapp"}]
		if app == nil || len(app.Instances) != 1 {
			t.Errorf("instance %s: meshd dropped it (problems: %v)", value, snap.Problems)
		}
	}
	// The check is on: an address in a claimed subnet is dropped.
	p0, _ := poolSubnet(registry.DefaultPool, 0)
	store := registry.NewOverlayStore(registry.DefaultPool)
	bad := fmt.Sprintf(`{"ipv4":"%s","node":"worker-x","port":8080}`, p0.Addr().Next())
	store.Replace("/", append(slices.Clone(kvs), registry.KV{Key: registry.InstanceKey(registry.GroupBackends, "benchapp", "worker-x"), Value: []byte(bad)}), 1)
	if app := store.Snapshot().Apps[registry.AppID{Group: registry.GroupBackends, Name: "benchapp"}]; app == nil || len(app.Instances) != 0 {
		t.Errorf("instance %s in node-0's subnet was kept: the check this test relies on is not running", bad)
	}
}

func TestNetPerChange(t *testing.T) {
	for _, c := range []struct {
		cpu, wall time.Duration
		idle      float64
		n         int
		want      time.Duration
	}{
		{cpu: 10 * time.Second, wall: 20 * time.Second, idle: 0.25, n: 100, want: 50 * time.Millisecond},
		{cpu: 10 * time.Second, wall: 20 * time.Second, idle: 0, n: 100, want: 100 * time.Millisecond},
		{cpu: time.Second, wall: 20 * time.Second, idle: 0.25, n: 100, want: 0}, // idle noise above the trials' CPU
		{cpu: time.Second, wall: time.Second, idle: 0.1, n: 0, want: 0},
	} {
		if got := netPerChange(c.cpu, c.wall, c.idle, c.n); got != c.want {
			t.Errorf("netPerChange(%v, %v, %v, %d) = %v, want %v", c.cpu, c.wall, c.idle, c.n, got, c.want)
		}
	}
}

// TestFlatCostNeverPassesOnZero: when the trials' CPU less the idle rate
// is not above zero at one end, the flat-cost row judges the gross figure
// and says so, instead of a ratio of zero that would read "met".
func TestFlatCostNeverPassesOnZero(t *testing.T) {
	row := func(r *Results) target {
		t.Helper()
		for _, tg := range r.targets() {
			if strings.HasPrefix(tg.goal, "meshd's own cost per change stays flat") {
				return tg
			}
		}
		t.Fatal("no flat-cost row")
		return target{}
	}
	small := ScaleResult{N: 8, Live: 8, CPUPerAgentChange: 600 * time.Microsecond, IdleCPU: 0.002, NetCPUPerAgentChange: 590 * time.Microsecond}
	big := ScaleResult{N: 10000, Live: 100, CPUPerAgentChange: 2300 * time.Microsecond, IdleCPU: 0.25}
	got := row(&Results{Scale: []ScaleResult{small, big}})
	if got.verdict != "NOT met" || !strings.Contains(got.goal, "gross") || !strings.Contains(got.measured, "2.3ms") {
		t.Errorf("net zero at N=10000: %+v, want the gross figures judged (not met)", got)
	}
	big.NetCPUPerAgentChange = 700 * time.Microsecond
	if got := row(&Results{Scale: []ScaleResult{small, big}}); got.verdict != "met" || !strings.Contains(got.goal, "less the idle rate") {
		t.Errorf("net figures at both ends: %+v, want them judged (met)", got)
	}
}
