package overlay

import (
	"errors"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/meshd/meshd/pkg/overlay/desired"
)

func TestMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	m, err := newMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	m.observe(desired.Plan{Peers: []desired.PeerChange{{Op: desired.OpAdd}, {Op: desired.OpAdd}, {Op: desired.OpRemove}}}, nil)
	m.observe(desired.Plan{}, errors.New("boom"))
	if got := value(t, m.applies); got != 2 {
		t.Errorf("applies = %v, want 2", got)
	}
	if got := value(t, m.errors); got != 1 {
		t.Errorf("errors = %v, want 1", got)
	}
	if got := value(t, m.changes.WithLabelValues("add")); got != 2 {
		t.Errorf("adds = %v, want 2", got)
	}
	// A second component on the same registry is a wiring bug: say so.
	if _, err := newMetrics(reg); err == nil {
		t.Error("registering twice succeeded")
	}
}

// value reads a counter or gauge.
func value(t *testing.T, m prometheus.Metric) float64 {
	t.Helper()
	var d dto.Metric
	if err := m.Write(&d); err != nil {
		t.Fatal(err)
	}
	switch {
	case d.Counter != nil:
		return d.Counter.GetValue()
	case d.Gauge != nil:
		return d.Gauge.GetValue()
	}
	t.Fatal("not a counter or gauge")
	return 0
}
