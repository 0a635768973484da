package haproxycfg

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshd/meshd/pkg/registry"
)

// Options configures the HAProxy component (meshd's config "haproxy"
// section plus the node's name and consumed groups).
type Options struct {
	// Self is this node's name.
	Self string
	// Consume lists the groups whose apps get a listener here.
	Consume []registry.Group
	// ConfigPath is the file meshd renders and HAProxy loads. Never
	// /etc/haproxy.cfg: the OS configuration replaces that one.
	ConfigPath string
	// MasterSocket is HAProxy's master CLI socket (-S).
	MasterSocket string
	// StatsSocket is the runtime API socket rendered into the config.
	StatsSocket string
	// Binary is the haproxy executable (a name looked up in PATH, or a path).
	Binary string
	// Supervise makes meshd start and restart the HAProxy master itself;
	// otherwise a service manager runs it and meshd only reloads it.
	Supervise bool
	// ReservedPorts are loopback ports no app may publish.
	ReservedPorts []int
	// AllowLowPorts are ports below 1024 apps may publish.
	AllowLowPorts []int
	// User and Group are rendered as HAProxy's user/group: the worker
	// drops root after binding (empty: as started).
	User, Group string
	// Probe checks that a port not yet held by HAProxy can be bound
	// (default ProbeLoopback).
	Probe PortProbe
	// ServerSlots is the per-backend slot granularity (default 8).
	ServerSlots int
	// PidFile is the supervised master's pid file (default: ConfigPath
	// with ".pid" instead of ".cfg").
	PidFile string
	// HardStopAfter bounds an old worker's drain (default 30s).
	HardStopAfter time.Duration
	// MaxReloads is mworker-max-reloads (default 3).
	MaxReloads int
	// GlobalExtra are extra lines for the global section.
	GlobalExtra []string
	// SuperviseEvery is how often a supervisor checks an adopted master
	// (default 1s; a master this process started is noticed at once).
	SuperviseEvery time.Duration
	// VerifyEvery is how often Run compares the running HAProxy with what
	// was applied and puts back what differs (Applier.Verify; default
	// DefaultVerifyEvery).
	VerifyEvery time.Duration
}

// DefaultVerifyEvery is how often HAProxy's running servers are compared
// with what meshd applied, when Options.VerifyEvery is not set.
const DefaultVerifyEvery = 10 * time.Second

// Component renders HAProxy's configuration from registry snapshots and
// applies it. It implements the agent's Component interface.
type Component struct {
	opts    Options
	params  Params
	log     *slog.Logger
	applier *Applier
	sup     *Supervisor
	metrics *metrics

	mu   sync.Mutex
	last Desired

	// prepared is closed after the first Prepare or Apply
	// (PreparedForClaim); only the loop's goroutine closes it.
	prepared     chan struct{}
	preparedOnce sync.Once
}

// Status is the component's published status (meshctl status).
type Status struct {
	ConfigPath string      `json:"configPath"`
	Listeners  int         `json:"listeners"`
	Backends   int         `json:"backends"`
	Servers    int         `json:"servers"`
	Apps       []AppStatus `json:"apps,omitempty"`
	Counters
	// Problems lists at most MaxStatusProblems of the problems (bad
	// instances may come from every node); ProblemCount counts them all.
	Problems       []Problem `json:"problems,omitempty"`
	ProblemCount   int       `json:"problemCount,omitempty"`
	LastError      string    `json:"lastError,omitempty"`
	RejectedConfig string    `json:"rejectedConfig,omitempty"`
	RejectedHash   string    `json:"rejectedHash,omitempty"`
	AppliedHash    string    `json:"appliedHash,omitempty"`
	Supervised     bool      `json:"supervised"`
	MasterPID      int       `json:"masterPid,omitempty"`
}

// AppStatus is one rendered listener.
type AppStatus struct {
	App     string `json:"app"`
	Port    int    `json:"port"`
	Servers int    `json:"servers"`
}

// Limits of the options (Validate).
const (
	MaxHardStopAfter = 24 * time.Hour
	MaxMaxReloads    = 100
)

// Validate checks the options without touching the system and returns
// every problem found, each naming its field as meshd's config file does.
// New refuses what it refuses, and meshd's config check (pkg/config)
// calls it for the "haproxy" section, so the two cannot disagree.
func (o Options) Validate() error {
	var errs []error
	bad := func(format string, a ...any) { errs = append(errs, fmt.Errorf(format, a...)) }
	if err := registry.ValidName(o.Self); err != nil {
		bad("self: %w", err)
	}
	if !filepath.IsAbs(o.ConfigPath) || filepath.Clean(o.ConfigPath) == "/etc/haproxy.cfg" {
		bad("configPath %q: want an absolute path the OS configuration does not manage", o.ConfigPath)
	}
	for _, s := range []struct{ name, path string }{{"masterSocket", o.MasterSocket}, {"statsSocket", o.StatsSocket}} {
		if !safeSocket(s.path) {
			bad("%s %q: want a path of [A-Za-z0-9/._-] (or ipv4@host:port), at most 107 bytes", s.name, s.path)
		}
	}
	if o.ServerSlots < 0 || o.ServerSlots > MaxServerSlots {
		bad("serverSlots %d: want 0 (default) to %d", o.ServerSlots, MaxServerSlots)
	}
	if o.HardStopAfter < 0 || o.HardStopAfter > MaxHardStopAfter {
		bad("hardStopAfter %v: want 0 (default) to %v", o.HardStopAfter, MaxHardStopAfter)
	}
	if o.MaxReloads < 0 || o.MaxReloads > MaxMaxReloads {
		bad("maxReloads %d: want 0 (default) to %d", o.MaxReloads, MaxMaxReloads)
	}
	for _, p := range o.ReservedPorts {
		if p < 1 || p > 65535 {
			bad("reservedPorts: %d out of range", p)
		}
	}
	for _, p := range o.AllowLowPorts {
		if p < 1 || p > 1023 {
			bad("allowLowPorts: %d: want 1-1023", p)
		}
	}
	for _, u := range []struct{ name, value string }{{"user", o.User}, {"group", o.Group}} {
		if u.value != "" && !ValidUnixName(u.value) {
			bad("%s %s: want a user or group name", u.name, registry.Quoted([]byte(u.value)))
		}
	}
	for _, l := range o.GlobalExtra {
		if !safeLine(l) {
			bad("globalExtra %q: want one line of printable ASCII", l)
		}
	}
	return errors.Join(errs...)
}

// New checks opts and builds the component. It starts nothing: in
// supervise mode Run restarts the HAProxy master if it dies.
func New(opts Options, log *slog.Logger, reg prometheus.Registerer) (*Component, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	log = log.With("component", "haproxy")
	if err := opts.Validate(); err != nil {
		return nil, fmt.Errorf("haproxy: %w", err)
	}
	if opts.Binary == "" {
		opts.Binary = "haproxy"
	}
	bin, err := exec.LookPath(opts.Binary)
	if err != nil {
		return nil, fmt.Errorf("haproxy: binary: %w", err)
	}
	opts.Binary = bin
	if opts.PidFile == "" {
		opts.PidFile = strings.TrimSuffix(opts.ConfigPath, ".cfg") + ".pid"
	}
	if opts.Probe == nil {
		opts.Probe = ProbeLoopback
	}
	if opts.SuperviseEvery <= 0 {
		opts.SuperviseEvery = time.Second
	}
	if opts.VerifyEvery <= 0 {
		opts.VerifyEvery = DefaultVerifyEvery
	}
	if err := os.MkdirAll(filepath.Dir(opts.ConfigPath), 0o755); err != nil {
		return nil, fmt.Errorf("haproxy: %w", err)
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, err
	}
	c := &Component{
		opts:     opts,
		log:      log,
		metrics:  m,
		prepared: make(chan struct{}),
		params: Params{
			Self: opts.Self, Consume: opts.Consume, ReservedPorts: opts.ReservedPorts, AllowLowPorts: opts.AllowLowPorts,
			ServerSlots: opts.ServerSlots, StatsSocket: opts.StatsSocket, MasterSocket: opts.MasterSocket,
			HardStopAfter: opts.HardStopAfter, MaxReloads: opts.MaxReloads, GlobalExtra: opts.GlobalExtra,
			User: opts.User, Group: opts.Group,
		},
	}
	c.applier = &Applier{
		ConfigPath: opts.ConfigPath,
		Binary:     opts.Binary,
		Master:     Master{Socket: opts.MasterSocket},
		Runtime:    Runtime{Socket: opts.StatsSocket},
		Log:        log,
		Hooks:      m.hooks(),
	}
	if reg != nil {
		if err := reg.Register(newServersCollector(c)); err != nil {
			return nil, fmt.Errorf("haproxy metrics: %w", err)
		}
	}
	if opts.Supervise {
		c.sup = &Supervisor{
			Binary: opts.Binary, ConfigPath: opts.ConfigPath, MasterSocket: opts.MasterSocket,
			PidFile: opts.PidFile, LogFile: strings.TrimSuffix(opts.ConfigPath, ".cfg") + ".log",
			Log: log, OnStart: m.masterStarts.Inc,
		}
		c.applier.Supervisor = c.sup
	}
	return c, nil
}

// Name implements agent.Component.
func (c *Component) Name() string { return "haproxy" }

// Params returns the rendering parameters derived from the options, so
// that meshctl can render what this node would run.
func (c *Component) Params() Params { return c.params }

// Apply computes the desired configuration from snap and applies it. A
// listener whose port something else on the node holds is left out and
// reported, so one busy port cannot stop every other change.
func (c *Component) Apply(ctx context.Context, snap *registry.Snapshot) error {
	defer c.markPrepared()
	d := c.compute(snap)
	c.mu.Lock()
	d = Hysteresis(d, c.last, c.params.withDefaults().ServerSlots)
	c.last = d
	c.mu.Unlock()
	if err := c.applier.Set(ctx, d); err != nil {
		return fmt.Errorf("haproxy: %w", err)
	}
	return nil
}

// compute is the configuration snap asks for, less the listeners whose
// port something else holds.
func (c *Component) compute(snap *registry.Snapshot) Desired {
	return LeaveOutBusy(Compute(snap, c.params), c.applier.HeldPorts(), c.opts.Probe)
}

// Prepare implements agent.Preparer. While the overlay holds HAProxy
// back (a new node before its claim has no overlay address or routes), a
// supervised HAProxy that has not run on this node yet is started on
// snap's configuration with every server slot free (WithoutServers): its
// validation and the master's start, HAProxy's slow steps (`haproxy -c`
// alone takes about 40 ms of CPU in the sandbox), happen before the node announces itself
// rather than while the other nodes add it, and the pass after the claim
// fills the slots over the runtime API. A free slot is a disabled server,
// so no health check runs before the node has its routes. Only the first
// call does anything, and only when meshd supervises HAProxy, nothing was
// applied yet and no master socket exists (a master that runs, or ran and
// left its socket, is the apply's to adopt or restart), and when nothing
// listens on any of its ports: on a node migrating from confd, the legacy
// HAProxy serves them, and an empty HAProxy bound next to it (SO_REUSEPORT)
// would be handed some of its connections and close them.
func (c *Component) Prepare(ctx context.Context, snap *registry.Snapshot) error {
	select {
	case <-c.prepared:
		return nil
	default:
	}
	defer c.markPrepared()
	if c.sup == nil || c.applier.AppliedHash() != "" {
		return nil
	}
	if _, err := c.applier.Master.Procs(ctx); !errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	d := c.compute(snap)
	for _, l := range d.Listeners {
		if err := probeAlone(l.Port); err != nil {
			c.log.Debug("not starting haproxy before the overlay is ready: a port is served already", "port", l.Port, "err", err)
			return nil
		}
	}
	if err := c.applier.Set(ctx, WithoutServers(d)); err != nil {
		return fmt.Errorf("haproxy: start without servers: %w", err)
	}
	c.log.Info("started haproxy before the overlay is ready, with no servers", "listeners", len(d.Listeners))
	return nil
}

// PreparedForClaim implements agent.ClaimPreparer: the channel is closed
// after the first Prepare or Apply, whatever its outcome, so that a new
// node starts HAProxy before it claims its member record.
func (c *Component) PreparedForClaim() <-chan struct{} { return c.prepared }

func (c *Component) markPrepared() { c.preparedOnce.Do(func() { close(c.prepared) }) }

// Status implements agent.Component.
func (c *Component) Status() any {
	c.mu.Lock()
	d := c.last
	c.mu.Unlock()
	st := StatusOf(d, c.opts.ConfigPath, c.applier.Counters())
	st.Supervised = c.sup != nil
	if err := c.applier.LastError(); err != nil {
		st.LastError = registry.StatusText(err.Error())
	}
	if h, err := c.applier.Rejected(); err != nil {
		st.RejectedHash, st.RejectedConfig = h, c.applier.RejectedPath()
	}
	st.AppliedHash = c.applier.AppliedHash()
	if c.sup != nil {
		st.MasterPID = c.sup.PID()
	}
	return st
}

// MaxStatusProblems bounds the problems listed in the published status,
// so that its size does not grow with the number of nodes.
const MaxStatusProblems = 8

// StatusOf is the part of the status that follows from the desired
// configuration d (rendered to configPath) and the applier's counters:
// what Status publishes, for callers that render without a running
// HAProxy (the scale bench's simulated nodes).
func StatusOf(d Desired, configPath string, counters Counters) Status {
	st := Status{
		ConfigPath: configPath,
		Listeners:  len(d.Listeners),
		Backends:   len(d.Listeners),
		Servers:    d.Servers(),
		Counters:   counters,
		Problems:   d.Problems,
	}
	if st.ProblemCount = len(d.Problems); st.ProblemCount > MaxStatusProblems {
		st.Problems = st.Problems[:MaxStatusProblems]
	}
	for _, l := range d.Listeners {
		n := 0
		for _, s := range l.Slots {
			if !s.Empty() {
				n++
			}
		}
		st.Apps = append(st.Apps, AppStatus{App: l.App.String(), Port: l.Port, Servers: n})
	}
	return st
}

// Run supervises the HAProxy master (in supervise mode) until ctx ends;
// the agent runs it in its errgroup. It never stops HAProxy: a meshd
// restart must not interrupt the mesh; the next meshd adopts the master.
func (c *Component) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	if c.sup != nil {
		wg.Go(func() { c.sup.Run(ctx, c.opts.SuperviseEvery) })
	}
	c.verifyLoop(ctx)
	wg.Wait()
	return nil
}

// verifyLoop runs Applier.Verify every VerifyEvery until ctx ends.
func (c *Component) verifyLoop(ctx context.Context) {
	t := time.NewTicker(c.opts.VerifyEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		corrected, err := c.applier.Verify(ctx)
		switch {
		case err != nil && ctx.Err() == nil:
			c.log.Warn("could not compare haproxy with what meshd applied", "err", err)
		case corrected:
			c.metrics.driftCorrections.Inc()
			c.log.Warn("haproxy's servers differed from what meshd applied (changed on the stats socket, or restarted from an older file); put back")
		}
	}
}

// Close releases nothing today (Run owns the supervisor); it is kept so
// that every component closes the same way.
func (c *Component) Close() error { return nil }

// StopHAProxy terminates a supervised master (tests, explicit shutdown).
func (c *Component) StopHAProxy(timeout time.Duration) error {
	if c.sup == nil {
		return errors.New("haproxy: not supervised")
	}
	return c.sup.Stop(timeout)
}

// Supervisor returns the supervisor (nil unless Supervise).
func (c *Component) Supervisor() *Supervisor { return c.sup }

// Applier returns the applier, for callers that compute Desired themselves.
func (c *Component) Applier() *Applier { return c.applier }
