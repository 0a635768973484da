// Package agent is meshd's core: it keeps a registry snapshot current,
// holds the node's lease (node entry, instances, status), and runs the
// reconcile loop that hands each new snapshot to the components.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"

	"github.com/meshd/meshd/pkg/registry"
)

// Options configures an Agent.
type Options struct {
	// Client is the process's one etcd client.
	Client *clientv3.Client
	// Node is this node's name; ID its stable identity (NodeID).
	Node string
	ID   string
	// PublicIPv4 is the node entry's "ipv4"; Consume its "services".
	PublicIPv4 string
	Consume    []registry.Group
	// LeaseTTL is the presence lease's TTL.
	LeaseTTL time.Duration
	// Coalesce is the window after a pass within which further events are
	// gathered into the next pass; an event after a quiet period is
	// applied at once (see loop).
	Coalesce time.Duration
	// RegisterTimeout bounds one registration attempt (lease, member
	// claim, node entry; default DefaultRegisterTimeout). An attempt that
	// runs out of it is retried with twice the time, up to
	// MaxRegisterTimeout, and a success starts from RegisterTimeout again:
	// an overloaded etcd (thousands of nodes starting together) may need
	// longer than any fixed bound, and retrying at the same bound would
	// fail every time while etcd still does the abandoned work.
	RegisterTimeout time.Duration
	// RemovalGrace is how long after registering again, once the lease
	// was lost, instance removals wait (default DefaultRemovalGrace; see
	// removalGraceUntil).
	RemovalGrace time.Duration
	// StateDir keeps the lease ID so that a restarted meshd resumes its
	// lease instead of churning its keys.
	StateDir string
	// Version is reported in the node entry and status.
	Version string

	// Member, if set, makes the agent claim an overlay subnet and publish
	// the durable member record (WireGuard key, endpoint, age recipient)
	// before it registers. Nil runs without overlay.
	Member *MemberOptions
	// FlannelLease, with Member, makes the agent keep a flannel-format
	// lease for its subnet (flannel.go). Nil writes none.
	FlannelLease *FlannelLeaseOptions
	// AdvertiseIP is the address instances are published with when there is
	// no overlay (with an overlay, the node's overlay IP is used).
	AdvertiseIP netip.Addr

	// Instances are the app instances this node serves.
	Instances []Instance
	// Components follow the snapshot, in order.
	Components []Component
	// Secrets makes the agent also watch this node's secrets prefix.
	Secrets bool

	Log        *slog.Logger
	Registerer prometheus.Registerer
	// Ready is called once the first reconcile pass has finished (or the
	// agent has given up waiting for etcd at start), for sd_notify.
	Ready func()
	// KeepLeaseOnStop is asked when Run ends because its context ended
	// (a clean stop): true leaves the lease, and so the node entry,
	// instances and status, alive for the next meshd process to resume,
	// as after a crash; false (and nil) revokes it, so every node learns
	// at once that this node left.
	KeepLeaseOnStop func() bool
	// Heartbeat is called on every loop iteration and periodically while
	// idle, for the systemd watchdog.
	Heartbeat func()
}

// MemberOptions is what goes into the node's durable member record.
type MemberOptions struct {
	PublicKey string
	Endpoint  string
	Recipient string
	Pool      registry.Pool
}

// Instance is one app instance this node serves, with its check.
type Instance struct {
	Group registry.Group
	App   string
	Port  int
	// Check reports whether the instance is healthy; nil means always. It
	// is given the address the instance is advertised with (the node's
	// overlay IP, or AdvertiseIP, and Port); that address is not valid
	// while the node has none yet.
	Check Check
	// Interval is how often Check runs (0: 1s).
	Interval time.Duration
	// Timeout bounds one run of Check (0: the interval, at most 2s).
	Timeout time.Duration
}

// ErrNodeOwned is returned when another live meshd holds this node's name.
var ErrNodeOwned = errors.New("node name is registered by another live meshd")

// Agent runs one node.
type Agent struct {
	o       Options
	log     *slog.Logger
	store   *registry.Store
	metrics *metrics
	notify  chan struct{}
	// pendingSince is when the oldest change not yet taken by a pass
	// arrived (Unix nanoseconds, 0: none): the reconcile wait metric.
	pendingSince atomic.Int64

	mu        sync.Mutex
	lease     clientv3.LeaseID // current lease, 0 while unregistered
	member    *registry.Member
	status    registry.Status
	published []byte // last status value written
	stateErr  error  // the state directory could not be written
	// registeredAt is when the current lease's registration succeeded
	// (zero while the node has no lease).
	registeredAt time.Time
	// leaseLost is set once a lease of this run has been lost: from then
	// on the loop gives instance removals a grace while unleased and just
	// after registering again (see removalGraceUntil).
	leaseLost bool
	healthy   map[int]bool
	// seen is the presence record last written (registry.Seen).
	seen registry.Seen
	// lastApply is when a reconcile pass last applied a revision fully.
	lastApply time.Time
	// checkNow[i] wakes instance i's check loop (the advertised address
	// changed).
	checkNow  []chan struct{}
	instChg   chan struct{}
	statusChg chan struct{}
	// preparedForClaim: the session waited for the ClaimPreparers once
	// (waitPrepared; the session's goroutine only).
	preparedForClaim bool
	// statusPoke asks the loop to rebuild the status (StatusNotifier).
	statusPoke chan struct{}
	// flannelChg wakes the flannel lease keeper (member record known,
	// flannel keys changed).
	flannelChg chan struct{}
}

// New checks options and builds an agent.
func New(o Options) (*Agent, error) {
	if o.Client == nil {
		return nil, errors.New("agent: no etcd client")
	}
	if err := registry.ValidName(o.Node); err != nil {
		return nil, fmt.Errorf("agent: node name: %w", err)
	}
	if o.LeaseTTL < time.Second {
		return nil, fmt.Errorf("agent: lease TTL %v too short", o.LeaseTTL)
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Registerer == nil {
		o.Registerer = prometheus.NewRegistry()
	}
	m, err := newMetrics(o.Registerer)
	if err != nil {
		return nil, err
	}
	m.components(o.Components)
	checkNow := make([]chan struct{}, len(o.Instances))
	for i := range checkNow {
		checkNow[i] = make(chan struct{}, 1)
	}
	store := registry.NewStore()
	if o.Member != nil && o.Member.Pool.Bits != 0 {
		store = registry.NewOverlayStore(o.Member.Pool)
	}
	a := &Agent{
		o:         o,
		checkNow:  checkNow,
		log:       o.Log.With("component", "agent", "node", o.Node),
		store:     store,
		metrics:   m,
		notify:    make(chan struct{}, 1),
		healthy:   map[int]bool{},
		instChg:   make(chan struct{}, 1),
		statusChg: make(chan struct{}, 1),

		statusPoke: make(chan struct{}, 1),
		flannelChg: make(chan struct{}, 1),
	}
	for _, c := range o.Components {
		if n, ok := c.(StatusNotifier); ok {
			n.NotifyStatus(func() { signal(a.statusPoke) })
		}
	}
	return a, nil
}

// Snapshot returns the agent's current view (for tests and debugging).
func (a *Agent) Snapshot() *registry.Snapshot { return a.store.Snapshot() }

// Status returns the node's current status.
func (a *Agent) Status() registry.Status {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.status
}

// LastApply is when a reconcile pass last applied a snapshot without
// error (zero before the first).
func (a *Agent) LastApply() time.Time {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.lastApply
}

// Run runs the agent until ctx ends or the node name turns out to belong to
// another node. On return after ctx ends it has revoked its lease, so peers
// learn at once that the node left, unless KeepLeaseOnStop says to keep it
// for the next process.
func (a *Agent) Run(ctx context.Context) error {
	g, gctx := errgroup.WithContext(ctx)
	watch := func(prefix string) {
		w := &registry.Watcher{
			Client: a.o.Client, Prefix: prefix, Store: a.store, Notify: a.kick, Log: a.log,
			Relisted: func() { a.metrics.relists.Inc() },
		}
		g.Go(func() error { w.Run(gctx); return nil })
	}
	watch(registry.ClusterPrefix)
	if a.o.Secrets {
		watch(registry.SecretsNodePrefix(a.o.Node))
	}
	if a.o.Member != nil {
		// Nodes still on flanneld are peers (overlay/desired/flannel.go).
		watch(registry.FlannelSubnetPrefix)
		watch(registry.FlannelConfigKey)
		if a.o.FlannelLease != nil {
			k := &flannelKeeper{a: a, o: a.o.FlannelLease.withDefaults()}
			g.Go(func() error { return k.run(gctx) })
		}
	}
	g.Go(func() error { return a.session(gctx) })
	for _, c := range a.o.Components {
		if r, ok := c.(Runner); ok {
			g.Go(func() error {
				if err := r.Run(gctx); err != nil && gctx.Err() == nil {
					a.log.Error("component stopped", "component", c.Name(), "err", err)
					return fmt.Errorf("%s: %w", c.Name(), err)
				}
				return nil
			})
		}
	}
	g.Go(func() error { a.loop(gctx); return nil })
	for i := range a.o.Instances {
		g.Go(func() error { a.checkLoop(gctx, i); return nil })
	}
	err := g.Wait()
	// A clean stop records when it happened, alongside (not before) the
	// lease's fate: with etcd away, stopping waits for one timeout, not two.
	var seenDone chan struct{}
	if ctx.Err() != nil && a.registered() {
		seenDone = make(chan struct{})
		go func() {
			defer close(seenDone)
			a.writeSeen(context.Background(), func(s *registry.Seen) { s.StoppedAt = time.Now().UTC() })
		}()
	}
	if ctx.Err() != nil && a.o.KeepLeaseOnStop != nil && a.o.KeepLeaseOnStop() {
		a.log.Info("stopping, lease kept for the next meshd to resume", "ttl", a.o.LeaseTTL)
	} else {
		a.revoke()
	}
	if seenDone != nil {
		<-seenDone
	}
	if errors.Is(err, ErrNodeOwned) {
		return err
	}
	return nil
}

// registered reports whether the node holds a lease.
func (a *Agent) registered() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.lease != 0
}

// kick wakes the reconcile loop.
func (a *Agent) kick() {
	a.pendingSince.CompareAndSwap(0, time.Now().UnixNano())
	select {
	case a.notify <- struct{}{}:
	default:
	}
}

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}
