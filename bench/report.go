package bench

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// Results is everything one `make bench` run measured, and what it ran on.
type Results struct {
	Started  time.Time
	Duration time.Duration
	Machine  string
	Versions []string
	Command  string
	Trials   int

	Floor    []Series
	Scale    []ScaleResult
	Fidelity []FidelityResult
	Traefik  []TraefikResult
	// OneNode is one real meshd with a large view.
	OneNode []OneNodeResult `json:",omitempty"`
	// Recompute splits one agent's reconcile pass by part, per size.
	Recompute []RecomputeRow
	// Notes are problems met during the run (a scenario that failed, a
	// peer that was not given), reported verbatim.
	Notes []string
	// NetLoss is what the kernel dropped during each part of the run, and
	// NetdevMaxBacklog the input backlog's size then (0: not recorded).
	NetLoss          []PartLoss `json:",omitempty"`
	NetdevMaxBacklog int        `json:",omitempty"`
}

// Machine describes this machine in one line.
func Machine() string {
	model := "unknown CPU"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
	}
	mem := ""
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		var kb int64
		if _, err := fmt.Sscanf(strings.SplitN(string(b), "\n", 2)[0], "MemTotal: %d kB", &kb); err == nil {
			mem = fmt.Sprintf(", %d GiB RAM", (kb+1<<19)>>20)
		}
	}
	kernel, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return fmt.Sprintf("%d × %s%s, Linux %s, %s", runtime.NumCPU(), model, mem, strings.TrimSpace(string(kernel)), runtime.Version())
}

// HAProxyVersion is the first line of `haproxy -v`.
func HAProxyVersion() string {
	out, err := exec.Command("haproxy", "-v").Output()
	if err != nil {
		return "haproxy: not found"
	}
	return strings.SplitN(string(out), "\n", 2)[0]
}

// target is one of the benchmark's goals and where the run stands against it.
type target struct{ goal, measured, verdict string }

func verdict(ok bool) string {
	if ok {
		return "met"
	}
	return "NOT met"
}

func (r *Results) targets() []target {
	var ts []target
	for _, f := range r.Fidelity {
		if f.N != 8 {
			continue
		}
		for _, s := range []Series{f.AddedServes, f.RemovedServes, f.Added, f.Join, f.JoinPing} {
			if len(s.Samples) == 0 {
				continue
			}
			p99 := s.Quantile(0.99)
			ts = append(ts, target{"p99 < 100 ms at N=8, full fidelity: " + strings.TrimPrefix(s.Name, "meshd sandbox N=8 "), ms(p99), verdict(p99 < 100*time.Millisecond)})
		}
		ts = append(ts, target{"instance change reaches HAProxy without a reload (N=8)",
			fmt.Sprintf("%d reloads, %d runtime-API updates over %d changes", f.Reloads, f.RuntimeUpdates, 2*len(f.Added.Samples)), verdict(f.Reloads == 0 && f.RuntimeUpdates > 0)})
	}
	for _, s := range r.Scale {
		if s.N != 1000 {
			continue
		}
		p99 := s.Added.Quantile(0.99)
		ts = append(ts, target{fmt.Sprintf("p99 < 1 s at N=1000%s, scale (instance added, applied)", liveNote(s)+s.Label), ms(p99), verdict(p99 < time.Second)})
		p99 = s.AddedStatus.Quantile(0.99)
		ts = append(ts, target{fmt.Sprintf("p99 < 1 s at N=1000%s, scale (instance added, status published)", liveNote(s)+s.Label), ms(p99), verdict(p99 < time.Second)})
	}
	floors := map[string]Series{}
	for _, f := range r.Floor {
		floors[f.Name] = f
	}
	var plain []ScaleResult // the runs without a proxy, in size order
	for _, sc := range r.Scale {
		if sc.Label == "" {
			plain = append(plain, sc)
		}
		f, ok := floors[fmt.Sprintf("etcd watch floor N=%d%s", sc.N, sc.Label)]
		bound := map[int]float64{8: 3, 1000: 2}[sc.N]
		if !ok || bound == 0 || len(f.Samples) == 0 || len(sc.Added.Samples) == 0 {
			continue
		}
		p99, fp99 := sc.Added.Quantile(0.99), f.Quantile(0.99)
		ts = append(ts, target{fmt.Sprintf("scale N=%d%s instance added (applied) p99 ≤ %.0f × the etcd floor's p99 at N=%d", sc.N, liveNote(sc)+sc.Label, bound, sc.N),
			fmt.Sprintf("%s vs floor %s (×%.2f)", ms(p99), ms(fp99), float64(p99)/float64(max(fp99, 1))), verdict(float64(p99) <= bound*float64(fp99))})
	}
	if len(plain) >= 2 {
		a, b := plain[0], plain[len(plain)-1]
		what, from, to := "CPU per agent per change", a.CPUPerAgentChange, b.CPUPerAgentChange
		switch {
		case a.IdleCPU > 0 && b.IdleCPU > 0 && a.NetCPUPerAgentChange > 0 && b.NetCPUPerAgentChange > 0:
			what, from, to = "CPU per agent per change less the idle rate", a.NetCPUPerAgentChange, b.NetCPUPerAgentChange
		case a.IdleCPU > 0 && b.IdleCPU > 0:
			// The trials used no more CPU than the idle rate over their
			// time: what a change adds is below that noise and a zero
			// must not pass for flat.
			what = "gross CPU per agent per change: less the idle rate it is not above zero at one end, so not measurable"
		}
		ratio := float64(to) / float64(max(from, 1))
		ts = append(ts, target{fmt.Sprintf("meshd's own cost per change stays flat (%s, N=%d → N=%d)", what, a.N, b.N),
			fmt.Sprintf("%s → %s (×%.2f)", from.Round(time.Microsecond), to.Round(time.Microsecond), ratio), verdict(ratio < 2)})
		if a.StatusBytesPerNode > 0 && b.StatusBytesPerNode > 0 {
			ts = append(ts, target{fmt.Sprintf("status bytes per cluster-wide change O(N): bytes per node flat (N=%d → N=%d)", a.N, b.N),
				fmt.Sprintf("%.0f → %.0f", a.StatusBytesPerNode, b.StatusBytesPerNode), verdict(b.StatusBytesPerNode < 1.5*a.StatusBytesPerNode)})
		}
		for _, s := range []ScaleResult{a, b} {
			if s.Idle >= time.Minute {
				ts = append(ts, target{fmt.Sprintf("zero status writes in an idle minute (N=%d)", s.N),
					fmt.Sprintf("%d in %s", s.IdleStatusWrites, s.Idle), verdict(s.IdleStatusWrites == 0)})
			}
		}
		wa, wb := a.WritesPerChange/float64(a.Live), b.WritesPerChange/float64(b.Live)
		ts = append(ts, target{fmt.Sprintf("etcd writes per change O(N), not O(N²) (writes per change per node, N=%d → N=%d)", a.N, b.N),
			fmt.Sprintf("%.2f → %.2f", wa, wb), verdict(wb < 2*wa+0.1)})
	}
	for _, f := range r.Fidelity {
		for _, sc := range r.Scale {
			if f.N != 8 || sc.N != 8 || sc.Label != "" || len(f.AddedServes.Samples) == 0 || len(sc.Added.Samples) == 0 {
				continue
			}
			fp, sp := f.AddedServes.Quantile(0.99), sc.Added.Quantile(0.99)
			measured := fmt.Sprintf("%s vs %s (×%.2f)", ms(fp), ms(sp), float64(fp)/float64(max(sp, 1)))
			if len(f.ServedFloor.Samples) > 0 {
				measured += fmt.Sprintf("; the sandbox's served floor alone: %s (×%.2f)", ms(f.ServedFloor.Quantile(0.99)), float64(f.ServedFloor.Quantile(0.99))/float64(max(sp, 1)))
			}
			ts = append(ts, target{"full fidelity N=8 instance added (served by all) p99 ≤ 2.5 × the scale run's N=8 p99",
				measured, verdict(float64(fp) <= 2.5*float64(sp))})
		}
	}
	for _, x := range r.OneNode {
		if x.N != 1000 {
			continue
		}
		// The bound is 40 MB, 40,000,000 bytes (not 40 MiB).
		ts = append(ts, target{"one meshd with a 1,000-node view: RSS < 40 MB (meshd's process; the userspace device apart)",
			fmt.Sprintf("%.1f MB = %.1f MiB (device %.1f MiB)", float64(x.RSS)/1e6, float64(x.RSS)/(1<<20), float64(x.DeviceRSS)/(1<<20)), verdict(x.RSS < 40e6)})
		ts = append(ts, target{"one meshd with a 1,000-node view: idle CPU < 0.5 % of a core",
			fmt.Sprintf("%.2f %% (device %.2f %%)", 100*x.IdleCPU, 100*x.DeviceIdleCPU), verdict(x.IdleCPU < 0.005)})
	}
	return ts
}

func liveNote(s ScaleResult) string {
	if s.Live < s.N {
		return fmt.Sprintf(" with %d live agents", s.Live)
	}
	return ""
}

// Markdown renders RESULTS.md.
func (r *Results) Markdown() string {
	var b bytes.Buffer
	w := func(format string, a ...any) { fmt.Fprintf(&b, format, a...) }
	w("# meshd convergence benchmarks\n\n")
	w("Generated by `%s` on %s (run took %s). Every number below was produced by that run;\n", r.Command, r.Started.UTC().Format("2006-01-02 15:04 MST"), r.Duration.Round(time.Second))
	w("nothing is copied from elsewhere. Convergence of a change = from just before the etcd write until the\n")
	w("slowest node has it (applied, published, served or pinged, as each row says). Trials per scenario: %d.\n\n", r.Trials)
	w("**Machine:** %s.  \n**Versions:** %s.\n\n", r.Machine, strings.Join(r.Versions, "; "))
	w("![convergence distributions](convergence.png)\n\n")

	w("## Where meshd stands against the targets\n\n| target | measured | |\n|---|---|---|\n")
	for _, t := range r.targets() {
		w("| %s | %s | %s |\n", t.goal, t.measured, t.verdict)
	}
	if len(r.targets()) == 0 {
		w("| (no scenario with the target sizes ran) | | |\n")
	}
	w("\n")

	if len(r.Fidelity) > 0 {
		w("## Full fidelity: the sandbox (namespaces, real WireGuard, real HAProxy)\n\n")
		w("Each node is a network namespace running the real `meshd` with real WireGuard (kernel module where there is one,\n")
		w("else userspace wireguard-go: the mode the nodes reported is below) and its own haproxy;\n")
		w("\"applied\" is the nodes' published status revision, \"served\" is the first successful HTTP request through\n")
		w("each consumer's `127.0.0.1:<port>` → HAProxy → (WireGuard) → the instance, polled every 2 ms from inside its namespace\n")
		w("(a new connection each time, from one thread kept in the namespace: the probes are the harness's, and each costs the machine\n")
		w("what a client's connection costs, not a namespace switch and an HTTP client; still, every consumer opens a connection\n")
		w("through its HAProxy every 2 ms, on the same cores, while a change is awaited). A successful answer is timed by the kernel's\n")
		w("receive timestamp of its last bytes (SO_TIMESTAMPNS), not by when the harness got to read it; an answer that stopped\n")
		w("(\"gone\") has no such timestamp and is timed when the harness read the failure.\n")
		w("Node killed is bounded by the sandbox's 3 s lease TTL.\n")
		w("\"Node join (pinged by all)\": from when the harness sees the new node's member record, every other node sends it an ICMP\n")
		w("echo every 10 ms (one socket each, not waiting for replies; an echo sent before the peer's handshake is queued by WireGuard\n")
		w("and its reply counts) until the first reply, timed by the kernel's receive timestamp (SO_TIMESTAMPNS), not by when the\n")
		w("harness, on the same busy cores, got to read it. The joining node starts its userspace device, configures its peers and starts its HAProxy\n")
		w("(with no servers) before it writes its member record (docs/overlay.md, \"A new node configures its peers before it\n")
		w("claims\"; docs/haproxy.md, \"A new node starts it before it claims\"); the window holds the rest of\n")
		w("its start: its flannel lease, its pass after the claim (its address and routes; its watches are open at etcd's head, so\n")
		w("its own claim reaches it at once), while the others add it as a peer and initiate, all on the same cores. The CPU\n")
		w("table's join row counts from just before the node's start, device start included. When a first handshake has not\n")
		w("completed, the joining side re-adds the peer from about 100 ms after its claim (\"First handshakes\"); WireGuard\n")
		w("alone would wait 5 s.\n")
		w("\"Served floor\": after the instance trials, with the instance served everywhere and nothing left to converge, every\n")
		w("consumer sends one request at the same moment (the probes' own request, which ends each \"served by all\" trial), after\n")
		w("%s of quiet, until the slowest answer: the data path alone in this sandbox (HAProxy, two userspace WireGuard devices,\n", servedFloorPause)
		w("the demo server, all on the same cores). None of meshd's work is in it.\n\n")
		w("| scenario | trials | p50 | p99 | max |\n|---|---|---|---|---|\n")
		for _, f := range r.Fidelity {
			for _, s := range []Series{f.Join, f.JoinPing, f.Added, f.AddedServes, f.ServedFloor, f.Removed, f.RemovedServes, f.Killed} {
				if len(s.Samples) > 0 {
					w("| %s | %d | %s | %s | %s |\n", s.Name, len(s.Samples), ms(s.Quantile(0.5)), ms(s.Quantile(0.99)), ms(s.Max()))
				}
			}
		}
		for _, f := range r.Fidelity {
			modes := strings.Join(f.OverlayModes, ", ")
			if modes == "" {
				modes = "not reported"
			}
			w("\nN=%d: overlay member records present: %v; WireGuard mode: %s; HAProxy reloads during the instance trials: %d; runtime-API updates: %d.\n",
				f.N, f.Overlay, modes, f.Reloads, f.RuntimeUpdates)
			if f.AddedCPU != nil && f.RemovedCPU != nil {
				w("Where the machine's CPU went during these trials, from just before each write until its probes ended (every node's\n")
				w("processes together, found by their network namespace, each with the children it waited for: meshd's with its `haproxy -c`;\n")
				w("\"harness\" is the benchmark's own process: etcd, the probes, the demo servers):\n\n")
				w("| trials | wall | cores busy | CPU per change | meshd | WireGuard devices | HAProxy | other | harness |\n|---|---|---|---|---|---|---|---|---|\n")
				for _, row := range []struct {
					name string
					c    *MachineCPU
				}{{"instance added", f.AddedCPU}, {"instance removed", f.RemovedCPU}, {"served floor", f.ServedFloorCPU}, {"node join, from its start", f.JoinCPU}} {
					c := row.c
					if c == nil {
						continue
					}
					cell := func(k string) string { return us(c.PerChange[k]) }
					w("| %s (%d) | %s | %.0f %% of %d | %s | %s | %s | %s | %s | %s |\n", row.name, c.Changes, c.Wall.Round(10*time.Millisecond),
						100*c.Busy, c.Cores, us(c.Total()), cell("meshd"), cell("WireGuard devices"), cell("HAProxy"), cell("other processes in the nodes"), cell("harness"))
					if len(c.Apart) > 0 {
						part := func(k string) string { return us(c.Apart[k]) }
						w("| … of which the joining node's | | | %s | %s | %s | %s | %s | |\n",
							us(sum(c.Apart)), part("meshd"), part("WireGuard devices"), part("HAProxy"), part("other processes in the nodes"))
					}
				}
				if c := f.AddedCPU; c.Cores > 0 && len(f.AddedServes.Samples) > 0 {
					total := c.Total()
					w("\nAn added instance's trial used %s of CPU, %s of each of the %d cores, in a window of %s on average with the\n",
						us(total), ms(total/time.Duration(c.Cores)), c.Cores, ms(c.Wall/time.Duration(c.Changes)))
					w("cores %.0f %% busy: the change's own work (and its measurement) fills the machine. \"Served by all\" took %s at the\n",
						100*c.Busy, ms(f.AddedServes.Quantile(0.5)))
					w("median. meshd's %d processes used %s of that CPU (%s each).\n", f.N, us(c.PerChange["meshd"]), us(c.PerChange["meshd"]/time.Duration(f.N)))
					if fc := f.ServedFloorCPU; fc != nil && len(f.ServedFloor.Samples) > 0 {
						w("A served-floor round (one request from each of the %d consumers, nothing to converge) used %s of CPU (%s in\n",
							f.N-1, us(fc.Total()), us(fc.PerChange["WireGuard devices"]))
						w("the WireGuard devices) and took %s at the median.\n", ms(f.ServedFloor.Quantile(0.5)))
					}
					if jc := f.JoinCPU; jc != nil && jc.Changes > 0 && len(f.JoinPing.Samples) > 0 {
						w("A join, from just before the new node's start until every other node had an echo answered, used %s of CPU\n", us(jc.Total()))
						w("in a window of %s on average (the cores %.0f %% busy); the joining node's own processes used %s of it, the %d other\n",
							ms(jc.Wall/time.Duration(jc.Changes)), 100*jc.Busy, us(sum(jc.Apart)), f.N)
						w("nodes' processes %s (adding the peer, its route, answering the echoes) and the harness %s.\n",
							us(jc.Total()-sum(jc.Apart)-jc.PerChange["harness"]), us(jc.PerChange["harness"]))
					}
				}
			}
		}
		w("\n")
		for _, f := range r.Fidelity {
			if f.Profile != nil {
				writeProfile(w, f.N, *f.Profile)
			}
		}
	}

	if len(r.Scale) > 0 {
		w("## Scale: N meshd agents in one process, one etcd\n\n")
		w("The real `pkg/agent` (lease session, member claim, watch, reconcile loop, status publishing), each with its own\n")
		w("etcd client; the kernel and HAProxy are replaced by a component that runs the real pure desired-state\n")
		w("computations (`haproxycfg.Compute`, the overlay's incremental `desired.Computer`) and records the result: the overlay's\n")
		w("per-peer deltas go to an in-memory WireGuard device (`overlay.FakeDevice`: a new peer handshakes at once, and again\n")
		w("every 2m25s, as a live peer with a 25 s keepalive does), and the status each agent publishes is\n")
		w("what a real node's is (`overlay.StatusOf` over that device, which like the real component reads the device again only\n")
		w("at the 25 s status refresh or after the overlay changed it, a read that here is a copy of the peers in memory, not a\n")
		w("kernel device's netlink dump, which this machine cannot measure; `haproxycfg.StatusOf` over the rendered config). etcd runs in\n")
		w("a separate process, and so do the harness's idle nodes (below), so the CPU below is the live agents' (and the harness's)\n")
		w("alone. Each agent keeps a flannel-format lease for its subnet, as every meshd node does. The change is one instance\n")
		w("put, then its delete.\n")
		w("Every agent of a row is live unless the row says \"(K live)\": then K nodes run a real agent here and the other N-K\n")
		w("are registered by the harness exactly as agents register (subnet claim, member record, leased node entry, flannel lease), each\n")
		w("holding an idle watch on `/cluster/` in its own client, in a child process (`-scale N:K`). Every client of the\n")
		w("harness (agents, idle nodes, the floor's watchers) is built as meshd builds its own (`pkg/etcdclient`: keep-alive\n")
		w("pings, reconnect backoff), and a watch stream that ends is resumed from its next revision, as meshd resumes.\n")
		w("Bringing N live agents up on one machine costs O(N²) (every join makes every running agent recompute, and etcd\n")
		w("fans it out to all of them): the start-up column below is that, on two cores, not what one node's start costs.\n")
		w("Agents join in batches of 50, as a fleet boots; a claim that loses a race retries among more free subnets each time.\n\n")
		w("| scenario | trials | p50 | p99 | max |\n|---|---|---|---|---|\n")
		for _, s := range r.Scale {
			for _, ser := range []Series{s.Added, s.AddedStatus, s.Removed, s.Join} {
				if len(ser.Samples) > 0 {
					w("| %s | %d | %s | %s | %s |\n", ser.Name, len(ser.Samples), ms(ser.Quantile(0.5)), ms(ser.Quantile(0.99)), ms(ser.Max()))
				}
			}
		}
		w("\n### Cost per change\n\n")
		w("| N | live agents | start-up (all registered) | CPU per change (all agents) | CPU per agent per change | idle CPU (all agents) | per agent per change, less idle | heap per agent | RSS per agent | etcd writes per change | per node | watch events per change | per node |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
		rssFell := false
		for _, s := range r.Scale {
			rssCell := fmt.Sprintf("%d KiB", s.RSSPerAgent>>10)
			if s.RSSPerAgent < 0 {
				rssCell, rssFell = "n/a", true
			}
			idleCell, netCell := "n/a", "n/a"
			if s.IdleCPU > 0 {
				idleCell, netCell = fmt.Sprintf("%.1f %%", 100*s.IdleCPU), s.NetCPUPerAgentChange.Round(time.Microsecond).String()
				if s.NetCPUPerAgentChange <= 0 {
					netCell = "not above the idle rate"
				}
			}
			w("| %d%s | %d | %s | %s | %s | %s | %s | %d KiB | %s | %.1f | %.2f | %.1f | %.2f |\n", s.N, s.Label, s.Live, s.Startup.Round(time.Millisecond),
				s.CPUPerChange.Round(time.Microsecond), s.CPUPerAgentChange.Round(time.Microsecond), idleCell, netCell, s.HeapPerAgent>>10, rssCell,
				s.WritesPerChange, s.WritesPerChange/float64(s.Live), s.EventsPerChange, s.EventsPerChange/float64(s.N))
		}
		w("\n\"Idle CPU\" is the process's CPU per second over the idle period after the trials (what runs on time rather than\n")
		w("on changes: lease keep-alives, status refreshes, device reads, GC); \"less idle\" is the CPU per agent per change after\n")
		w("taking that rate over the trials' wall time off. At N=10,000 a change takes a second or more, so the gross figure counts\n")
		w("seconds of time-driven work per change; where the trials used no more CPU than that rate over their time, what a change\n")
		w("adds is below the subtraction's noise and the cell says so (the flat-cost target then judges the gross figure).\n")
		w("The idle period (its status writes are counted too) starts no sooner than %s\n", idleAfterJoin)
		w("after the last agent joined: a second after an apply that added peers, a node reads its device again for their first\n")
		w("handshakes, and the status write that may follow belongs to the join.\n")
		if rssFell {
			w("\nRSS per agent n/a: the process's RSS fell during that bring-up (memory of the run before it was returned to\n")
			w("the OS meanwhile), so its growth says nothing about the agents.\n")
		}
		for _, s := range r.Scale {
			if s.StatusResends+s.StatusLost > 0 {
				w("\nN=%d: some agents' status writes failed (etcd deadline under load) and were not retried until their next change:\n", s.N)
				w("%d settle rounds had to be repeated and %d trials have no status-published sample.\n", s.StatusResends, s.StatusLost)
			}
		}
		for _, s := range r.Scale {
			if s.Label != "" {
				w("\nRows \"via grpc-proxy\": every agent and every idle watcher connects to etcd's gRPC proxy instead of etcd (the\n")
				w("servers `etcd grpc-proxy start` runs, embedded in a child process: bench/grpcproxy.go), which merges identical\n")
				w("watches into one upstream watch; the harness writes to etcd directly. The floor rows of the same label measure\n")
				w("watchers behind the same proxy. docs/grpc-proxy.md says how a large cluster deploys it.\n")
				break
			}
		}
		w("\n### Status bytes in etcd\n\n")
		w("What the agents' statuses cost etcd per change (key and value, as a watch on `/meshd/status/` receives them), the mean\n")
		w("size of one status value, etcd's database growth (Maintenance `Status` DbSize, which grows in bbolt pages and is coarse\n")
		w("over a few trials) per 100 changes, and the status writes counted while the cluster stayed idle after the trials.\n\n")
		w("| N | live agents | status bytes per change | per live node | one status value | DB growth per 100 changes | DB size after | status writes while idle |\n|---|---|---|---|---|---|---|---|\n")
		for _, s := range r.Scale {
			idle := "not measured"
			if s.Idle > 0 {
				idle = fmt.Sprintf("%d in %s", s.IdleStatusWrites, s.Idle)
			}
			w("| %d%s | %d | %.0f | %.0f | %.0f | %d KiB | %d MiB | %s |\n", s.N, s.Label, s.Live, s.StatusBytesPerChange, s.StatusBytesPerNode,
				s.StatusValueBytes, s.DBGrowthPer100>>10, s.DBSize>>20, idle)
		}
		w("\nWrites per change are the change itself plus one status write per live agent (the status revision is how\n")
		w("`meshctl --wait` knows a change is applied), \"per node\" divides by the live agents; watch events are what etcd\n")
		w("delivered for them (agents, idle watchers and the harness's status watch), \"per node\" divides by N.\n\n")
		writeJoins(w, r.Scale)
	}

	if len(r.OneNode) > 0 {
		w("## One real meshd with a large view\n\n")
		w("One sandbox node (a real meshd process in its namespace: userspace WireGuard, supervised HAProxy) in a registry of N\n")
		w("nodes, the other N-1 registered by the harness as their agents would register, without WireGuard endpoints: the node's\n")
		w("device holds N-1 peers that send nothing, so the idle figures are meshd's own, without keepalive or handshake traffic.\n")
		w("RSS is VmRSS after the idle period; CPU is user+system time over it, as a share of one core. The userspace device\n")
		w("runs in a process of its own (it outlives meshd restarts) and is shown apart; with kernel WireGuard it does not exist.\n\n")
		w("| N | peers | converged after start | meshd RSS | meshd idle CPU | device RSS | device idle CPU | status writes while idle |\n|---|---|---|---|---|---|---|---|\n")
		for _, x := range r.OneNode {
			w("| %d | %d | %s | %.1f MiB | %.2f %% | %.1f MiB | %.2f %% | %d in %s |\n", x.N, x.Peers, ms(x.Converged),
				float64(x.RSS)/(1<<20), 100*x.IdleCPU, float64(x.DeviceRSS)/(1<<20), 100*x.DeviceIdleCPU, x.IdleStatusWrites, x.Idle)
		}
		w("\n")
	}

	if len(r.Recompute) > 0 {
		w("### Where an agent's time per change goes\n\n")
		w("Measured with `testing.Benchmark` on a store holding an N-node cluster (also `go test -bench Recompute ./bench`):\n\n")
		w("| N | snapshot after an instance change | snapshot after a member change | overlay desired state, full | overlay, incremental (one member changed) | HAProxy desired state | pass for an instance change | pass for a member change |\n|---|---|---|---|---|---|---|---|\n")
		for _, x := range r.Recompute {
			us := func(d time.Duration) time.Duration { return d.Round(time.Microsecond / 10) }
			w("| %d | %s | %s | %s | %s | %s | %s | %s |\n", x.N, us(x.SnapshotInstance), us(x.SnapshotMember), us(x.Overlay), us(x.OverlayIncremental), us(x.HAProxy),
				us(x.SnapshotInstance+x.HAProxy), us(x.SnapshotMember+x.OverlayIncremental+x.HAProxy))
		}
		w("\nmeshd recomputes a component's whole desired state from a whole snapshot (by design: no per-event patching),\n")
		w("but the snapshot is rebuilt only in the parts that changed, and a component whose input part did not change\n")
		w("(the overlay reads only members and flannel leases) skips its pass. An instance change, the common case, therefore costs O(apps);\n")
		w("a member change (a node joining or leaving) costs O(N) with a small constant: meshd's overlay runs the incremental\n")
		w("`desired.Computer` (same result as the full computation, proven by a randomized equivalence test and a fuzzer), which\n")
		w("re-validates and re-sorts only the changed members; what is left is one pass over the members and a fresh output.\n\n")
	}

	if len(r.Floor) > 0 {
		w("## The physical floor: etcd delivering one put to N idle watchers\n\n")
		w("Same etcd process, one client per watcher (built as meshd's), each watching `/cluster/backends/floor/` and doing\n")
		w("nothing. A watcher whose stream ends resumes from its next revision; its late delivery counts (a note says so).\n\n")
		w("| N | trials | p50 | p99 | max |\n|---|---|---|---|---|\n")
		for _, s := range r.Floor {
			w("| %s | %d | %s | %s | %s |\n", s.Name, len(s.Samples), ms(s.Quantile(0.5)), ms(s.Quantile(0.99)), ms(s.Max()))
		}
		w("\n")
	}

	w("## Side by side with what users would pick instead\n\n")
	w("**confd** (what nix-infra runs) cannot be built here: its dependencies answer 403 from the module proxy\n")
	w("(see ../shared/ENVIRONMENT.md), so it is not in this comparison.\n\n")
	if len(r.Traefik) > 0 {
		w("**Traefik %s** with its etcd KV provider: N processes against the same etcd as the scale run, given the same\n", r.Traefik[0].Version)
		w("change (one backend server key put, then deleted, under `traefik/http/services/benchapp/...`). Converged = every\n")
		w("instance's API (`/api/http/services/benchapp@etcd`, polled every 2 ms) lists (no longer lists) the server.\n\n")
		w("| scenario | trials | p50 | p99 | max | meshd at the same N (applied) | ratio p50 / p99 (Traefik ÷ meshd) |\n|---|---|---|---|---|---|---|\n")
		for _, t := range r.Traefik {
			for i, ser := range []Series{t.Added, t.Removed} {
				cmpTxt, ratio := "—", "—"
				for _, s := range r.Scale {
					if s.N == t.N {
						m := []Series{s.Added, s.Removed}[i]
						cmpTxt = fmt.Sprintf("p50 %s, p99 %s", ms(m.Quantile(0.5)), ms(m.Quantile(0.99)))
						ratio = fmt.Sprintf("%.1f / %.1f", float64(ser.Quantile(0.5))/float64(max(m.Quantile(0.5), 1)), float64(ser.Quantile(0.99))/float64(max(m.Quantile(0.99), 1)))
					}
				}
				w("| %s | %d | %s | %s | %s | %s | %s |\n", ser.Name, len(ser.Samples), ms(ser.Quantile(0.5)), ms(ser.Quantile(0.99)), ms(ser.Max()), cmpTxt, ratio)
			}
		}
		w("\nTraefik coalesces provider events for `providers.providersThrottleDuration`. The run measures it at each throttle\n")
		w("shown: 2 s is Traefik's default, as users run it; 0 s applies every event at once, Traefik at its fastest, so that\n")
		w("row compares the machinery and not a default (meshd applies an isolated change at once and batches what arrives\n")
		w("within 5 ms of a pass). All ran against the same etcd process, one after the other.\n\n")
	} else {
		w("**Traefik** was not run: no binary was given (`-traefik` or `TRAEFIK_BIN`). See below for how to build one.\n\n")
	}
	w("**flannel** (vxlan, for the overlay) does not build from the module proxy here (found by hand on 2026-11-21, not by this\n")
	w("harness): both versions the proxy lists fail the same way (`go mod download github.com/flannel-io/flannel@VERSION`, then\n")
	w("`go build .` in the module directory):\n\n")
	w("- v0.28.10: the module proxy answers 403 for `github.com/tencentcloud/tencentcloud-sdk-go/tencentcloud/common@v1.3.190`\n")
	w("- v0.28.4: the module proxy answers 403 for `github.com/tencentcloud/tencentcloud-sdk-go/tencentcloud/common@v1.3.79`\n\n")
	w("flannel's `main.go` imports its Tencent VPC backend (`_ \"github.com/flannel-io/flannel/pkg/backend/tencentvpc\"`), whose only\n")
	w("build constraint is `!windows`, so no build tag avoids that dependency. The overlay comparison is therefore missing rather\n")
	w("than stood in for by an imitation.\n\n")

	var slowJoins []string
	var joinMax time.Duration
	for _, f := range r.Fidelity {
		joinMax = max(joinMax, f.Join.Max())
		for _, d := range f.JoinPing.Samples {
			if d > 4500*time.Millisecond {
				slowJoins = append(slowJoins, fmt.Sprintf("N=%d: %s", f.N, ms(d)))
			}
		}
	}
	if len(slowJoins) > 0 {
		w("## Observations\n\n")
		w("- Node join until pinged by all had trials of about 5 s (%s), while no trial's \"applied by the others\" took more\n", strings.Join(slowJoins, ", "))
		w("  than %s. 5 s is WireGuard's handshake retry interval (REKEY_TIMEOUT): consistent with a first handshake\n", ms(joinMax))
		w("  initiation reaching the new node before it had configured the sender as a peer, and the next attempt waiting 5 s.\n")
		w("  Not yet confirmed by a packet trace; a node could re-initiate handshakes once it has applied new peers.\n\n")
	}

	if len(r.NetLoss) > 0 {
		w("## What the kernel dropped during each part\n\n")
		w("Packets dropped because a CPU's input backlog was full (`/proc/net/softnet_stat`, machine-wide: loopback and the\n")
		w("sandbox's veth pairs pass through it; `net.core.netdev_max_backlog` = %d during this run), and TCP connections the\n", r.NetdevMaxBacklog)
		w("kernel aborted when their retransmissions outlasted the socket's timeout (TcpExt `TCPAbortOnTimeout`, in the\n")
		w("benchmark process's network namespace: etcd, the agents, the floor's watchers, Traefik; gRPC sets that timeout to its\n")
		w("keep-alive timeout). A part with drops measured the kernel's retransmissions too (200 ms and more each), not only the\n")
		w("work of etcd and meshd. The bench does not change the host's settings.\n\n")
		w("| part | input backlog drops | TCP aborts on timeout |\n|---|---|---|\n")
		for _, x := range r.NetLoss {
			w("| %s | %d | %d |\n", x.Part, x.BacklogDrops, x.AbortOnTimeout)
		}
		w("\n")
	}

	if len(r.Notes) > 0 {
		w("## Problems met during this run\n\n")
		for _, n := range r.Notes {
			w("- %s\n", strings.ReplaceAll(n, "\n", " "))
		}
		w("\n")
	}

	w("## Reproduce\n\n```sh\n")
	w("make bench                      # = make deps build && go run ./bench/cmd/bench (root: the sandbox needs namespaces)\n")
	w("go run ./bench/cmd/bench -h     # sizes, trials, -traefik\n")
	w("go run ./bench/cmd/bench -scale 1000:200 -fidelity '' -grpc-proxy '' -one-node 0 -scale-profile /tmp  # where the agents' CPU goes\n")
	w("go test -count=1 ./bench        # the smoke run that make test includes\n```\n\n")
	w("The Traefik binary is built by hand, outside the repository (about 6 minutes here), and given to the harness:\n\n```sh\n")
	w("dir=$(go mod download -json github.com/traefik/traefik/v3@v3.6.12 | sed -n 's/.*\"Dir\": \"\\(.*\\)\",/\\1/p')\n")
	w("(cd \"$dir\" && go build -o /tmp/traefik ./cmd/traefik)\n")
	w("TRAEFIK_BIN=/tmp/traefik TRAEFIK_VERSION=v3.6.12 make bench   # the binary itself reports version \"dev\"\n```\n")
	return b.String()
}

// Plot writes the convergence distributions as a PNG with gnuplot: one
// empirical CDF per series, log time axis.
func (r *Results) Plot(path string) error {
	if _, err := exec.LookPath("gnuplot"); err != nil {
		return fmt.Errorf("gnuplot not found (apt-get install gnuplot-nox): %w", err)
	}
	dir, err := os.MkdirTemp("", "meshd-bench-plot-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	var series []Series
	series = append(series, r.Floor...)
	for _, s := range r.Scale {
		series = append(series, s.Added)
	}
	for _, t := range r.Traefik {
		series = append(series, t.Added)
	}
	for _, f := range r.Fidelity {
		series = append(series, f.AddedServes)
		if len(f.JoinPing.Samples) > 0 {
			series = append(series, f.JoinPing)
		}
	}
	colors := []string{"#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666",
		"#1f78b4", "#b2df8a", "#fb9a99", "#cab2d6", "#000000"}
	var plots []string
	for i, s := range series {
		if len(s.Samples) == 0 {
			continue
		}
		v := slices.Clone(s.Samples)
		slices.Sort(v)
		var d bytes.Buffer
		for j, x := range v {
			fmt.Fprintf(&d, "%f %f\n", float64(x)/float64(time.Millisecond), float64(j+1)/float64(len(v)))
		}
		f := filepath.Join(dir, fmt.Sprintf("s%d.dat", i))
		if err := os.WriteFile(f, d.Bytes(), 0o644); err != nil {
			return err
		}
		// Dash type by family: the floor dotted, Traefik dashed, meshd solid.
		dt := 1
		switch {
		case strings.HasPrefix(s.Name, "etcd watch floor"):
			dt = 3
		case strings.HasPrefix(s.Name, "traefik"):
			dt = 2
		}
		plots = append(plots, fmt.Sprintf("%q using 1:2 with steps lw 2 dt %d lc rgb %q title %q", f, dt, colors[i%len(colors)], s.Name))
	}
	if len(plots) == 0 {
		return fmt.Errorf("nothing to plot")
	}
	script := fmt.Sprintf(`set terminal pngcairo size 1400,900 font "sans,11"
set output %q
set title "Convergence: time from the etcd write until the slowest node has the change (empirical CDF; x: milliseconds, log scale)"
set ylabel "fraction of trials"
set logscale x
set grid
set key below maxrows 5 box
set yrange [0:1.02]
plot %s
`, path, strings.Join(plots, ", \\\n  "))
	cmd := exec.Command("gnuplot")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("gnuplot: %w: %s", err, out)
	}
	return nil
}

// Table prints a short summary of every series, for the terminal.
func (r *Results) Table() string {
	var b bytes.Buffer
	tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SERIES\tTRIALS\tP50\tP99\tMAX")
	add := func(s Series) {
		if len(s.Samples) > 0 {
			fmt.Fprintf(tw, "%s\t%d\t%s\t%s\t%s\n", s.Name, len(s.Samples), ms(s.Quantile(0.5)), ms(s.Quantile(0.99)), ms(s.Max()))
		}
	}
	for _, s := range r.Floor {
		add(s)
	}
	for _, s := range r.Scale {
		add(s.Added)
		add(s.AddedStatus)
		add(s.Removed)
		add(s.Join)
	}
	for _, t := range r.Traefik {
		add(t.Added)
		add(t.Removed)
	}
	for _, f := range r.Fidelity {
		for _, s := range []Series{f.Join, f.JoinPing, f.Added, f.AddedServes, f.ServedFloor, f.Removed, f.RemovedServes, f.Killed} {
			add(s)
		}
	}
	tw.Flush()
	return b.String()
}

// writeJoins renders the scale runs' joins (ScaleOptions.Joins), if any.
func writeJoins(w func(string, ...any), runs []ScaleResult) {
	joined := false
	for _, s := range runs {
		joined = joined || len(s.Join.Samples) > 0
	}
	if !joined {
		return
	}
	w("### A node joins\n\n")
	w("After the trials, more live agents join one at a time, each once the cluster settled from the one before (`-joins`).\n")
	w("\"Applied by the others\" is from just before the new agent's start until every other live agent applied its member\n")
	w("record (written with the node entry in the claim's transaction): the joiner's own start is in it (its lease, its list\n")
	w("of the whole registry, its first passes, its claim). The writes are every etcd revision from the agent's\n")
	w("start until the cluster settled, %s after the join (the others re-read their devices for the new peer's first\n", idleAfterJoin)
	w("handshake, which changes their status), less the settle's own: the joiner's (claim, member record and node entry in one\n")
	w("transaction; its flannel lease; its presence record; its statuses) and every other live agent's status writes.\n")
	w("\"Per agent\" divides the status writes by the live agents in the cluster after a join, on average over the joins\n")
	w("(live agents + (joins+1)/2). About three per agent fits one status each for the claim's revision, for the flannel\n")
	w("lease's, and for the re-read of the device (the overlay status counts the peers with a recent handshake).\n")
	w("The joining agent and every live agent share this machine's two cores: the joiner's own start (its list of the\n")
	w("whole registry, its first overlay computation over every member) runs while each of the others makes its passes\n")
	w("for the new member, all on the same two cores: the times at N=1,000 and N=10,000 are not what a join costs one node\n")
	w("on its own CPU; one such pass alone is in the table \"Where an agent's time per change goes\" below (a member change).\n\n")
	w("| N | live agents | joins | from its start, applied by the others p50 | p99 | etcd writes per join | status writes per join | per agent |\n|---|---|---|---|---|---|---|---|\n")
	for _, s := range runs {
		if len(s.Join.Samples) == 0 {
			continue
		}
		agents := float64(s.Live) + float64(len(s.Join.Samples)+1)/2
		w("| %d%s | %d | %d | %s | %s | %.1f | %.1f | %.2f |\n", s.N, s.Label, s.Live, len(s.Join.Samples), ms(s.Join.Quantile(0.5)), ms(s.Join.Quantile(0.99)),
			s.JoinWrites, s.JoinStatusWrites, s.JoinStatusWrites/agents)
	}
	w("\n")
}

// writeProfile renders one node's profiled reconcile passes.
func writeProfile(w func(string, ...any), n int, p PassProfile) {
	w("### Where a change's time goes on one node (N=%d, %s profiled)\n\n", n, p.Node)
	w("After the trials above, the harness put and deleted the instance again in a loop for %s (%d changes, each\n", p.Window, p.Changes)
	w("waited for until every node applied it) while %s's meshd (a consumer: its HAProxy gets the change) took a CPU\n", p.Node)
	w("profile (`pprof: true`, `/debug/pprof/profile`) and the harness read its metrics before and after. Means per change:\n\n")
	w("| part | mean | source |\n|---|---|---|\n")
	w("| etcd write → %s published it applied | %s | harness (as the \"applied\" rows) |\n", p.Node, us(p.Applied))
	w("| change arrived → its pass started (coalescing) | %s | `meshd_reconcile_wait_seconds` |\n", us(p.Wait))
	w("| the pass (%d passes) | %s | `meshd_reconcile_seconds` |\n", p.Passes, us(p.Pass))
	comps := make([]string, 0, len(p.Components))
	for c := range p.Components {
		comps = append(comps, c)
	}
	slices.Sort(comps)
	for _, c := range comps {
		w("| … of which component %s | %s | `meshd_component_apply_seconds` |\n", c, us(p.Components[c]))
	}
	rest := p.Applied - p.Wait - p.Pass
	w("| the rest: etcd's watch delivering the change to %s, %s's status write, the harness's watch of that | %s | difference |\n", p.Node, p.Node, us(rest))
	w("| meshd's CPU per change (process, /proc) | %s | |\n\n", us(p.CPUPerChange))
	w("CPU profile (`go tool pprof -top bin/meshd %s`):\n\n```\n%s```\n\n", filepath.Base(p.ProfileFile), strings.TrimLeft(p.Top, "\n"))
}

// us renders a duration in microseconds or milliseconds.
func us(d time.Duration) string {
	if d < time.Millisecond && d > -time.Millisecond {
		return fmt.Sprintf("%d µs", d.Microseconds())
	}
	return ms(d)
}
