package daemon

import (
	"context"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshd/meshd/monitoring"
	"github.com/meshd/meshd/pkg/agent"
	"github.com/meshd/meshd/pkg/config"
	"github.com/meshd/meshd/pkg/etcdclient"
)

// recorder is a Registerer that remembers every metric description it is
// given, vectors without children included (Gather omits those).
type recorder struct {
	prometheus.Registerer
	descs []*prometheus.Desc
}

func (r *recorder) Register(c prometheus.Collector) error {
	ch := make(chan *prometheus.Desc, 64)
	go func() { c.Describe(ch); close(ch) }()
	for d := range ch {
		r.descs = append(r.descs, d)
	}
	return r.Registerer.Register(c)
}

func (r *recorder) MustRegister(cs ...prometheus.Collector) {
	for _, c := range cs {
		if err := r.Register(c); err != nil {
			panic(err)
		}
	}
}

var (
	descName   = regexp.MustCompile(`fqName: "([^"]+)"`)
	descConst  = regexp.MustCompile(`constLabels: \{([^}]*)\}`)
	descVar    = regexp.MustCompile(`variableLabels: \{([^}]*)\}`)
	constLabel = regexp.MustCompile(`(\w+)=`)
)

// registered builds the daemon's registry the way Run does, with every
// component enabled, and returns each metric's sorted label names.
func registered(t *testing.T) map[string][]string {
	t.Helper()
	if _, err := exec.LookPath("haproxy"); err != nil {
		t.Skip("haproxy not installed: the HAProxy component cannot be built")
	}
	dir := t.TempDir()
	cfg := config.Default()
	cfg.NodeName = "metrics-h18"
	cfg.StateDir = filepath.Join(dir, "state")
	cfg.HAProxy.ConfigPath = filepath.Join(dir, "haproxy", "haproxy.cfg")
	cfg.HAProxy.MasterSocket = filepath.Join(dir, "master.sock")
	cfg.HAProxy.StatsSocket = filepath.Join(dir, "stats.sock")
	cfg.HAProxy.Supervise = false
	cfg.Secrets.CredstoreDir = filepath.Join(dir, "credstore")
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	reg := newRegistry("v-test")
	rec := &recorder{Registerer: reg}
	log := slog.New(slog.DiscardHandler)
	p, err := buildParts(context.Background(), cfg, log, rec)
	if err != nil {
		t.Fatalf("buildParts: %v", err)
	}
	t.Cleanup(p.close)
	cli, err := etcdclient.New(etcdclient.Options{Endpoints: []string{"http://127.0.0.1:1"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	if _, err := agent.New(agent.Options{
		Client: cli, Node: cfg.NodeName, ID: "0123456789abcdef0123456789abcdef", LeaseTTL: cfg.LeaseTTL.D(),
		StateDir: cfg.StateDir, Member: p.member, Components: p.components, Secrets: true, Log: log, Registerer: rec,
	}); err != nil {
		t.Fatalf("agent.New: %v", err)
	}
	out := map[string][]string{}
	for _, d := range rec.descs {
		s := d.String()
		m := descName.FindStringSubmatch(s)
		if m == nil {
			t.Fatalf("cannot read the name of %s", s)
		}
		var labels []string
		if c := descConst.FindStringSubmatch(s); c != nil {
			for _, l := range constLabel.FindAllStringSubmatch(c[1], -1) {
				labels = append(labels, l[1])
			}
		}
		if v := descVar.FindStringSubmatch(s); v != nil {
			for _, l := range strings.Split(v[1], ",") {
				if l = strings.TrimSpace(l); l != "" {
					labels = append(labels, l)
				}
			}
		}
		slices.Sort(labels)
		out[m[1]] = labels
	}
	// The collectors registered directly on the registry (Go, process,
	// build info) are not seen by the recorder: gather them.
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if _, ok := out[mf.GetName()]; ok {
			continue
		}
		var labels []string
		if ms := mf.GetMetric(); len(ms) > 0 {
			for _, l := range ms[0].GetLabel() {
				labels = append(labels, l.GetName())
			}
		}
		slices.Sort(labels)
		out[mf.GetName()] = labels
	}
	return out
}

// documented reads docs/metrics.md's reference tables: metric -> labels.
func documented(t *testing.T) map[string][]string {
	t.Helper()
	b, err := os.ReadFile("../../docs/metrics.md")
	if err != nil {
		t.Fatal(err)
	}
	ref, err := monitoring.ParseReference(string(b))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]string{}
	for name, m := range ref {
		out[name] = m.Labels
	}
	return out
}

// perPeer are the per-peer WireGuard series. The page lists them; they
// are served by the overlay's per-peer collector, which this registry may
// not have yet, so only their absence from the code is tolerated.
var perPeer = []string{
	"meshd_wireguard_peer_last_handshake_timestamp_seconds",
	"meshd_wireguard_peer_receive_bytes_total",
	"meshd_wireguard_peer_transmit_bytes_total",
}

func TestMetricsReference(t *testing.T) {
	code := registered(t)
	doc := documented(t)
	prefixed := func(name string) bool {
		for d := range doc {
			if p, ok := strings.CutSuffix(d, "*"); ok && strings.HasPrefix(name, p) {
				return true
			}
		}
		return false
	}
	for name, labels := range code {
		if prefixed(name) {
			continue
		}
		want, ok := doc[name]
		if !ok {
			t.Errorf("%s (labels %v) is exported but docs/metrics.md does not list it", name, labels)
			continue
		}
		if !slices.Equal(want, labels) {
			t.Errorf("%s: docs/metrics.md lists labels %v, the code has %v", name, want, labels)
		}
	}
	for name := range doc {
		if strings.HasSuffix(name, "*") || slices.Contains(perPeer, name) {
			continue
		}
		if _, ok := code[name]; !ok {
			t.Errorf("docs/metrics.md lists %s, which the code does not export", name)
		}
	}
	for _, name := range []string{"meshd_build_info", "meshd_component_consecutive_failures", "meshd_haproxy_servers", "meshd_registry_rejected_keys"} {
		if _, ok := code[name]; !ok {
			t.Errorf("%s is not registered", name)
		}
	}
}
