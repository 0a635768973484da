package agent

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshd/meshd/pkg/registry"
)

type metrics struct {
	reconciles   *prometheus.CounterVec
	duration     prometheus.Histogram
	wait         prometheus.Histogram
	applyTime    *prometheus.HistogramVec
	applied      prometheus.Gauge
	seen         prometheus.Gauge
	leaseLost    prometheus.Counter
	registered   prometheus.Gauge
	relists      prometheus.Counter
	advertised   prometheus.Gauge
	problems     prometheus.Gauge
	statusWrites prometheus.Counter
	statusBytes  prometheus.Counter
	lastSuccess  *prometheus.GaugeVec
	failures     *prometheus.GaugeVec
	rejected     *prometheus.GaugeVec
	nodes        prometheus.Gauge
}

func newMetrics(r prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		reconciles: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshd_component_applies_total", Help: "Component apply calls, by component and result.",
		}, []string{"component", "result"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "meshd_reconcile_seconds", Help: "Time of one reconcile pass over every component.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16),
		}),
		wait: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "meshd_reconcile_wait_seconds", Help: "Time from a registry change's arrival to the start of the pass that applies it (the coalescing delay).",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16),
		}),
		applyTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "meshd_component_apply_seconds", Help: "Time of one component's apply call in a reconcile pass.",
			Buckets: prometheus.ExponentialBuckets(0.0001, 2, 18),
		}, []string{"component"}),
		applied:      prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshd_applied_revision", Help: "Newest etcd revision every component applied."}),
		seen:         prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshd_seen_revision", Help: "Newest etcd revision received."}),
		leaseLost:    prometheus.NewCounter(prometheus.CounterOpts{Name: "meshd_lease_lost_total", Help: "Times the presence lease was lost and re-acquired."}),
		registered:   prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshd_registered", Help: "1 while the node entry is registered on a live lease."}),
		relists:      prometheus.NewCounter(prometheus.CounterOpts{Name: "meshd_registry_relists_total", Help: "Full re-lists of a watched prefix (start and compaction)."}),
		advertised:   prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshd_instances_advertised", Help: "Instances currently advertised (check passing)."}),
		problems:     prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshd_registry_problems", Help: "Registry keys skipped as invalid."}),
		statusWrites: prometheus.NewCounter(prometheus.CounterOpts{Name: "meshd_status_writes_total", Help: "Status writes to etcd."}),
		statusBytes:  prometheus.NewCounter(prometheus.CounterOpts{Name: "meshd_status_written_bytes_total", Help: "Bytes of status values written to etcd."}),
		lastSuccess: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "meshd_component_last_success_timestamp_seconds",
			Help: "When the component last applied a snapshot without error (Unix time; 0 before the first).",
		}, []string{"component"}),
		failures: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "meshd_component_consecutive_failures",
			Help: "Apply calls of the component that failed in a row (0 once one succeeds).",
		}, []string{"component"}),
		rejected: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "meshd_registry_rejected_keys",
			Help: "Registry keys skipped as invalid in the newest snapshot, by reason.",
		}, []string{"reason"}),
	}
	m.nodes = prometheus.NewGauge(prometheus.GaugeOpts{
		Name: "meshd_cluster_nodes",
		Help: "Nodes with a live (leased) entry under /cluster/nodes in the newest snapshot.",
	})
	for _, r := range registry.ProblemReasons {
		m.rejected.WithLabelValues(r).Set(0)
	}
	for _, c := range []prometheus.Collector{m.reconciles, m.duration, m.wait, m.applyTime, m.applied, m.seen, m.leaseLost, m.registered, m.relists, m.advertised, m.problems, m.statusWrites, m.statusBytes, m.lastSuccess, m.failures, m.rejected, m.nodes} {
		if err := r.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// components makes every component's series exist from the start, so a
// component that never succeeds shows as 0 rather than as no data.
func (m *metrics) components(cs []Component) {
	for _, c := range cs {
		m.lastSuccess.WithLabelValues(c.Name())
		m.failures.WithLabelValues(c.Name())
	}
}

// rejectedKeys sets the rejected-key gauges from a snapshot's problems.
func (m *metrics) rejectedKeys(probs []registry.Problem) {
	n := make(map[string]int, len(registry.ProblemReasons))
	for _, p := range probs {
		n[p.Reason]++
	}
	for _, r := range registry.ProblemReasons {
		m.rejected.WithLabelValues(r).Set(float64(n[r]))
	}
}
