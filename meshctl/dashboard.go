package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"

	"github.com/meshd/meshd/pkg/dashboard"
)

// cmdDashboard serves the live web page of the mesh (pkg/dashboard).
func cmdDashboard(ctx context.Context, e *env, args []string) error {
	fs := flags(e, "dashboard")
	listen := fs.String("listen", "127.0.0.1:8080", "address to serve the page on (keep it on loopback; use SSH port forwarding)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return usagef("unexpected arguments %v", fs.Args())
	}
	return runDashboard(ctx, e, *listen)
}

func runDashboard(ctx context.Context, e *env, listen string) error {
	cli, err := e.etcd()
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	fmt.Fprint(e.Stdout, dashboard.Banner(ln.Addr().String()))
	// Watch errors (etcd unreachable, access denied) go to stderr; the
	// page says it is waiting until the first full listing.
	log := slog.New(slog.NewTextHandler(e.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	return dashboard.Serve(ctx, dashboard.Options{Client: cli, Log: log}, ln)
}
