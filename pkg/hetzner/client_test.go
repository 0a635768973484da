package hetzner_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/meshd/meshd/pkg/hetzner"
)

// scripted answers each request with the next of a list of responses and
// records the bodies it received.
func scripted(t *testing.T, answers ...func(w http.ResponseWriter)) (*httptest.Server, *[]string) {
	var n atomic.Int32
	var bodies []string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		bodies = append(bodies, string(b))
		i := int(n.Add(1)) - 1
		if i >= len(answers) {
			i = len(answers) - 1
		}
		answers[i](w)
	}))
	t.Cleanup(srv.Close)
	return srv, &bodies
}

func status(code int, header ...string) func(w http.ResponseWriter) {
	return func(w http.ResponseWriter) {
		for i := 0; i+1 < len(header); i += 2 {
			w.Header().Set(header[i], header[i+1])
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(code)
		if code == http.StatusConflict {
			io.WriteString(w, `{"error":{"code":"conflict","message":"changed"}}`)
		} else {
			io.WriteString(w, `{}`)
		}
	}
}

func TestRetryTransport(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	reset := func(d time.Duration) string { return strconv.FormatInt(now.Add(d).Unix(), 10) }
	tests := []struct {
		name      string
		answers   []func(http.ResponseWriter)
		rand      float64
		wantCode  int
		wantWaits []time.Duration
		requests  int
	}{
		// 3600 requests per hour, empty: one request comes back per second.
		{"429 waits for one request of RateLimit-Reset", []func(http.ResponseWriter){
			status(429, "RateLimit-Limit", "3600", "RateLimit-Remaining", "0", "RateLimit-Reset", reset(time.Hour)), status(200)},
			0, 200, []time.Duration{time.Second}, 2},
		{"429 wait has up to half again of jitter", []func(http.ResponseWriter){
			status(429, "RateLimit-Limit", "60", "RateLimit-Remaining", "0", "RateLimit-Reset", reset(10*time.Minute)), status(200)},
			0.5, 200, []time.Duration{12500 * time.Millisecond}, 2},
		{"429 counts what remains", []func(http.ResponseWriter){
			status(429, "RateLimit-Limit", "100", "RateLimit-Remaining", "90", "RateLimit-Reset", reset(100*time.Second)), status(200)},
			0, 200, []time.Duration{10 * time.Second}, 2},
		{"429 never waits past the reset", []func(http.ResponseWriter){
			status(429, "RateLimit-Limit", "1", "RateLimit-Remaining", "0", "RateLimit-Reset", reset(3*time.Second)), status(200)},
			0, 200, []time.Duration{3 * time.Second}, 2},
		{"429 ignores Retry-After, which the API does not send", []func(http.ResponseWriter){
			status(429, "Retry-After", "30"), status(200)}, 0, 200, []time.Duration{time.Second}, 2},
		{"429 asking too long is returned", []func(http.ResponseWriter){
			status(429, "RateLimit-Limit", "1", "RateLimit-Remaining", "0", "RateLimit-Reset", reset(time.Hour))}, 0, 429, nil, 1},
		{"502 then 504 then ok, backoff with full jitter", []func(http.ResponseWriter){status(502), status(504), status(200)},
			1, 200, []time.Duration{time.Second, 2 * time.Second}, 3},
		{"503 is not retried, like hcloud-go", []func(http.ResponseWriter){status(503), status(200)}, 0, 503, nil, 1},
		{"conflict is retried", []func(http.ResponseWriter){status(409), status(201)}, 0, 201, []time.Duration{time.Second}, 2},
		{"422 is not retried", []func(http.ResponseWriter){status(422), status(200)}, 0, 422, nil, 1},
		{"gives up after MaxRetries", []func(http.ResponseWriter){status(504)}, 1, 504,
			[]time.Duration{time.Second, 2 * time.Second, 4 * time.Second}, 4},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv, bodies := scripted(t, tt.answers...)
			var sl sleeps
			rt := hetzner.NewRetryTransport(nil, hetzner.RetryOptions{MaxRetries: 3, Sleep: sl.sleep,
				Rand: func() float64 { return tt.rand }, Now: func() time.Time { return now }})
			req, _ := http.NewRequest("POST", srv.URL, bytes.NewReader([]byte(`{"name":"n1"}`)))
			resp, err := rt.RoundTrip(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tt.wantCode {
				t.Errorf("status %d, want %d", resp.StatusCode, tt.wantCode)
			}
			if tt.wantCode == 409 && !strings.Contains(string(body), "conflict") {
				t.Errorf("peeked body not restored: %q", body)
			}
			if diff := cmp.Diff(tt.wantWaits, sl.all()); diff != "" {
				t.Errorf("waits (-want +got):\n%s", diff)
			}
			if len(*bodies) != tt.requests {
				t.Errorf("%d requests, want %d", len(*bodies), tt.requests)
			}
			for _, b := range *bodies {
				if b != `{"name":"n1"}` {
					t.Errorf("retried request body %q: not replayed", b)
				}
			}
		})
	}
}

// flaky fails its first n round trips with err, then passes them on.
type flaky struct {
	n   int
	err error
}

func (f *flaky) RoundTrip(r *http.Request) (*http.Response, error) {
	if f.n > 0 {
		f.n--
		return nil, f.err
	}
	return http.DefaultTransport.RoundTrip(r)
}

type timeoutErr struct{}

func (timeoutErr) Error() string   { return "i/o timeout" }
func (timeoutErr) Timeout() bool   { return true }
func (timeoutErr) Temporary() bool { return true }

func TestRetryTransportRetriesNetworkErrors(t *testing.T) {
	for _, tt := range []struct {
		name  string
		err   error
		retry bool
	}{
		{"timeout", &net.OpError{Op: "read", Net: "tcp", Err: timeoutErr{}}, true},
		{"connection reset", &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", syscall.ECONNRESET)}, true},
		{"closed before the answer", fmt.Errorf("read: %w", io.ErrUnexpectedEOF), true},
		{"certificate error is final", errors.New("x509: certificate signed by unknown authority"), false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			srv, bodies := scripted(t, status(200))
			var sl sleeps
			rt := hetzner.NewRetryTransport(&flaky{n: 2, err: tt.err}, hetzner.RetryOptions{Sleep: sl.sleep, Rand: func() float64 { return 0 }})
			req, _ := http.NewRequest("POST", srv.URL, bytes.NewReader([]byte(`{"name":"n1"}`)))
			resp, err := rt.RoundTrip(req)
			if !tt.retry {
				if err == nil || len(*bodies) != 0 || len(sl.all()) != 0 {
					t.Fatalf("err %v after %d requests and waits %v: want the error at once", err, len(*bodies), sl.all())
				}
				return
			}
			if err != nil {
				t.Fatalf("not retried: %v", err)
			}
			resp.Body.Close()
			if diff := cmp.Diff([]time.Duration{time.Second, time.Second}, sl.all()); diff != "" {
				t.Errorf("waits (-want +got):\n%s", diff)
			}
			if len(*bodies) != 1 || (*bodies)[0] != `{"name":"n1"}` {
				t.Errorf("bodies that arrived: %q", *bodies)
			}
		})
	}
}

func TestRetryTransportStopsWithContext(t *testing.T) {
	srv, _ := scripted(t, status(502))
	ctx, cancel := context.WithCancel(context.Background())
	rt := hetzner.NewRetryTransport(nil, hetzner.RetryOptions{Sleep: func(ctx context.Context, d time.Duration) error {
		cancel()
		return ctx.Err()
	}})
	req, _ := http.NewRequestWithContext(ctx, "GET", srv.URL, nil)
	if _, err := rt.RoundTrip(req); err == nil {
		t.Fatal("round trip survived a cancelled context")
	}
}

func TestNewClientRejectsBadTokens(t *testing.T) {
	for _, tok := range []string{"", "has space", "line\nbreak"} {
		_, err := hetzner.NewClient(hetzner.ClientOptions{Token: tok})
		if err == nil {
			t.Errorf("token %q accepted", tok)
		} else if tok != "" && strings.Contains(err.Error(), tok) {
			t.Errorf("error %q contains the token", err)
		}
	}
}

func TestParseLabels(t *testing.T) {
	got, err := hetzner.ParseLabels([]string{"team=infra,env=prod", "example.com/owner=ops"})
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(map[string]string{"team": "infra", "env": "prod", "example.com/owner": "ops"}, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	for _, bad := range []string{"novalue", "meshd/cluster=x", "k=bad value", "k=-x", "/k=v", "bad_prefix.com/k=v", "k=" + strings.Repeat("a", 64)} {
		if _, err := hetzner.ParseLabels([]string{bad}); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestParsePublicKey(t *testing.T) {
	line := sshKeyLine(7, "ops@laptop")
	pk, err := hetzner.ParsePublicKey(line + "\n")
	if err != nil {
		t.Fatal(err)
	}
	if pk.Comment != "ops@laptop" || pk.Line != line || len(pk.Fingerprint) != 47 {
		t.Errorf("parsed %+v", pk)
	}
	other, _ := hetzner.ParsePublicKey(sshKeyLine(8, "ops@laptop"))
	if other.Fingerprint == pk.Fingerprint {
		t.Error("two keys share a fingerprint")
	}
	fields := strings.Fields(line)
	for name, bad := range map[string]string{
		"private key":   "-----BEGIN OPENSSH PRIVATE KEY-----",
		"one field":     "ssh-ed25519",
		"bad base64":    "ssh-ed25519 !!!",
		"type mismatch": "ssh-rsa " + fields[1],
	} {
		if _, err := hetzner.ParsePublicKey(bad); err == nil {
			t.Errorf("%s accepted", name)
		}
	}
}

func TestTerminalProgressRedrawsInPlace(t *testing.T) {
	var b bytes.Buffer
	p := hetzner.NewProgress(&b, true)
	p.Server("b", "creating")
	p.Server("a", "creating")
	p.Server("b", "create_server 50%")
	p.Note("created firewall")
	out := b.String()
	// After the last redraw the screen shows the note, then a and b.
	if !strings.Contains(out, "\x1b[2A") {
		t.Errorf("no cursor-up to redraw the two-line block: %q", out)
	}
	last := out[strings.LastIndex(out, "\x1b[J")+len("\x1b[J"):]
	if want := "created firewall\na  creating\nb  create_server 50%\n"; last != want {
		t.Errorf("final screen %q, want %q", last, want)
	}
	var plain bytes.Buffer
	pp := hetzner.NewProgress(&plain, false)
	pp.Server("a", "creating")
	pp.Server("a", "created, running")
	if plain.String() != "a: creating\na: created, running\n" {
		t.Errorf("plain progress %q", plain.String())
	}
}
