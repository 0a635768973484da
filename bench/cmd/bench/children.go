package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/meshd/meshd/bench"
	"github.com/meshd/meshd/pkg/etcdtest"
)

// serveChild runs the child role args name (serve-etcd, grpc-proxy,
// passive-nodes), if they name one: the benchmark runs its etcd, gRPC
// proxy and passive nodes as children of this binary so that their CPU is
// measured apart from the agents'.
func serveChild(args []string) (bool, error) {
	if len(args) == 0 {
		return false, nil
	}
	switch args[0] {
	case "serve-etcd":
		return true, serveEtcd(args[1:])
	case "grpc-proxy":
		return true, serveGRPCProxy(args[1:])
	case "passive-nodes":
		return true, servePassive(args[1:])
	}
	return false, nil
}

// childProc is a child process of this binary (serve-etcd,
// passive-nodes): it runs until its stdin closes.
type childProc struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
}

// startChild runs this binary with args and waits for the child's first
// line on stdout, which it returns (the child prints it once ready).
func startChild(args ...string) (*childProc, string, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, "", err
	}
	cmd := exec.Command(self, args...)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdin, err := cmd.StdinPipe()
	if err != nil {
		return nil, "", err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, "", err
	}
	if err := cmd.Start(); err != nil {
		return nil, "", err
	}
	line, err := bufio.NewReader(stdout).ReadString('\n')
	if err != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		return nil, "", fmt.Errorf("%s child: %w", args[0], err)
	}
	return &childProc{cmd: cmd, stdin: stdin}, strings.TrimSpace(line), nil
}

func (p *childProc) stop() {
	p.stdin.Close()
	done := make(chan struct{})
	go func() { _ = p.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-done
	}
}

// etcdProc is the benchmark's etcd, a child process running serve-etcd.
type etcdProc struct {
	*childProc
	endpoint string
}

func startEtcd(ctx context.Context, dir string) (*etcdProc, error) {
	p, endpoint, err := startChild("serve-etcd", dir)
	if err != nil {
		return nil, err
	}
	return &etcdProc{childProc: p, endpoint: endpoint}, nil
}

// serveGRPCProxy is the grpc-proxy child: etcd's gRPC proxy in front of
// the etcd at ENDPOINT; it prints its own endpoint and serves until stdin
// closes.
func serveGRPCProxy(args []string) error {
	if len(args) != 1 {
		return errors.New("usage: bench grpc-proxy ENDPOINT")
	}
	// The proxy's warnings and errors (a client's watch stream it cancels,
	// an upstream it cannot reach) go to stderr, as etcd's own would.
	cfg := zap.NewProductionConfig()
	cfg.Level = zap.NewAtomicLevelAt(zap.WarnLevel)
	lg, err := cfg.Build()
	if err != nil {
		return err
	}
	p, err := bench.StartGRPCProxy(args[0], lg)
	if err != nil {
		return err
	}
	defer p.Close()
	fmt.Println(p.Endpoint)
	_, _ = io.Copy(io.Discard, os.Stdin)
	return nil
}

// servePassive is the passive-nodes child: it registers N idle nodes
// (bench.RegisterPassive) against the etcd at ENDPOINT, prints "ready",
// and holds their watches until stdin closes.
func servePassive(args []string) error {
	if len(args) != 2 {
		return errors.New("usage: bench passive-nodes ENDPOINT N")
	}
	n, err := strconv.Atoi(args[1])
	if err != nil || n < 1 {
		return fmt.Errorf("passive-nodes: bad count %q", args[1])
	}
	stop, err := bench.RegisterPassive(context.Background(), func() (*clientv3.Client, error) { return newClient(args[0]) }, n)
	if err != nil {
		return err
	}
	defer stop()
	fmt.Println("ready")
	_, _ = io.Copy(io.Discard, os.Stdin)
	return nil
}

// serveEtcd is the child: an etcd on 127.0.0.1 until stdin closes.
func serveEtcd(args []string) error {
	if len(args) != 1 {
		return errors.New("usage: bench serve-etcd DIR")
	}
	s, err := etcdtest.Start(etcdtest.Options{Dir: args[0]})
	if err != nil {
		return err
	}
	defer s.Close()
	fmt.Println(s.Endpoint())
	_, _ = io.Copy(io.Discard, os.Stdin)
	return nil
}
