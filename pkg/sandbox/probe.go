package sandbox

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// ServeDemo serves the demo app inside the node's namespace on
// 0.0.0.0:port: an HTTP server answering "demo from <node>". The listener
// lives in the namespace; the server runs in this process until teardown.
func (n *Node) ServeDemo(port int) error {
	_, err := n.ServeDemoAt(netip.AddrPortFrom(netip.IPv4Unspecified(), uint16(port)))
	return err
}

// ServeDemoAt serves the demo app inside the node's namespace on addr
// only (its overlay address, say, as an app in nix-infra's layout binds),
// until stop (the app dying) or teardown.
func (n *Node) ServeDemoAt(addr netip.AddrPort) (stop func(), err error) {
	l, err := listenIn(n.NS, addr.String())
	if err != nil {
		return nil, fmt.Errorf("demo server on %s: %w", n.Name, err)
	}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "demo from %s\n", n.Name)
		}),
		ReadHeaderTimeout: 5 * time.Second,
	}
	go func() { _ = srv.Serve(l) }()
	stop = func() { srv.Close() }
	n.addCloser(stop)
	return stop, nil
}

// DemoBody is what the demo server on node answers.
func DemoBody(node string) string { return "demo from " + node + "\n" }

// HTTPGet fetches url from inside the node's namespace (so 127.0.0.1 is the
// node's loopback, where its HAProxy listens) and returns the body and the
// request's latency.
func (n *Node) HTTPGet(ctx context.Context, url string) (string, time.Duration, error) {
	start := time.Now()
	b, err := n.Fetch(ctx, url, 4096)
	return string(b), time.Since(start), err
}

// Fetch GETs url from inside the node's namespace (no keep-alive) and
// returns at most limit bytes of the body; a status other than 200 is an
// error (with the body).
func (n *Node) Fetch(ctx context.Context, url string, limit int64) ([]byte, error) {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return dialIn(ctx, n.NS, network, addr)
		},
		DisableKeepAlives: true,
	}
	defer tr.CloseIdleConnections()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return nil, err
	}
	return readAnswer(resp, limit)
}

// readAnswer reads at most limit bytes of resp's body and closes it; a
// status other than 200 is an error (with the body).
func readAnswer(resp *http.Response, limit int64) ([]byte, error) {
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, limit))
	if err != nil {
		return b, err
	}
	if resp.StatusCode != http.StatusOK {
		return b, fmt.Errorf("GET %s: %s", resp.Request.URL, resp.Status)
	}
	return b, nil
}

// PollHTTP GETs url from inside the node's namespace every interval (a
// fresh connection each time, as a client of 127.0.0.1:<port> makes one)
// until done says the answer is the one awaited, and returns when that
// answer arrived. done gets the body and nil for a 200, else the error.
// Each GET is bounded by timeout. The whole poll runs on one OS thread
// that stays in the namespace, and each request is written and parsed
// over the bare connection: a probe costs a connection and a request,
// not a namespace switch and an HTTP transport, so polling several nodes
// every few milliseconds loads the machine it measures as little as it
// can. The thread leaves the namespace when the poll ends (enterNetns
// says why it must not end with it).
func (n *Node) PollHTTP(ctx context.Context, url string, interval, timeout time.Duration, done func(body string, err error) bool) (time.Time, error) {
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return time.Time{}, err
	}
	req.Close = true
	host := req.URL.Host
	if req.URL.Port() == "" {
		host = net.JoinHostPort(req.URL.Hostname(), "80")
	}
	res := make(chan pollResult, 1)
	go func() {
		leave, err := enterNetns(n.NS)
		if err != nil {
			res <- pollResult{err: err}
			return
		}
		r := n.poll(ctx, req, host, interval, timeout, done)
		if err := leave(); err != nil {
			res <- pollResult{err: errors.Join(r.err, err)}
			select {} // keep the thread out of use (enterNetns)
		}
		res <- r
	}()
	r := <-res
	return r.t, r.err
}

type pollResult struct {
	t   time.Time
	err error
}

// poll is PollHTTP's loop, on a thread already in the namespace.
func (n *Node) poll(ctx context.Context, req *http.Request, host string, interval, timeout time.Duration, done func(string, error) bool) pollResult {
	var last error
	for {
		body, at, err := getOnce(ctx, req, host, timeout)
		if done(body, err) {
			if at.IsZero() {
				at = time.Now()
			}
			return pollResult{t: at}
		}
		last = err
		select {
		case <-ctx.Done():
			return pollResult{err: fmt.Errorf("%s: %s: still not as awaited (last answer: %v): %w", n.Name, req.URL, last, ctx.Err())}
		case <-time.After(interval):
		}
	}
}

// getOnce sends req over a new connection to host and reads the answer
// (at most 4 KiB of body); a status other than 200 is an error. at is
// when the answer's last bytes reached the socket, by the kernel's
// receive timestamp (zero when there was no answer): the time a client
// on the node had it, not when this process, on the same busy cores, got
// to read it.
func getOnce(ctx context.Context, req *http.Request, host string, timeout time.Duration) (body string, at time.Time, err error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", host)
	if err != nil {
		return "", time.Time{}, err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	tc, ok := conn.(*net.TCPConn)
	if !ok {
		return "", time.Time{}, fmt.Errorf("GET %s: not a TCP connection", req.URL)
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return "", time.Time{}, err
	}
	if err := rxTimestamps(raw); err != nil {
		return "", time.Time{}, fmt.Errorf("GET %s: %w", req.URL, err)
	}
	if err := req.Write(conn); err != nil {
		return "", time.Time{}, err
	}
	// The request says "Connection: close": the answer ends where the
	// connection does.
	data, at, err := readStamped(raw, 64<<10)
	if err != nil {
		return "", time.Time{}, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(bytes.NewReader(data)), req)
	if err != nil {
		return "", time.Time{}, err
	}
	b, err := readAnswer(resp, 4096)
	return string(b), at, err
}

// readStamped reads raw until EOF (at most limit bytes) and returns what
// it read with the kernel's receive timestamp of the last read that
// returned data (zero when none did).
func readStamped(raw syscall.RawConn, limit int) ([]byte, time.Time, error) {
	var (
		out []byte
		at  time.Time
		buf = make([]byte, 4096)
		oob = make([]byte, 128)
	)
	for {
		var n, oobn int
		var rerr error
		err := raw.Read(func(fd uintptr) bool {
			n, oobn, _, _, rerr = unix.Recvmsg(int(fd), buf, oob, 0)
			return rerr != unix.EAGAIN
		})
		if err == nil {
			err = rerr
		}
		if err != nil {
			return out, at, err
		}
		if n == 0 {
			return out, at, nil
		}
		out = append(out, buf[:n]...)
		if t, ok := rxTimestamp(oob[:oobn]); ok {
			at = t
		}
		if len(out) > limit {
			return out, at, fmt.Errorf("answer longer than %d bytes", limit)
		}
	}
}

// Ping sends one ICMP echo from inside the node's namespace and waits for
// the reply until ctx ends (or 1 s).
func (n *Node) Ping(ctx context.Context, dst netip.Addr) (time.Duration, error) {
	conn, err := n.icmpConn()
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	id, seq := uint16(os.Getpid()), uint16(n.c.pingSeq.Add(1))
	deadline := time.Now().Add(time.Second)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	_ = conn.SetDeadline(deadline)
	start := time.Now()
	if _, err := conn.WriteTo(echoRequest(id, seq), &net.IPAddr{IP: dst.AsSlice()}); err != nil {
		return 0, fmt.Errorf("ping %s from %s: %w", dst, n.Name, err)
	}
	at, err := readEchoReply(conn, dst, id, func(s uint16) bool { return s == seq })
	if err != nil {
		return 0, fmt.Errorf("ping %s from %s: %w", dst, n.Name, err)
	}
	return at.Sub(start), nil
}

// PingUntilReply sends an ICMP echo to dst from inside the node's
// namespace every interval, all over one socket, until a reply to any of
// them arrives, and returns when it arrived. No echo is waited for before
// the next is sent, and the reply to an early one (queued by WireGuard
// until its handshake completed) counts: the moment dst first answers is
// measured, to within interval, rather than to within a per-echo timeout.
// An echo the node cannot send yet (no route) is tried again with the next.
func (n *Node) PingUntilReply(ctx context.Context, dst netip.Addr, interval time.Duration) (time.Time, error) {
	conn, err := n.icmpConn()
	if err != nil {
		return time.Time{}, err
	}
	defer conn.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { _ = conn.SetReadDeadline(time.Now()) })
	defer stop()
	id := uint16(os.Getpid())
	var (
		mu      sync.Mutex
		sent    = map[uint16]bool{}
		sendErr error
	)
	go func() {
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			seq := uint16(n.c.pingSeq.Add(1))
			mu.Lock()
			sent[seq] = true
			mu.Unlock()
			_, err := conn.WriteTo(echoRequest(id, seq), &net.IPAddr{IP: dst.AsSlice()})
			mu.Lock()
			sendErr = err
			mu.Unlock()
			select {
			case <-ctx.Done():
				return
			case <-t.C:
			}
		}
	}()
	at, err := readEchoReply(conn, dst, id, func(s uint16) bool {
		mu.Lock()
		defer mu.Unlock()
		return sent[s]
	})
	if err != nil {
		mu.Lock()
		defer mu.Unlock()
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return time.Time{}, fmt.Errorf("ping %s from %s: no reply (last send error: %v): %w", dst, n.Name, sendErr, err)
	}
	return at, nil
}

// icmpConn opens an ICMP socket in the node's namespace (the socket stays
// there whichever thread uses it), with receive timestamps on.
func (n *Node) icmpConn() (*net.IPConn, error) {
	var conn net.PacketConn
	if err := inNetns(n.NS, func() error {
		var err error
		conn, err = net.ListenPacket("ip4:icmp", "0.0.0.0")
		return err
	}); err != nil {
		return nil, fmt.Errorf("icmp socket in %s: %w", n.NS, err)
	}
	ic := conn.(*net.IPConn)
	raw, err := ic.SyscallConn()
	if err == nil {
		err = rxTimestamps(raw)
	}
	if err != nil {
		ic.Close()
		return nil, fmt.Errorf("icmp socket in %s: %w", n.NS, err)
	}
	return ic, nil
}

// echoRequest is an ICMP echo request with id and seq.
func echoRequest(id, seq uint16) []byte {
	msg := make([]byte, 16)
	msg[0] = 8 // echo request
	binary.BigEndian.PutUint16(msg[4:], id)
	binary.BigEndian.PutUint16(msg[6:], seq)
	copy(msg[8:], "meshdsbx")
	binary.BigEndian.PutUint16(msg[2:], icmpChecksum(msg))
	return msg
}

// readEchoReply reads conn until an echo reply from dst with id and a
// sequence number ours accepts arrives, or the read fails (deadline). It
// returns when the reply reached the node: the kernel's receive time
// (SO_TIMESTAMPNS, set by icmpConn), not when this process got to read
// it, so a harness busy on the same cores does not add its own delay.
func readEchoReply(conn *net.IPConn, dst netip.Addr, id uint16, ours func(seq uint16) bool) (time.Time, error) {
	buf := make([]byte, 1500)
	oob := make([]byte, 128)
	for {
		m, oobn, _, from, err := conn.ReadMsgIP(buf, oob)
		if err != nil {
			return time.Time{}, err
		}
		// Unlike ReadFrom, ReadMsgIP leaves the IPv4 header on.
		msg := buf[:m]
		if m >= 20 && msg[0]>>4 == 4 {
			if hl := int(msg[0]&0x0f) * 4; hl >= 20 && hl <= m {
				msg = msg[hl:]
			}
		}
		if m = len(msg); m < 8 || msg[0] != 0 || binary.BigEndian.Uint16(msg[4:]) != id || !ours(binary.BigEndian.Uint16(msg[6:])) {
			continue
		}
		if from != nil && from.IP.Equal(dst.AsSlice()) {
			if t, ok := rxTimestamp(oob[:oobn]); ok {
				return t, nil
			}
			return time.Now(), nil
		}
	}
}

// rxTimestamps turns on the kernel's receive timestamps (SO_TIMESTAMPNS)
// on a socket: each read's control message then carries when the data
// reached it (rxTimestamp).
func rxTimestamps(raw syscall.RawConn) error {
	var serr error
	if err := raw.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_TIMESTAMPNS, 1) }); err != nil {
		return fmt.Errorf("receive timestamps: %w", err)
	}
	if serr != nil {
		return fmt.Errorf("receive timestamps: %w", serr)
	}
	return nil
}

// keepTimestamps opens a socket with receive timestamps on and returns it,
// to be closed when no more timestamps are wanted. The kernel stamps
// received packets only while some socket asks for timestamps, and turns
// that on (and off, after the last such socket closed) from deferred
// work: a probe's own short-lived socket could miss the stamps of its
// first packets (seen once: a poll's answer without one). This one keeps
// stamping on for every probe.
func keepTimestamps() (io.Closer, error) {
	conn, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("timestamping socket: %w", err)
	}
	raw, err := conn.(*net.UDPConn).SyscallConn()
	if err == nil {
		err = rxTimestamps(raw)
	}
	if err != nil {
		conn.Close()
		return nil, fmt.Errorf("timestamping socket: %w", err)
	}
	return conn, nil
}

// rxTimestamp finds the SCM_TIMESTAMPNS control message in oob.
func rxTimestamp(oob []byte) (time.Time, bool) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return time.Time{}, false
	}
	for _, m := range msgs {
		if m.Header.Level == unix.SOL_SOCKET && m.Header.Type == unix.SO_TIMESTAMPNS && len(m.Data) >= 16 {
			sec := int64(binary.NativeEndian.Uint64(m.Data[0:8]))
			nsec := int64(binary.NativeEndian.Uint64(m.Data[8:16]))
			return time.Unix(sec, nsec), true
		}
	}
	return time.Time{}, false
}

func icmpChecksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}

// WGPeer is one WireGuard peer as `wg show dump` reports it.
type WGPeer struct {
	PublicKey  string
	Endpoint   string
	AllowedIPs string
	// Handshake is the time of the latest handshake (zero: none yet).
	Handshake time.Time
}

// WGPeers reads the node's WireGuard peers with `wg show <iface> dump`
// in meshd's namespaces.
func (n *Node) WGPeers(ctx context.Context) ([]WGPeer, error) {
	out, err := n.Exec(ctx, "wg", "show", n.Config.Overlay.Interface, "dump")
	if err != nil {
		return nil, err
	}
	return parseWGDump(string(out))
}

// parseWGDump parses `wg show IFACE dump`: one interface line, then one
// line per peer (public-key preshared-key endpoint allowed-ips
// latest-handshake rx tx keepalive).
func parseWGDump(s string) ([]WGPeer, error) {
	sc := bufio.NewScanner(strings.NewReader(s))
	var peers []WGPeer
	first := true
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		f := strings.Split(line, "\t")
		if first {
			first = false
			if len(f) != 4 {
				return nil, fmt.Errorf("wg dump: interface line has %d fields", len(f))
			}
			continue
		}
		if len(f) != 8 {
			return nil, fmt.Errorf("wg dump: peer line has %d fields", len(f))
		}
		p := WGPeer{PublicKey: f[0], Endpoint: f[2], AllowedIPs: f[3]}
		if sec, err := strconv.ParseInt(f[4], 10, 64); err == nil && sec > 0 {
			p.Handshake = time.Unix(sec, 0)
		}
		peers = append(peers, p)
	}
	if first {
		return nil, errors.New("wg dump: empty")
	}
	return peers, nil
}
