package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/config"
	"github.com/meshd/meshd/pkg/haproxycfg"
	"github.com/meshd/meshd/pkg/registry"
	"github.com/meshd/meshd/pkg/sandbox"
)

// The apps the full-fidelity benchmark changes.
const (
	benchApp     = "benchapp"
	benchPort    = 8081 // served on n1
	benchPublish = 18081
	killApp      = "benchkill"
	killPort     = 8082
	killPublish  = 18082
)

// FidelityOptions configures the full-fidelity benchmark on a sandbox.
type FidelityOptions struct {
	Sandbox sandbox.Options
	// N is the cluster size (n1 serves, the others consume).
	N int
	// Trials for instance add/remove and node join; KillTrials for node
	// kill (each lasts about a lease TTL).
	Trials, KillTrials int
	// Profile, when set, profiles n2 (a consumer) for this long after the
	// instance trials (PassProfile); its CPU profile goes to ProfileDir.
	Profile    time.Duration
	ProfileDir string
	Log        func(format string, a ...any)
}

// FidelityResult is what the full-fidelity benchmark measured.
type FidelityResult struct {
	N int
	// Join: a new node's registration until every other node applied it
	// (the new node's own start-up is not in it); JoinPing: until every
	// other node also pings its overlay address (empty without an overlay).
	Join, JoinPing Series
	// Added/Removed: an instance put/delete until every node applied it;
	// AddedServes/RemovedServes: until every consumer's 127.0.0.1 listener
	// answers from it / no longer does, through HAProxy (and WireGuard).
	Added, AddedServes, Removed, RemovedServes Series
	// ServedFloor is the data path alone, the floor under AddedServes:
	// the instance already served everywhere, every consumer sends one
	// request at the same moment (as the probes do), until the slowest
	// answer. It is what the last step of "served by all" costs in this
	// sandbox with nothing left to converge.
	ServedFloor Series
	// Killed: a SIGKILL of a serving node until its instance was gone
	// and every node applied that (bounded by the lease TTL).
	Killed Series
	// Reloads and RuntimeUpdates are the HAProxy counters' growth, summed
	// over nodes, during the instance trials.
	Reloads, RuntimeUpdates int64
	// Overlay says whether nodes had overlay addresses (member records);
	// OverlayModes are the WireGuard modes the nodes reported.
	Overlay      bool
	OverlayModes []string
	// Profile is n2's reconcile passes profiled (FidelityOptions.Profile).
	Profile *PassProfile `json:",omitempty"`
	// AddedCPU and RemovedCPU are where the machine's CPU went during the
	// instance trials, each kind's trials apart (from just before the write
	// until the probes ended).
	AddedCPU, RemovedCPU *MachineCPU `json:",omitempty"`
	// ServedFloorCPU is the same accounting for the ServedFloor rounds,
	// JoinCPU for the join trials (from just before the node's start until
	// every other node pinged it; Apart is the joining node's processes).
	ServedFloorCPU, JoinCPU *MachineCPU `json:",omitempty"`
}

// Fidelity runs the full-fidelity benchmark: a real sandbox of N nodes.
func Fidelity(ctx context.Context, o FidelityOptions) (FidelityResult, error) {
	res := FidelityResult{N: o.N}
	name := func(s string) Series { return Series{Name: fmt.Sprintf("meshd sandbox N=%d %s", o.N, s)} }
	res.Join, res.JoinPing = name("node join (applied by the others)"), name("node join (pinged by all)")
	res.Added, res.AddedServes = name("instance added (applied)"), name("instance added (served by all)")
	res.Removed, res.RemovedServes = name("instance removed (applied)"), name("instance removed (gone from all)")
	res.Killed = name("node killed (instance gone everywhere)")
	res.ServedFloor = name("served floor (instance already served; every consumer's request at once)")
	if o.Log == nil {
		o.Log = func(string, ...any) {}
	}
	c, err := sandbox.Start(ctx, o.Sandbox)
	if err != nil {
		return res, err
	}
	defer c.Close()
	var edit func(*config.Config)
	if o.Profile > 0 {
		edit = func(cfg *config.Config) { cfg.MetricsAddr, cfg.Pprof = profileMetricsAddr, true }
	}
	if _, err := c.BringUp(ctx, sandbox.DemoOptions{Nodes: o.N, StepTimeout: 60 * time.Second, Edit: edit}); err != nil {
		return res, err
	}
	n1 := c.Node("n1")
	if err := n1.ServeDemo(benchPort); err != nil {
		return res, err
	}
	members, err := c.Members(ctx)
	if err != nil {
		return res, err
	}
	target := n1.Addr
	if m, ok := members["n1"]; ok {
		target, res.Overlay = m.OverlayIP, true
	}
	for _, app := range []struct {
		name string
		port int
	}{{benchApp, benchPublish}, {killApp, killPublish}} {
		b, _ := json.Marshal(registry.AppMeta{Env: registry.Env{"PROTOCOL": json.RawMessage(`"http"`)}, Publish: registry.Publish{Port: app.port}})
		rev, at, err := c.Put(ctx, registry.MetaKey(registry.GroupBackends, app.name), string(b))
		if err != nil {
			return res, err
		}
		if _, err := c.WaitApplied(ctx, rev, at, c.NodeNames()); err != nil {
			return res, err
		}
	}
	consumers := c.Nodes()[1:]
	res.OverlayModes = overlayModes(ctx, c)

	// Instance added / removed.
	c0, err := haproxyCounters(ctx, c)
	if err != nil {
		return res, err
	}
	// The harness writes the instance in n1's name, the node whose address
	// it points at: an instance of a node that has no member record may
	// not point into another node's subnet (meshd drops it). n1's meshd
	// leaves the key alone: it only touches instance keys it wrote.
	key := registry.InstanceKey(registry.GroupBackends, benchApp, n1.Name)
	val, _ := json.Marshal(registry.Instance{IPv4: target.String(), Node: n1.Name, Port: benchPort})
	url := fmt.Sprintf("http://127.0.0.1:%d/", benchPublish)
	namespaces := map[uint64]bool{}
	for _, n := range c.Nodes() {
		ino, err := n.NetnsInode()
		if err != nil {
			return res, err
		}
		namespaces[ino] = true
	}
	var addedCPU, removedCPU cpuAccount
	for t := range o.Trials {
		for _, add := range []bool{true, false} {
			tctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			cpu0, cerr := readCPU(namespaces)
			probe := startProbes(tctx, consumers, url, add)
			var rev int64
			var at time.Time
			if add {
				rev, at, err = c.Put(tctx, key, string(val))
			} else {
				rev, at, err = c.Delete(tctx, key)
			}
			if err != nil {
				cancel()
				return res, err
			}
			cv, err := c.WaitApplied(tctx, rev, at, c.NodeNames())
			if err != nil {
				cancel()
				return res, fmt.Errorf("trial %d: %w%s", t, err, exited(c))
			}
			served, err := probe(at)
			cancel()
			if err != nil {
				return res, fmt.Errorf("trial %d: %w%s", t, err, exited(c))
			}
			if cpu1, err := readCPU(namespaces); err == nil && cerr == nil {
				if add {
					addedCPU.add(cpu0, cpu1, 1)
				} else {
					removedCPU.add(cpu0, cpu1, 1)
				}
			}
			if add {
				res.Added.Add(cv.Max())
				res.AddedServes.Add(served)
			} else {
				res.Removed.Add(cv.Max())
				res.RemovedServes.Add(served)
			}
		}
	}
	if addedCPU.changes > 0 && removedCPU.changes > 0 {
		a, r := addedCPU.result(), removedCPU.result()
		res.AddedCPU, res.RemovedCPU = &a, &r
	}
	c1, err := haproxyCounters(ctx, c)
	if err != nil {
		return res, err
	}
	res.Reloads, res.RuntimeUpdates = c1.Reloads-c0.Reloads, c1.RuntimeUpdates-c0.RuntimeUpdates
	if err := measureServedFloor(ctx, c, consumers, key, string(val), url, namespaces, o.Trials, &res); err != nil {
		return res, err
	}
	o.Log("%s", res.ServedFloor.Summary())
	o.Log("%s\n%s\n%s\n%s\nhaproxy reloads during instance trials: %d, runtime updates: %d",
		res.Added.Summary(), res.AddedServes.Summary(), res.Removed.Summary(), res.RemovedServes.Summary(), res.Reloads, res.RuntimeUpdates)

	if o.Profile > 0 && o.N >= 2 {
		n2 := c.Node("n2")
		pp, err := profilePasses(ctx, n2, o.Profile, o.Sandbox.MeshdBinary, o.ProfileDir, func(i int) (time.Duration, error) {
			tctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			var rev int64
			var at time.Time
			var err error
			if i%2 == 0 {
				rev, at, err = c.Put(tctx, key, string(val))
			} else {
				rev, at, err = c.Delete(tctx, key)
			}
			if err != nil {
				return 0, err
			}
			cv, err := c.WaitApplied(tctx, rev, at, c.NodeNames())
			if err != nil {
				return 0, fmt.Errorf("profiled change %d: %w", i, err)
			}
			return cv.PerNode[n2.Name], nil
		})
		if err != nil {
			return res, err
		}
		res.Profile = &pp
		o.Log("profiled %s: %d changes, applied mean %v, wait %v, pass %v, CPU per change %v",
			pp.Node, pp.Changes, pp.Applied, pp.Wait, pp.Pass, pp.CPUPerChange)
	}

	// Node join, and the machine's CPU from just before the node's start
	// until every other node pinged it, the joining node's apart.
	var joinCPU cpuAccount
	for t := range o.Trials {
		cpu0, cerr := readCPU(namespaces)
		n, err := c.AddNode(ctx, sandbox.NodeOptions{Consume: []registry.Group{registry.GroupBackends}})
		if err != nil {
			return res, err
		}
		if err := measureJoin(ctx, c, n, &res); err != nil {
			return res, fmt.Errorf("join trial %d: %w\n%s", t, err, n.LogTail(1500))
		}
		if ino, err := n.NetnsInode(); err == nil && cerr == nil {
			withNew := maps.Clone(namespaces)
			withNew[ino] = true
			if cpu1, err := readCPU(withNew); err == nil {
				joinCPU.apart = ino
				joinCPU.add(cpu0, cpu1, 1)
			}
		}
		if err := removeNode(ctx, c, n.Name); err != nil {
			return res, err
		}
	}
	if joinCPU.changes > 0 {
		r := joinCPU.result()
		res.JoinCPU = &r
	}
	o.Log("%s\n%s", res.Join.Summary(), res.JoinPing.Summary())

	// Node killed.
	for t := range o.KillTrials {
		n, err := c.AddNode(ctx, sandbox.NodeOptions{
			Instances: []config.Instance{{App: killApp, Group: registry.GroupBackends, Port: killPort,
				Check: config.Check{TCP: fmt.Sprintf("127.0.0.1:%d", killPort), Interval: config.Duration(200 * time.Millisecond)}}},
			BeforeStart: func(n *sandbox.Node) error { return n.ServeDemo(killPort) },
		})
		if err != nil {
			return res, err
		}
		ikey := registry.InstanceKey(registry.GroupBackends, killApp, n.Name)
		tctx, cancel := context.WithTimeout(ctx, 60*time.Second)
		rev, at, err := c.WaitKey(tctx, ikey, false)
		if err == nil {
			_, err = c.WaitApplied(tctx, rev, at, c.NodeNames())
		}
		if err != nil {
			cancel()
			return res, fmt.Errorf("kill trial %d: instance not advertised: %w", t, err)
		}
		others := without(c.NodeNames(), n.Name)
		killed := time.Now()
		if err := n.Kill(tctx); err != nil {
			cancel()
			return res, err
		}
		rev, _, err = c.WaitKey(tctx, ikey, true)
		if err == nil {
			var cv sandbox.Convergence
			cv, err = c.WaitApplied(tctx, rev, killed, others)
			res.Killed.Add(cv.Max())
		}
		cancel()
		if err != nil {
			return res, fmt.Errorf("kill trial %d: %w", t, err)
		}
		if err := removeNode(ctx, c, n.Name); err != nil {
			return res, err
		}
	}
	o.Log("%s", res.Killed.Summary())
	return res, nil
}

// removeNode stops a node, removes its keys as `meshctl node remove` does,
// and waits until every other node applied the removal: the next trial
// starts from a settled cluster (its node may reuse the freed subnet).
func removeNode(ctx context.Context, c *sandbox.Cluster, name string) error {
	if err := c.RemoveNode(ctx, name); err != nil {
		return err
	}
	// Watch the member record from now on, so the deletion's own revision
	// is known: the newest revision may be a status write the nodes never
	// see.
	cur, err := c.Client().Get(ctx, "/", clientv3.WithCountOnly())
	if err != nil {
		return err
	}
	wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	wch := c.Client().Watch(wctx, registry.MemberKey(name), clientv3.WithRev(cur.Header.Revision+1))
	if _, err := registry.RemoveNode(ctx, c.Client(), name); err != nil {
		return err
	}
	for wr := range wch {
		for _, ev := range wr.Events {
			if ev.Type == clientv3.EventTypeDelete {
				_, err := c.WaitApplied(wctx, ev.Kv.ModRevision, time.Now(), c.NodeNames())
				return err
			}
		}
	}
	return fmt.Errorf("removal of %s not seen: %w", name, wctx.Err())
}

// measureJoin times a new node's arrival: from its first registry write
// (member record, else node entry) until every node applied it, and until
// every other node pings its overlay address. The pings start as soon as
// the harness sees the member record, from which the others add it as a
// peer (a node with an overlay writes its node entry in the same
// transaction).
func measureJoin(ctx context.Context, c *sandbox.Cluster, n *sandbox.Node, res *FidelityResult) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	var (
		overlay netip.Addr
		rev     int64
		at      time.Time
	)
	if res.Overlay {
		var err error
		if rev, at, err = c.WaitKey(ctx, registry.MemberKey(n.Name), false); err != nil {
			return err
		}
		ms, err := c.Members(ctx)
		if err != nil {
			return err
		}
		overlay = ms[n.Name].OverlayIP
	}
	// Every other node pings the new one from now on, not from when all
	// have published it applied: a node carries traffic to the new peer as
	// soon as its device has the peer and the handshake completed, whether
	// or not its status has reached etcd yet.
	type pinged struct {
		t   time.Time
		err error
	}
	var pings chan pinged
	if overlay.IsValid() {
		pings = make(chan pinged, len(c.Nodes()))
		for _, o := range c.Nodes() {
			if o.Name == n.Name {
				continue
			}
			go func() {
				t, err := o.PingUntilReply(ctx, overlay, joinPingEvery)
				pings <- pinged{t, err}
			}()
		}
	}
	nrev, nat, err := c.WaitKey(ctx, registry.NodeKey(n.Name), false)
	if err != nil {
		return err
	}
	if at.IsZero() || nat.Before(at) {
		at = nat
	}
	rev = max(rev, nrev)
	cv, err := c.WaitApplied(ctx, rev, at, without(c.NodeNames(), n.Name))
	if err != nil {
		return err // the deferred cancel ends the pings
	}
	res.Join.Add(cv.Max())
	if pings == nil {
		return nil
	}
	var (
		slowest time.Duration
		errs    []error
	)
	for range len(c.Nodes()) - 1 {
		p := <-pings
		if p.err != nil {
			errs = append(errs, p.err)
			continue
		}
		slowest = max(slowest, p.t.Sub(at))
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	res.JoinPing.Add(slowest)
	return nil
}

// servedFloorPause is the quiet time before each served-floor round: the
// devices and HAProxy idle first, as they do while a change is awaited.
const servedFloorPause = 100 * time.Millisecond

// measureServedFloor puts the instance, waits until every consumer serves
// it, then runs trials rounds of one request from every consumer at the
// same moment (the probes of the instance trials, which end with such a
// request on each consumer), and deletes the instance again.
func measureServedFloor(ctx context.Context, c *sandbox.Cluster, consumers []*sandbox.Node, key, val, url string,
	namespaces map[uint64]bool, trials int, res *FidelityResult) error {
	tctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	rev, at, err := c.Put(tctx, key, val)
	if err != nil {
		return err
	}
	if _, err := c.WaitApplied(tctx, rev, at, c.NodeNames()); err != nil {
		return fmt.Errorf("served floor: %w%s", err, exited(c))
	}
	if _, err := startProbes(tctx, consumers, url, true)(at); err != nil {
		return fmt.Errorf("served floor: %w%s", err, exited(c))
	}
	var acct cpuAccount
	for t := range trials {
		select {
		case <-tctx.Done():
			return fmt.Errorf("served floor round %d: %w", t, tctx.Err())
		case <-time.After(servedFloorPause):
		}
		cpu0, cerr := readCPU(namespaces)
		at := time.Now()
		d, err := startProbes(tctx, consumers, url, true)(at)
		if err != nil {
			return fmt.Errorf("served floor round %d: %w%s", t, err, exited(c))
		}
		if cpu1, err := readCPU(namespaces); err == nil && cerr == nil {
			acct.add(cpu0, cpu1, 1)
		}
		res.ServedFloor.Add(d)
	}
	if acct.changes > 0 {
		r := acct.result()
		res.ServedFloorCPU = &r
	}
	rev, at, err = c.Delete(tctx, key)
	if err != nil {
		return err
	}
	if _, err := c.WaitApplied(tctx, rev, at, c.NodeNames()); err != nil {
		return fmt.Errorf("served floor: %w%s", err, exited(c))
	}
	return nil
}

// joinPingEvery is how often each node sends an echo to a joining node
// until the first reply: the resolution of "node join (pinged by all)".
// Not 2 ms, as the probes of an instance change: those reach HAProxy on
// the node's loopback, while an echo to a peer not configured yet is read
// and dropped by the node's userspace WireGuard device, and seven nodes
// echoing every 2 ms slowed the join they measured (p50 203-232 ms
// against 151 ms at 10 ms, in the same session's runs).
const joinPingEvery = 10 * time.Millisecond

// probeEvery is how often each consumer polls its 127.0.0.1:<port> while
// an instance change is awaited: the resolution of "served".
const probeEvery = 2 * time.Millisecond

// startProbes polls url on every node (every 2 ms, each node on one OS
// thread that stays in its namespace: sandbox.Node.PollHTTP) until it
// answers (want=true) or stops answering (want=false). The returned
// function waits and returns the slowest node's time from the write at
// `at`.
func startProbes(ctx context.Context, nodes []*sandbox.Node, url string, want bool) func(at time.Time) (time.Duration, error) {
	type result struct {
		t   time.Time
		err error
	}
	out := make(chan result, len(nodes))
	for _, n := range nodes {
		go func() {
			t, err := n.PollHTTP(ctx, url, probeEvery, 200*time.Millisecond, func(_ string, err error) bool { return (err == nil) == want })
			out <- result{t, err}
		}()
	}
	return func(at time.Time) (time.Duration, error) {
		var slowest time.Duration
		var errs []error
		for range nodes {
			r := <-out
			if r.err != nil {
				errs = append(errs, r.err)
				continue
			}
			slowest = max(slowest, r.t.Sub(at))
		}
		return slowest, errors.Join(errs...)
	}
}

// exited names the nodes whose meshd is no longer running, with the end
// of its log: a trial that waits for every node fails on one that died.
func exited(c *sandbox.Cluster) string {
	var b strings.Builder
	for _, n := range c.Nodes() {
		if n.Pid() == 0 {
			fmt.Fprintf(&b, "\nmeshd on %s is not running; its log ends:\n%s", n.Name, n.LogTail(1500))
		}
	}
	return b.String()
}

// haproxyCounters sums the HAProxy counters every node publishes.
func haproxyCounters(ctx context.Context, c *sandbox.Cluster) (haproxycfg.Counters, error) {
	var sum haproxycfg.Counters
	sts, _, err := c.Statuses(ctx)
	if err != nil {
		return sum, err
	}
	for _, st := range sts {
		var hs haproxycfg.Status
		if raw, ok := st.Components["haproxy"]; ok && json.Unmarshal(raw, &hs) == nil {
			sum.Reloads += hs.Reloads
			sum.RuntimeUpdates += hs.RuntimeUpdates
		}
	}
	return sum, nil
}

// overlayModes lists the distinct WireGuard modes (kernel, userspace) the
// nodes report in their overlay status.
func overlayModes(ctx context.Context, c *sandbox.Cluster) []string {
	sts, _, err := c.Statuses(ctx)
	if err != nil {
		return nil
	}
	seen := map[string]bool{}
	var out []string
	for _, st := range sts {
		var ov struct {
			Mode string `json:"mode"`
		}
		if raw, ok := st.Components["overlay"]; ok && json.Unmarshal(raw, &ov) == nil && ov.Mode != "" && !seen[ov.Mode] {
			seen[ov.Mode] = true
			out = append(out, ov.Mode)
		}
	}
	return out
}

func without(s []string, x string) []string {
	var out []string
	for _, v := range s {
		if v != x {
			out = append(out, v)
		}
	}
	return out
}
