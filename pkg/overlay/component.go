// Package overlay is meshd's WireGuard mesh: it computes the node's
// desired interface, peers and routes from the registry (package
// desired, pure) and makes the kernel match (Applier: wgctrl + netlink,
// kernel WireGuard or embedded wireguard-go). It replaces flanneld.
//
// The rooms, one file each: component.go wires them as an agent
// component; tracker.go is the desired-state tracker (snapshot -> target,
// no I/O); applier.go (with device.go, routes.go) makes the kernel match a
// state, through kernel.go's small interfaces; route_repair.go watches
// netlink for what others remove; handshake_retry.go re-adds new peers
// whose first handshake stalls; bootcache.go keeps the last applied state
// on disk for a boot without etcd; status.go and metrics.go report;
// key.go keeps the private key; fakedevice.go is an in-memory WireGuard
// device for the scale bench and tests.
package overlay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshd/meshd/pkg/backoff"
	"github.com/meshd/meshd/pkg/overlay/desired"
	"github.com/meshd/meshd/pkg/registry"
)

// Options configure the overlay component; they mirror config.Overlay.
type Options struct {
	// Self is this node's name in the registry.
	Self string
	// StateDir keeps the private key and the applied-state cache.
	StateDir string
	// Interface is the WireGuard interface name (e.g. "meshd-wg").
	Interface string
	// ListenPort is the UDP port (0: 51820).
	ListenPort int
	// MTU of the interface (0: uplink MTU - 80).
	MTU int
	// Keepalive is every peer's persistent keepalive.
	Keepalive time.Duration
	// Mode is "auto", "kernel" or "userspace".
	Mode string
	// RouteTable holds the routes (0: 51820).
	RouteTable int
	// RouteNetwork routes the whole Network instead of per-peer subnets.
	RouteNetwork bool
	// Network is the cluster prefix (nix-infra: 10.0.0.0/8).
	Network netip.Prefix
	// Pool is the subnet pool: a member whose subnet is not one of its
	// subnets is skipped (zero: only Network is checked).
	Pool registry.Pool
	// RulePriority of the policy rule (0: DefaultRulePriority).
	RulePriority int
	// ImportKeyFile is flanneld's WireGuard private key file, imported on
	// first start so a migrating node keeps its public key
	// (LoadOrImportKey). Empty: no import.
	ImportKeyFile string
	// DetachUserspace runs a userspace device in its own process so that
	// it survives meshd restarts; main must call MaybeRunDevice (see
	// DeviceFlag). Without it the device lives and dies with meshd.
	DetachUserspace bool
}

func (o Options) params() desired.Params {
	return desired.Params{
		ListenPort:   o.ListenPort,
		MTU:          o.MTU,
		Keepalive:    o.Keepalive,
		RouteTable:   o.RouteTable,
		RouteNetwork: o.RouteNetwork,
		Network:      o.Network,
		Pool:         o.Pool,
	}
}

// Component is the overlay as an agent component. Apply hands each
// snapshot to the tracker, which computes the target, and the target to
// the applier; Run owns the long-running parts (the route repairer and
// the handshake retry) until its context ends.
type Component struct {
	opts    Options
	log     *slog.Logger
	key     wgtypes.Key
	pubOnce sync.Once
	pub     string // PublicKey's value
	metrics *metrics

	track   *tracker
	applier *Applier
	// reader is what Status reads the live device through: the applier
	// (tests put a FakeDevice here).
	reader deviceReader
	// peerCache keeps the status's peer summary between device reads.
	peerCache PeerCache
	cache     *bootCache
	retry     *handshakeRetry
	repairer  *routeRepairer
	// added wakes Run's re-read of the device after peers were added;
	// statusMu guards statusChanged (NotifyStatus).
	added         chan struct{}
	statusMu      sync.Mutex
	statusChanged func()
	// prepared is closed once the node may claim (PreparedForClaim).
	prepared     chan struct{}
	preparedOnce sync.Once
	// preClaim is for the handshake retry, until the claim (Apply runs on
	// the agent's loop only).
	preClaim *preClaimApply
}

// preClaimApply is what prepareBeforeClaim applied: the handshake retry
// notes it at the first apply after the claim.
type preClaimApply struct {
	plan    desired.Plan
	peers   int
	started time.Time
}

// New loads (or creates) the node's WireGuard key and opens the applier.
// It does not touch the interface: Boot or the first Apply does, and it
// starts nothing: Run does. Metrics are registered on reg when it is not
// nil.
func New(opts Options, log *slog.Logger, reg prometheus.Registerer) (*Component, error) {
	if err := registry.ValidName(opts.Self); err != nil {
		return nil, fmt.Errorf("overlay: node name: %w", err)
	}
	if err := opts.Validate(); err != nil {
		return nil, fmt.Errorf("overlay: %w", err)
	}
	computer, err := desired.NewComputer(opts.Self, opts.params())
	if err != nil {
		return nil, fmt.Errorf("overlay: %w", err)
	}
	key, imported, err := LoadOrImportKey(opts.StateDir, opts.ImportKeyFile)
	if err != nil {
		return nil, fmt.Errorf("overlay: %w", err)
	}
	log = log.With("component", "overlay")
	if imported {
		log.Info("imported flanneld's WireGuard key: the node keeps its public key", "file", opts.ImportKeyFile, "publicKey", key.PublicKey().String())
	}
	m, err := newMetrics(reg)
	if err != nil {
		return nil, fmt.Errorf("overlay: metrics: %w", err)
	}
	app, err := NewApplier(ApplierOptions{
		Interface:    opts.Interface,
		Mode:         opts.Mode,
		PrivateKey:   key,
		RulePriority: opts.RulePriority,
		Detach:       opts.DetachUserspace,
	}, log)
	if err != nil {
		return nil, fmt.Errorf("overlay: %w", err)
	}
	c := assemble(opts, log, key, m, computer, app)
	if reg != nil {
		if err := reg.Register(peerCollector{c}); err != nil {
			app.Close()
			return nil, fmt.Errorf("overlay: metrics: %w", err)
		}
	}
	return c, nil
}

// assemble wires the rooms together around app.
func assemble(opts Options, log *slog.Logger, key wgtypes.Key, m *metrics, computer *desired.Computer, app *Applier) *Component {
	c := &Component{
		opts: opts, log: log, key: key, metrics: m, applier: app, reader: app,
		track:    &tracker{computer: computer},
		retry:    newHandshakeRetry(app, log, func(n int) { m.retries.Add(float64(n)) }),
		added:    make(chan struct{}, 1),
		prepared: make(chan struct{}),
	}
	c.cache = &bootCache{dir: opts.StateDir, iface: opts.Interface, changed: c.statusChangedNow}
	c.repairer = &routeRepairer{iface: opts.Interface, linkIndex: app.linkIndex.Load, repair: c.repair, log: log}
	return c
}

// Name implements agent.Component.
func (c *Component) Name() string { return "overlay" }

// NotifyStatus implements agent.StatusNotifier: the boot cache is written
// in the background (Run), and a write that fails, or works again, changes
// the status (cacheError); and Run reads the device again a second after
// peers were added (their first handshakes). Call it before Run.
func (c *Component) NotifyStatus(changed func()) {
	c.statusMu.Lock()
	c.statusChanged = changed
	c.statusMu.Unlock()
}

// statusChangedNow tells the agent the status changed, if it asked to be
// told (NotifyStatus).
func (c *Component) statusChangedNow() {
	c.statusMu.Lock()
	changed := c.statusChanged
	c.statusMu.Unlock()
	if changed != nil {
		changed()
	}
}

// FirstHandshakeRead is how long after an apply that added peers Run has
// the status read the device again. The summary right after the apply
// shows the new peers without a handshake (none has completed yet); a
// second later their first handshakes have (or the handshake retry is at
// them), and the status shows it then instead of at the agent's next 25 s
// refresh, so that the write it causes belongs to the change, not to the
// idle time after it.
const FirstHandshakeRead = time.Second

// peersAdded wakes rereadAfterAdd.
func (c *Component) peersAdded() {
	select {
	case c.added <- struct{}{}:
	default: // Run has one pending already
	}
}

// rereadAfterAdd waits for applies that added peers and, FirstHandshakeRead
// after one, drops the peer summary and has the status rebuilt. Adds
// during the wait are covered by one more wait.
func (c *Component) rereadAfterAdd(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.added:
		}
		if backoff.Sleep(ctx, FirstHandshakeRead) != nil {
			return
		}
		c.peerCache.Invalidate()
		c.statusChangedNow()
	}
}

// PublicKey returns the node's WireGuard public key (base64), the value
// to publish in the member record and the node entry.
// It is derived once: a scalar multiplication, and the status asks on
// every pass.
func (c *Component) PublicKey() string {
	c.pubOnce.Do(func() { c.pub = c.key.PublicKey().String() })
	return c.pub
}

// Applier returns the component's applier, for callers (tests, an e2e
// harness) that need the live device.
func (c *Component) Applier() *Applier { return c.applier }

// PreparedForClaim implements agent.ClaimPreparer: the channel is closed
// once the first Apply, or a Boot that found a cache, is over, whatever
// its outcome. A node without a member record configures its peers in
// that Apply (prepareBeforeClaim), so that when it claims, every node
// that adds it reaches a device that already knows them.
func (c *Component) PreparedForClaim() <-chan struct{} { return c.prepared }

func (c *Component) markPrepared() { c.preparedOnce.Do(func() { close(c.prepared) }) }

// prepareBeforeClaim configures a new node's device before it claims its
// member record: its listen port and its peers (desired.BeforeClaim), no
// address or route. It does so only onto a device it creates, never one
// that runs already (a restarted meshd, the boot cache). Without it the
// joiner's device would come up after the others added it (a userspace
// device takes tens of milliseconds to start) or at the same moment (both
// sides initiating at once: crossing handshakes that stall until the
// handshake retry); with it, the others' first initiations complete at
// once (docs/overlay.md, "First handshakes"). A failure is logged and left
// to the Apply after the claim.
func (c *Component) prepareBeforeClaim(ctx context.Context, snap *registry.Snapshot) {
	st, err := desired.BeforeClaim(snap, c.opts.Self, c.PublicKey(), c.opts.params())
	if err != nil {
		c.log.Warn("cannot configure the overlay before the claim", "err", err)
		return
	}
	started := time.Now()
	plan, fresh, err := c.applier.setFresh(ctx, st)
	if !fresh {
		return
	}
	c.peerCache.Invalidate()
	c.metrics.observe(plan, err)
	if err != nil {
		c.log.Warn("cannot configure the overlay before the claim", "err", err)
		return
	}
	c.preClaim = &preClaimApply{plan: plan, peers: len(st.Peers), started: started}
	c.log.Info("overlay configured before the claim", "peers", len(st.Peers))
}

// Boot brings the overlay up from the state cached by the last
// successful Apply, without etcd: etcd itself may only be reachable over
// the overlay. With no cache it does nothing and returns nil. An error
// (a corrupt cache, a device failure) leaves the node waiting for etcd;
// the caller logs it and carries on.
func (c *Component) Boot(ctx context.Context) error {
	cf, err := c.cache.load()
	if errors.Is(err, ErrNoCache) {
		c.log.Info("no overlay cache, waiting for the registry")
		return nil
	}
	if err != nil {
		return fmt.Errorf("overlay boot: %w", err)
	}
	st := cf.State
	gen, ok := c.track.adopt(st, cf.Revision)
	if !ok { // Apply got there first: the registry wins
		return nil
	}
	c.cache.loaded(st, gen)
	defer c.markPrepared() // the device is up, from the cache, or failed
	if err := c.set(ctx, st, gen, "boot"); err != nil {
		return fmt.Errorf("overlay boot: %w", err)
	}
	c.log.Info("overlay up from cache", "peers", len(st.Peers), "revision", cf.Revision)
	return nil
}

// Apply implements agent.Component: compute the desired overlay from snap
// and apply the difference. Until the node has a member record (its
// subnet claim) there is nothing to configure and Apply does nothing; if
// the record disappears while the node runs, the overlay stays as it was
// until the node claims a new one.
func (c *Component) Apply(ctx context.Context, snap *registry.Snapshot) error {
	defer c.markPrepared()
	if c.track.upToDate(snap) {
		return nil
	}
	st, gen, newProblems, unchanged, ok, err := c.track.compute(snap)
	if err != nil {
		return fmt.Errorf("overlay: %w", err)
	}
	if !ok {
		select {
		case <-c.prepared: // not the first Apply, or booted from the cache
		default:
			c.prepareBeforeClaim(ctx, snap)
		}
		return nil
	}
	if newProblems { // log changes, not every pass
		for _, p := range st.Problems {
			c.log.Warn("skipping member", "node", p.Member, "err", p.Err)
		}
	}
	if unchanged {
		// Nothing to do on the device: no read of it either (with a
		// userspace device a round trip to its busy process).
		c.track.record(gen, nil)
		return nil
	}
	return c.set(ctx, st, gen, "apply")
}

// Ready implements the agent's Gate: the components after the overlay
// (HAProxy) wait until this node has its overlay, from the registry or
// from the boot cache. Otherwise their first health checks would go out
// before the routes exist and mark every server down.
func (c *Component) Ready() bool { return c.track.ready() }

// set applies st (generation gen of the target), records the outcome
// and, on success, notes the new peers for the handshake retry and
// caches st.
func (c *Component) set(ctx context.Context, st desired.State, gen uint64, why string) error {
	// The peers the plan adds exist from inside the apply on: a handshake
	// may complete while it still sets addresses and routes, and the
	// handshake retry must count it (retryState.added).
	started := time.Now()
	plan, before, err := c.applier.set(ctx, st)
	if err != nil {
		c.peerCache.Invalidate() // the device may be anything: read it
	} else {
		// The status's peer summary follows from the device as read for
		// this apply and what the apply changed: no second read.
		c.peerCache.Applied(c.applier.Mode(), before, plan, &st, time.Now())
		if slices.ContainsFunc(plan.Peers, func(pc desired.PeerChange) bool { return pc.Op == desired.OpAdd }) {
			c.peersAdded()
		}
	}
	c.metrics.observe(plan, err)
	current, revision := c.track.record(gen, err)
	if err != nil {
		c.log.Warn("overlay apply failed", "why", why, "err", err)
		return fmt.Errorf("overlay: %w", err)
	}
	if pc := c.preClaim; pc != nil {
		// The first apply after the claim: the others learn of this node
		// now, so the peers configured before the claim are checked from
		// here on, and their first handshakes read a second later (before
		// this apply's own plan, whose removals win).
		c.preClaim = nil
		c.retry.note(pc.plan, pc.peers, pc.started, started)
		c.peersAdded()
	}
	c.retry.note(plan, len(st.Peers), started, started)
	if !plan.Empty() {
		c.log.Info("overlay changed", "why", why, "peerChanges", len(plan.Peers),
			"routesAdded", len(plan.AddRoutes), "routesDeleted", len(plan.DelRoutes))
	}
	c.metrics.peers.Set(float64(len(st.Peers)))
	if current {
		if err := c.cache.offer(st, gen, revision); err != nil {
			// The overlay is up; only the next boot without etcd suffers.
			c.log.Warn("cannot write overlay cache", "err", err)
		}
	}
	return nil
}

// repair re-applies the newest target for the route repairer and records
// the outcome like any apply, so the status shows a repair that fails. A
// non-empty plan means something had been removed behind meshd's back.
func (c *Component) repair(ctx context.Context, why string) {
	t, gen := c.track.newest()
	if t == nil {
		return
	}
	started := time.Now()
	plan, _, err := c.applier.set(ctx, *t)
	if ctx.Err() != nil {
		return // stopping: not a failure of the overlay
	}
	c.metrics.observe(plan, err)
	c.track.record(gen, err)
	if err != nil {
		c.log.Warn("overlay repair failed", "why", why, "err", err)
		return
	}
	c.retry.note(plan, len(t.Peers), started, started)
	if !plan.Empty() {
		c.peerCache.Invalidate()
		c.metrics.repairs.Inc()
		c.log.Info("overlay repaired", "why", why, "plan", plan.String())
	}
}

// Run runs the route repairer, the handshake retry, the boot cache's
// writer and the re-read after added peers until ctx ends (the agent runs
// it next to its loop). It returns nil when ctx ends, the newest applied
// state written.
func (c *Component) Run(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { c.repairer.run(ctx); return nil })
	g.Go(func() error { c.retry.run(ctx); return nil })
	g.Go(func() error { c.cache.run(ctx, c.log); return nil })
	g.Go(func() error { c.rereadAfterAdd(ctx); return nil })
	return g.Wait()
}

// Close releases the netlink and wgctrl handles; call it after Run has
// returned. It deliberately leaves the interface, peers and routes up: a
// meshd restart must not flap the data plane, and the next meshd adopts
// the running device. (A userspace device lives in meshd's process and
// ends with it; the next meshd's Boot recreates it from the cache.)
func (c *Component) Close() error {
	return c.applier.Close()
}

// Destroy removes the interface, its routes and rule: the node leaves the
// overlay (the cache stays, so a later Boot can bring it back). Not part
// of a normal stop; call Close afterwards.
func (c *Component) Destroy() error {
	c.track.drop()
	return c.applier.Destroy()
}
