package haproxycfg

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Supervisor keeps an HAProxy master running when no service manager
// does (the sandbox, hosts without systemd). The master runs in its own
// session, so it outlives meshd: a restarted meshd finds it again through
// the master socket and adopts it instead of starting another one.
type Supervisor struct {
	Binary       string
	ConfigPath   string
	MasterSocket string
	PidFile      string
	// LogFile receives the master's stderr (alerts, reload failures).
	LogFile string
	Log     *slog.Logger
	// OnStart is called each time the supervisor starts a master.
	OnStart func()

	ensureMu sync.Mutex // one Ensure at a time: never two masters
	mu       sync.Mutex
	pid      int
	exited   chan struct{} // closed when the master this process started exits; nil if adopted
}

// master returns the client for the supervised master's socket.
func (s *Supervisor) master() Master { return Master{Socket: s.MasterSocket} }

// PID returns the master's pid as last seen (0: none).
func (s *Supervisor) PID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pid
}

// observe records the pid of a master found running (adopted after a
// meshd restart, or restarted by the supervisor loop).
func (s *Supervisor) observe(pid int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pid != pid {
		s.Log.Info("adopted running haproxy master", "pid", pid)
		s.pid = pid
		s.exited = nil
	}
}

// Ensure makes sure a master is running: it adopts one that answers on the
// master socket, or starts one from ConfigPath (which must exist and be
// valid). started says whether it started a new master. It never starts a
// second master while the one in the pid file is alive: that one may be
// re-executing itself for a reload, which briefly closes its socket.
func (s *Supervisor) Ensure(ctx context.Context) (started bool, err error) {
	s.ensureMu.Lock()
	defer s.ensureMu.Unlock()
	if p, err := s.master().ProcsWait(ctx, 2*time.Second); err == nil {
		s.observe(p.Master.PID)
		return false, nil
	}
	if pid := s.pidFromFile(); pidAlive(pid) && isHAProxy(pid) {
		return false, fmt.Errorf("haproxy master %d (from %s) is running but %s does not answer", pid, s.PidFile, s.MasterSocket)
	}
	if _, err := os.Stat(s.ConfigPath); err != nil {
		return false, fmt.Errorf("start haproxy: %w", err)
	}
	return true, s.start(ctx)
}

// pidFromFile reads the master's pid file (0 if absent or garbled).
func (s *Supervisor) pidFromFile() int {
	b, err := os.ReadFile(s.PidFile)
	if err != nil {
		return 0
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return pid
}

// isHAProxy reports whether pid runs an haproxy binary (a stale pid file
// may name a recycled pid).
func isHAProxy(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm")
	return err == nil && strings.HasPrefix(strings.TrimSpace(string(b)), "haproxy")
}

// pidAlive reports whether pid is a running (not zombie) process.
func pidAlive(pid int) bool {
	if pid <= 0 {
		return false
	}
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return false
	}
	f := strings.Fields(s[i+1:])
	return len(f) > 0 && f[0] != "Z" && f[0] != "X"
}

// start runs a new master and waits until its first worker is up.
func (s *Supervisor) start(ctx context.Context) error {
	logf, err := os.OpenFile(s.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return fmt.Errorf("start haproxy: %w", err)
	}
	defer logf.Close()
	// Not CommandContext: the master must survive meshd.
	cmd := exec.Command(s.Binary, "-W", "-S", s.MasterSocket+",mode,600", "-f", s.ConfigPath, "-p", s.PidFile)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start haproxy: %w", err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait() // reap; the exit is reported through exited
		close(exited)
	}()
	s.mu.Lock()
	s.pid, s.exited = cmd.Process.Pid, exited
	s.mu.Unlock()
	s.Log.Info("started haproxy master", "pid", cmd.Process.Pid)
	if s.OnStart != nil {
		s.OnStart()
	}

	wctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	for {
		if p, err := s.master().Procs(wctx); err == nil {
			if _, ok := p.Current(); ok {
				return nil
			}
		}
		select {
		case <-exited:
			return fmt.Errorf("start haproxy: master exited at once: %s", s.logTail())
		case <-wctx.Done():
			return fmt.Errorf("start haproxy: no worker after 15s: %s", s.logTail())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// logTail returns the master's latest alerts (or last lines), for errors.
func (s *Supervisor) logTail() string {
	b, err := os.ReadFile(s.LogFile)
	if err != nil {
		return "(no log)"
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	lines = lines[max(0, len(lines)-50):]
	var alerts []string
	for _, l := range lines {
		if strings.Contains(l, "[ALERT]") {
			alerts = append(alerts, strings.TrimSpace(l))
		}
	}
	if len(alerts) == 0 {
		alerts = lines
	}
	return strings.Join(alerts[max(0, len(alerts)-3):], " | ")
}

// alive reports whether the supervised master process still exists. It
// looks at the process, not the socket: during a reload the master
// re-executes itself and its socket is briefly refused.
func (s *Supervisor) alive() bool {
	s.mu.Lock()
	exited, pid := s.exited, s.pid
	s.mu.Unlock()
	if exited != nil {
		select {
		case <-exited:
			return false
		default:
			return true
		}
	}
	if pidAlive(pid) {
		return true
	}
	f := s.pidFromFile()
	return pidAlive(f) && isHAProxy(f)
}

// Run restarts the master whenever it dies, until ctx ends. It only acts
// once ConfigPath exists (the first Apply writes it and starts the
// master). It never stops the master: leaving meshd leaves HAProxy serving.
func (s *Supervisor) Run(ctx context.Context, every time.Duration) {
	t := time.NewTicker(every)
	defer t.Stop()
	var lastStart time.Time
	for {
		s.mu.Lock()
		exited := s.exited
		s.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-exited: // nil channel (adopted master) never fires
		}
		if _, err := os.Stat(s.ConfigPath); err != nil || s.alive() {
			continue
		}
		// A master that dies at once must not be restarted in a hot loop.
		if wait := every - time.Since(lastStart); wait > 0 {
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
		}
		lastStart = time.Now()
		s.Log.Warn("haproxy master is gone; restarting it", "pid", s.PID())
		if _, err := s.Ensure(ctx); err != nil && !errors.Is(err, context.Canceled) {
			s.Log.Error("restart haproxy", "err", err)
		}
	}
}

// Stop terminates the master and its workers (SIGTERM) and waits up to
// timeout for it to go. meshd itself never calls it on exit; it is for
// tests and for an operator-requested shutdown.
func (s *Supervisor) Stop(timeout time.Duration) error {
	s.mu.Lock()
	pid, exited := s.pid, s.exited
	s.mu.Unlock()
	if pid == 0 {
		return nil
	}
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		return nil // already gone
	}
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if exited != nil {
			select {
			case <-exited:
				return nil
			default:
			}
		} else if !pidAlive(pid) {
			return nil
		}
		time.Sleep(10 * time.Millisecond)
	}
	syscall.Kill(pid, syscall.SIGKILL)
	return fmt.Errorf("haproxy master %d did not stop in %v; killed", pid, timeout)
}
