package daemon

import (
	"slices"
	"strings"
	"testing"

	"github.com/meshd/meshd/pkg/config"
	"github.com/meshd/meshd/pkg/haproxycfg"
	"github.com/meshd/meshd/pkg/registry"
)

// TestHAProxyReservesMetricsPort: an app publishing meshd's own metrics
// port is never rendered (its reload would fail on the bound port), and
// the operator's allowed low ports reach the renderer.
func TestHAProxyReservesMetricsPort(t *testing.T) {
	cfg := config.Default()
	cfg.NodeName = "n1"
	cfg.Consume = []registry.Group{registry.GroupServices}
	cfg.MetricsAddr = "127.0.0.1:9464"
	cfg.HAProxy.ReservedPorts = []int{2379}
	cfg.HAProxy.AllowLowPorts = []int{443}
	o := haproxyOptions(cfg)
	if !slices.Contains(o.ReservedPorts, 9464) || !slices.Contains(o.ReservedPorts, 2379) || !slices.Equal(o.AllowLowPorts, []int{443}) {
		t.Fatalf("options: reserved %v, low %v", o.ReservedPorts, o.AllowLowPorts)
	}
	id := registry.AppID{Group: registry.GroupServices, Name: "sneaky"}
	snap := &registry.Snapshot{Apps: map[registry.AppID]*registry.App{id: {ID: id, Meta: &registry.AppMeta{Publish: registry.Publish{Port: 9464}}}}}
	d := haproxycfg.Compute(snap, haproxycfg.Params{Consume: o.Consume, ReservedPorts: o.ReservedPorts})
	if len(d.Listeners) != 0 || len(d.Problems) != 1 || !strings.Contains(d.Problems[0].Reason, "9464") {
		t.Errorf("app on the metrics port: listeners %v, problems %v", d.Listeners, d.Problems)
	}
}
