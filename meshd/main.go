// Command meshd is the per-node daemon of a meshd cluster: it leases the
// node's registry entry in etcd, programs the WireGuard overlay, renders
// and applies HAProxy, and delivers secrets as systemd credentials.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/spf13/pflag"

	"github.com/meshd/meshd/pkg/config"
	"github.com/meshd/meshd/pkg/daemon"
	"github.com/meshd/meshd/pkg/overlay"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	// A userspace WireGuard device runs in its own process (this binary,
	// re-executed) so that it outlives a meshd restart: traffic keeps
	// flowing while meshd is away.
	overlay.MaybeRunDevice(os.Args[1:])
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if !errors.Is(err, pflag.ErrHelp) {
			fmt.Fprintf(os.Stderr, "meshd: %v\n", err)
			os.Exit(1)
		}
	}
}

// run parses flags into a Config and runs the daemon.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := pflag.NewFlagSet("meshd", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		configPath  = fs.String("config", "", "path of the JSON config file (see docs/config.md)")
		checkConfig = fs.Bool("check-config", false, "validate the config file and exit")
		nodeName    = fs.String("node-name", "", "this node's name in the registry (overrides the config; default hostname)")
		endpoints   = fs.StringSlice("etcd-endpoints", nil, "etcd endpoints (overrides the config)")
		stateDir    = fs.String("state-dir", "", "state directory for keys and caches (overrides the config)")
		metricsAddr = fs.String("metrics-addr", "", "address for /metrics and /healthz, \"off\" to disable (overrides the config)")
		logLevel    = fs.String("log-level", "info", "log level: debug, info, warn, error")
		logFormat   = fs.String("log-format", "text", "log format: text or json")
		showVersion = fs.Bool("version", false, "print the version and exit")
	)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: meshd --config FILE [flags]\n\n%s", fs.FlagUsages())
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q (meshd takes only flags)", fs.Arg(0))
	}
	if *showVersion {
		fmt.Fprintln(stdout, version)
		return nil
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("--log-level %q: want debug, info, warn or error", *logLevel)
	}
	var handler slog.Handler
	switch *logFormat {
	case "text":
		handler = slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: level})
	case "json":
		handler = slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: level})
	default:
		return fmt.Errorf("--log-format %q: want text or json", *logFormat)
	}

	cfg := config.Default()
	if *configPath != "" {
		var err error
		if cfg, err = config.Load(*configPath); err != nil {
			return err
		}
	} else if *checkConfig {
		return errors.New("--check-config needs --config FILE")
	}
	if *nodeName != "" {
		cfg.NodeName = *nodeName
	}
	if len(*endpoints) > 0 {
		cfg.Etcd.Endpoints = *endpoints
	}
	if *stateDir != "" {
		cfg.StateDir = *stateDir
	}
	switch *metricsAddr {
	case "":
	case "off":
		cfg.MetricsAddr = ""
	default:
		cfg.MetricsAddr = *metricsAddr
	}
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("invalid config: %s", strings.ReplaceAll(err.Error(), "\n", "; "))
	}
	if *checkConfig {
		fmt.Fprintf(stdout, "config ok: node %s, %d instance(s), overlay %v, haproxy %v, secrets %v\n",
			cfg.NodeName, len(cfg.Instances), cfg.Overlay.Enable, cfg.HAProxy.Enable, cfg.Secrets.Enable)
		return nil
	}
	return daemon.Run(ctx, cfg, slog.New(handler), version)
}
