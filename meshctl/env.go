package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/pflag"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/meshd/meshd/pkg/etcdclient"
)

// env is what every command gets: global options and where to print.
type env struct {
	Endpoints []string
	CAFile    string
	CertFile  string
	KeyFile   string
	Timeout   time.Duration // of each etcd request
	// DialTimeout is the etcd client's (it connects in the background;
	// Timeout bounds each request).
	DialTimeout time.Duration
	Stdout      io.Writer
	Stderr      io.Writer
	Stdin       io.Reader
	Getenv      func(string) string

	cli *clientv3.Client

	declaring *pflag.FlagSet // newLeaf collects a command's flags here
	parsed    *pflag.FlagSet // the flags cobra parsed for the running command
	ran       bool           // a command's function ran: its errors are its own
}

// etcd returns the process's one etcd client, creating it on first use.
func (e *env) etcd() (*clientv3.Client, error) {
	if e.cli != nil {
		return e.cli, nil
	}
	cli, err := etcdclient.New(etcdclient.Options{
		Endpoints: e.Endpoints, CAFile: e.CAFile, CertFile: e.CertFile, KeyFile: e.KeyFile,
		DialTimeout: e.DialTimeout,
	})
	if err != nil {
		return nil, err
	}
	e.cli = cli
	return cli, nil
}

// explain names the etcd endpoints and what to check when an error says
// etcd did not answer (etcd down, a wrong address, a TLS mismatch: the
// client only sees requests time out).
func (e *env) explain(err error) error {
	if e.cli == nil || errors.Is(err, errTimeout) {
		return err
	}
	code := status.Code(err)
	if !errors.Is(err, context.DeadlineExceeded) && code != codes.DeadlineExceeded && code != codes.Unavailable {
		return err
	}
	return fmt.Errorf("etcd at %s did not answer within %v: is etcd running, are --endpoints and --cacert/--cert/--key right? (%w)",
		strings.Join(e.Endpoints, ", "), e.Timeout, err)
}

func (e *env) close() {
	if e.cli != nil {
		e.cli.Close()
	}
}

// globalFlags are etcdctl's connection flags, accepted anywhere on the line.
func globalFlags(fs *pflag.FlagSet, e *env) {
	defEndpoints := []string{"http://127.0.0.1:2379"}
	if v := e.Getenv("ETCDCTL_ENDPOINTS"); v != "" {
		defEndpoints = strings.Split(v, ",")
	}
	if v := e.Getenv("MESHCTL_ENDPOINTS"); v != "" {
		defEndpoints = strings.Split(v, ",")
	}
	fs.StringSliceVar(&e.Endpoints, "endpoints", defEndpoints, "etcd endpoints (env MESHCTL_ENDPOINTS or ETCDCTL_ENDPOINTS)")
	fs.StringVar(&e.CAFile, "cacert", e.Getenv("ETCDCTL_CACERT"), "etcd CA certificate (env ETCDCTL_CACERT)")
	fs.StringVar(&e.CertFile, "cert", e.Getenv("ETCDCTL_CERT"), "etcd client certificate (env ETCDCTL_CERT)")
	fs.StringVar(&e.KeyFile, "key", e.Getenv("ETCDCTL_KEY"), "etcd client key (env ETCDCTL_KEY)")
	fs.DurationVar(&e.Timeout, "command-timeout", 5*time.Second, "timeout of each etcd request")
	fs.DurationVar(&e.DialTimeout, "dial-timeout", 5*time.Second, "the etcd client's dial timeout, as etcdctl's (the client connects in the background; --command-timeout bounds each request)")
}
