package agent_test

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/meshd/meshd/pkg/agent"
	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/registry"
)

// series finds one series of a metric in reg (nil: none); label "" takes
// a metric without labels.
func series(t *testing.T, reg *prometheus.Registry, name, label, value string) *dto.Metric {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if label == "" {
				return m
			}
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					return m
				}
			}
		}
	}
	return nil
}

// gaugeValue reads one gauge series (-1: none).
func gaugeValue(t *testing.T, reg *prometheus.Registry, name, label, value string) float64 {
	t.Helper()
	if m := series(t, reg, name, label, value); m != nil {
		return m.GetGauge().GetValue()
	}
	return -1
}

// histogramCount reads the sample count of one histogram series (-1:
// none).
func histogramCount(t *testing.T, reg *prometheus.Registry, name, label, value string) float64 {
	t.Helper()
	if m := series(t, reg, name, label, value); m != nil {
		return float64(m.GetHistogram().GetSampleCount())
	}
	return -1
}

// TestComponentAndRejectedKeyMetrics: a failing component counts its
// failures in a row and keeps its last success time; success resets the
// count; an invalid key shows under its reason and goes when it is fixed;
// the node count follows the snapshot; applies and waits are timed.
func TestComponentAndRejectedKeyMetrics(t *testing.T) {
	srv := etcdtest.New(t)
	var failing atomic.Bool
	rec := &recorder{fail: func(*registry.Snapshot) bool { return failing.Load() }}
	reg := prometheus.NewRegistry()
	n := startNode(t, srv, "n1", id1, t.TempDir(), func(o *agent.Options) {
		o.Components = []agent.Component{rec}
		o.Registerer = reg
	})
	failures := func() float64 {
		return gaugeValue(t, reg, "meshd_component_consecutive_failures", "component", "recorder")
	}
	lastOK := func() float64 {
		return gaugeValue(t, reg, "meshd_component_last_success_timestamp_seconds", "component", "recorder")
	}
	rejected := func(reason string) float64 {
		return gaugeValue(t, reg, "meshd_registry_rejected_keys", "reason", reason)
	}
	before := float64(time.Now().Add(-time.Second).Unix())
	eventually(t, 10*time.Second, "a first successful apply", func() bool { return lastOK() >= before })
	if f := failures(); f != 0 {
		t.Errorf("failures after a success = %v, want 0", f)
	}
	// The node's own live entry.
	eventually(t, 10*time.Second, "meshd_cluster_nodes 1", func() bool { return gaugeValue(t, reg, "meshd_cluster_nodes", "", "") == 1 })
	// Every apply is timed, and a change's wait before its pass.
	var applies, waits float64
	eventually(t, 10*time.Second, "the first apply and its wait timed", func() bool {
		applies = histogramCount(t, reg, "meshd_component_apply_seconds", "component", "recorder")
		waits = histogramCount(t, reg, "meshd_reconcile_wait_seconds", "", "")
		return applies >= 1 && waits >= 1
	})

	failing.Store(true)
	if _, err := n.cli.Put(t.Context(), "/cluster/backends/bad/meta_data", `{"publish":`); err != nil {
		t.Fatal(err)
	}
	// A pass already running when failing was set may still succeed:
	// the last success is read once the first failure is in.
	eventually(t, 10*time.Second, "a failure", func() bool { return failures() >= 1 })
	ok := lastOK()
	eventually(t, 10*time.Second, "two failures in a row", func() bool { return failures() >= 2 })
	if w := histogramCount(t, reg, "meshd_reconcile_wait_seconds", "", ""); w <= waits {
		t.Errorf("a registry change was not timed: %v waits, was %v", w, waits)
	}
	if n := histogramCount(t, reg, "meshd_component_apply_seconds", "component", "recorder"); n < applies+2 {
		t.Errorf("failed applies not timed: %v, was %v", n, applies)
	}
	if got := lastOK(); got != ok {
		t.Errorf("last success moved while failing: %v -> %v", ok, got)
	}
	if got := rejected(registry.ReasonBadValue); got != 1 {
		t.Errorf("rejected bad_value = %v, want 1", got)
	}
	if got := rejected(registry.ReasonBadKey); got != 0 {
		t.Errorf("rejected bad_key = %v, want 0", got)
	}

	failing.Store(false)
	if _, err := n.cli.Put(t.Context(), "/cluster/backends/bad/meta_data", `{"publish":{"port":8081}}`); err != nil {
		t.Fatal(err)
	}
	eventually(t, 10*time.Second, "recovery", func() bool { return failures() == 0 && lastOK() > ok })
	eventually(t, 5*time.Second, "the fixed key no longer rejected", func() bool { return rejected(registry.ReasonBadValue) == 0 })
}
