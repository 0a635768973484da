package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os/signal"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/registry"
	"github.com/meshd/meshd/pkg/sandbox"
)

// cmdSandbox runs a local meshd cluster in network namespaces (see
// docs/sandbox.md): up until Ctrl-C, or --check to verify and exit.
func cmdSandbox(ctx context.Context, e *env, args []string) error {
	fs := flags(e, "sandbox")
	var (
		name    = fs.String("name", "mdsb", "sandbox name: prefix of every namespace and link it creates")
		nodes   = fs.Int("nodes", 3, "number of nodes (the first serves the demo app, the others consume it)")
		servers = fs.Int("servers", 1, "how many nodes serve the demo app")
		check   = fs.Bool("check", false, "bring up, verify every node's path to the demo app, print the table, tear down; exit 0 only if all passed")
		clean   = fs.Bool("clean", false, "remove what an earlier run of this sandbox name left behind, and exit")
		meshd   = fs.String("meshd", "", "meshd binary (default: next to meshctl, else on PATH)")
		haproxy = fs.String("haproxy", "haproxy", "haproxy binary")
		forward = fs.String("etcd-addr", "127.0.0.1:23790", "host loopback address forwarded to the sandbox's etcd (port 0: any free port)")
		timeout = fs.Duration("timeout", 60*time.Second, "how long each step and the final check may take")
		keep    = fs.Bool("keep-workdir", false, "keep the work and run directories (configs, logs, HAProxy files) after teardown")
		verbose = fs.Bool("verbose", false, "log the harness's own steps")
		logLvl  = fs.String("meshd-log-level", "", "meshd --log-level for every node")
	)
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("unexpected argument %q", fs.Arg(0))
	}
	if *clean {
		removed, err := sandbox.Clean(context.WithoutCancel(ctx), *name)
		for _, r := range removed {
			if strings.Contains(r, "/") {
				fmt.Fprintf(e.Stdout, "removed directory %s\n", r)
			} else {
				fmt.Fprintf(e.Stdout, "removed namespace %s\n", r)
			}
		}
		if err == nil && len(removed) == 0 {
			fmt.Fprintf(e.Stdout, "nothing left from sandbox %q\n", *name)
		}
		return err
	}
	if *nodes < 2 || *nodes > sandbox.MaxNodes {
		return usagef("--nodes %d: want 2 to %d", *nodes, sandbox.MaxNodes)
	}
	// Whatever ends this process short of SIGKILL must end in teardown: a
	// closed terminal (SIGHUP), and output piped into `head` (a write to a
	// closed pipe then fails instead of killing the process).
	signal.Ignore(syscall.SIGPIPE)
	ctx, stopHup := signal.NotifyContext(ctx, syscall.SIGHUP)
	defer stopHup()
	level := slog.LevelWarn
	if *verbose {
		level = slog.LevelInfo
	}
	if *check && *forward == "127.0.0.1:23790" {
		*forward = "127.0.0.1:0" // a check must not collide with a sandbox left running
	}
	c, err := sandbox.Start(ctx, sandbox.Options{
		Name: *name, MeshdBinary: *meshd, HAProxyBinary: *haproxy, ForwardAddr: *forward,
		KeepWorkDir: *keep, MeshdLogLevel: *logLvl,
		Logger: slog.New(slog.NewTextHandler(e.Stderr, &slog.HandlerOptions{Level: level})),
	})
	if err != nil {
		return err
	}
	defer func() {
		fmt.Fprintf(e.Stdout, "tearing down sandbox %s...\n", *name)
		if err := c.Close(); err != nil {
			fmt.Fprintf(e.Stderr, "teardown: %v\n", err)
		} else {
			fmt.Fprintln(e.Stdout, "removed every namespace, link, process and temporary file")
		}
		if *keep {
			fmt.Fprintf(e.Stdout, "work directory kept: %s (run directory: %s)\n", c.WorkDir(), c.RunDir())
		}
	}()
	fmt.Fprintf(e.Stdout, "sandbox %s: hub namespace %s, etcd %s inside, forwarded to %s; work dir %s, run dir %s\n",
		*name, c.HubNS(), c.EtcdEndpoint(), c.Endpoint(), c.WorkDir(), c.RunDir())
	if _, err := c.BringUp(ctx, sandbox.DemoOptions{Nodes: *nodes, Servers: *servers, Out: e.Stdout, StepTimeout: *timeout}); err != nil {
		return err
	}
	reports, err := c.Check(ctx, *timeout)
	if err != nil {
		return err
	}
	fmt.Fprintln(e.Stdout)
	sandbox.WriteTable(e.Stdout, reports)
	failed := 0
	for _, r := range reports {
		if !r.OK() {
			failed++
		}
	}
	if *check {
		if failed > 0 {
			return fmt.Errorf("%d of %d nodes failed the check", failed, len(reports))
		}
		fmt.Fprintf(e.Stdout, "\nall %d nodes passed\n", len(reports))
		return nil
	}
	printUsage(e.Stdout, c)
	go followChanges(ctx, e.Stdout, c)
	<-ctx.Done()
	fmt.Fprintln(e.Stdout)
	return nil
}

func printUsage(w io.Writer, c *sandbox.Cluster) {
	ns := c.Nodes()
	consumer := ns[len(ns)-1]
	fmt.Fprintf(w, `
The sandbox is up. Meanwhile, from another shell (as root):
  meshctl --endpoints %[1]s status
  meshctl --endpoints %[1]s app list
  ip netns exec %[2]s curl -s 127.0.0.1:%[3]d      # HAProxy -> WireGuard -> demo app
  nsenter -t %[4]d -m -n wg show                    # %[5]s's WireGuard (its private /run/wireguard)
  ip netns exec %[2]s ip route show table all
Every change written under /cluster/ is reported below with the time until every node applied it.
Ctrl-C tears everything down.
`, c.Endpoint(), consumer.NS, sandbox.DemoPublishPort, consumer.Pid(), consumer.Name)
}

// followChanges reports, for every write under /cluster/ while the
// sandbox is up, how long every running node took to apply it.
func followChanges(ctx context.Context, w io.Writer, c *sandbox.Cluster) {
	resp, err := c.Client().Get(ctx, "/", clientv3.WithCountOnly())
	if err != nil {
		return
	}
	for wr := range c.Client().Watch(ctx, registry.ClusterPrefix, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1)) {
		if wr.Err() != nil || len(wr.Events) == 0 {
			continue
		}
		at := time.Now()
		var what []string
		for _, ev := range wr.Events {
			what = append(what, fmt.Sprintf("%s %s", strings.ToLower(ev.Type.String()), ev.Kv.Key))
		}
		rev := wr.Header.Revision
		go func() {
			wctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			cv, err := c.WaitApplied(wctx, rev, at, c.NodeNames())
			switch {
			case errors.Is(err, context.Canceled) && ctx.Err() != nil:
			case err != nil:
				fmt.Fprintf(w, "revision %d (%s): %v\n", rev, strings.Join(what, ", "), err)
			default:
				fmt.Fprintf(w, "revision %d (%s): every node applied it in %s\n", rev, strings.Join(what, ", "), cv.Max().Round(100*time.Microsecond))
			}
		}()
	}
}
