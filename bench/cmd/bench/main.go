// Command bench runs meshd's convergence benchmarks and rewrites
// bench/RESULTS.md and bench/convergence.png (make bench). Run it as root
// from the repository root: the full-fidelity scenarios run a sandbox.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/meshd/meshd/bench"
	"github.com/meshd/meshd/pkg/etcdtest"
	"github.com/meshd/meshd/pkg/sandbox"
)

func main() {
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case "serve-etcd":
			if err := serveEtcd(os.Args[2:]); err != nil {
				log.Fatal(err)
			}
			return
		case "grpc-proxy":
			if err := serveGRPCProxy(os.Args[2:]); err != nil {
				log.Fatal(err)
			}
			return
		case "passive-nodes":
			if err := servePassive(os.Args[2:]); err != nil {
				log.Fatal(err)
			}
			return
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		os.Exit(1)
	}
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

func run(ctx context.Context) error {
	var (
		out        = flag.String("out", "bench", "directory for RESULTS.md, convergence.png and results.json")
		trials     = flag.Int("trials", 20, "trials per scenario")
		killTrials = flag.Int("kill-trials", 5, "node-kill trials per sandbox size (each lasts about the 3 s lease TTL)")
		scaleN     = flag.String("scale", "8,100,1000,10000:100", "scale benchmark sizes, N or N:LIVE (N nodes of which LIVE run a real agent in this process; the floor runs at each N)")
		proxyN     = flag.String("grpc-proxy", "10000:100", "sizes (N or N:LIVE, as -scale) run again with every agent and watcher connected through etcd's gRPC proxy (its watch coalescing); empty: none")
		oneNode    = flag.Int("one-node", 1000, "run one real meshd (a sandbox node, needs root) with a view of this many nodes and measure its RSS and idle CPU over -idle (0: skip)")
		idle       = flag.Duration("idle", time.Minute, "after each scale run's trials, count the status writes of an idle cluster for this long (0: skip)")
		fidN       = flag.String("fidelity", "3,8", "sandbox sizes for the full-fidelity benchmark (needs root)")
		traefikBin = flag.String("traefik", os.Getenv("TRAEFIK_BIN"), "Traefik v3 binary for the peer comparison (env TRAEFIK_BIN); empty skips it")
		traefikN   = flag.String("traefik-n", "8", "Traefik instance counts (each must also be in -scale for the ratio)")
		throttles  = flag.String("traefik-throttle", "0s,2s", "Traefik providers.providersThrottleDuration values, each run in turn (0s: every event applied at once, Traefik at its fastest; 2s: Traefik's default)")
		traefikVer = flag.String("traefik-version", os.Getenv("TRAEFIK_VERSION"), "label for the Traefik binary (env TRAEFIK_VERSION; default: what `traefik version` says)")
		meshd      = flag.String("meshd", "bin/meshd", "meshd binary for the sandbox")
		agentLog   = flag.String("agent-log", "", "write the scale agents' warnings to this file")
		from       = flag.String("from", "", "measure nothing: render RESULTS.md and the plot again from a saved results.json")
	)
	flag.Parse()
	if *from != "" {
		b, err := os.ReadFile(*from)
		if err != nil {
			return err
		}
		var res bench.Results
		if err := json.Unmarshal(b, &res); err != nil {
			return fmt.Errorf("%s: %w", *from, err)
		}
		return write(&res, *out)
	}
	scales, lives, err := sizes("-scale", *scaleN)
	if err != nil {
		return err
	}
	var pscales, plives []int
	if *proxyN != "" {
		if pscales, plives, err = sizes("-grpc-proxy", *proxyN); err != nil {
			return err
		}
	}
	var tthrottles []time.Duration
	for _, f := range strings.Split(*throttles, ",") {
		d, err := time.ParseDuration(strings.TrimSpace(f))
		if err != nil || d < 0 {
			return fmt.Errorf("-traefik-throttle %q: want durations like 0s,2s", f)
		}
		tthrottles = append(tthrottles, d)
	}
	fids, err := ints(*fidN)
	if err != nil {
		return err
	}
	tns, err := ints(*traefikN)
	if err != nil {
		return err
	}
	res := &bench.Results{
		Started: time.Now(), Machine: bench.Machine(), Trials: *trials,
		Command:  "go run ./bench/cmd/bench " + strings.Join(os.Args[1:], " "),
		Versions: []string{"etcd server/client v3.7.3 (embedded)", bench.HAProxyVersion(), "userspace wireguard-go (golang.zx2c4.com/wireguard, from go.mod)"},
	}
	logf := func(format string, a ...any) { fmt.Fprintf(os.Stderr, format+"\n", a...) }
	work, err := os.MkdirTemp("", "meshd-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)

	// One etcd, in its own process, for the floor, the scale runs and
	// Traefik: the agents' CPU is then measurable on its own.
	etcd, err := startEtcd(ctx, filepath.Join(work, "etcd"))
	if err != nil {
		return err
	}
	defer etcd.stop()
	newClient := func() (*clientv3.Client, error) {
		return clientv3.New(clientv3.Config{Endpoints: []string{etcd.endpoint}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	}
	var alog *slog.Logger
	if *agentLog != "" {
		f, err := os.Create(*agentLog)
		if err != nil {
			return err
		}
		defer f.Close()
		alog = slog.New(slog.NewTextHandler(f, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	type run struct {
		n, live int
		proxy   bool
	}
	var runs []run
	for i, n := range scales {
		runs = append(runs, run{n, lives[i], false})
	}
	for i, n := range pscales {
		runs = append(runs, run{n, plives[i], true})
	}
	for _, rn := range runs {
		n := rn.n
		// The agents and watchers connect to endpoint: etcd, or a gRPC
		// proxy in front of it; the harness's control client to etcd.
		endpoint, label := etcd.endpoint, ""
		stopProxy := func() {}
		if rn.proxy {
			p, pe, err := startChild("grpc-proxy", etcd.endpoint)
			if err != nil {
				res.Notes = append(res.Notes, fmt.Sprintf("grpc-proxy N=%d: %v", n, err))
				continue
			}
			stopProxy, endpoint, label = p.stop, pe, " via grpc-proxy"
		}
		clientOf := func() (*clientv3.Client, error) {
			return clientv3.New(clientv3.Config{Endpoints: []string{endpoint}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
		}
		control := newClient
		logf("floor N=%d%s ...", n, label)
		f, err := bench.Floor(ctx, bench.FloorOptions{NewClient: clientOf, Control: control, Label: label, N: n, Trials: *trials})
		if err != nil {
			res.Notes = append(res.Notes, fmt.Sprintf("floor N=%d%s: %v", n, label, err))
		} else {
			logf("%s", f.Summary())
			res.Floor = append(res.Floor, f)
		}
		logf("scale N=%d%s ...", n, label)
		s, err := bench.Scale(ctx, bench.ScaleOptions{
			NewClient: clientOf, Control: control, Label: label, MetricsURL: etcd.endpoint + "/metrics", N: n, Live: rn.live, Trials: *trials,
			Idle: *idle,
			Passive: func(ctx context.Context, n int) (func(), error) {
				p, _, err := startChild("passive-nodes", endpoint, strconv.Itoa(n))
				if err != nil {
					return nil, fmt.Errorf("passive nodes: %w", err)
				}
				return p.stop, nil
			},
			StateDir: filepath.Join(work, fmt.Sprintf("scale-%d", n)), Log: logf, AgentLog: alog,
		})
		stopProxy()
		if err != nil {
			res.Notes = append(res.Notes, fmt.Sprintf("scale N=%d%s: %v", n, label, err))
		} else {
			res.Scale = append(res.Scale, s)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	logf("recompute cost ...")
	res.Recompute = bench.Recompute(scales)
	if *traefikBin != "" {
		cli, err := newClient()
		if err != nil {
			return err
		}
		for _, n := range tns {
			for _, throttle := range tthrottles {
				logf("traefik N=%d throttle=%s ...", n, throttle)
				t, err := bench.Traefik(ctx, bench.TraefikOptions{
					Binary: *traefikBin, EtcdAddr: strings.TrimPrefix(etcd.endpoint, "http://"), Client: cli,
					N: n, Trials: *trials, Throttle: throttle, Dir: work, Log: logf,
				})
				if err != nil {
					res.Notes = append(res.Notes, fmt.Sprintf("traefik N=%d throttle=%s: %v", n, throttle, err))
					continue
				}
				if *traefikVer != "" {
					t.Version = *traefikVer
				}
				res.Traefik = append(res.Traefik, t)
			}
		}
		cli.Close()
		if len(res.Traefik) > 0 {
			res.Versions = append(res.Versions, "Traefik "+res.Traefik[0].Version)
		}
	} else {
		res.Notes = append(res.Notes, "Traefik not run: no binary given (-traefik or TRAEFIK_BIN)")
	}
	if *oneNode > 0 {
		logf("one node N=%d ...", *oneNode)
		o, err := bench.OneNode(ctx, bench.OneNodeOptions{
			Sandbox: sandbox.Options{Name: "mdbench1", MeshdBinary: *meshd},
			N:       *oneNode, Idle: max(*idle, 10*time.Second), Log: logf,
		})
		if err != nil {
			res.Notes = append(res.Notes, fmt.Sprintf("one node N=%d: %v", *oneNode, err))
		} else {
			res.OneNode = append(res.OneNode, o)
		}
	}
	for _, n := range fids {
		logf("full fidelity N=%d ...", n)
		f, err := bench.Fidelity(ctx, bench.FidelityOptions{
			Sandbox: sandbox.Options{Name: "mdbench", MeshdBinary: *meshd},
			N:       n, Trials: *trials, KillTrials: *killTrials, Log: logf,
		})
		if err != nil {
			res.Notes = append(res.Notes, fmt.Sprintf("full fidelity N=%d: %v", n, err))
			continue
		}
		res.Fidelity = append(res.Fidelity, f)
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	res.Duration = time.Since(res.Started)
	fmt.Print(res.Table())
	for _, n := range res.Notes {
		logf("note: %s", n)
	}
	raw, _ := json.MarshalIndent(res, "", "  ")
	if err := os.MkdirAll(*out, 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(*out, "results.json"), raw, 0o644); err != nil {
		return err
	}
	return write(res, *out)
}

// write renders RESULTS.md and convergence.png into dir.
func write(res *bench.Results, dir string) error {
	if err := res.Plot(filepath.Join(dir, "convergence.png")); err != nil {
		res.Notes = append(res.Notes, "plot: "+err.Error())
	}
	if err := os.WriteFile(filepath.Join(dir, "RESULTS.md"), []byte(res.Markdown()), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(os.Stderr, "wrote %s\n", filepath.Join(dir, "RESULTS.md"))
	return nil
}

// childProc is a child process of this binary (serve-etcd,
// passive-nodes): it runs until its stdin closes.
type childProc struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
}

// startChild runs this binary with args and waits for the child's first
// line on stdout, which it returns (the child prints it once ready).
func startChild(args ...string) (*childProc, string, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, "", err
	}
	cmd := exec.Command(self, args...)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, "", err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, "", err
	}
	if err := cmd.Start(); err != nil {
		return nil, "", err
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, "", fmt.Errorf("%s child: %w", args[0], err)
	}
	return &childProc{cmd: cmd, stdin: stdin}, strings.TrimSpace(line), nil
}

func (p *childProc) stop() {
	p.stdin.Close()
	done := make(chan struct{})
	go func() { _ = p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-done
	}
}

// etcdProc is the benchmark's etcd, a child process running serve-etcd.
type etcdProc struct {
	*childProc
	endpoint string
}

func startEtcd(ctx context.Context, dir string) (*etcdProc, error) {
	p, endpoint, err := startChild("serve-etcd", dir)
	if err != nil {
		return nil, err
	}
	return &etcdProc{childProc: p, endpoint: endpoint}, nil
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

// serveGRPCProxy is the grpc-proxy child: etcd's gRPC proxy in front of
// the etcd at ENDPOINT; it prints its own endpoint and serves until stdin
// closes.
func serveGRPCProxy(args []string) error {
	if len(args) != 1 {
		return errors.New("usage: bench grpc-proxy ENDPOINT")
	}
	p, err := bench.StartGRPCProxy(args[0])
	if err != nil {
		return err
	}
	defer p.Close()
	fmt.Println(p.Endpoint)
	_, _ = io.Copy(io.Discard, os.Stdin)
	return nil
}

// servePassive is the passive-nodes child: it registers N idle nodes
// (bench.RegisterPassive) against the etcd at ENDPOINT, prints "ready",
// and holds their watches until stdin closes.
func servePassive(args []string) error {
	if len(args) != 2 {
		return errors.New("usage: bench passive-nodes ENDPOINT N")
	}
	n, err := strconv.Atoi(args[1])
	if err != nil || n < 1 {
		return fmt.Errorf("passive-nodes: bad count %q", args[1])
	}
	newClient := func() (*clientv3.Client, error) {
		return clientv3.New(clientv3.Config{Endpoints: []string{args[0]}, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	}
	stop, err := bench.RegisterPassive(context.Background(), newClient, n)
	if err != nil {
		return err
	}
	defer stop()
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, os.Stdin)
	return nil
}

// serveEtcd is the child: an etcd on 127.0.0.1 until stdin closes.
func serveEtcd(args []string) error {
	if len(args) != 1 {
		return errors.New("usage: bench serve-etcd DIR")
	}
	s, err := etcdtest.Start(etcdtest.Options{Dir: args[0]})
	if err != nil {
		return err
	}
	defer s.Close()
	fmt.Println(s.Endpoint())
	_, _ = io.Copy(io.Discard, os.Stdin)
	return nil
}
