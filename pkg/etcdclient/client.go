// Package etcdclient builds the one etcd client a meshd or meshctl process
// uses, from endpoints and optional TLS files.
package etcdclient

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

// Options says how to reach etcd.
type Options struct {
	Endpoints   []string
	CAFile      string
	CertFile    string
	KeyFile     string
	DialTimeout time.Duration
}

// TLS builds the client TLS configuration, or nil when no file is set.
// RetryMax is the longest a meshd node waits between two attempts to
// reach etcd (gRPC reconnects, re-registration, the registry watch), so
// that it is back within about RetryMax of etcd's return.
const RetryMax = 250 * time.Millisecond

func (o Options) TLS() (*tls.Config, error) {
	if o.CAFile == "" && o.CertFile == "" && o.KeyFile == "" {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if o.CAFile != "" {
		pem, err := os.ReadFile(o.CAFile)
		if err != nil {
			return nil, fmt.Errorf("etcd ca file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("etcd ca file %s: no PEM certificate in it", o.CAFile)
		}
		cfg.RootCAs = pool
	}
	if o.CertFile != "" || o.KeyFile != "" {
		if o.CertFile == "" || o.KeyFile == "" {
			return nil, fmt.Errorf("etcd client certificate: cert and key files go together")
		}
		cert, err := tls.LoadX509KeyPair(o.CertFile, o.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("etcd client certificate: %w", err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg, nil
}

// New returns a client. It does not wait for etcd to answer: meshd must
// start (and bring its overlay up from cache) while etcd is unreachable.
func New(o Options) (*clientv3.Client, error) {
	tlsCfg, err := o.TLS()
	if err != nil {
		return nil, err
	}
	if len(o.Endpoints) == 0 {
		return nil, fmt.Errorf("etcd: no endpoints")
	}
	if o.DialTimeout == 0 {
		o.DialTimeout = 5 * time.Second
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:            o.Endpoints,
		TLS:                  tlsCfg,
		DialTimeout:          o.DialTimeout,
		DialKeepAliveTime:    5 * time.Second,
		DialKeepAliveTimeout: 3 * time.Second,
		Logger:               zap.NewNop(),
		// gRPC's default reconnect backoff grows to 120 s: after a long
		// outage a node would stay away long after etcd is back. Retry
		// every 250 ms at most (±20%) instead: the wait for the next
		// attempt after etcd's return is the largest part of a node's
		// re-convergence, and four refused connections a second per node
		// while etcd is down are still a trickle.
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 50 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: RetryMax},
			MinConnectTimeout: 2 * time.Second,
		})},
	})
	if err != nil {
		return nil, fmt.Errorf("etcd client: %w", err)
	}
	return cli, nil
}
