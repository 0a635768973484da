package creds

import (
	"errors"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	deliveries   prometheus.Counter
	openFailures prometheus.Counter
	failing      prometheus.Gauge
	unitActions  *prometheus.CounterVec
}

// newMetrics creates the component's metrics and registers them on reg
// (nil: not registered).
func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		deliveries: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshd_creds_deliveries_total",
			Help: "Credentials written to the credential store.",
		}),
		openFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshd_creds_open_failures_total",
			Help: "Sealed secrets that did not open with this node's identity.",
		}),
		failing: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshd_creds_failing_secrets",
			Help: "Secrets whose newest version is not delivered or whose units were not told.",
		}),
		unitActions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshd_creds_unit_actions_total",
			Help: "Unit restarts and reloads after a secret changed, by action and result.",
		}, []string{"action", "result"}),
	}
	if reg == nil {
		return m, nil
	}
	var errs []error
	for _, c := range []prometheus.Collector{m.deliveries, m.openFailures, m.failing, m.unitActions} {
		if err := reg.Register(c); err != nil {
			errs = append(errs, err)
		}
	}
	return m, errors.Join(errs...)
}
