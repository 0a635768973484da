package overlay

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshd/meshd/pkg/overlay/desired"
)

// metrics are the overlay's Prometheus series. They live on the
// component, registered on the Registerer New was given: no globals.
type metrics struct {
	peers   prometheus.Gauge
	applies prometheus.Counter
	errors  prometheus.Counter
	changes *prometheus.CounterVec
	repairs prometheus.Counter
	retries prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		peers: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: "meshd", Subsystem: "overlay", Name: "peers",
			Help: "WireGuard peers in the last applied overlay state.",
		}),
		applies: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "meshd", Subsystem: "overlay", Name: "applies_total",
			Help: "Overlay apply passes (each compares the live device with the desired state).",
		}),
		errors: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "meshd", Subsystem: "overlay", Name: "apply_errors_total",
			Help: "Overlay apply passes that failed at least partly.",
		}),
		changes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "meshd", Subsystem: "overlay", Name: "peer_changes_total",
			Help: "Per-peer changes sent to the WireGuard device, by operation.",
		}, []string{"op"}),
		repairs: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "meshd", Subsystem: "overlay", Name: "repairs_total",
			Help: "Times the overlay put back something another program removed (a route, an address, the interface).",
		}),
		retries: prometheus.NewCounter(prometheus.CounterOpts{
			Namespace: "meshd", Subsystem: "overlay", Name: "handshake_kicks_total",
			Help: "Newly added peers re-added because their first WireGuard handshake had not completed (see retryDelays).",
		}),
	}
	if reg != nil {
		for _, c := range []prometheus.Collector{m.peers, m.applies, m.errors, m.changes, m.repairs, m.retries} {
			if err := reg.Register(c); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

func (m *metrics) observe(plan desired.Plan, err error) {
	m.applies.Inc()
	if err != nil {
		m.errors.Inc()
	}
	for _, c := range plan.Peers {
		m.changes.WithLabelValues(c.Op.String()).Inc()
	}
}
