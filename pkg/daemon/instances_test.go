package daemon

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshd/meshd/pkg/agent"
	"github.com/meshd/meshd/pkg/config"
)

// fakeUnits stands in for systemd's D-Bus manager (dbusUnits): it answers
// a unit's ActiveState ("active", "failed", "inactive", ... as
// org.freedesktop.systemd1.Unit's ActiveState property) from a map, or
// blocks until the context ends when block is set, like a D-Bus call to a
// systemd that does not answer.
type fakeUnits struct {
	mu     sync.Mutex
	states map[string]string
	block  bool
}

func (f *fakeUnits) ActiveState(ctx context.Context, unit string) (string, error) {
	f.mu.Lock()
	block, st := f.block, f.states[unit]
	f.mu.Unlock()
	if block {
		<-ctx.Done()
		return "", ctx.Err()
	}
	if st == "" {
		return "inactive", nil
	}
	return st, nil
}

// listen listens on addr ("127.0.0.2:0"...) until the test ends.
func listen(t *testing.T, addr string) netip.AddrPort {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return netip.MustParseAddrPort(l.Addr().String())
}

// freePort returns a loopback address on which nothing listens.
func freePort(t *testing.T, ip string) netip.AddrPort {
	t.Helper()
	l, err := net.Listen("tcp", ip+":0")
	if err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddrPort(l.Addr().String())
	l.Close()
	return a
}

func oneInstance(t *testing.T, c config.Check, port int, units agent.UnitStater) agent.Instance {
	t.Helper()
	cfg := config.Config{Instances: []config.Instance{{App: "web", Group: "backends", Port: port, Check: c}}}
	ins, err := buildInstances(cfg, units)
	if err != nil || len(ins) != 1 {
		t.Fatalf("buildInstances: %v %v", ins, err)
	}
	in := ins[0]
	if in.App != "web" || in.Group != "backends" || in.Port != port {
		t.Fatalf("instance %+v: identity not carried over", in)
	}
	return in
}

// TestInstanceChecksFromConfig shows that every check option of an
// instance changes what the built check does.
func TestInstanceChecksFromConfig(t *testing.T) {
	ctx := context.Background()
	// The node's HAProxy answers on 127.0.0.1 at the app's port on every
	// node that consumes the app's group; the app itself listens on the
	// node's advertised address (here 127.0.0.2).
	app := freePort(t, "127.0.0.2")
	listen(t, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), app.Port()).String())
	units := &fakeUnits{states: map[string]string{}}
	port := int(app.Port())

	t.Run("default dials the advertised address, not 127.0.0.1", func(t *testing.T) {
		in := oneInstance(t, config.Check{}, port, units)
		if err := agent.RunCheck(ctx, in, app); err == nil {
			t.Fatal("check passed with the app down and only the local HAProxy stand-in listening")
		}
		if err := agent.RunCheck(ctx, in, netip.AddrPort{}); err == nil {
			t.Fatal("check passed without an advertised address")
		}
		l, err := net.Listen("tcp", app.String())
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		if err := agent.RunCheck(ctx, in, app); err != nil {
			t.Fatalf("check fails with the app listening on its advertised address: %v", err)
		}
	})

	t.Run("tcp replaces the advertised address", func(t *testing.T) {
		up := listen(t, "127.0.0.1:0")
		in := oneInstance(t, config.Check{TCP: up.String()}, port, units)
		if err := agent.RunCheck(ctx, in, app); err != nil {
			t.Fatalf("check.tcp %v listening, advertised address down: %v", up, err)
		}
		down := freePort(t, "127.0.0.1")
		in = oneInstance(t, config.Check{TCP: down.String()}, port, units)
		if err := agent.RunCheck(ctx, in, up); err == nil {
			t.Fatal("check.tcp on a closed port passed")
		}
	})

	t.Run("unit and tcp must both pass", func(t *testing.T) {
		up := listen(t, "127.0.0.1:0")
		down := freePort(t, "127.0.0.1")
		units.mu.Lock()
		units.states["app.service"] = "active"
		units.states["dead.service"] = "failed"
		units.mu.Unlock()
		for _, tc := range []struct {
			unit, tcp string
			pass      bool
		}{
			{"app.service", up.String(), true},
			{"dead.service", up.String(), false},
			{"app.service", down.String(), false},
			{"other.service", up.String(), false},
		} {
			in := oneInstance(t, config.Check{Unit: tc.unit, TCP: tc.tcp}, port, units)
			err := agent.RunCheck(ctx, in, app)
			if (err == nil) != tc.pass {
				t.Errorf("unit %s, tcp %s: err %v, want pass=%v", tc.unit, tc.tcp, err, tc.pass)
			}
		}
		// unit alone still needs the advertised address to answer.
		in := oneInstance(t, config.Check{Unit: "app.service"}, port, units)
		if err := agent.RunCheck(ctx, in, app); err == nil {
			t.Error("unit active but app not listening on its advertised address: check passed")
		}
		if err := agent.RunCheck(ctx, in, up); err != nil {
			t.Errorf("unit active and advertised address answering: %v", err)
		}
	})

	t.Run("disable advertises unconditionally", func(t *testing.T) {
		in := oneInstance(t, config.Check{Disable: true, Unit: "dead.service"}, port, units)
		if in.Check != nil {
			t.Fatal("disabled check still built")
		}
		if err := agent.RunCheck(ctx, in, app); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("interval and timeout", func(t *testing.T) {
		in := oneInstance(t, config.Check{Interval: config.Duration(7 * time.Second), Unit: "slow.service"}, port, units)
		if in.Interval != 7*time.Second {
			t.Errorf("interval %v, want 7s", in.Interval)
		}
		units.mu.Lock()
		units.block = true
		units.mu.Unlock()
		defer func() { units.mu.Lock(); units.block = false; units.mu.Unlock() }()
		for _, timeout := range []time.Duration{150 * time.Millisecond, 900 * time.Millisecond} {
			in := oneInstance(t, config.Check{Unit: "slow.service", Timeout: config.Duration(timeout)}, port, units)
			start := time.Now()
			err := agent.RunCheck(ctx, in, app)
			took := time.Since(start)
			if !errors.Is(err, context.DeadlineExceeded) && (err == nil || !strings.Contains(err.Error(), "deadline")) {
				t.Errorf("timeout %v: err %v, want a deadline error", timeout, err)
			}
			if took < timeout || took > timeout+time.Second {
				t.Errorf("timeout %v: check took %v", timeout, took)
			}
		}
	})
}
