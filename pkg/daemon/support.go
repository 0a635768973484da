package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"time"

	sddaemon "github.com/coreos/go-systemd/v22/daemon"
	sddbus "github.com/coreos/go-systemd/v22/dbus"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
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

func (d *dbusUnits) ActiveState(ctx context.Context, unit string) (string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.conn == nil {
		c, err := sddbus.NewSystemConnectionContext(ctx)
		if err != nil {
			return "", fmt.Errorf("connect to systemd: %w", err)
		}
		d.conn = c
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
