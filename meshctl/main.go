// Command meshctl is the operator's tool for a meshd cluster: nodes, apps,
// secrets, status, Hetzner provisioning and the local sandbox.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// Exit codes scripts can rely on.
const (
	exitOK      = 0
	exitFailed  = 1 // the command ran and failed (etcd error, API error, check failed)
	exitUsage   = 2 // bad flags or arguments
	exitTimeout = 3 // --wait gave up
)

// usageError marks an error as the caller's fault (exit 2).
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, a ...any) error { return usageError{fmt.Errorf(format, a...)} }

// errTimeout marks a --wait that gave up (exit 3).
var errTimeout = errors.New("timed out")

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr, os.Getenv)
	stop()
	os.Exit(code)
}

// run is main without the process: testable end to end.
func run(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer, getenv func(string) string) int {
	e := &env{Stdout: stdout, Stderr: stderr, Stdin: stdin, Getenv: getenv}
	defer e.close()
	root := newRoot(e)
	root.SetArgs(args)
	root.SetIn(stdin)
	root.SetOut(stdout)
	root.SetErr(stderr)
	cmd, err := root.ExecuteContextC(ctx)
	if err == nil {
		return exitOK
	}
	name := cmd.CommandPath()
	err = e.explain(err)
	var ue usageError
	if !e.ran || errors.As(err, &ue) {
		fmt.Fprintf(stderr, "%s: %v\n\n%s\n", name, err, hint(cmd))
		return exitUsage
	}
	fmt.Fprintf(stderr, "%s: %v\n", name, err)
	switch {
	case errors.Is(err, errTimeout):
		return exitTimeout
	case errors.Is(err, errRegistryUnreachable):
		return exitRegistry
	}
	return exitFailed
}
