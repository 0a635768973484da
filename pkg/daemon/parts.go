package daemon

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshd/meshd/pkg/agent"
	"github.com/meshd/meshd/pkg/config"
	"github.com/meshd/meshd/pkg/creds"
	"github.com/meshd/meshd/pkg/haproxycfg"
)

// parts are the components built from the config.
type parts struct {
	components []agent.Component
	member     *agent.MemberOptions
	closers    []func() error
}

func (p *parts) close() {
	for i := len(p.closers) - 1; i >= 0; i-- {
		p.closers[i]()
	}
}

// buildParts builds the enabled components. The overlay comes up from its
// cache here, before etcd answers: etcd may only be reachable over it.
func buildParts(ctx context.Context, cfg config.Config, log *slog.Logger, reg prometheus.Registerer) (_ *parts, err error) {
	p := &parts{}
	defer func() {
		if err != nil {
			p.close()
		}
	}()
	var recipient string
	if cfg.Secrets.Enable {
		c, err := creds.New(creds.Options{
			Self: cfg.NodeName, StateDir: cfg.StateDir, CredstoreDir: cfg.Secrets.CredstoreDir,
			WithKey: cfg.Secrets.WithKey, Units: cfg.Secrets.Units,
		}, log.With("component", "creds"), reg)
		if err != nil {
			return nil, fmt.Errorf("secrets: %w", err)
		}
		recipient = c.Recipient()
		p.components = append(p.components, c)
	}
	if err := buildOverlay(ctx, cfg, log, reg, p, recipient); err != nil {
		return nil, err
	}
	if h := cfg.HAProxy; h.Enable {
		c, err := haproxycfg.New(haproxycfg.Options{
			Self: cfg.NodeName, Consume: cfg.Consume, ConfigPath: h.ConfigPath, MasterSocket: h.MasterSocket,
			StatsSocket: h.StatsSocket, Binary: h.Binary, Supervise: h.Supervise,
			ReservedPorts: h.ReservedPorts, ServerSlots: h.ServerSlots,
		}, log.With("component", "haproxy"), reg)
		if err != nil {
			return nil, fmt.Errorf("haproxy: %w", err)
		}
		p.closers = append(p.closers, c.Close)
		p.components = append(p.components, c)
	}
	return p, nil
}

// buildOverlay is filled in when the overlay lands.
func buildOverlay(ctx context.Context, cfg config.Config, log *slog.Logger, reg prometheus.Registerer, p *parts, recipient string) error {
	return nil
}
