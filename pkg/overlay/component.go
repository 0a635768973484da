// Package overlay is meshd's WireGuard mesh: it computes the node's
// desired interface, peers and routes from the registry (package
// desired, pure) and makes the kernel match (Applier: wgctrl + netlink,
// kernel WireGuard or embedded wireguard-go). It replaces flanneld.
package overlay

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

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
	}
}

// Component is the overlay as an agent component: Apply computes the
// desired state from each snapshot and hands it to the Applier; a
// background watcher puts back routes, addresses or the interface when
// something else removes them.
type Component struct {
	opts    Options
	log     *slog.Logger
	key     wgtypes.Key
	applier *Applier
	// reader is what Status reads the live device through: the applier
	// (tests put a FakeDevice here).
	reader  deviceReader
	metrics *metrics

	// computer is desired.Compute with memory: a change of k members costs
	// O(k log N) plus one cheap pass, not a full recomputation. cmu
	// serialises it (the agent calls Apply from one goroutine; cmu keeps
	// that an implementation detail).
	cmu      sync.Mutex
	computer *desired.Computer

	mu       sync.Mutex
	target   *desired.State // newest desired state (applied or being retried)
	gen      uint64         // bumped whenever target is replaced
	applied  bool           // target is fully applied
	revision int64          // snapshot revision of target
	cached   []byte         // JSON of the state last written to the cache
	cacheGen uint64         // gen whose state the cache is known to hold
	lastErr  error
	cacheErr error // last failure to write the boot cache, nil once it works
	waiting  bool  // no member record for Self yet
	// membersGen is the snapshot member generation target was computed
	// from: the overlay reads nothing else, so an unchanged generation
	// with target applied means there is nothing to do (an app or status
	// change costs the overlay nothing, however large the cluster).
	membersGen uint64
	problems   []desired.Problem

	// kicks are newly added peers awaiting their first handshake (see
	// kickDelays); kickWake wakes the kick loop.
	kmu      sync.Mutex
	kicks    map[string]*kickState
	kickWake chan struct{}

	ctx      context.Context // ends at Close; bounds the watcher
	cancel   context.CancelFunc
	watching bool // the repair watcher runs; done closes when it ends
	closed   bool
	done     chan struct{}
}

// New loads (or creates) the node's WireGuard key and opens the applier.
// It does not touch the interface: Boot or the first Apply does. Metrics
// are registered on reg when it is not nil.
func New(opts Options, log *slog.Logger, reg prometheus.Registerer) (*Component, error) {
	if err := registry.ValidName(opts.Self); err != nil {
		return nil, fmt.Errorf("overlay: node name: %w", err)
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
	ctx, cancel := context.WithCancel(context.Background())
	c := &Component{opts: opts, log: log, key: key, applier: app, reader: app, metrics: m, computer: computer, ctx: ctx, cancel: cancel,
		done: make(chan struct{}), kickWake: make(chan struct{}, 1)}
	if reg != nil {
		if err := reg.Register(peerCollector{c}); err != nil {
			cancel()
			app.Close()
			return nil, fmt.Errorf("overlay: metrics: %w", err)
		}
	}
	return c, nil
}

// Name implements agent.Component.
func (c *Component) Name() string { return "overlay" }

// PublicKey returns the node's WireGuard public key (base64), the value
// to publish in the member record and the node entry.
func (c *Component) PublicKey() string { return c.key.PublicKey().String() }

// Applier returns the component's applier, for callers (tests, an e2e
// harness) that need the live device.
func (c *Component) Applier() *Applier { return c.applier }

// Boot brings the overlay up from the state cached by the last
// successful Apply, without etcd: etcd itself may only be reachable over
// the overlay. With no cache it does nothing and returns nil. An error
// (a corrupt cache, a device failure) leaves the node waiting for etcd;
// the caller logs it and carries on.
func (c *Component) Boot(ctx context.Context) error {
	cf, err := loadCache(c.opts.StateDir)
	if errors.Is(err, ErrNoCache) {
		c.log.Info("no overlay cache, waiting for the registry")
		return nil
	}
	if err != nil {
		return fmt.Errorf("overlay boot: %w", err)
	}
	c.mu.Lock()
	if c.target != nil { // Apply got there first: the registry wins
		c.mu.Unlock()
		return nil
	}
	st := cf.State
	c.gen++
	c.target, c.revision = &st, cf.Revision
	c.cached, c.cacheGen = stateJSON(st), c.gen
	gen := c.gen
	c.mu.Unlock()
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
	c.mu.Lock()
	if snap.Gen.Members != 0 && snap.Gen.Members == c.membersGen && c.applied && c.lastErr == nil {
		c.revision = snap.Revision
		c.mu.Unlock()
		return nil
	}
	c.mu.Unlock()
	c.cmu.Lock()
	st, err := c.computer.Compute(snap)
	c.cmu.Unlock()
	c.mu.Lock()
	c.membersGen = snap.Gen.Members
	if errors.Is(err, desired.ErrNoSelf) {
		c.waiting = true
		c.mu.Unlock()
		return nil
	}
	if err != nil {
		c.lastErr = err
		c.mu.Unlock()
		return fmt.Errorf("overlay: %w", err)
	}
	if !slices.Equal(st.Problems, c.problems) { // log changes, not every pass
		for _, p := range st.Problems {
			c.log.Warn("skipping member", "node", p.Member, "err", p.Err)
		}
	}
	c.waiting, c.problems = false, st.Problems
	c.gen++
	c.target, c.revision = &st, snap.Revision
	gen := c.gen
	c.mu.Unlock()
	return c.set(ctx, st, gen, "apply")
}

// Ready implements the agent's Gate: the components after the overlay
// (HAProxy) wait until this node has its overlay, from the registry or
// from the boot cache. Otherwise their first health checks would go out
// before the routes exist and mark every server down.
func (c *Component) Ready() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.target != nil && !c.waiting
}

// set applies st (generation gen of the target), records the outcome
// and, on success, caches st and starts the repair watcher.
func (c *Component) set(ctx context.Context, st desired.State, gen uint64, why string) error {
	plan, err := c.applier.set(ctx, st)
	c.metrics.observe(plan, err)
	c.mu.Lock()
	defer c.mu.Unlock()
	current := gen == c.gen // no newer target arrived meanwhile
	c.lastErr = err
	if current {
		c.applied = err == nil
	}
	if err != nil {
		c.log.Warn("overlay apply failed", "why", why, "err", err)
		return fmt.Errorf("overlay: %w", err)
	}
	c.noteAdded(plan, len(st.Peers), time.Now())
	if !plan.Empty() {
		c.log.Info("overlay changed", "why", why, "peerChanges", len(plan.Peers),
			"routesAdded", len(plan.AddRoutes), "routesDeleted", len(plan.DelRoutes))
	}
	c.metrics.peers.Set(float64(len(st.Peers)))
	// The cache is rewritten only when the applied state changed, not on
	// every registry revision.
	if current && c.cacheGen != gen {
		if b := stateJSON(st); !bytes.Equal(b, c.cached) {
			if err := saveCache(c.opts.StateDir, cacheFile{Interface: c.opts.Interface, Revision: c.revision, State: st}); err != nil {
				// The overlay is up; only the next boot without etcd suffers.
				c.log.Warn("cannot write overlay cache", "err", err)
				c.cacheErr = err
			} else {
				c.cached, c.cacheGen, c.cacheErr = b, gen, nil
			}
		} else {
			c.cacheGen = gen
		}
	}
	if !c.watching && !c.closed {
		c.watching = true
		go c.watch(c.ctx)
	}
	return nil
}

// stateJSON is the applied part of st, encoded, for change detection.
func stateJSON(st desired.State) []byte {
	st.Problems = nil
	b, _ := json.Marshal(st)
	return b
}

// Close stops the repair watcher and releases the netlink and wgctrl
// handles. It deliberately leaves the interface, peers and routes up: a
// meshd restart must not flap the data plane, and the next meshd adopts
// the running device. (A userspace device lives in meshd's process and
// ends with it; the next meshd's Boot recreates it from the cache.)
func (c *Component) Close() error {
	c.mu.Lock()
	c.closed = true
	watching := c.watching
	c.mu.Unlock()
	c.cancel()
	if watching {
		<-c.done
	}
	return c.applier.Close()
}

// Destroy removes the interface, its routes and rule: the node leaves the
// overlay (the cache stays, so a later Boot can bring it back). Not part
// of a normal stop; call Close afterwards.
func (c *Component) Destroy() error {
	c.mu.Lock()
	c.target = nil
	c.gen++
	c.mu.Unlock()
	return c.applier.Destroy()
}
