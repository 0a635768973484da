package hetzner

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/hetznercloud/hcloud-go/v2/hcloud"
	"github.com/hetznercloud/hcloud-go/v2/hcloud/schema"
)

// ClientOptions configures the API client.
type ClientOptions struct {
	// Token is the API token. It is only ever put into the Authorization
	// header; nothing here logs or prints it.
	Token string
	// Endpoint overrides the API address (tests, proxies).
	Endpoint string
	// PollInterval is how often running actions are polled (default 1s).
	PollInterval time.Duration
	// Retry configures retries of rate-limited and failed requests.
	Retry RetryOptions
	// Transport is the underlying transport (default http.DefaultTransport).
	Transport http.RoundTripper
	// Version goes into the User-Agent.
	Version string
}

// RetryOptions configures the retrying transport.
//
// hcloud-go's own retry handler is switched off: it does not honour the
// Retry-After header of a 429 (it backs off on its own schedule), it only
// retries a 429 whose body carries the rate_limit_exceeded code, and it
// never retries a 503. This transport does all three and also retries
// the API's "conflict" code, which hcloud-go retried too.
type RetryOptions struct {
	// MaxRetries is how many times one request is retried (default 5).
	MaxRetries int
	// Base is the first backoff for 5xx and 409 conflict; it doubles on
	// each retry up to 30s (default 1s).
	Base time.Duration
	// MaxRetryAfter is the longest Retry-After honoured; a longer one
	// fails the request with the API's error (default 2m).
	MaxRetryAfter time.Duration
	// Sleep waits d or until ctx ends (default: a timer). Tests record
	// the waits through it.
	Sleep func(ctx context.Context, d time.Duration) error
}

// NewClient returns an hcloud client with the retrying transport and the
// poll interval set.
func NewClient(o ClientOptions) (*hcloud.Client, error) {
	if o.Token == "" {
		return nil, fmt.Errorf("%w: no API token: set HCLOUD_TOKEN or --token-file", ErrInvalid)
	}
	if strings.ContainsAny(o.Token, " \t\r\n") {
		// Do not echo the token: say what is wrong with it.
		return nil, fmt.Errorf("%w: the API token contains whitespace", ErrInvalid)
	}
	if o.PollInterval <= 0 {
		o.PollInterval = time.Second
	}
	if o.Transport == nil {
		// Bound each attempt; the whole request (retries and their waits
		// included) is bounded by the caller's context.
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.ResponseHeaderTimeout = time.Minute
		o.Transport = t
	}
	rt := NewRetryTransport(o.Transport, o.Retry)
	opts := []hcloud.ClientOption{
		hcloud.WithToken(o.Token),
		hcloud.WithHTTPClient(&http.Client{Transport: rt}),
		hcloud.WithPollOpts(hcloud.PollOpts{BackoffFunc: hcloud.ConstantBackoff(o.PollInterval)}),
		hcloud.WithRetryOpts(hcloud.RetryOpts{MaxRetries: 0}),
		hcloud.WithApplication("meshctl", o.Version),
	}
	if o.Endpoint != "" {
		opts = append(opts, hcloud.WithEndpoint(o.Endpoint))
	}
	return hcloud.NewClient(opts...), nil
}

// NewRetryTransport wraps base (nil: http.DefaultTransport) with retries
// of 429 (after Retry-After), 502/503/504 and 409 conflict.
func NewRetryTransport(base http.RoundTripper, o RetryOptions) http.RoundTripper {
	if base == nil {
		base = http.DefaultTransport
	}
	if o.MaxRetries == 0 {
		o.MaxRetries = 5
	}
	if o.Base <= 0 {
		o.Base = time.Second
	}
	if o.MaxRetryAfter <= 0 {
		o.MaxRetryAfter = 2 * time.Minute
	}
	if o.Sleep == nil {
		o.Sleep = sleepCtx
	}
	return &retryTransport{base: base, o: o}
}

type retryTransport struct {
	base http.RoundTripper
	o    RetryOptions
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

func (t *retryTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	for attempt := 0; ; attempt++ {
		r := req
		if attempt > 0 {
			r = req.Clone(req.Context())
			if req.Body != nil && req.Body != http.NoBody {
				body, err := req.GetBody()
				if err != nil {
					return nil, err
				}
				r.Body = body
			}
		}
		resp, err := t.base.RoundTrip(r)
		if err != nil {
			return nil, err
		}
		if attempt >= t.o.MaxRetries {
			return resp, nil
		}
		if req.Body != nil && req.Body != http.NoBody && req.GetBody == nil {
			return resp, nil // cannot replay the body
		}
		wait, retry, err := t.decide(resp, attempt)
		if err != nil || !retry {
			return resp, err
		}
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
		resp.Body.Close()
		if err := t.o.Sleep(req.Context(), wait); err != nil {
			return nil, err
		}
	}
}

// decide says whether and after how long resp should be retried. It may
// replace resp.Body (after peeking at it) with an equivalent reader.
func (t *retryTransport) decide(resp *http.Response, attempt int) (time.Duration, bool, error) {
	backoff := min(t.o.Base<<attempt, 30*time.Second)
	switch resp.StatusCode {
	case http.StatusTooManyRequests:
		d, ok := parseRetryAfter(resp.Header.Get("Retry-After"), time.Now())
		if !ok {
			return backoff, true, nil
		}
		if d > t.o.MaxRetryAfter {
			return 0, false, nil // let the caller see the API's error
		}
		return d, true, nil
	case http.StatusBadGateway, http.StatusServiceUnavailable, http.StatusGatewayTimeout:
		return backoff, true, nil
	case http.StatusConflict:
		body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
		resp.Body.Close()
		resp.Body = io.NopCloser(bytes.NewReader(body))
		if err != nil {
			return 0, false, err
		}
		var e schema.ErrorResponse
		if json.Unmarshal(body, &e) == nil && e.Error.Code == string(hcloud.ErrorCodeConflict) {
			return backoff, true, nil
		}
	}
	return 0, false, nil
}

// parseRetryAfter reads a Retry-After header: delay seconds or an HTTP
// date.
func parseRetryAfter(v string, now time.Time) (time.Duration, bool) {
	v = strings.TrimSpace(v)
	if v == "" {
		return 0, false
	}
	if s, err := strconv.Atoi(v); err == nil {
		if s < 0 {
			return 0, false
		}
		return time.Duration(s) * time.Second, true
	}
	if at, err := http.ParseTime(v); err == nil {
		return max(at.Sub(now), 0), true
	}
	return 0, false
}
