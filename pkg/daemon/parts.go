package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshd/meshd/pkg/agent"
	"github.com/meshd/meshd/pkg/config"
	"github.com/meshd/meshd/pkg/creds"
	"github.com/meshd/meshd/pkg/haproxycfg"
	"github.com/meshd/meshd/pkg/overlay"
	"github.com/meshd/meshd/pkg/registry"
)

// parts are the components built from the config.
type parts struct {
	components []agent.Component
	member     *agent.MemberOptions
	flannel    *agent.FlannelLeaseOptions
	overlay    *overlay.Component // nil when the overlay is disabled
	closers    []func() error
}

func (p *parts) close() {
	for i := len(p.closers) - 1; i >= 0; i-- {
		p.closers[i]()
	}
}

// buildParts builds the enabled components, in the order the loop applies
// them: the overlay first (routes before anything uses them), then HAProxy,
// then credentials. The overlay comes up from its cache here, before etcd
// answers: etcd may only be reachable over it.
func buildParts(ctx context.Context, cfg config.Config, log *slog.Logger, reg prometheus.Registerer) (_ *parts, err error) {
	p := &parts{}
	defer func() {
		if err != nil {
			p.close()
		}
	}()
	var (
		secrets   *creds.Component
		recipient string
	)
	if cfg.Secrets.Enable {
		secrets, err = creds.New(cfg.SecretsOptions(), log, reg)
		if err != nil {
			return nil, fmt.Errorf("secrets: %w", err)
		}
		p.closers = append(p.closers, func() error { secrets.Close(); return nil })
		recipient = secrets.Recipient()
	}
	if cfg.Overlay.Enable {
		ov, err := overlay.New(cfg.OverlayOptions(), log, reg)
		if err != nil {
			return nil, fmt.Errorf("overlay: %w", err)
		}
		p.closers = append(p.closers, ov.Close)
		if err := ov.Boot(ctx); err != nil {
			// Not fatal: the first reconcile builds the overlay from etcd.
			log.Warn("overlay: cannot boot from cache", "err", err)
		}
		p.member = &agent.MemberOptions{
			PublicKey: ov.PublicKey(),
			Endpoint:  overlayEndpoint(cfg),
			Recipient: recipient,
			Pool:      registry.Pool{Min: cfg.Overlay.SubnetMin, Max: cfg.Overlay.SubnetMax, Bits: cfg.Overlay.SubnetLen},
		}
		p.components = append(p.components, ov)
		p.flannel = &agent.FlannelLeaseOptions{Port: flannelPort(cfg)}
		p.overlay = ov
	}
	if h := cfg.HAProxy; h.Enable {
		c, err := haproxycfg.New(haproxyOptions(cfg), log, reg)
		if err != nil {
			return nil, fmt.Errorf("haproxy: %w", err)
		}
		p.closers = append(p.closers, c.Close)
		p.components = append(p.components, c)
	}
	if secrets != nil {
		p.components = append(p.components, secrets)
	}
	return p, nil
}

// flannelPort is the WireGuard port the node's flannel lease announces:
// the endpoint's, which peers dial.
func flannelPort(cfg config.Config) uint16 {
	if ap, err := netip.ParseAddrPort(overlayEndpoint(cfg)); err == nil {
		return ap.Port()
	}
	return uint16(cfg.Overlay.ListenPort)
}

// overlayEndpoint is the host:port peers dial: the configured endpoint, or
// the node's public IPv4 with the WireGuard port.
func overlayEndpoint(cfg config.Config) string {
	if cfg.Overlay.Endpoint != "" {
		return cfg.Overlay.Endpoint
	}
	if cfg.PublicIPv4 != "" {
		return netip.AddrPortFrom(netip.MustParseAddr(cfg.PublicIPv4), uint16(cfg.Overlay.ListenPort)).String()
	}
	return ""
}

// haproxyOptions maps the config onto the HAProxy component. meshd's own
// metrics port is reserved: an app publishing it would fail the reload.
func haproxyOptions(cfg config.Config) haproxycfg.Options {
	o := cfg.HAProxyOptions()
	reserved := slices.Clone(o.ReservedPorts)
	if _, port, err := net.SplitHostPort(cfg.MetricsAddr); err == nil {
		if p, err := strconv.Atoi(port); err == nil && p > 0 && !slices.Contains(reserved, p) {
			reserved = append(reserved, p)
		}
	}
	o.ReservedPorts = reserved
	return o
}
