// Command bench runs meshd's convergence benchmarks and rewrites
// bench/RESULTS.md and bench/convergence.png (make bench). Run it as root
// from the repository root: the full-fidelity scenarios run a sandbox.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"log"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/meshd/meshd/bench"
)

func main() {
	if child, err := serveChild(os.Args[1:]); child {
		if err != nil {
			log.Fatal(err)
		}
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx); err != nil {
		fmt.Fprintf(os.Stderr, "bench: %v\n", err)
		os.Exit(1)
	}
}

func run(ctx context.Context) error {
	o, err := parseFlags(os.Args[1:])
	if err != nil {
		return err
	}
	// The profile is written into it during a run.
	if err := os.MkdirAll(o.out, 0o755); err != nil {
		return err
	}
	if o.from != "" {
		b, err := os.ReadFile(o.from)
		if err != nil {
			return err
		}
		var res bench.Results
		if err := json.Unmarshal(b, &res); err != nil {
			return fmt.Errorf("%s: %w", o.from, err)
		}
		return write(&res, o.out)
	}
	res := &bench.Results{
		Started: time.Now(), Machine: bench.Machine(), Trials: o.trials, NetdevMaxBacklog: bench.NetdevMaxBacklog(),
		Command:  "go run ./bench/cmd/bench " + strings.Join(os.Args[1:], " "),
		Versions: []string{"etcd server/client v3.7.3 (embedded)", bench.HAProxyVersion(), "userspace wireguard-go (golang.zx2c4.com/wireguard, from go.mod)"},
	}
	m := &measurer{o: o, res: res}
	if m.work, err = os.MkdirTemp("", "meshd-bench-"); err != nil {
		return err
	}
	defer os.RemoveAll(m.work)

	// One etcd, in its own process, for the floor, the scale runs and
	// Traefik: the agents' CPU is then measurable on its own.
	if m.etcd, err = startEtcd(ctx, filepath.Join(m.work, "etcd")); err != nil {
		return err
	}
	defer m.etcd.stop()
	if o.agentLog != "" {
		f, err := os.Create(o.agentLog)
		if err != nil {
			return err
		}
		defer f.Close()
		m.alog = slog.New(slog.NewTextHandler(f, &slog.HandlerOptions{Level: slog.LevelWarn}))
	}
	for i, n := range o.scales {
		if m.scale(ctx, n, o.lives[i], false); ctx.Err() != nil {
			return ctx.Err()
		}
	}
	for i, n := range o.proxyScales {
		if m.scale(ctx, n, o.proxyLives[i], true); ctx.Err() != nil {
			return ctx.Err()
		}
	}
	logf("recompute cost ...")
	res.Recompute = bench.Recompute(o.scales)
	if err := m.traefik(ctx); err != nil {
		return err
	}
	if err := m.sandboxes(ctx); err != nil {
		return err
	}
	res.Duration = time.Since(res.Started)
	fmt.Print(res.Table())
	for _, n := range res.Notes {
		logf("note: %s", n)
	}
	raw, _ := json.MarshalIndent(res, "", "  ")
	if err := os.WriteFile(filepath.Join(o.out, "results.json"), raw, 0o644); err != nil {
		return err
	}
	return write(res, o.out)
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
