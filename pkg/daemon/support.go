package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"time"

	sddaemon "github.com/coreos/go-systemd/v22/daemon"
	sddbus "github.com/coreos/go-systemd/v22/dbus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/meshd/meshd/pkg/config"
)

func promHandler(reg *prometheus.Registry) http.Handler {
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
}

func writeJSON(w http.ResponseWriter, v any) {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// notifier speaks sd_notify when meshd runs under systemd (NOTIFY_SOCKET
// set) and does nothing otherwise.
type notifier struct {
	log      *slog.Logger
	interval time.Duration // watchdog ping interval, 0 when disabled
	mu       sync.Mutex
	last     time.Time
	isReady  bool
}

func newNotifier(log *slog.Logger) *notifier {
	n := &notifier{log: log}
	if d, err := sddaemon.SdWatchdogEnabled(false); err == nil && d > 0 {
		n.interval = d / 3
	}
	return n
}

func (n *notifier) send(state string) {
	if _, err := sddaemon.SdNotify(false, state); err != nil {
		n.log.Warn("sd_notify", "state", state, "err", err)
	}
}

func (n *notifier) ready() {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.isReady {
		n.isReady = true
		n.send(sddaemon.SdNotifyReady)
	}
}

// heartbeat is called by the reconcile loop on every iteration: the
// watchdog is fed only while the loop is alive.
func (n *notifier) heartbeat() {
	if n.interval == 0 {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if time.Since(n.last) >= n.interval {
		n.last = time.Now()
		n.send(sddaemon.SdNotifyWatchdog)
	}
}

func (n *notifier) stopping() { n.send(sddaemon.SdNotifyStopping) }

// dbusUnits reads unit states from systemd over D-Bus, connecting lazily so
// that hosts without systemd only fail the checks that need it.
type dbusUnits struct {
	mu   sync.Mutex
	conn *sddbus.Conn
}

func newDBusUnits() *dbusUnits { return &dbusUnits{} }

// connectLocked opens the D-Bus connection if there is none.
func (d *dbusUnits) connectLocked(ctx context.Context) error {
	if d.conn == nil {
		c, err := sddbus.NewSystemConnectionContext(ctx)
		if err != nil {
			return fmt.Errorf("connect to systemd: %w", err)
		}
		d.conn = c
	}
	return nil
}

// SystemState is systemd's manager state: "running", "degraded", ...,
// "stopping" while the system shuts down.
func (d *dbusUnits) SystemState(ctx context.Context) (string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.connectLocked(ctx); err != nil {
		return "", err
	}
	v, err := d.conn.GetManagerProperty("SystemState")
	if err != nil {
		d.conn.Close()
		d.conn = nil
		return "", fmt.Errorf("systemd SystemState: %w", err)
	}
	return strings.Trim(v, `"`), nil
}

// keepLeaseOnStop is the agent's KeepLeaseOnStop for config.OnStop:
// "keep" always, "revoke" never, "auto" unless the system is shutting
// down (asked of systemd through systemState; without an answer, revoke,
// as a node that may not come back should).
func keepLeaseOnStop(policy string, systemState func(context.Context) (string, error), log *slog.Logger) func() bool {
	switch policy {
	case config.OnStopKeep:
		return func() bool { return true }
	case config.OnStopRevoke:
		return nil
	}
	return func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		st, err := systemState(ctx)
		if err != nil {
			log.Info("cannot tell whether the system is shutting down: revoking the lease", "err", err)
			return false
		}
		if st == "stopping" {
			log.Info("system shutting down: revoking the lease")
			return false
		}
		return true
	}
}

func (d *dbusUnits) ActiveState(ctx context.Context, unit string) (string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if err := d.connectLocked(ctx); err != nil {
		return "", err
	}
	p, err := d.conn.GetUnitPropertyContext(ctx, unit, "ActiveState")
	if err != nil {
		d.conn.Close()
		d.conn = nil
		return "", fmt.Errorf("unit %s: %w", unit, err)
	}
	s, _ := p.Value.Value().(string)
	return s, nil
}
