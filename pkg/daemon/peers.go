package daemon

import (
	"net/http"
	"time"

	"github.com/meshd/meshd/pkg/overlay"
)

// PeersPath is where the metrics listener serves the overlay's per-peer
// detail. The node status in etcd has only a bounded summary of the
// peers; this is the full list, read from the device at each request.
const PeersPath = "/status/peers"

// peerSource is the overlay component, as the peers endpoint reads it.
type peerSource interface {
	PeerDetails(now time.Time) []overlay.PeerDetail
}

// peersResponse is the body of GET /status/peers.
type peersResponse struct {
	Node  string               `json:"node"`
	Time  time.Time            `json:"time"`
	Peers []overlay.PeerDetail `json:"peers"`
}

// peersHandler serves every WireGuard peer of the node with its endpoint,
// last handshake and byte counters, as JSON. With the overlay disabled
// (src nil) it answers 404.
func peersHandler(node string, src peerSource) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodHead {
			w.Header().Set("Allow", "GET, HEAD")
			http.Error(w, "method not allowed", http.StatusMethodNotAllowed)
			return
		}
		if src == nil {
			http.Error(w, "the overlay is not enabled on this node", http.StatusNotFound)
			return
		}
		now := time.Now().UTC()
		resp := peersResponse{Node: node, Time: now, Peers: src.PeerDetails(now)}
		if resp.Peers == nil {
			resp.Peers = []overlay.PeerDetail{}
		}
		w.Header().Set("Content-Type", "application/json")
		writeJSON(w, resp)
	})
}
