package main

import (
	"context"
	"fmt"
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
		return usagef("--listen: %v", err)
	}
	fmt.Fprint(e.Stdout, dashboard.Banner(ln.Addr().String()))
	return dashboard.Serve(ctx, dashboard.Options{Client: cli}, ln)
}
