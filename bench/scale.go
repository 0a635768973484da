package bench

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshd/meshd/pkg/agent"
	"github.com/meshd/meshd/pkg/backoff"
	"github.com/meshd/meshd/pkg/haproxycfg"
	"github.com/meshd/meshd/pkg/overlay"
	"github.com/meshd/meshd/pkg/overlay/desired"
	"github.com/meshd/meshd/pkg/registry"
)

// ScaleOptions configures the scale benchmark: N real meshd agents in this
// process against one etcd, each with a recording component instead of
// the kernel and HAProxy.
type ScaleOptions struct {
	// NewClient returns a client of the etcd under test; every agent gets
	// its own, as every meshd has its own.
	NewClient func() (*clientv3.Client, error)
	// Control, if set, is the harness's own client (etcd itself, when the
	// agents and watchers go through a proxy); nil: NewClient.
	Control func() (*clientv3.Client, error)
	// MetricsURL is etcd's /metrics (for watch events per change); empty
	// skips that count.
	MetricsURL string
	N          int
	// Live is how many of the N nodes run a real agent (0: all). The
	// other N-Live are registered by the harness (member record, subnet
	// claim, leased node entry, as an agent writes them) and each has an
	// idle watch on /cluster/ in its own client: every agent sees an
	// N-node cluster and etcd fans every event out to N watchers, but
	// only Live agents share this machine's cores.
	Live int
	// Passive registers the N-Live harness nodes and holds their watches
	// until the returned stop is called. nil: RegisterPassive in this
	// process. The bench command runs them in a child process, so that the
	// CPU measured here is the live agents' alone (on a real cluster those
	// watchers are other machines).
	Passive func(ctx context.Context, n int) (stop func(), err error)
	Trials  int
	// StateDir holds the agents' state directories.
	StateDir string
	// Coalesce is each agent's settle window (default: meshd's default).
	Coalesce time.Duration
	// LeaseTTL of every agent (default 30s: keep-alive traffic stays low).
	LeaseTTL time.Duration
	// Log receives progress lines (nil: none).
	Log func(format string, a ...any)
	// AgentLog receives the agents' own logs (nil: discarded).
	AgentLog *slog.Logger
	// Label is added to the series names and the result (" via grpc-proxy").
	Label string
	// Idle is how long the cluster is left alone after the trials while
	// status writes are counted (0: not measured); it starts at least
	// overlay.FirstHandshakeRead after the last agent joined.
	Idle time.Duration
	// CPUProfile, if set, receives a CPU profile of this process (the
	// live agents and the harness) over the trials, and IdleCPUProfile
	// one over the idle period (Idle).
	CPUProfile, IdleCPUProfile io.Writer
	// Joins is how many more live agents join, one at a time, after the
	// instance trials (0: none): measureJoins.
	Joins int
}

// ScaleResult is what the scale benchmark measured.
type ScaleResult struct {
	N, Live int
	// Label says how the run differs (" via grpc-proxy"), or is empty.
	Label string `json:",omitempty"`
	// Startup is how long all N agents took to register and apply.
	Startup time.Duration
	// Added and Removed are the times from an instance put (delete) until
	// every agent's component applied it, in process.
	Added, Removed Series
	// AddedStatus is until every agent's published status reached the
	// revision (what `meshctl --wait` sees), for the same trials as Added.
	AddedStatus Series
	// CPUPerChange is this process's CPU time (every agent and the
	// harness; etcd runs elsewhere when MetricsURL names a separate
	// process) per change, and per agent per change.
	CPUPerChange, CPUPerAgentChange time.Duration
	// IdleCPU is this process's CPU per second over the idle period after
	// the trials (-idle; zero when skipped): what runs on time, not on
	// changes (lease keep-alives, status refreshes, device reads, GC).
	// NetCPUPerAgentChange is CPUPerAgentChange less that rate over the
	// trials' wall time: the cost a change itself adds. At N=10,000 a
	// change takes seconds, so the time-driven part would otherwise be
	// counted as per-change cost.
	IdleCPU              float64
	NetCPUPerAgentChange time.Duration
	// HeapPerAgent is the Go heap in use per running agent (client
	// included), and RSSPerAgent the process's RSS growth per agent.
	HeapPerAgent, RSSPerAgent int64
	// WritesPerChange is etcd revisions per change (the change itself plus
	// every status it causes); EventsPerChange is watch events etcd sent.
	WritesPerChange, EventsPerChange float64
	// StatusResends counts settle rounds that had to be repeated because
	// some agent's status never reached etcd (a failed status write is
	// only retried on the agent's next change); StatusLost counts trials
	// whose status convergence was not measured for that reason.
	StatusResends, StatusLost int
	// StatusBytesPerChange is the node status etcd stored per change,
	// key and value, over every agent; StatusBytesPerNode is that per
	// live agent, StatusValueBytes the mean size of one status.
	StatusBytesPerChange, StatusBytesPerNode, StatusValueBytes float64
	// DBGrowthPer100 is how much etcd's database (Maintenance Status
	// DbSize) grew per 100 changes during the trials; DBSize is its size
	// after them.
	DBGrowthPer100, DBSize int64
	// IdleStatusWrites is how many statuses were written while nothing
	// changed for Idle after the trials.
	IdleStatusWrites int64
	Idle             time.Duration
	// SamplePeers is the peer count in the overlay status one agent
	// published last (N-1 when the status carries the real overlay's).
	SamplePeers int
	// Join is, per joining agent (Joins), from just before its start
	// until every other live agent applied its member record.
	Join Series
	// JoinWrites is etcd revisions per join, from the agent's start until
	// the cluster settled after the others' re-read of their devices for
	// its handshake, and JoinStatusWrites the node statuses among them
	// (the joiner's and the others').
	JoinWrites, JoinStatusWrites float64
}

// idleAfterJoin is how long after the last join the idle period starts at
// the soonest: the agents' re-read of their devices for the new peers'
// first handshakes (overlay.FirstHandshakeRead), with a margin.
const idleAfterJoin = overlay.FirstHandshakeRead + 500*time.Millisecond

// recorder is the scale benchmark's component: it computes the real
// desired state of HAProxy and the overlay (the pure functions meshd
// uses), applies the overlay's per-peer deltas to a FakeDevice instead
// of a kernel device, and records the HAProxy configuration instead of
// loading it. Its status is what a real node publishes: the overlay's
// (overlay.StatusOf over the device, every peer with a recent handshake)
// and HAProxy's (haproxycfg.StatusOf, with the applier's counters kept
// the way the applier counts: a slot-only change is a runtime update,
// any other change a reload).
type recorder struct {
	self    string
	consume []registry.Group
	onApply func(node string, rev int64)

	overlay *desired.Computer // what meshd's overlay component runs
	dev     *overlay.FakeDevice
	peers   overlay.PeerCache // as the overlay component keeps it

	mu         sync.Mutex
	rev        int64
	ov         desired.State
	ovRev      int64
	hd         haproxycfg.Desired
	hash       string
	structure  string
	counters   haproxycfg.Counters
	overlayGen overlay.InputGens
	// changed is the agent's (agent.StatusNotifier); reread re-reads the
	// device overlay.FirstHandshakeRead after peers were added, as the
	// overlay component's Run does.
	changed func()
	reread  *time.Timer
}

// NotifyStatus implements agent.StatusNotifier.
func (r *recorder) NotifyStatus(changed func()) { r.changed = changed }

func (r *recorder) Name() string { return "haproxy" }

func (r *recorder) Apply(ctx context.Context, snap *registry.Snapshot) error {
	hd := haproxycfg.Compute(snap, haproxycfg.Params{Self: r.self, Consume: r.consume})
	hash, structure := haproxycfg.Hash(hd), haproxycfg.StructureHash(hd)
	r.mu.Lock()
	// Like the real overlay component: recompute only when a part of the
	// snapshot it reads (members, flannel leases) changed.
	if gen := overlay.InputsOf(snap); gen != r.overlayGen {
		if od, err := r.overlay.Compute(snap); err == nil && desired.Unchanged(r.ov, od) {
			r.ov = od // as the component: nothing to do on the device, no read of it
		} else if err == nil {
			// As the component: the summary follows from the device as
			// read before the set, and the set's plan.
			before, _ := r.dev.Device()
			plan, _ := r.dev.Set(od)
			r.peers.Applied(r.dev.Mode(), before, plan, &od, time.Now())
			now := time.Now()
			added := false
			for _, c := range plan.Peers {
				if c.Op == desired.OpAdd {
					r.dev.Traffic(c.Peer.PublicKey, now, 0, 0)
					added = true
				}
			}
			if added && r.changed != nil {
				if r.reread == nil {
					r.reread = time.AfterFunc(overlay.FirstHandshakeRead, func() {
						r.peers.Invalidate()
						r.changed()
					})
				} else {
					r.reread.Reset(overlay.FirstHandshakeRead)
				}
			}
			r.ov = od
		}
		r.overlayGen = gen
	}
	r.ovRev = snap.Revision
	switch {
	case r.hash == "":
		r.counters.Reloads++ // the first configuration is loaded
	case structure != r.structure:
		r.counters.Reloads++
	case hash != r.hash:
		r.counters.RuntimeUpdates++
	}
	r.rev, r.hd, r.hash, r.structure = snap.Revision, hd, hash, structure
	r.mu.Unlock()
	r.onApply(r.self, snap.Revision)
	return nil
}

func (r *recorder) Status() any {
	r.mu.Lock()
	defer r.mu.Unlock()
	st := haproxycfg.StatusOf(r.hd, "/run/meshd/haproxy.cfg", r.counters)
	st.AppliedHash, st.Supervised = r.hash, true
	return st
}

// overlayStatus is the recorder's overlay as a component of its own, so
// that the node status carries "overlay" and "haproxy" as a real node's
// does. The recorder (after it in the list) does the work.
type overlayStatus struct{ r *recorder }

func (o overlayStatus) Name() string                                    { return "overlay" }
func (o overlayStatus) Apply(context.Context, *registry.Snapshot) error { return nil }

// RefreshStatus implements agent.StatusRefresher, as the overlay
// component does.
func (o overlayStatus) RefreshStatus() { o.r.peers.Refresh(time.Now()) }

func (o overlayStatus) Status() any {
	o.r.mu.Lock()
	defer o.r.mu.Unlock()
	return overlay.StatusOf("meshd-wg", o.r.ov, o.r.ovRev, o.r.dev, &o.r.peers, time.Now())
}

func liveTag(o ScaleOptions) string {
	if o.Live < o.N {
		return fmt.Sprintf(" (%d live)%s", o.Live, o.Label)
	}
	return o.Label
}

// Scale runs the scale benchmark.
func Scale(ctx context.Context, o ScaleOptions) (ScaleResult, error) {
	if o.Live <= 0 || o.Live > o.N {
		o.Live = o.N
	}
	res := ScaleResult{N: o.N, Live: o.Live, Label: o.Label,
		Added:       Series{Name: fmt.Sprintf("meshd scale N=%d%s instance added", o.N, liveTag(o))},
		Removed:     Series{Name: fmt.Sprintf("meshd scale N=%d%s instance removed", o.N, liveTag(o))},
		AddedStatus: Series{Name: fmt.Sprintf("meshd scale N=%d%s instance added (status published)", o.N, liveTag(o))},
		Join:        Series{Name: fmt.Sprintf("meshd scale N=%d%s node join, from its start (applied by the others)", o.N, liveTag(o))},
	}
	if o.Log == nil {
		o.Log = func(string, ...any) {}
	}
	if o.LeaseTTL == 0 {
		o.LeaseTTL = 30 * time.Second
	}
	if o.Coalesce == 0 {
		o.Coalesce = 5 * time.Millisecond
	}
	control := o.Control
	if control == nil {
		control = o.NewClient
	}
	ctl, err := control()
	if err != nil {
		return res, err
	}
	defer ctl.Close()
	applied := newProgress()
	published := newProgress()
	// A clean registry: the etcd may have served an earlier size. The
	// flannel leases too: an earlier run's (on leases of 24 h) would be
	// flannel-only peers here.
	prefixes := []string{registry.ClusterPrefix, registry.MeshdPrefix, registry.FlannelSubnetPrefix}
	for _, p := range prefixes {
		if _, err := ctl.Delete(ctx, p, clientv3.WithPrefix()); err != nil {
			return res, err
		}
	}
	defer func() {
		for _, p := range prefixes {
			_, _ = ctl.Delete(context.WithoutCancel(ctx), p, clientv3.WithPrefix())
		}
	}()
	if o.Live < o.N {
		register := o.Passive
		if register == nil {
			register = func(ctx context.Context, n int) (func(), error) { return RegisterPassive(ctx, o.NewClient, n) }
		}
		passive, err := register(ctx, o.N-o.Live)
		if err != nil {
			return res, err
		}
		defer passive()
		o.Log("scale N=%d: %d nodes registered by the harness, each with an idle watch", o.N, o.N-o.Live)
	}
	names := make([]string, o.Live)
	for i := range names {
		names[i] = fmt.Sprintf("s%04d", i)
	}
	actx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	var clients []*clientv3.Client
	defer func() {
		stop()
		wg.Wait()
		for _, c := range clients {
			c.Close()
		}
	}()
	tally := &statusTally{}
	go watchStatuses(actx, ctl, published, tally)

	// Return what the previous run freed to the OS first: otherwise the
	// RSS growth below can be negative.
	debug.FreeOSMemory()
	var m0 runtime.MemStats
	runtime.ReadMemStats(&m0)
	rss0 := rss()
	startAll := time.Now()
	errs := make(chan error, o.N)
	// Start-up budget: every join makes every running agent recompute and
	// etcd fan the event out to all of them, so bringing N agents up on
	// one machine costs O(N²) (1000 live agents: minutes on two cores).
	upctx, cancel := context.WithTimeout(ctx, 5*time.Minute+time.Duration(o.N)*time.Duration(o.N)*time.Millisecond/2)
	defer cancel()
	go func() {
		select {
		case err := <-errs:
			o.Log("%v", err)
			cancel()
		case <-upctx.Done():
		}
	}()
	// Nodes join in batches, as a fleet boots: a thousand simultaneous
	// subnet claims would measure transaction contention, not convergence.
	const batch = 50
	for lo := 0; lo < o.Live; lo += batch {
		hi := min(lo+batch, o.Live)
		for i := lo; i < hi; i++ {
			if err := startAgent(actx, o, names[i], i, applied, &clients, &wg, errs); err != nil {
				return res, err
			}
		}
		// A status is published only once the agent has registered.
		if _, err := published.wait(upctx, names[lo:hi], 1, startAll); err != nil {
			return res, fmt.Errorf("agents did not register: %w", err)
		}
	}
	cancel()
	// Wait until the join storm has settled: every agent applied the
	// newest revision.
	if err := settle(ctx, ctl, names, applied, published, &res.StatusResends); err != nil {
		return res, err
	}
	res.Startup = time.Since(startAll)
	settled := time.Now()
	debug.FreeOSMemory()
	var m1 runtime.MemStats
	runtime.ReadMemStats(&m1)
	res.HeapPerAgent = int64(m1.HeapInuse-m0.HeapInuse) / int64(o.Live)
	res.RSSPerAgent = (rss() - rss0) / int64(o.Live)
	o.Log("scale N=%d: %d agents up in %s, heap %d KiB/agent", o.N, o.Live, res.Startup.Round(time.Millisecond), res.HeapPerAgent>>10)

	stopProfile, err := startProfile(o.CPUProfile)
	if err != nil {
		return res, err
	}
	defer stopProfile() // on an error return; after the trials below
	cpu0, wall0 := cpuTime(), time.Now()
	ev0, _ := etcdCounter(ctx, o.MetricsURL, "etcd_debugging_mvcc_events_total")
	rev0 := int64(0)
	changes := 0
	key := registry.InstanceKey(registry.GroupBackends, "benchapp", "worker-x")
	meta, _ := json.Marshal(registry.AppMeta{Publish: registry.Publish{Port: 19999}})
	if _, err := ctl.Put(ctx, registry.MetaKey(registry.GroupBackends, "benchapp"), string(meta)); err != nil {
		return res, err
	}
	if err := settle(ctx, ctl, names, applied, published, &res.StatusResends); err != nil {
		return res, err
	}
	w0, b0 := tally.read()
	db0 := dbSize(ctx, ctl)
	for t := range o.Trials {
		for _, add := range []bool{true, false} {
			start := time.Now()
			var rev int64
			if add {
				v := fmt.Sprintf(`{"ipv4":"%s.%d","node":"worker-x","port":8080}`, benchInstanceNet, t%250+1)
				r, err := ctl.Put(ctx, key, v)
				if err != nil {
					return res, err
				}
				rev = r.Header.Revision
			} else {
				r, err := ctl.Delete(ctx, key)
				if err != nil {
					return res, err
				}
				rev = r.Header.Revision
			}
			if rev0 == 0 {
				rev0 = rev - 1
			}
			changes++
			tctx, cancel := context.WithTimeout(ctx, 60*time.Second)
			d, err := applied.wait(tctx, names, rev, start)
			if err != nil {
				cancel()
				return res, fmt.Errorf("trial %d: applied: %w", t, err)
			}
			pd, perr := published.wait(tctx, names, rev, start)
			cancel()
			if perr != nil {
				o.Log("trial %d: published: %v (etcd holds %s)", t, perr, statusCensus(ctx, ctl, rev))
				res.StatusLost++
			}
			if add {
				res.Added.Add(d)
				if perr == nil {
					res.AddedStatus.Add(pd)
				}
			} else {
				res.Removed.Add(d)
			}
		}
	}
	// Every trial waited for every status of its revision: what the
	// tally holds now is the trials' statuses.
	if w1, b1 := tally.read(); changes > 0 && w1 > w0 {
		res.StatusBytesPerChange = float64(b1-b0) / float64(changes)
		res.StatusBytesPerNode = res.StatusBytesPerChange / float64(o.Live)
		res.StatusValueBytes = float64(b1-b0) / float64(w1-w0)
	}
	if db1 := dbSize(ctx, ctl); db0 > 0 && db1 > 0 && changes > 0 {
		res.DBGrowthPer100, res.DBSize = (db1-db0)*100/int64(changes), db1
	}
	// Let the last statuses land before counting writes.
	before := res.StatusResends
	if err := settle(ctx, ctl, names, applied, published, &res.StatusResends); err != nil {
		return res, err
	}
	settles := 1 + res.StatusResends - before
	cpu, wall := cpuTime()-cpu0, time.Since(wall0)
	stopProfile()
	res.CPUPerChange = cpu / time.Duration(changes)
	res.CPUPerAgentChange = res.CPUPerChange / time.Duration(o.Live)
	if r, err := ctl.Get(ctx, "/", clientv3.WithCountOnly()); err == nil {
		// Minus the harness's final settle writes (and the statuses they
		// caused).
		res.WritesPerChange = float64(r.Header.Revision-rev0-int64(settles)*int64(1+o.Live)) / float64(changes)
	}
	if ev1, err := etcdCounter(ctx, o.MetricsURL, "etcd_debugging_mvcc_events_total"); err == nil && o.MetricsURL != "" {
		res.EventsPerChange = (ev1 - ev0) / float64(changes)
	}
	if r, err := ctl.Get(ctx, registry.StatusKey(names[0])); err == nil && len(r.Kvs) == 1 {
		if st, err := registry.DecodeStatus(names[0], r.Kvs[0].Value); err == nil {
			var ov overlay.Status
			if json.Unmarshal(st.Components["overlay"], &ov) == nil {
				res.SamplePeers = ov.Peers.Count
			}
		}
	}
	if o.Joins > 0 {
		names, err = measureJoins(ctx, o, ctl, names, applied, published, tally, &res, func(name string, i int) error {
			return startAgent(actx, o, name, i, applied, &clients, &wg, errs)
		})
		if err != nil {
			return res, err
		}
		settled = time.Now()
	}
	if o.Idle > 0 {
		// The idle period starts no sooner than the agents' re-read of
		// their devices after the last join's peers were added
		// (overlay.FirstHandshakeRead): the status write it may cause
		// belongs to the join.
		if wait := time.Until(settled.Add(idleAfterJoin)); wait > 0 {
			select {
			case <-ctx.Done():
				return res, ctx.Err()
			case <-time.After(wait):
			}
		}
		w0, _ := tally.read()
		stopIdle, err := startProfile(o.IdleCPUProfile)
		if err != nil {
			return res, err
		}
		icpu0, iwall0 := cpuTime(), time.Now()
		err = backoff.Sleep(ctx, o.Idle)
		stopIdle()
		if err != nil {
			return res, err
		}
		w1, _ := tally.read()
		res.IdleStatusWrites, res.Idle = w1-w0, o.Idle
		res.IdleCPU = float64(cpuTime()-icpu0) / float64(time.Since(iwall0))
		res.NetCPUPerAgentChange = netPerChange(cpu, wall, res.IdleCPU, changes*o.Live)
	}
	o.Log("%s\n%s\n%s\nstatus: %.0f bytes/change (%.0f per node, %.0f per value), etcd db +%d bytes per 100 changes, %d status writes idle for %v",
		res.Added.Summary(), res.AddedStatus.Summary(), res.Removed.Summary(),
		res.StatusBytesPerChange, res.StatusBytesPerNode, res.StatusValueBytes, res.DBGrowthPer100, res.IdleStatusWrites, res.Idle)
	return res, nil
}

// measureJoins starts o.Joins more live agents, one at a time, each once
// the cluster settled from the one before, as nodes join a running
// cluster. It times each join (timeJoin: until every other live agent
// applied the member record, written with the node entry in the claim's
// transaction), and counts what the join cost etcd:
// every write (revision) from the agent's start until the cluster settled
// after the others' re-read of their devices for the new peer's first
// handshake (idleAfterJoin), less the settle's own, and the node statuses
// among them. It returns names with the joined agents added.
func measureJoins(ctx context.Context, o ScaleOptions, ctl *clientv3.Client, names []string, applied, published *progress, tally *statusTally, res *ScaleResult, start func(name string, i int) error) ([]string, error) {
	var writes, statuses int64
	for j := range o.Joins {
		name := fmt.Sprintf("j%04d", j)
		r0, err := ctl.Get(ctx, "/", clientv3.WithCountOnly())
		if err != nil {
			return names, err
		}
		s0, _ := tally.read()
		d, err := timeJoin(ctx, ctl, name, r0.Header.Revision, names, applied, func() error { return start(name, o.Live+j) })
		if err != nil {
			return names, fmt.Errorf("join %d: %w", j, err)
		}
		res.Join.Add(d)
		names = append(names, name)
		if err := backoff.Sleep(ctx, idleAfterJoin); err != nil {
			return names, err
		}
		before := res.StatusResends
		if err := settle(ctx, ctl, names, applied, published, &res.StatusResends); err != nil {
			return names, fmt.Errorf("join %d: %w", j, err)
		}
		settles := int64(1 + res.StatusResends - before)
		r1, err := ctl.Get(ctx, "/", clientv3.WithCountOnly())
		if err != nil {
			return names, err
		}
		s1, _ := tally.read()
		// The settle's own: its put, and every agent's status of it.
		writes += r1.Header.Revision - r0.Header.Revision - settles*int64(1+len(names))
		statuses += s1 - s0 - settles*int64(len(names))
	}
	res.JoinWrites = float64(writes) / float64(o.Joins)
	res.JoinStatusWrites = float64(statuses) / float64(o.Joins)
	o.Log("%s\njoin: %.1f etcd writes, %.1f of them statuses", res.Join.Summary(), res.JoinWrites, res.JoinStatusWrites)
	return names, nil
}

// timeJoin starts agent name (start) and returns the time from just
// before its start until every agent of others applied its member record,
// watched from revision after on. The agent's own work is in it (lease, a
// list of the whole registry, its first passes, the claim): the harness
// sees the member record no sooner than the agents do, so the claim's
// commit is not a time it knows.
func timeJoin(ctx context.Context, ctl *clientv3.Client, name string, after int64, others []string, applied *progress, start func() error) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	wch := ctl.Watch(ctx, registry.MemberKey(name), clientv3.WithRev(after+1))
	at := time.Now()
	if err := start(); err != nil {
		return 0, err
	}
	for wr := range wch {
		if err := wr.Err(); err != nil {
			return 0, fmt.Errorf("member record: %w", err)
		}
		for _, ev := range wr.Events {
			if ev.Type != clientv3.EventTypePut {
				continue
			}
			d, err := applied.wait(ctx, others, ev.Kv.ModRevision, at)
			if err != nil {
				return 0, fmt.Errorf("applied by the others: %w", err)
			}
			return d, nil
		}
	}
	return 0, fmt.Errorf("member record: watch ended: %w", context.Cause(ctx))
}

// startProfile starts a CPU profile into w (none when w is nil) and
// returns the function that stops it, which may be called more than once.
func startProfile(w io.Writer) (stop func(), err error) {
	if w == nil {
		return func() {}, nil
	}
	if err := pprof.StartCPUProfile(w); err != nil {
		return nil, fmt.Errorf("cpu profile: %w", err)
	}
	return sync.OnceFunc(pprof.StopCPUProfile), nil
}

// netPerChange is cpu, less idleRate (CPU seconds per second) over wall,
// divided over n; never below zero.
func netPerChange(cpu, wall time.Duration, idleRate float64, n int) time.Duration {
	if n <= 0 {
		return 0
	}
	return max(cpu-time.Duration(idleRate*float64(wall)), 0) / time.Duration(n)
}

// dbSize is the etcd database's size as its first endpoint reports it
// (0: unknown).
func dbSize(ctx context.Context, cli *clientv3.Client) int64 {
	eps := cli.Endpoints()
	if len(eps) == 0 {
		return 0
	}
	st, err := cli.Status(ctx, eps[0])
	if err != nil {
		return 0
	}
	return st.DbSize
}

// RegisterPassive registers n nodes the way their agents would (subnet
// claim, member record, node entry on a lease: registerNode), then gives
// each an idle watch on /cluster/ in its own client, resumed as meshd
// resumes its own when a stream ends (watchResuming). The watches start
// after the last registration: a watcher opened per registration would
// receive every later one, O(n²) events before the benchmark begins. The
// returned function stops the watches and revokes the nodes' lease.
func RegisterPassive(ctx context.Context, newClient func() (*clientv3.Client, error), n int) (func(), error) {
	cli, err := newClient()
	if err != nil {
		return nil, err
	}
	lease, err := cli.Grant(ctx, 3600)
	if err != nil {
		cli.Close()
		return nil, err
	}
	var clients []*clientv3.Client
	wctx, cancel := context.WithCancel(ctx)
	stop := func() {
		cancel()
		for _, c := range clients {
			c.Close()
		}
		_, _ = cli.Revoke(context.WithoutCancel(ctx), lease.ID)
		cli.Close()
	}
	for i := range n {
		if err := registerNode(ctx, cli, lease.ID, i, true); err != nil {
			stop()
			return nil, err
		}
	}
	for range n {
		wc, err := newClient()
		if err != nil {
			stop()
			return nil, err
		}
		clients = append(clients, wc)
		go watchResuming(wctx, wc, registry.ClusterPrefix, false, func(clientv3.WatchResponse) {}, nil)
	}
	return stop, nil
}

// registerNode registers harness node i (p0000, p0001, ...) with the keys
// and values its agent would write (registry.ClaimMember's subnet claim
// and member record, the node entry on lease, its flannel lease), in one create-only
// transaction. Its subnet is the pool's i-th: ClaimMember would search
// for a free one by listing every claim, O(N²) for N registrations. Without
// endpoint its member record names no WireGuard endpoint (a peer others
// cannot dial, which sends nothing).
func registerNode(ctx context.Context, cli *clientv3.Client, lease clientv3.LeaseID, i int, endpoint bool) error {
	name := fmt.Sprintf("p%04d", i)
	ip := fmt.Sprintf("198.51.100.%d", i%250+1)
	ep := ""
	if endpoint {
		ep = ip + ":51820"
	}
	subnet, err := poolSubnet(registry.DefaultPool, i)
	if err != nil {
		return fmt.Errorf("register %s: %w", name, err)
	}
	m := registry.Member{Name: name, PublicKey: randomKey(), Endpoint: ep, Subnet: subnet, OverlayIP: subnet.Addr()}
	claim, _ := json.Marshal(registry.SubnetClaim{Node: name})
	member, err := json.Marshal(m)
	if err != nil {
		return err
	}
	node, _ := json.Marshal(registry.Node{Name: name, IPv4: ip, Services: []registry.Group{registry.GroupBackends},
		Meshd: &registry.NodeMeshd{ID: randomHex(16), PublicKey: m.PublicKey, OverlayIP: m.OverlayIP.String(), Version: "bench-passive"}})
	// The flannel-format lease every meshd node keeps for its subnet (here
	// on the harness's lease, a node's own is on one of 24 h); the member
	// record wins over it, so it gives no peer and no endpoint.
	flannel, err := registry.EncodeFlannelLease(netip.MustParseAddr(ip), m.PublicKey, 51820)
	if err != nil {
		return err
	}
	tr, err := cli.Txn(ctx).If(
		clientv3.Compare(clientv3.CreateRevision(registry.SubnetKey(subnet)), "=", 0),
		clientv3.Compare(clientv3.CreateRevision(registry.MemberKey(name)), "=", 0),
	).Then(
		clientv3.OpPut(registry.SubnetKey(subnet), string(claim)),
		clientv3.OpPut(registry.MemberKey(name), string(member)),
		clientv3.OpPut(registry.NodeKey(name), string(node), clientv3.WithLease(lease)),
		clientv3.OpPut(registry.FlannelSubnetKey(subnet), string(flannel), clientv3.WithLease(lease)),
	).Commit()
	if err != nil {
		return fmt.Errorf("register %s: %w", name, err)
	}
	if !tr.Succeeded {
		return fmt.Errorf("register %s: subnet %v or its member record is taken", name, subnet)
	}
	return nil
}

// benchInstanceNet holds the addresses of the scale bench's instance: the
// overlay pool's last /24. An instance of a node without a member record
// (worker-x) must point into the pool and into no subnet another node
// claimed, or every agent drops it as invalid and the change measured
// changes nothing; the bench's nodes claim the pool's first subnets.
const benchInstanceNet = "10.98.255"

// poolSubnet is the pool's i-th subnet.
func poolSubnet(pool registry.Pool, i int) (netip.Prefix, error) {
	b := pool.Min.As4()
	v := binary.BigEndian.Uint32(b[:]) + uint32(i)<<(32-pool.Bits)
	binary.BigEndian.PutUint32(b[:], v)
	p := netip.PrefixFrom(netip.AddrFrom4(b), pool.Bits)
	if !pool.Contains(p) {
		return netip.Prefix{}, fmt.Errorf("subnet %d is beyond the pool", i)
	}
	return p, nil
}

// startAgent starts agent i with its own client and state directory.
func startAgent(actx context.Context, o ScaleOptions, name string, i int, applied *progress, clients *[]*clientv3.Client, wg *sync.WaitGroup, errs chan<- error) error {
	cli, err := o.NewClient()
	if err != nil {
		return err
	}
	*clients = append(*clients, cli)
	dir := filepath.Join(o.StateDir, name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	oc, err := desired.NewComputer(name, overlayParams)
	if err != nil {
		return err
	}
	key, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		return err
	}
	rec := &recorder{self: name, consume: []registry.Group{registry.GroupBackends}, onApply: applied.report, overlay: oc,
		dev: overlay.NewFakeDevice(key)}
	// Its peers re-handshake as live ones do (25 s keepalive, sessions
	// rekeyed after 2 minutes), so a bring-up longer than
	// overlay.RecentHandshake does not leave every first handshake stale.
	rec.dev.RekeyEvery(2*time.Minute + 25*time.Second)
	ip := fmt.Sprintf("192.0.2.%d", i%250+1)
	a, err := agent.New(agent.Options{
		Client: cli, Node: name, ID: randomHex(16), PublicIPv4: ip,
		Consume: rec.consume, LeaseTTL: o.LeaseTTL, Coalesce: o.Coalesce, StateDir: dir, Version: "bench",
		Member: &agent.MemberOptions{PublicKey: rec.dev.PublicKey(), Endpoint: ip + ":51820", Pool: registry.DefaultPool},
		// As every meshd node with an overlay (pkg/daemon): a flannel-format
		// lease for its subnet, one more write when it joins.
		FlannelLease: &agent.FlannelLeaseOptions{Port: 51820},
		Components:   []agent.Component{overlayStatus{rec}, rec}, Log: o.AgentLog,
	})
	if err != nil {
		return err
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		if err := a.Run(actx); err != nil && actx.Err() == nil {
			errs <- fmt.Errorf("agent %s: %w", name, err)
		}
	}()
	return nil
}
