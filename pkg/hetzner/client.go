package hetzner

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/hetznercloud/hcloud-go/v2/hcloud"
	"github.com/hetznercloud/hcloud-go/v2/hcloud/schema"

	"github.com/meshd/meshd/pkg/backoff"
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
// hcloud-go's own retry handler is switched off and replaced by this
// transport, which follows the same policy (hcloud-go v2.52.0,
// client_handler_retry.go retryPolicy: the error codes conflict,
// rate_limit_exceeded, bad_gateway and timeout, the statuses 502 and 504,
// and network timeouts; backoff as ExponentialBackoffWithOpts{Base: 1s,
// Multiplier: 2, Cap: 1m, Jitter: true}) and adds two things: a
// connection reset or a connection closed before the answer is retried
// like a timeout, and a 429 waits for the API's RateLimit-Reset header
// (the API sends no Retry-After) instead of a blind backoff.
type RetryOptions struct {
	// MaxRetries is how many times one request is retried (default 5).
	MaxRetries int
	// Base is the first backoff; it doubles on each retry up to a
	// minute, with full jitter above Base (default 1s).
	Base time.Duration
	// MaxRetryAfter is the longest a 429 waits; a longer wait fails the
	// request with the API's error (default 2m).
	MaxRetryAfter time.Duration
	// Sleep waits d or until ctx ends (default: a timer). Tests record
	// the waits through it.
	Sleep func(ctx context.Context, d time.Duration) error
	// Rand returns a number in [0, 1) for jitter (default math/rand/v2).
	Rand func() float64
	// Now is the clock RateLimit-Reset is compared with (default
	// time.Now).
	Now func() time.Time
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

// NewRetryTransport wraps base (nil: http.DefaultTransport) with the
// retries RetryOptions describes.
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
		o.Sleep = backoff.Sleep
	}
	if o.Rand == nil {
		o.Rand = rand.Float64
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &retryTransport{base: base, o: o}
}

type retryTransport struct {
	base http.RoundTripper
	o    RetryOptions
}

func (t *retryTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	replayable := req.Body == nil || req.Body == http.NoBody || req.GetBody != nil
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
			if req.Context().Err() != nil || attempt >= t.o.MaxRetries || !replayable || !retryableNetError(err) {
				return nil, err
			}
			if err := t.o.Sleep(req.Context(), t.backoff(attempt)); err != nil {
				return nil, err
			}
			continue
		}
		if attempt >= t.o.MaxRetries || !replayable {
			return resp, nil
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

// retryableNetError reports whether a transport error is worth another
// attempt: a timeout (hcloud-go's policy), or a connection the other end
// reset or closed before answering.
func retryableNetError(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE) ||
		errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF)
}

// backoff is hcloud-go's ExponentialBackoffWithOpts{Base, Multiplier: 2,
// Cap: 1m, Jitter: true}: Base*2^attempt capped at a minute, then a
// uniformly random point between Base and that.
func (t *retryTransport) backoff(attempt int) time.Duration {
	base := t.o.Base.Seconds()
	b := min(base*math.Pow(2, float64(attempt)), time.Minute.Seconds())
	b = (b-base)*t.o.Rand() + base
	return time.Duration(b * float64(time.Second))
}

// decide says whether and after how long resp should be retried. It may
// replace resp.Body (after peeking at it) with an equivalent reader.
func (t *retryTransport) decide(resp *http.Response, attempt int) (time.Duration, bool, error) {
	if resp.StatusCode < 400 {
		return 0, false, nil
	}
	if resp.StatusCode == http.StatusTooManyRequests {
		return t.rateLimitWait(resp.Header, attempt)
	}
	if resp.StatusCode == http.StatusBadGateway || resp.StatusCode == http.StatusGatewayTimeout {
		return t.backoff(attempt), true, nil
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	resp.Body.Close()
	resp.Body = io.NopCloser(bytes.NewReader(body))
	if err != nil {
		return 0, false, err
	}
	var e schema.ErrorResponse
	if json.Unmarshal(body, &e) != nil {
		return 0, false, nil
	}
	switch hcloud.ErrorCode(e.Error.Code) {
	case hcloud.ErrorCodeConflict, hcloud.ErrorCodeBadGateway, hcloud.ErrorCodeTimeout:
		return t.backoff(attempt), true, nil
	case hcloud.ErrorCodeRateLimitExceeded:
		return t.rateLimitWait(resp.Header, attempt)
	}
	return 0, false, nil
}

// rateLimitWait is how long a rate-limited request waits. The API sends
// RateLimit-Limit (requests per window), RateLimit-Remaining and
// RateLimit-Reset (the UNIX time at which the budget is full again; it
// refills at a constant rate). Waiting for the whole budget is wasteful,
// so the wait is the time one request takes to come back, (Reset - now) /
// (Limit - Remaining), at least a second and at most until Reset, plus up to half of it
// again as jitter so that parallel requests do not all return at once.
// Without the headers it backs off exponentially.
func (t *retryTransport) rateLimitWait(h http.Header, attempt int) (time.Duration, bool, error) {
	reset, err := strconv.ParseInt(strings.TrimSpace(h.Get("RateLimit-Reset")), 10, 64)
	if err != nil {
		return t.backoff(attempt), true, nil
	}
	until := max(time.Unix(reset, 0).Sub(t.o.Now()), 0)
	wait := until
	if limit, err := strconv.Atoi(strings.TrimSpace(h.Get("RateLimit-Limit"))); err == nil && limit > 0 {
		// Until Reset, Limit - Remaining requests come back.
		missing := limit
		if rem, err := strconv.Atoi(strings.TrimSpace(h.Get("RateLimit-Remaining"))); err == nil && rem >= 0 && rem < limit {
			missing = limit - rem
		}
		wait = min(max(until/time.Duration(missing), time.Second), until)
	}
	wait += time.Duration(float64(wait) / 2 * t.o.Rand())
	if wait > t.o.MaxRetryAfter {
		return 0, false, nil // let the caller see the API's error
	}
	return wait, true, nil
}
