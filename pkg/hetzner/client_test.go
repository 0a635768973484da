package hetzner_test

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
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
	date := time.Now().Add(90 * time.Second).UTC().Format(http.TimeFormat)
	tests := []struct {
		name      string
		answers   []func(http.ResponseWriter)
		wantCode  int
		wantWaits []time.Duration // exact, or -1 for "any backoff"
		requests  int
	}{
		{"429 honours Retry-After seconds", []func(http.ResponseWriter){status(429, "Retry-After", "3"), status(200)}, 200, []time.Duration{3 * time.Second}, 2},
		{"429 honours Retry-After date", []func(http.ResponseWriter){status(429, "Retry-After", date), status(200)}, 200, []time.Duration{-1}, 2},
		{"429 without header backs off", []func(http.ResponseWriter){status(429), status(200)}, 200, []time.Duration{time.Second}, 2},
		{"429 asking too long is returned", []func(http.ResponseWriter){status(429, "Retry-After", "3600")}, 429, nil, 1},
		{"503 then 502 then ok", []func(http.ResponseWriter){status(503), status(502), status(200)}, 200, []time.Duration{time.Second, 2 * time.Second}, 3},
		{"conflict is retried", []func(http.ResponseWriter){status(409), status(201)}, 201, []time.Duration{time.Second}, 2},
		{"422 is not retried", []func(http.ResponseWriter){status(422), status(200)}, 422, nil, 1},
		{"gives up after MaxRetries", []func(http.ResponseWriter){status(504)}, 504, []time.Duration{time.Second, 2 * time.Second, 4 * time.Second}, 4},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv, bodies := scripted(t, tt.answers...)
			var sl sleeps
			rt := hetzner.NewRetryTransport(nil, hetzner.RetryOptions{MaxRetries: 3, Sleep: sl.sleep})
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
			got := sl.all()
			if len(got) != len(tt.wantWaits) {
				t.Fatalf("waits %v, want %v", got, tt.wantWaits)
			}
			for i, w := range tt.wantWaits {
				if w == -1 {
					if got[i] < 80*time.Second || got[i] > 91*time.Second {
						t.Errorf("wait %v, want about 90s from the date", got[i])
					}
				} else if got[i] != w {
					t.Errorf("wait %d = %v, want %v", i, got[i], w)
				}
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

func TestRetryTransportStopsWithContext(t *testing.T) {
	srv, _ := scripted(t, status(429, "Retry-After", "30"))
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
