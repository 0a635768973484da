// Package daemon wires meshd's parts together from a Config: the etcd
// client, the components, the agent, metrics and systemd notification.
// meshd's main only parses flags and calls Run.
package daemon

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/meshd/meshd/pkg/agent"
	"github.com/meshd/meshd/pkg/atomicfile"
	"github.com/meshd/meshd/pkg/config"
	"github.com/meshd/meshd/pkg/etcdclient"
	"github.com/meshd/meshd/pkg/registry"
)

// Run runs meshd with cfg until ctx ends. It returns an error only for
// problems that restarting cannot fix by waiting (bad state directory,
// name owned by another node); an unreachable etcd is waited out.
func Run(ctx context.Context, cfg config.Config, log *slog.Logger, version string) error {
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("invalid config: %w", err)
	}
	// The client reads the TLS files but does not connect: a bad file
	// stops meshd here, before anything is written to the host.
	cli, err := etcdclient.New(etcdclient.Options{
		Endpoints: cfg.Etcd.Endpoints, CAFile: cfg.Etcd.CAFile, CertFile: cfg.Etcd.CertFile,
		KeyFile: cfg.Etcd.KeyFile, DialTimeout: cfg.Etcd.DialTimeout.D(),
	})
	if err != nil {
		return err
	}
	defer cli.Close()
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	id, err := LoadOrCreateNodeID(cfg.StateDir)
	if err != nil {
		return err
	}

	reg := newRegistry(version)

	parts, err := buildParts(ctx, cfg, log, reg)
	if err != nil {
		return err
	}
	defer parts.close()

	notify := newNotifier(log)
	systemd := newDBusUnits() // connects on first use: unit checks, and the stop policy
	instances, err := buildInstances(cfg, systemd)
	if err != nil {
		return err
	}
	a, err := agent.New(agent.Options{
		Client: cli, Node: cfg.NodeName, ID: id, PublicIPv4: cfg.PublicIPv4, Consume: cfg.Consume,
		LeaseTTL: cfg.LeaseTTL.D(), Coalesce: cfg.Coalesce.D(), StateDir: cfg.StateDir, Version: version,
		Member: parts.member, FlannelLease: parts.flannel, AdvertiseIP: advertiseIP(cfg),
		Instances: instances, Components: parts.components, Secrets: cfg.Secrets.Enable,
		Log: log, Registerer: reg, Ready: notify.ready, Heartbeat: notify.heartbeat,
		KeepLeaseOnStop: keepLeaseOnStop(cfg.OnStop, systemd.SystemState, log),
	})
	if err != nil {
		return err
	}
	if cfg.MetricsAddr != "" {
		var peers peerSource
		if parts.overlay != nil {
			peers = parts.overlay
		}
		srv, err := serveHTTP(cfg.MetricsAddr, cfg.Pprof, reg, a, peersHandler(cfg.NodeName, peers), cfg.NodeName, version)
		if err != nil {
			return err
		}
		defer srv.Close()
	}
	log.Info("meshd starting", "node", cfg.NodeName, "version", version, "etcd", strings.Join(cfg.Etcd.Endpoints, ","))
	err = a.Run(ctx)
	notify.stopping()
	return err
}

func advertiseIP(cfg config.Config) netip.Addr {
	a, _ := netip.ParseAddr(cfg.PublicIPv4)
	return a
}

// LoadOrCreateNodeID returns the node's stable identity, creating it on
// first start. It tells a restarted meshd's own node entry from another
// node's that happens to use the same name.
func LoadOrCreateNodeID(stateDir string) (string, error) {
	path := filepath.Join(stateDir, "node-id")
	b, err := os.ReadFile(path)
	if err == nil {
		id := strings.TrimSpace(string(b))
		if len(id) == 32 {
			if _, err := hex.DecodeString(id); err == nil {
				return id, nil
			}
		}
		return "", fmt.Errorf("node id file %s is corrupt; remove it to let meshd create a new identity", path)
	}
	if !errors.Is(err, os.ErrNotExist) {
		return "", fmt.Errorf("node id: %w", err)
	}
	var raw [16]byte
	if _, err := rand.Read(raw[:]); err != nil {
		return "", err
	}
	id := hex.EncodeToString(raw[:])
	if err := atomicfile.WriteFile(path, []byte(id+"\n"), 0o600); err != nil {
		return "", fmt.Errorf("node id: %w", err)
	}
	return id, nil
}

// newRegistry is the process's metrics registry with the collectors that
// belong to no component: Go runtime, process, build info.
func newRegistry(version string) *prometheus.Registry {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}), buildInfo(version))
	return reg
}

// health is what /healthz answers: the node's own view, from memory.
type health struct {
	Node    string `json:"node"`
	Version string `json:"version,omitempty"`
	// Revision is the newest revision applied without error; Seen the
	// newest received.
	Revision int64 `json:"revision"`
	Seen     int64 `json:"seen"`
	// LastApply is when a revision was last applied without error (null
	// before the first).
	LastApply  *time.Time                 `json:"lastApply"`
	Errors     map[string]string          `json:"errors,omitempty"`
	Problems   int                        `json:"problems,omitempty"`
	Components map[string]json.RawMessage `json:"components,omitempty"`
}

func healthOf(node, version string, st registry.Status, lastApply time.Time) health {
	h := health{
		Node: node, Version: version, Revision: st.Revision, Seen: st.Seen,
		Errors: st.Errors, Problems: st.Problems, Components: st.Components,
	}
	if !lastApply.IsZero() {
		t := lastApply.UTC()
		h.LastApply = &t
	}
	return h
}

// serveHTTP serves /metrics, /healthz and PeersPath on a local address,
// and with withPprof Go's profiler under /debug/pprof/. /healthz answers
// 503 until the first full apply and while a component fails.
func serveHTTP(addr string, withPprof bool, reg *prometheus.Registry, a *agent.Agent, peers http.Handler, node, version string) (*http.Server, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics listener: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promHandler(reg))
	mux.Handle(PeersPath, peers)
	if withPprof {
		mux.HandleFunc("/debug/pprof/", pprof.Index)
		mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) {
		st := a.Status()
		w.Header().Set("Content-Type", "application/json")
		if len(st.Errors) > 0 || st.Revision == 0 {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		writeJSON(w, healthOf(node, version, st, a.LastApply()))
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go srv.Serve(ln)
	return srv, nil
}
