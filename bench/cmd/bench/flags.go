package main

import (
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// options are the benchmark's flags, parsed and checked.
type options struct {
	out         string
	trials      int
	killTrials  int
	scales      []int // -scale: N
	lives       []int // -scale: LIVE of each N
	proxyScales []int // -grpc-proxy, as -scale
	proxyLives  []int
	oneNode     int
	joins       int
	idle        time.Duration
	profile     time.Duration
	fidelity    []int
	traefikBin  string
	traefikNs   []int
	throttles   []time.Duration
	traefikVer  string
	meshd       string
	agentLog    string
	scaleProf   string // -scale-profile: a directory
	from        string
}

// parseFlags parses the command line (without the program name).
func parseFlags(args []string) (options, error) {
	fs := flag.NewFlagSet("bench", flag.ExitOnError)
	var (
		o         options
		scaleN    = fs.String("scale", "8,100,1000:200,10000:100", "scale benchmark sizes, N or N:LIVE (N nodes of which LIVE run a real agent in this process; the floor runs at each N)")
		proxyN    = fs.String("grpc-proxy", "10000:100", "sizes (N or N:LIVE, as -scale) run again with every agent and watcher connected through etcd's gRPC proxy (its watch coalescing); empty: none")
		fidN      = fs.String("fidelity", "3,8", "sandbox sizes for the full-fidelity benchmark (needs root)")
		traefikN  = fs.String("traefik-n", "8", "Traefik instance counts (each must also be in -scale for the ratio)")
		throttles = fs.String("traefik-throttle", "0s,2s", "Traefik providers.providersThrottleDuration values, each run in turn (0s: every event applied at once, Traefik at its fastest; 2s: Traefik's default)")
	)
	fs.StringVar(&o.out, "out", "bench", "directory for RESULTS.md, convergence.png and results.json")
	fs.IntVar(&o.trials, "trials", 20, "trials per scenario")
	fs.IntVar(&o.killTrials, "kill-trials", 5, "node-kill trials per sandbox size (each lasts about the 3 s lease TTL)")
	fs.IntVar(&o.oneNode, "one-node", 1000, "run one real meshd (a sandbox node, needs root) with a view of this many nodes and measure its RSS and idle CPU over -idle (0: skip)")
	fs.DurationVar(&o.profile, "profile", 30*time.Second, "at the largest -fidelity size, profile n2's reconcile passes (CPU profile and per-part times from its metrics) over this long of instance changes (0: skip)")
	fs.IntVar(&o.joins, "joins", 10, "after each scale run's trials, this many more live agents join one at a time: the join's convergence and etcd writes (0: skip)")
	fs.DurationVar(&o.idle, "idle", time.Minute, "after each scale run's trials, count the status writes of an idle cluster for this long (0: skip)")
	fs.StringVar(&o.traefikBin, "traefik", os.Getenv("TRAEFIK_BIN"), "Traefik v3 binary for the peer comparison (env TRAEFIK_BIN); empty skips it")
	fs.StringVar(&o.traefikVer, "traefik-version", os.Getenv("TRAEFIK_VERSION"), "label for the Traefik binary (env TRAEFIK_VERSION; default: what `traefik version` says)")
	fs.StringVar(&o.meshd, "meshd", "bin/meshd", "meshd binary for the sandbox")
	fs.StringVar(&o.agentLog, "agent-log", "", "write the scale agents' warnings to this file")
	fs.StringVar(&o.scaleProf, "scale-profile", "", "write a CPU profile of each scale run's trials (live agents and harness) to scale-N[-LABEL].pprof in this directory, and of its idle period (-idle) to scale-N[-LABEL]-idle.pprof")
	fs.StringVar(&o.from, "from", "", "measure nothing: render RESULTS.md and the plot again from a saved results.json")
	if err := fs.Parse(args); err != nil {
		return options{}, err
	}
	if o.from != "" {
		return o, nil // nothing is measured
	}
	if o.joins < 0 {
		return options{}, fmt.Errorf("-joins %d: want 0 or more", o.joins)
	}
	var err error
	if o.scales, o.lives, err = sizes("-scale", *scaleN); err != nil {
		return options{}, err
	}
	if *proxyN != "" {
		if o.proxyScales, o.proxyLives, err = sizes("-grpc-proxy", *proxyN); err != nil {
			return options{}, err
		}
	}
	for _, f := range strings.Split(*throttles, ",") {
		d, err := time.ParseDuration(strings.TrimSpace(f))
		if err != nil || d < 0 {
			return options{}, fmt.Errorf("-traefik-throttle %q: want durations like 0s,2s", f)
		}
		o.throttles = append(o.throttles, d)
	}
	if o.fidelity, err = ints(*fidN); err != nil {
		return options{}, err
	}
	if o.traefikNs, err = ints(*traefikN); err != nil {
		return options{}, err
	}
	return o, nil
}

func ints(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 {
			return nil, fmt.Errorf("bad size %q", f)
		}
		out = append(out, n)
	}
	return out, nil
}

// sizes parses a list of N or N:LIVE.
func sizes(flagName, list string) (ns, lives []int, err error) {
	for _, f := range strings.Split(list, ",") {
		n, l, _ := strings.Cut(f, ":")
		v, err := ints(n)
		if err != nil || len(v) != 1 {
			return nil, nil, fmt.Errorf("%s %q: want N or N:LIVE", flagName, f)
		}
		live := v[0]
		if l != "" {
			ls, err := ints(l)
			if err != nil || len(ls) != 1 || ls[0] > v[0] {
				return nil, nil, fmt.Errorf("%s %q: want N or N:LIVE with LIVE <= N", flagName, f)
			}
			live = ls[0]
		}
		ns, lives = append(ns, v[0]), append(lives, live)
	}
	return ns, lives, nil
}
