package overlay

// The real-WireGuard tests run each node as a child process: this test
// binary re-executed with `ip netns exec <ns>`, so every thread, socket
// and TUN of the node lives in its namespace, exactly as meshd does. The
// child mounts a private tmpfs on /run/wireguard (ip netns exec gives it
// its own mount namespace) so the nodes' UAPI sockets do not collide.
// The parent drives it with one JSON command per line on stdin.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/sys/unix"

	"github.com/meshd/meshd/pkg/overlay/desired"
	"github.com/meshd/meshd/pkg/registry"
)

const (
	helperEnv = "MESHD_OVERLAY_TEST_HELPER"
	// privateRunEnv makes the helper mount a private /run/wireguard, as
	// the sandbox does for meshd.
	privateRunEnv = "MESHD_OVERLAY_TEST_PRIVATE_RUN"
)

func TestMain(m *testing.M) {
	// Detached userspace devices are this binary re-executed.
	MaybeRunDevice(os.Args[1:])
	if os.Getenv(helperEnv) == "1" {
		os.Exit(runHelper(os.Stdin, os.Stdout))
	}
	os.Exit(m.Run())
}

// helperCmd is one command to a node process.
type helperCmd struct {
	Op       string            `json:"op"`
	Options  *Options          `json:"options,omitempty"`
	Members  []registry.Member `json:"members,omitempty"`
	Revision int64             `json:"revision,omitempty"`
	Addr     string            `json:"addr,omitempty"`
	// Timeout of a ping (0: 2s).
	Timeout time.Duration `json:"timeout,omitempty"`
}

// helperReply is the answer to one command.
type helperReply struct {
	Err       string       `json:"err,omitempty"`
	Sent      int          `json:"sent,omitempty"`
	Lost      int          `json:"lost,omitempty"`
	PublicKey string       `json:"publicKey,omitempty"`
	Status    *Status      `json:"status,omitempty"`
	Peers     []PeerDetail `json:"peers,omitempty"`
	Plan      string       `json:"plan,omitempty"`
	// Metrics are the per-peer series a scrape returns: name -> peer -> value.
	Metrics map[string]map[string]float64 `json:"metrics,omitempty"`
}

func runHelper(in io.Reader, out io.Writer) int {
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	if os.Getenv(privateRunEnv) == "1" {
		if err := unix.Mount("none", "/run/wireguard", "tmpfs", 0, "mode=0755"); err != nil {
			fmt.Fprintf(os.Stderr, "helper: mount private /run/wireguard: %v\n", err)
			return 2
		}
	}
	var c *Component
	var opts Options
	// stop ends the component's Run (the agent's errgroup in meshd) and
	// waits for it, before Close.
	stop := func() {}
	enc := json.NewEncoder(out)
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	ctx := context.Background()
	for sc.Scan() {
		var cmd helperCmd
		var rep helperReply
		err := json.Unmarshal(sc.Bytes(), &cmd)
		if err == nil {
			err = func() error {
				if c == nil && cmd.Op != "new" && cmd.Op != "ping" && cmd.Op != "pings" && cmd.Op != "exit" {
					return errors.New("no component: send new first")
				}
				switch cmd.Op {
				case "new":
					opts = *cmd.Options
					nc, err := New(opts, log.With("node", opts.Self), nil)
					if err != nil {
						return err
					}
					c = nc
					rctx, cancel := context.WithCancel(ctx)
					ran := make(chan struct{})
					go func() { defer close(ran); nc.Run(rctx) }()
					stop = func() { cancel(); <-ran }
					rep.PublicKey = c.PublicKey()
				case "boot":
					return c.Boot(ctx)
				case "apply":
					return c.Apply(ctx, snapshotOf(cmd.Members, cmd.Revision))
				case "plan": // what Apply would still change: "" once converged
					want, err := desired.Compute(snapshotOf(cmd.Members, cmd.Revision), opts.Self, opts.params())
					if err != nil {
						return err
					}
					live, err := c.applier.Live(want.RouteTable)
					if err != nil {
						return err
					}
					if want.MTU == 0 {
						want.MTU = live.MTU // resolved by the applier from the uplink
					}
					rep.Plan = desired.Diff(live, want).String()
				case "status":
					now := time.Now()
					st := c.StatusNow(now)
					rep.Status = &st
					rep.Peers = c.PeerDetails(now)
				case "metrics": // scrape the per-peer collector
					reg := prometheus.NewRegistry()
					if err := reg.Register(peerCollector{c}); err != nil {
						return err
					}
					m, err := gatherPeers(reg)
					if err != nil {
						return err
					}
					rep.Metrics = m
				case "close":
					stop()
					err := c.Close()
					c = nil
					return err
				case "destroy":
					stop()
					err := c.Destroy()
					return errors.Join(err, c.Close())
				case "ping":
					if cmd.Timeout == 0 {
						cmd.Timeout = 2 * time.Second
					}
					return ping(cmd.Addr, cmd.Timeout)
				case "pings": // one echo every 20ms for Timeout, count losses
					end := time.Now().Add(cmd.Timeout)
					for time.Now().Before(end) {
						rep.Sent++
						if ping(cmd.Addr, 150*time.Millisecond) != nil {
							rep.Lost++
						}
						time.Sleep(20 * time.Millisecond)
					}
				case "exit":
					return nil
				default:
					return fmt.Errorf("unknown op %q", cmd.Op)
				}
				return nil
			}()
		}
		if err != nil {
			rep.Err = err.Error()
		}
		enc.Encode(rep)
		if cmd.Op == "exit" {
			return 0
		}
	}
	return 0
}

func snapshotOf(ms []registry.Member, rev int64) *registry.Snapshot {
	s := &registry.Snapshot{Revision: rev, Members: map[string]registry.Member{}}
	for _, m := range ms {
		s.Members[m.Name] = m
	}
	return s
}

// ping sends ICMP echo requests to addr until one is answered or timeout.
// The test machine has no ping binary; this is the same packet.
func ping(addr string, timeout time.Duration) error {
	dst, err := net.ResolveIPAddr("ip4", addr)
	if err != nil {
		return err
	}
	c, err := icmp.ListenPacket("ip4:icmp", "0.0.0.0")
	if err != nil {
		return fmt.Errorf("icmp socket: %w", err)
	}
	defer c.Close()
	id := os.Getpid() & 0xffff
	deadline := time.Now().Add(timeout)
	buf := make([]byte, 1500)
	for seq := 1; time.Now().Before(deadline); seq++ {
		msg := icmp.Message{Type: ipv4.ICMPTypeEcho, Body: &icmp.Echo{ID: id, Seq: seq, Data: []byte("meshd")}}
		b, _ := msg.Marshal(nil)
		if _, err := c.WriteTo(b, dst); err != nil {
			time.Sleep(50 * time.Millisecond) // no route yet
			continue
		}
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				break // timed out: send the next echo
			}
			rm, err := icmp.ParseMessage(1, buf[:n])
			if err != nil || rm.Type != ipv4.ICMPTypeEchoReply || from.String() != dst.String() {
				continue
			}
			if e, ok := rm.Body.(*icmp.Echo); ok && e.ID == id {
				return nil
			}
		}
	}
	return fmt.Errorf("no echo reply from %s within %v", addr, timeout)
}

// node is the parent's handle on one helper process.
type node struct {
	name string
	ns   string
	cmd  *exec.Cmd
	in   io.WriteCloser
	out  *bufio.Scanner
	// logPath collects the node's stderr (and its device process's).
	logPath string
}

// logText returns the node's log, for failure messages.
func (n *node) logText() string {
	b, _ := os.ReadFile(n.logPath)
	return string(b)
}

func (n *node) do(t testing.TB, cmd helperCmd) helperReply {
	t.Helper()
	rep, err := n.try(cmd)
	if err != nil {
		t.Fatalf("%v\nnode log:\n%s", err, n.logText())
	}
	return rep
}

// try sends one command and reads the reply; unlike do it may run on any
// goroutine.
func (n *node) try(cmd helperCmd) (helperReply, error) {
	b, _ := json.Marshal(cmd)
	if _, err := n.in.Write(append(b, '\n')); err != nil {
		return helperReply{}, fmt.Errorf("%s: send %s: %w", n.name, cmd.Op, err)
	}
	if !n.out.Scan() {
		return helperReply{}, fmt.Errorf("%s: no reply to %s (helper died?)", n.name, cmd.Op)
	}
	var rep helperReply
	if err := json.Unmarshal(n.out.Bytes(), &rep); err != nil {
		return helperReply{}, fmt.Errorf("%s: bad reply %q: %w", n.name, n.out.Text(), err)
	}
	return rep, nil
}

// must runs cmd and fails the test on an error reply.
func (n *node) must(t testing.TB, cmd helperCmd) helperReply {
	t.Helper()
	rep := n.do(t, cmd)
	if rep.Err != "" {
		t.Fatalf("%s: %s: %s\nnode log:\n%s", n.name, cmd.Op, rep.Err, n.logText())
	}
	return rep
}
