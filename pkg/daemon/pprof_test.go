package daemon

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// TestPprofOnlyWhenEnabled: the metrics listener serves Go's profiler
// only with the pprof setting; /metrics is served either way.
func TestPprofOnlyWhenEnabled(t *testing.T) {
	for _, on := range []bool{false, true} {
		addr := freePort(t, "127.0.0.1").String()
		srv, err := serveHTTP(addr, on, prometheus.NewRegistry(), nil, http.NotFoundHandler(), "n1", "test")
		if err != nil {
			t.Fatal(err)
		}
		get := func(path string) (int, string) {
			t.Helper()
			resp, err := http.Get("http://" + addr + path)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			return resp.StatusCode, string(b)
		}
		if code, _ := get("/metrics"); code != http.StatusOK {
			t.Errorf("pprof=%v: /metrics answers %d", on, code)
		}
		code, body := get("/debug/pprof/")
		switch {
		case on && (code != http.StatusOK || !strings.Contains(body, "goroutine")):
			t.Errorf("pprof on: /debug/pprof/ answers %d, want the profile index", code)
		case !on && code != http.StatusNotFound:
			t.Errorf("pprof off: /debug/pprof/ answers %d, want 404", code)
		}
		if on {
			if code, _ := get("/debug/pprof/goroutine?debug=1"); code != http.StatusOK {
				t.Errorf("pprof on: goroutine profile answers %d", code)
			}
		}
		srv.Close()
	}
}
