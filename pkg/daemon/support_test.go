package daemon

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"

	"github.com/meshd/meshd/pkg/config"
)

func TestKeepLeaseOnStop(t *testing.T) {
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	state := func(s string, err error) func(context.Context) (string, error) {
		return func(context.Context) (string, error) { return s, err }
	}
	noDBus := state("", errors.New("connect to systemd: no such file"))
	if f := keepLeaseOnStop(config.OnStopRevoke, state("running", nil), log); f != nil && f() {
		t.Error(`"revoke" kept the lease`)
	}
	if f := keepLeaseOnStop(config.OnStopKeep, noDBus, log); f == nil || !f() {
		t.Error(`"keep" revoked the lease`)
	}
	for _, c := range []struct {
		state func(context.Context) (string, error)
		keep  bool
	}{
		{state("running", nil), true},   // systemctl restart meshd
		{state("degraded", nil), true},  // some other unit failed
		{state("stopping", nil), false}, // shutdown or reboot
		{noDBus, false},                 // not under systemd: nothing says it comes back
	} {
		if got := keepLeaseOnStop(config.OnStopAuto, c.state, log)(); got != c.keep {
			s, err := c.state(context.Background())
			t.Errorf("auto with system state %q (%v): keep = %v, want %v", s, err, got, c.keep)
		}
	}
}
