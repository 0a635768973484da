package haproxycfg

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the component's Prometheus counters.
type metrics struct {
	reloads            *prometheus.CounterVec
	runtimeUpdates     prometheus.Counter
	runtimeSlots       prometheus.Counter
	validationFailures prometheus.Counter
	masterStarts       prometheus.Counter
}

// newMetrics registers the counters on reg (a private registry if nil).
func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	if reg == nil {
		reg = prometheus.NewRegistry()
	}
	m := &metrics{
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshd_haproxy_reloads_total",
			Help: "HAProxy reloads through the master socket, by result (ok, failed).",
		}, []string{"result"}),
		runtimeUpdates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshd_haproxy_runtime_updates_total",
			Help: "Instance changes applied through the runtime API without a reload.",
		}),
		runtimeSlots: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshd_haproxy_runtime_slot_changes_total",
			Help: "Server slots changed through the runtime API.",
		}),
		validationFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshd_haproxy_validation_failures_total",
			Help: "Rendered configurations that haproxy -c rejected.",
		}),
		masterStarts: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshd_haproxy_master_starts_total",
			Help: "HAProxy masters started by the supervisor.",
		}),
	}
	for _, c := range []prometheus.Collector{m.reloads, m.runtimeUpdates, m.runtimeSlots, m.validationFailures, m.masterStarts} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("haproxy metrics: %w", err)
		}
	}
	return m, nil
}

func (m *metrics) hooks() Hooks {
	return Hooks{
		Reload: func(ok bool) {
			if ok {
				m.reloads.WithLabelValues("ok").Inc()
			} else {
				m.reloads.WithLabelValues("failed").Inc()
			}
		},
		RuntimeUpdate: func(slots int) {
			m.runtimeUpdates.Inc()
			m.runtimeSlots.Add(float64(slots))
		},
		ValidationFailure: m.validationFailures.Inc,
	}
}
