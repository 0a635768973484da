package creds

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/dbus"
)

// UnitManager is the part of systemd's manager the component needs: tell
// the units that use a rotated secret to pick it up.
type UnitManager interface {
	// RestartUnit restarts a unit if it is running. A stopped unit reads
	// the new credential when it is next started.
	RestartUnit(ctx context.Context, unit string) error
	// ReloadUnit reloads a running unit (restarting it if it cannot
	// reload).
	ReloadUnit(ctx context.Context, unit string) error
}

// DBusManager is the UnitManager that talks to systemd over D-Bus. It
// connects on first use, so a host without systemd (a container, a test
// machine) runs meshd fine as long as no unit needs restarting.
type DBusManager struct {
	// JobTimeout bounds how long a restart or reload job is waited for
	// (default DefaultJobTimeout). A unit that takes longer keeps
	// restarting in systemd; the call returns ErrJobPending so the
	// reconcile loop (and the overlay and HAProxy with it) is not held up.
	JobTimeout time.Duration

	mu   sync.Mutex
	conn *dbus.Conn
}

// DefaultJobTimeout is DBusManager's default JobTimeout.
const DefaultJobTimeout = 20 * time.Second

// ErrJobPending is returned (wrapped) when a unit's job was queued but
// had not finished within the manager's timeout. The unit was told; the
// component does not repeat the restart.
var ErrJobPending = errors.New("job queued, still running")

// RestartUnit implements UnitManager with systemd's TryRestartUnit.
func (m *DBusManager) RestartUnit(ctx context.Context, unit string) error {
	return m.run(ctx, func(c *dbus.Conn, ch chan<- string) (int, error) {
		return c.TryRestartUnitContext(ctx, unit, "replace", ch)
	})
}

// ReloadUnit implements UnitManager with systemd's ReloadOrTryRestartUnit.
func (m *DBusManager) ReloadUnit(ctx context.Context, unit string) error {
	return m.run(ctx, func(c *dbus.Conn, ch chan<- string) (int, error) {
		return c.ReloadOrTryRestartUnitContext(ctx, unit, "replace", ch)
	})
}

// Close closes the D-Bus connection, if one was made.
func (m *DBusManager) Close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.conn != nil {
		m.conn.Close()
		m.conn = nil
	}
}

func (m *DBusManager) connect(ctx context.Context) (*dbus.Conn, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.conn != nil && m.conn.Connected() {
		return m.conn, nil
	}
	c, err := dbus.NewSystemConnectionContext(ctx)
	if err != nil {
		// Without a bus daemon, root can still talk to systemd directly
		// over its private socket.
		var perr error
		if c, perr = dbus.NewSystemdConnectionContext(ctx); perr != nil {
			return nil, fmt.Errorf("connect to systemd: %w", errors.Join(err, perr))
		}
	}
	m.conn = c
	return c, nil
}

// run starts a job and waits for its result. Errors do not repeat the
// verb and unit: the component adds them.
func (m *DBusManager) run(ctx context.Context, start func(*dbus.Conn, chan<- string) (int, error)) error {
	c, err := m.connect(ctx)
	if err != nil {
		return err
	}
	ch := make(chan string, 1)
	if _, err := start(c, ch); err != nil {
		return err
	}
	timeout := m.JobTimeout
	if timeout <= 0 {
		timeout = DefaultJobTimeout
	}
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case res := <-ch:
		if res != "done" {
			return fmt.Errorf("job %s", res)
		}
		return nil
	case <-timer.C:
		return fmt.Errorf("%w after %v", ErrJobPending, timeout)
	case <-ctx.Done():
		return ctx.Err()
	}
}

// validUnitName checks a unit name from the configuration: systemd's
// alphabet and a known suffix, so nothing odd reaches D-Bus or a log.
func validUnitName(s string) error {
	if s == "" || len(s) > 255 {
		return fmt.Errorf("unit name %q: want 1 to 255 characters", s)
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte(":-_.\\@", c) >= 0) {
			return fmt.Errorf("unit name %q: forbidden character %q", s, c)
		}
	}
	dot := strings.LastIndexByte(s, '.')
	if dot <= 0 {
		return fmt.Errorf("unit name %q: no type suffix (.service, ...)", s)
	}
	switch s[dot+1:] {
	case "service", "socket", "target", "timer", "path", "mount", "scope", "slice", "device", "swap", "automount":
	default:
		return fmt.Errorf("unit name %q: unknown type %q", s, s[dot+1:])
	}
	return nil
}
