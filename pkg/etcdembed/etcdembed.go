// Package etcdembed runs a real etcd server in-process
// (go.etcd.io/etcd/server/v3/embed) with fast election timing: the
// sandbox's etcd, and through pkg/etcdtest every test's. It does not import
// package testing, so a binary that embeds it (meshctl's sandbox) does not
// link the test framework.
package etcdembed

import (
	"fmt"
	"net/url"
	"os"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Server is a running single-member etcd.
type Server struct {
	Etcd    *embed.Etcd
	dir     string
	clients []url.URL
	peers   []url.URL
	name    string
}

// Options tunes the server. The zero value listens on 127.0.0.1 with
// ephemeral ports.
type Options struct {
	// Dir is the data directory; empty means a new temporary directory.
	Dir string
	// ClientURL and PeerURL pin the listen addresses (needed to restart a
	// server on the same address); empty means 127.0.0.1:0.
	ClientURL string
	PeerURL   string
}

// Start starts a server and waits until it serves.
func Start(o Options) (*Server, error) {
	s := &Server{dir: o.Dir, name: "default"}
	if s.dir == "" {
		d, err := os.MkdirTemp("", "meshd-etcd-")
		if err != nil {
			return nil, err
		}
		s.dir = d
	}
	cu, pu := o.ClientURL, o.PeerURL
	if cu == "" {
		cu = "http://127.0.0.1:0"
	}
	if pu == "" {
		pu = "http://127.0.0.1:0"
	}
	c, err := url.Parse(cu)
	if err != nil {
		return nil, err
	}
	p, err := url.Parse(pu)
	if err != nil {
		return nil, err
	}
	s.clients, s.peers = []url.URL{*c}, []url.URL{*p}
	if err := s.start(); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *Server) start() error {
	cfg := embed.NewConfig()
	cfg.Name = s.name
	cfg.Dir = s.dir
	cfg.ListenClientUrls = s.clients
	cfg.AdvertiseClientUrls = s.clients
	cfg.ListenPeerUrls = s.peers
	cfg.AdvertisePeerUrls = s.peers
	cfg.InitialCluster = fmt.Sprintf("%s=%s", s.name, s.peers[0].String())
	cfg.TickMs = 10
	cfg.ElectionMs = 100
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	cfg.LogLevel = "error"
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return fmt.Errorf("start etcd: %w", err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(30 * time.Second):
		e.Close()
		return fmt.Errorf("etcd did not become ready in 30s")
	}
	s.Etcd = e
	// Pin the real addresses so a restart reuses them.
	cu, _ := url.Parse("http://" + e.Clients[0].Addr().String())
	pu, _ := url.Parse("http://" + e.Peers[0].Addr().String())
	s.clients, s.peers = []url.URL{*cu}, []url.URL{*pu}
	return nil
}

// Addr is the client address (host:port).
func (s *Server) Addr() string { return s.clients[0].Host }

// Endpoint is the client URL.
func (s *Server) Endpoint() string { return s.clients[0].String() }

// Stop stops the server, keeping its data.
func (s *Server) Stop() {
	if s.Etcd != nil {
		s.Etcd.Close()
		s.Etcd = nil
	}
}

// Restart starts a stopped server again on the same addresses and data.
func (s *Server) Restart() error {
	s.Stop()
	return s.start()
}

// Close stops the server and removes its data directory.
func (s *Server) Close() {
	s.Stop()
	os.RemoveAll(s.dir)
}

// Client returns a new client of the server.
func (s *Server) Client() (*clientv3.Client, error) {
	return clientv3.New(clientv3.Config{
		Endpoints:   []string{s.Endpoint()},
		DialTimeout: 5 * time.Second,
		Logger:      zap.NewNop(),
	})
}
