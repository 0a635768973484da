// Package etcdtest gives tests a real etcd server (pkg/etcdembed) that
// stops when the test ends, TLS variants and a proxy that can cut
// connections. Only tests import it: it links package testing.
package etcdtest

import (
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/meshd/meshd/pkg/etcdembed"
)

// Server, Options and Start are pkg/etcdembed's, so tests keep one import.
type (
	Server  = etcdembed.Server
	Options = etcdembed.Options
)

// Start starts a server that the caller stops (see etcdembed.Start).
func Start(o Options) (*Server, error) { return etcdembed.Start(o) }

// New starts a server for a test and stops it when the test ends.
func New(t testing.TB) *Server {
	t.Helper()
	s, err := Start(Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Close)
	return s
}

// NewClient returns a client of s closed when the test ends.
func NewClient(t testing.TB, s *Server) *clientv3.Client {
	t.Helper()
	c, err := s.Client()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
