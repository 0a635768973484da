package haproxycfg

import (
	"context"
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the component's Prometheus counters.
type metrics struct {
	reloads            *prometheus.CounterVec
	runtimeUpdates     prometheus.Counter
	runtimeSlots       prometheus.Counter
	validationFailures prometheus.Counter
	masterStarts       prometheus.Counter
	driftCorrections   prometheus.Counter
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
		driftCorrections: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshd_haproxy_drift_corrections_total",
			Help: "Times HAProxy was found running other servers than meshd applied (changed on the stats socket, restarted from an older file) and was put back.",
		}),
	}
	for _, c := range []prometheus.Collector{m.reloads, m.runtimeUpdates, m.runtimeSlots, m.validationFailures, m.masterStarts, m.driftCorrections} {
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

// serversCollector reads HAProxy's server health through the runtime API
// at scrape time: one series per consumed app and state, so its size is
// bounded by the apps this node consumes, not by the cluster.
type serversCollector struct {
	c       *Component
	servers *prometheus.Desc
	up      *prometheus.Desc
}

func newServersCollector(c *Component) *serversCollector {
	return &serversCollector{
		c: c,
		servers: prometheus.NewDesc("meshd_haproxy_servers",
			"Occupied server slots of each consumed app, by health (up, down) as HAProxy's runtime API reports it.",
			[]string{"app", "state"}, nil),
		up: prometheus.NewDesc("meshd_haproxy_runtime_up",
			"1 if HAProxy's runtime API answered during this scrape, else 0.", nil, nil),
	}
}

func (s *serversCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- s.servers
	ch <- s.up
}

// scrapeTimeout bounds one runtime API read during a scrape.
const scrapeTimeout = 2 * time.Second

func (s *serversCollector) Collect(ch chan<- prometheus.Metric) {
	s.c.mu.Lock()
	listeners := s.c.last.Listeners
	s.c.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), scrapeTimeout)
	defer cancel()
	health, err := s.c.applier.Runtime.Health(ctx)
	if err != nil {
		ch <- prometheus.MustNewConstMetric(s.up, prometheus.GaugeValue, 0)
		return
	}
	ch <- prometheus.MustNewConstMetric(s.up, prometheus.GaugeValue, 1)
	for _, l := range listeners {
		h, ok := health[BackendName(l.App)]
		if !ok {
			continue // not running yet: no data rather than a false "0 up"
		}
		app := l.App.String()
		ch <- prometheus.MustNewConstMetric(s.servers, prometheus.GaugeValue, float64(h.Up), app, "up")
		ch <- prometheus.MustNewConstMetric(s.servers, prometheus.GaugeValue, float64(h.Down), app, "down")
	}
}
