package overlay

import (
	"time"

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

// Per-peer series, read from the device at scrape time (peerCollector).
var (
	peerHandshakeDesc = prometheus.NewDesc("meshd_wireguard_peer_last_handshake_timestamp_seconds",
		"Time of the peer's last WireGuard handshake, seconds since the epoch (0: none yet).", []string{"peer"}, nil)
	peerRxDesc = prometheus.NewDesc("meshd_wireguard_peer_receive_bytes_total",
		"Bytes received from the peer, as the WireGuard device counts them.", []string{"peer"}, nil)
	peerTxDesc = prometheus.NewDesc("meshd_wireguard_peer_transmit_bytes_total",
		"Bytes sent to the peer, as the WireGuard device counts them.", []string{"peer"}, nil)
)

// peerCollector reports one series per peer of the live device. It reads
// the device at each scrape, so a removed peer's series vanish with it.
// A peer is labelled with its node name, or its public key when the
// desired state does not name it.
type peerCollector struct{ c *Component }

func (p peerCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- peerHandshakeDesc
	ch <- peerRxDesc
	ch <- peerTxDesc
}

func (p peerCollector) Collect(ch chan<- prometheus.Metric) {
	for _, d := range p.c.PeerDetails(time.Now()) {
		peer := d.Name
		if peer == "" {
			peer = d.PublicKey
		}
		var hs float64
		if !d.LastHandshake.IsZero() {
			hs = float64(d.LastHandshake.UnixNano()) / 1e9
		}
		ch <- prometheus.MustNewConstMetric(peerHandshakeDesc, prometheus.GaugeValue, hs, peer)
		ch <- prometheus.MustNewConstMetric(peerRxDesc, prometheus.CounterValue, float64(d.RxBytes), peer)
		ch <- prometheus.MustNewConstMetric(peerTxDesc, prometheus.CounterValue, float64(d.TxBytes), peer)
	}
}
