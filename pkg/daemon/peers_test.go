package daemon

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/meshd/meshd/pkg/overlay"
)

// fixedPeers is a peer source with a fixed list; the overlay's own tests
// cover PeerDetails over a device.
type fixedPeers []overlay.PeerDetail

func (f fixedPeers) PeerDetails(time.Time) []overlay.PeerDetail { return f }

func TestPeersEndpoint(t *testing.T) {
	hs := time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
	peers := fixedPeers{
		{Name: "node-b", PublicKey: "kb", Endpoint: "192.0.2.2:51820", HandshakeAgeSeconds: 12, LastHandshake: hs, RxBytes: 10, TxBytes: 20},
		{Name: "node-c", PublicKey: "kc", HandshakeAgeSeconds: -1},
	}
	get := func(src peerSource, method string) *httptest.ResponseRecorder {
		rec := httptest.NewRecorder()
		peersHandler("node-a", src).ServeHTTP(rec, httptest.NewRequest(method, PeersPath, nil))
		return rec
	}
	rec := get(peers, http.MethodGet)
	if rec.Code != http.StatusOK || rec.Header().Get("Content-Type") != "application/json" {
		t.Fatalf("GET: %d %q %s", rec.Code, rec.Header().Get("Content-Type"), rec.Body)
	}
	var got peersResponse
	if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if got.Node != "node-a" || got.Time.IsZero() {
		t.Errorf("node %q time %v", got.Node, got.Time)
	}
	if diff := cmp.Diff([]overlay.PeerDetail(peers), got.Peers); diff != "" {
		t.Errorf("peers (-want +got):\n%s", diff)
	}
	if rec := get(fixedPeers(nil), http.MethodGet); rec.Code != http.StatusOK || !json.Valid(rec.Body.Bytes()) ||
		!strings.Contains(rec.Body.String(), `"peers": []`) {
		t.Errorf("no peers: %d %s, want an empty list", rec.Code, rec.Body)
	}
	if rec := get(nil, http.MethodGet); rec.Code != http.StatusNotFound {
		t.Errorf("overlay disabled: %d, want 404", rec.Code)
	}
	if rec := get(peers, http.MethodPost); rec.Code != http.StatusMethodNotAllowed {
		t.Errorf("POST: %d, want 405", rec.Code)
	}
}
