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
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/pflag"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/etcdclient"
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

// env is what every command gets: global options and where to print.
type env struct {
	Endpoints []string
	CAFile    string
	CertFile  string
	KeyFile   string
	Timeout   time.Duration
	Stdout    io.Writer
	Stderr    io.Writer
	Stdin     io.Reader
	Getenv    func(string) string

	cli *clientv3.Client
}

// etcd returns the process's one etcd client, creating it on first use.
func (e *env) etcd() (*clientv3.Client, error) {
	if e.cli != nil {
		return e.cli, nil
	}
	cli, err := etcdclient.New(etcdclient.Options{
		Endpoints: e.Endpoints, CAFile: e.CAFile, CertFile: e.CertFile, KeyFile: e.KeyFile,
		DialTimeout: 5 * time.Second,
	})
	if err != nil {
		return nil, err
	}
	e.cli = cli
	return cli, nil
}

func (e *env) close() {
	if e.cli != nil {
		e.cli.Close()
	}
}

type command struct {
	summary string
	run     func(ctx context.Context, e *env, args []string) error
}

// commands is the table of subcommands; each group lives in its own file.
func commands() map[string]command {
	return map[string]command{
		"node":      {"list and remove nodes", cmdNode},
		"app":       {"register, unregister and list apps", cmdApp},
		"status":    {"show every node's lease, applied revision and health", cmdStatus},
		"migrate":   {"show where a live migration from flanneld stands", cmdMigrate},
		"secret":    {"put, list, remove and import sealed secrets", cmdSecret},
		"provision": {"create Hetzner Cloud servers for the cluster", cmdProvision},
		"destroy":   {"delete Hetzner Cloud servers and their registry keys", cmdDestroy},
		"cloud":     {"list the cluster's Hetzner servers next to their registry state", cmdCloud},
		"pki":       {"create the cluster CA and node certificates", cmdPKI},
		"etcd":      {"set up etcd roles (least privilege per node)", cmdEtcd},
		"sandbox":   {"run a local meshd cluster in network namespaces", cmdSandbox},
	}
}

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
	fs := pflag.NewFlagSet("meshctl", pflag.ContinueOnError)
	fs.SetInterspersed(false)
	fs.SetOutput(stderr)
	defEndpoints := []string{"http://127.0.0.1:2379"}
	if v := getenv("ETCDCTL_ENDPOINTS"); v != "" {
		defEndpoints = strings.Split(v, ",")
	}
	if v := getenv("MESHCTL_ENDPOINTS"); v != "" {
		defEndpoints = strings.Split(v, ",")
	}
	fs.StringSliceVar(&e.Endpoints, "endpoints", defEndpoints, "etcd endpoints (env MESHCTL_ENDPOINTS or ETCDCTL_ENDPOINTS)")
	fs.StringVar(&e.CAFile, "cacert", getenv("ETCDCTL_CACERT"), "etcd CA certificate (env ETCDCTL_CACERT)")
	fs.StringVar(&e.CertFile, "cert", getenv("ETCDCTL_CERT"), "etcd client certificate (env ETCDCTL_CERT)")
	fs.StringVar(&e.KeyFile, "key", getenv("ETCDCTL_KEY"), "etcd client key (env ETCDCTL_KEY)")
	fs.DurationVar(&e.Timeout, "command-timeout", 30*time.Second, "timeout of each etcd request")
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: meshctl [global flags] COMMAND [args]\n\ncommands:\n")
		cmds := commands()
		names := make([]string, 0, len(cmds))
		for n := range cmds {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			fmt.Fprintf(stderr, "  %-10s %s\n", n, cmds[n].summary)
		}
		fmt.Fprintf(stderr, "\nglobal flags:\n%s", fs.FlagUsages())
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return exitOK
		}
		return exitUsage
	}
	if fs.NArg() == 0 {
		fs.Usage()
		return exitUsage
	}
	cmd, ok := commands()[fs.Arg(0)]
	if !ok {
		fmt.Fprintf(stderr, "meshctl: unknown command %q (see meshctl --help)\n", fs.Arg(0))
		return exitUsage
	}
	err := cmd.run(ctx, e, fs.Args()[1:])
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, pflag.ErrHelp):
		return exitOK
	}
	fmt.Fprintf(stderr, "meshctl %s: %v\n", fs.Arg(0), err)
	var ue usageError
	switch {
	case errors.As(err, &ue):
		return exitUsage
	case errors.Is(err, errTimeout):
		return exitTimeout
	}
	return exitFailed
}

// flags returns a flag set for a subcommand that reports errors as usage
// errors.
func flags(e *env, name string) *pflag.FlagSet {
	fs := pflag.NewFlagSet("meshctl "+name, pflag.ContinueOnError)
	fs.SetOutput(e.Stderr)
	return fs
}

// parse parses a subcommand's flags, turning a parse error into a usage
// error.
func parse(fs *pflag.FlagSet, args []string) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return err
		}
		return usageError{err}
	}
	return nil
}
