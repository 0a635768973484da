// Package hcloudfake is an in-memory HTTP fake of the Hetzner Cloud API for
// tests. It is a fake, not the API: it serves the few endpoints meshctl
// uses, keeps their state, and checks requests against the rules the API
// reference (docs.hetzner.cloud, "Hetzner Cloud API") documents, each rule
// citing its section (see rules.go). Requests are decoded into the fake's
// own request types, written from the reference's request bodies, not into
// hcloud-go's schema types, so a request hcloud-go can encode but the API
// rejects is rejected here too. Errors carry the documented codes, status
// codes and invalid_input details; every answer carries the RateLimit-*
// headers. It paginates with a small page size, finishes actions after a
// few polls, records every request, and injects faults on demand.
package hcloudfake

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hetznercloud/hcloud-go/v2/hcloud/schema"
)

// Request is one request the fake received, as recorded.
type Request struct {
	Method string
	Path   string
	Query  url.Values
	Body   []byte
	// Status is the status the fake answered with.
	Status int
}

// Fault makes the fake answer matching requests with an error instead of
// serving them.
type Fault struct {
	Method string
	Path   string
	// BodyContains, when set, must occur in the request body (e.g. a
	// server's name) for the fault to match.
	BodyContains string
	// Status, Code and Message are the error answer.
	Status  int
	Code    string
	Message string
	// Reset, when set, drops the connection without an answer, as a
	// reset or a proxy timeout looks to the client.
	Reset bool
	// Times is how often the fault fires (default 1; -1: always).
	Times int
}

// Server is the fake API.
type Server struct {
	// Token is the bearer token the fake accepts.
	Token string
	// PageSize is the largest page the fake returns (default 2).
	PageSize int
	// ActionPolls is how many polls an action stays running (default 2).
	ActionPolls int
	// CreateDelay holds each server create this long before answering,
	// so that tests can observe how many run at once.
	CreateDelay time.Duration
	// Now is the fake's clock: the rate limit refills by it and
	// deprecations are judged by it (default time.Now).
	Now func() time.Time

	srv *httptest.Server
	mux *http.ServeMux

	mu        sync.Mutex
	nextID    int64
	servers   map[int64]*schema.Server
	userData  map[int64]string
	actions   map[int64]*action
	sshKeys   map[int64]*schema.SSHKey
	networks  map[int64]*network
	firewalls map[int64]*firewall
	pgs       map[int64]*schema.PlacementGroup
	faults    []*Fault
	requests  []Request
	limit     rateLimit
	// failActions maps "command/server name" to the error the next
	// action of that command on that server ends with.
	failActions map[string]schema.ActionError
	creating    int // server creates being answered now
	maxCreating int
}

type action struct {
	a         schema.Action
	pollsLeft int
	fail      *schema.ActionError
	onDone    func()
	onFail    func()
}

// created is the fixed creation time of every resource: output stays
// reproducible.
var created = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

// New starts a fake for a test; it is closed when the test ends.
func New(t testing.TB, token string) *Server {
	t.Helper()
	s := &Server{
		Token: token, PageSize: 2, ActionPolls: 2, nextID: 100, Now: time.Now,
		servers: map[int64]*schema.Server{}, userData: map[int64]string{}, actions: map[int64]*action{},
		sshKeys: map[int64]*schema.SSHKey{}, networks: map[int64]*network{},
		firewalls: map[int64]*firewall{}, pgs: map[int64]*schema.PlacementGroup{},
		failActions: map[string]schema.ActionError{},
		limit:       rateLimit{limit: defaultRateLimit, remaining: defaultRateLimit},
	}
	s.mux = http.NewServeMux()
	s.routes()
	s.srv = httptest.NewServer(http.HandlerFunc(s.serve))
	t.Cleanup(s.srv.Close)
	return s
}

// URL is the endpoint to give hcloud.WithEndpoint.
func (s *Server) URL() string { return s.srv.URL }

// Inject adds a fault.
func (s *Server) Inject(f Fault) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if f.Times == 0 {
		f.Times = 1
	}
	s.faults = append(s.faults, &f)
}

// FailAction makes the next action command (create_server, start_server,
// delete_server) of the named server end in an error.
func (s *Server) FailAction(command, server, code, message string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.failActions[command+"/"+server] = schema.ActionError{Code: code, Message: message}
}

// MaxConcurrentCreates is the most server creates that were in flight at
// once.
func (s *Server) MaxConcurrentCreates() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.maxCreating
}

// Requests returns every request received so far.
func (s *Server) Requests() []Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.requests)
}

// RequestsTo returns the requests with the given method and path.
func (s *Server) RequestsTo(method, path string) []Request {
	var out []Request
	for _, r := range s.Requests() {
		if r.Method == method && r.Path == path {
			out = append(out, r)
		}
	}
	return out
}

type recorder struct {
	http.ResponseWriter
	status int
}

func (r *recorder) WriteHeader(code int) {
	r.status = code
	r.ResponseWriter.WriteHeader(code)
}

func (s *Server) serve(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	r.Body = io.NopCloser(bytes.NewReader(body))
	rec := &recorder{ResponseWriter: w, status: http.StatusOK}
	// Requests are recorded in the order they arrive; the status is filled
	// in once answered. Recording on the way out would let a client's
	// retry, sent as soon as it has the answer (or the dropped
	// connection), be recorded before the request it retries.
	s.mu.Lock()
	idx := len(s.requests)
	s.requests = append(s.requests, Request{Method: r.Method, Path: r.URL.Path, Query: r.URL.Query(), Body: body})
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.requests[idx].Status = rec.status
		s.mu.Unlock()
	}()
	if f := s.fault(r.Method, r.URL.Path, body); f != nil && f.Reset {
		rec.status = 0
		if hj, ok := w.(http.Hijacker); ok {
			if c, _, err := hj.Hijack(); err == nil {
				c.Close()
				return
			}
		}
		panic(http.ErrAbortHandler)
	} else if f != nil {
		s.rateLimitHeaders(rec, true)
		writeError(rec, f.Status, f.Code, f.Message, nil)
		return
	}
	// Rate Limiting: every request, authenticated or not, counts.
	if !s.rateLimitHeaders(rec, true) {
		writeError(rec, http.StatusTooManyRequests, "rate_limit_exceeded", "limit of requests per hour reached", nil)
		return
	}
	if r.Header.Get("Authorization") != "Bearer "+s.Token {
		// Like a careless proxy, echo what was sent: callers must never
		// pass this message on with the token in it.
		writeError(rec, http.StatusUnauthorized, "unauthorized", "unable to authenticate with "+r.Header.Get("Authorization"), nil)
		return
	}
	s.mux.ServeHTTP(rec, r)
}

func (s *Server) fault(method, path string, body []byte) *Fault {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, f := range s.faults {
		if f.Times == 0 || f.Method != method || f.Path != path || !bytes.Contains(body, []byte(f.BodyContains)) {
			continue
		}
		if f.Times > 0 {
			f.Times--
		}
		return f
	}
	return nil
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// apiError is the error body of "Errors": code, message and details,
// which is null unless the code has details.
type apiError struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
		Details any    `json:"details"`
	} `json:"error"`
}

func writeError(w http.ResponseWriter, status int, code, msg string, details any) {
	var e apiError
	e.Error.Code, e.Error.Message, e.Error.Details = code, msg, details
	writeJSON(w, status, e)
}

// fieldError is one entry of invalid_input's details.fields.
type fieldError struct {
	Name     string   `json:"name"`
	Messages []string `json:"messages"`
}

// invalid answers invalid_input as "Errors" shows it: status 400, the
// message "invalid input in field 'f': m", and details.fields naming the
// field and its messages.
func invalid(w http.ResponseWriter, field, msg string) {
	writeError(w, http.StatusBadRequest, "invalid_input", fmt.Sprintf("invalid input in field '%s': %s", field, msg),
		map[string]any{"fields": []fieldError{{Name: field, Messages: []string{msg}}}})
}

// notFound answers not_found (404).
func notFound(w http.ResponseWriter, what string) {
	writeError(w, http.StatusNotFound, "not_found", what+" not found", nil)
}

// uniqueness answers uniqueness_error (409) with details.fields naming
// the field, as "Errors" shows it.
func uniqueness(w http.ResponseWriter, field, msg string) {
	writeError(w, http.StatusConflict, "uniqueness_error", msg, map[string]any{"fields": []map[string]string{{"name": field}}})
}

// decode reads a request body into v, one of the fake's request types.
// Malformed JSON is json_error; a field the request type does not have,
// or a value of the wrong JSON type, is invalid_input naming the field.
func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	body, _ := io.ReadAll(r.Body)
	if len(bytes.TrimSpace(body)) == 0 {
		body = []byte("{}")
	}
	if !json.Valid(body) {
		writeError(w, http.StatusBadRequest, "json_error", "invalid JSON in request body", nil)
		return false
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		field := "body"
		var te *json.UnmarshalTypeError
		switch {
		case asTypeError(err, &te):
			field = te.Field
		case strings.HasPrefix(err.Error(), "json: unknown field "):
			field = strings.Trim(strings.TrimPrefix(err.Error(), "json: unknown field "), `"`)
		}
		invalid(w, field, err.Error())
		return false
	}
	return true
}

func asTypeError(err error, te **json.UnmarshalTypeError) bool {
	t, ok := err.(*json.UnmarshalTypeError)
	if ok {
		*te = t
	}
	return ok
}

func pathID(w http.ResponseWriter, r *http.Request) (int64, bool) {
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	if err != nil {
		notFound(w, "resource")
		return 0, false
	}
	return id, true
}

// page cuts a sorted list into the requested page and adds the meta, as
// "Pagination" describes (previous/next page null at the ends).
func (s *Server) page(w http.ResponseWriter, r *http.Request, key string, items []any) {
	per := s.PageSize
	if p, err := strconv.Atoi(r.URL.Query().Get("per_page")); err == nil && p > 0 && p < per {
		per = p
	}
	pg := 1
	if p, err := strconv.Atoi(r.URL.Query().Get("page")); err == nil && p > 0 {
		pg = p
	}
	last := max((len(items)+per-1)/per, 1)
	lo, hi := min((pg-1)*per, len(items)), min(pg*per, len(items))
	var prev, next any
	if pg > 1 {
		prev = pg - 1
	}
	if pg < last {
		next = pg + 1
	}
	meta := map[string]any{"pagination": map[string]any{"page": pg, "per_page": per, "previous_page": prev,
		"next_page": next, "last_page": last, "total_entries": len(items)}}
	writeJSON(w, http.StatusOK, map[string]any{key: append([]any{}, items[lo:hi]...), "meta": meta})
}

// filter keeps the items whose name and labels match the query.
func filter[T any](r *http.Request, m map[int64]*T, name func(*T) string, labels func(*T) map[string]string, view func(*T) any) []any {
	q := r.URL.Query()
	ids := make([]int64, 0, len(m))
	for id := range m {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	out := []any{}
	for _, id := range ids {
		it := m[id]
		if n := q.Get("name"); n != "" && name(it) != n {
			continue
		}
		if !matchLabels(q.Get("label_selector"), labels(it)) {
			continue
		}
		out = append(out, view(it))
	}
	return out
}

func (s *Server) id() int64 {
	s.nextID++
	return s.nextID
}

// newActionLocked starts an action that finishes after ActionPolls polls
// and then runs onDone (under the lock), or onFail[0] if FailAction made
// it fail. name is the resource's name, for FailAction.
func (s *Server) newActionLocked(command, resType string, resID int64, name string, onDone func(), onFail ...func()) schema.Action {
	a := &action{
		a: schema.Action{ID: s.id(), Command: command, Status: "running", Started: created,
			Resources: []schema.ActionResourceReference{{ID: resID, Type: resType}}},
		pollsLeft: s.ActionPolls, onDone: onDone,
	}
	if e, ok := s.failActions[command+"/"+name]; ok {
		delete(s.failActions, command+"/"+name)
		a.fail, a.onDone = &e, nil
		if len(onFail) > 0 {
			a.onDone = onFail[0]
		}
	}
	s.actions[a.a.ID] = a
	if a.pollsLeft <= 0 {
		s.finishLocked(a)
	}
	return a.a
}

func (s *Server) finishLocked(a *action) {
	a.a.Status, a.a.Progress = "success", 100
	if a.fail != nil {
		a.a.Status, a.a.Error = "error", a.fail
	}
	fin := created.Add(time.Minute)
	a.a.Finished = &fin
	if a.onDone != nil {
		a.onDone()
	}
}

func (s *Server) pollLocked(a *action) schema.Action {
	if a.a.Status == "running" {
		a.pollsLeft--
		a.a.Progress = min(a.a.Progress+100/max(s.ActionPolls, 1), 99)
		if a.pollsLeft <= 0 {
			s.finishLocked(a)
		}
	}
	return a.a
}

func (s *Server) listActions(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []any
	for _, v := range r.URL.Query()["id"] {
		id, _ := strconv.ParseInt(v, 10, 64)
		if a, ok := s.actions[id]; ok {
			out = append(out, s.pollLocked(a))
		}
	}
	if out == nil {
		out = []any{}
	}
	s.page(w, r, "actions", out)
}

func (s *Server) getAction(w http.ResponseWriter, r *http.Request) {
	id, ok := pathID(w, r)
	if !ok {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	a, found := s.actions[id]
	if !found {
		notFound(w, fmt.Sprintf("action %d", id))
		return
	}
	writeJSON(w, http.StatusOK, schema.ActionGetResponse{Action: s.pollLocked(a)})
}

func (s *Server) routes() {
	m := s.mux
	m.HandleFunc("GET /actions", s.listActions)
	m.HandleFunc("GET /actions/{id}", s.getAction)
	m.HandleFunc("GET /servers", s.listServers)
	m.HandleFunc("POST /servers", s.createServer)
	m.HandleFunc("GET /servers/{id}", s.getServer)
	m.HandleFunc("DELETE /servers/{id}", s.deleteServer)
	m.HandleFunc("POST /servers/{id}/actions/poweron", s.powerOn)
	m.HandleFunc("GET /server_types", s.listServerTypes)
	m.HandleFunc("GET /server_types/{id}", s.getServerType)
	m.HandleFunc("GET /images", s.listImages)
	m.HandleFunc("GET /images/{id}", s.getImage)
	m.HandleFunc("GET /locations", s.listLocations)
	m.HandleFunc("GET /ssh_keys", s.listSSHKeys)
	m.HandleFunc("POST /ssh_keys", s.createSSHKey)
	m.HandleFunc("GET /networks", s.listNetworks)
	m.HandleFunc("POST /networks", s.createNetwork)
	m.HandleFunc("POST /networks/{id}/actions/add_subnet", s.addSubnet)
	m.HandleFunc("GET /firewalls", s.listFirewalls)
	m.HandleFunc("POST /firewalls", s.createFirewall)
	m.HandleFunc("POST /firewalls/{id}/actions/set_rules", s.setRules)
	m.HandleFunc("POST /firewalls/{id}/actions/apply_to_resources", s.applyToResources)
	m.HandleFunc("GET /placement_groups", s.listPlacementGroups)
	m.HandleFunc("POST /placement_groups", s.createPlacementGroup)
	m.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		notFound(w, "the fake does not serve "+r.Method+" "+r.URL.Path+":")
	})
}

// mustPrefix parses a prefix the fake stored after validating it.
func mustPrefix(s string) netip.Prefix { return netip.MustParsePrefix(s) }
