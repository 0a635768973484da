// Package hcloudfake is an in-memory HTTP fake of the Hetzner Cloud API for
// tests. Request and response bodies are hcloud-go's own schema types,
// decoded strictly (an unknown or mistyped field is a 400, as a field the
// real API does not know would be ignored or rejected). It keeps state —
// servers, actions that finish after a few polls, SSH keys, networks,
// firewalls and placement groups — paginates lists with a small page size,
// records every request, and injects faults (429 with Retry-After, 5xx,
// API errors) on demand.
package hcloudfake

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
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
	Status       int
	Code         string
	Message      string
	// RetryAfter is sent as the Retry-After header when set.
	RetryAfter string
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

	srv *httptest.Server
	mux *http.ServeMux

	mu        sync.Mutex
	nextID    int64
	servers   map[int64]*schema.Server
	userData  map[int64]string
	actions   map[int64]*action
	sshKeys   map[int64]*schema.SSHKey
	networks  map[int64]*schema.Network
	firewalls map[int64]*schema.Firewall
	pgs       map[int64]*schema.PlacementGroup
	faults    []*Fault
	requests  []Request
	// failActions maps "command/server name" to the error the action
	// of that command on that server ends with.
	failActions map[string]schema.ActionError
	creating    int // server creates being answered now
	maxCreating int
}

type action struct {
	a         schema.Action
	pollsLeft int
	fail      *schema.ActionError
	onDone    func()
}

// created is the fixed creation time of every resource: output stays
// reproducible.
var created = time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)

// New starts a fake for a test; it is closed when the test ends.
func New(t testing.TB, token string) *Server {
	t.Helper()
	s := &Server{
		Token: token, PageSize: 2, ActionPolls: 2, nextID: 100,
		servers: map[int64]*schema.Server{}, userData: map[int64]string{}, actions: map[int64]*action{},
		sshKeys: map[int64]*schema.SSHKey{}, networks: map[int64]*schema.Network{},
		firewalls: map[int64]*schema.Firewall{}, pgs: map[int64]*schema.PlacementGroup{},
		failActions: map[string]schema.ActionError{},
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

// FailAction makes the action command (create_server, start_server,
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
	defer func() {
		s.mu.Lock()
		s.requests = append(s.requests, Request{Method: r.Method, Path: r.URL.Path, Query: r.URL.Query(), Body: body, Status: rec.status})
		s.mu.Unlock()
	}()
	if r.Header.Get("Authorization") != "Bearer "+s.Token {
		// Like a careless proxy, echo what was sent: callers must never
		// pass this message on with the token in it.
		writeError(rec, http.StatusUnauthorized, "unauthorized", "unable to authenticate with "+r.Header.Get("Authorization"))
		return
	}
	if f := s.fault(r.Method, r.URL.Path, body); f != nil {
		if f.RetryAfter != "" {
			rec.Header().Set("Retry-After", f.RetryAfter)
		}
		writeError(rec, f.Status, f.Code, f.Message)
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

func writeError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, schema.ErrorResponse{Error: schema.Error{Code: code, Message: msg}})
}

// decode reads a request body strictly into v.
func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(r.Body)
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		writeError(w, http.StatusBadRequest, "invalid_input", "invalid request body: "+err.Error())
		return false
	}
	return true
}

func pathID(w http.ResponseWriter, r *http.Request) (int64, bool) {
	id, err := strconv.ParseInt(r.PathValue("id"), 10, 64)
	if err != nil {
		writeError(w, http.StatusNotFound, "not_found", "not found")
		return 0, false
	}
	return id, true
}

// page cuts a sorted list into the requested page and adds the meta.
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
	meta := schema.MetaPagination{Page: pg, PerPage: per, LastPage: last, TotalEntries: len(items)}
	if pg > 1 {
		meta.PreviousPage = pg - 1
	}
	if pg < last {
		meta.NextPage = pg + 1
	}
	writeJSON(w, http.StatusOK, map[string]any{key: append([]any{}, items[lo:hi]...), "meta": schema.Meta{Pagination: &meta}})
}

// matchLabels evaluates a label selector: comma-separated terms of k=v,
// k==v, k!=v, k and !k.
func matchLabels(sel string, labels map[string]string) bool {
	if sel == "" {
		return true
	}
	for _, term := range strings.Split(sel, ",") {
		term = strings.TrimSpace(term)
		switch {
		case strings.Contains(term, "!="):
			k, v, _ := strings.Cut(term, "!=")
			if labels[k] == v {
				return false
			}
		case strings.Contains(term, "=="):
			k, v, _ := strings.Cut(term, "==")
			if got, ok := labels[k]; !ok || got != v {
				return false
			}
		case strings.Contains(term, "="):
			k, v, _ := strings.Cut(term, "=")
			if got, ok := labels[k]; !ok || got != v {
				return false
			}
		case strings.HasPrefix(term, "!"):
			if _, ok := labels[term[1:]]; ok {
				return false
			}
		default:
			if _, ok := labels[term]; !ok {
				return false
			}
		}
	}
	return true
}

// filter keeps the items whose name and labels match the query.
func filter[T any](r *http.Request, m map[int64]*T, name func(*T) string, labels func(*T) map[string]string) []any {
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
		out = append(out, *it)
	}
	return out
}

func (s *Server) id() int64 {
	s.nextID++
	return s.nextID
}

// newActionLocked starts an action that finishes after ActionPolls polls
// and then runs onDone (under the lock). name is the resource's name, for
// FailAction.
func (s *Server) newActionLocked(command, resType string, resID int64, name string, onDone func()) schema.Action {
	a := &action{
		a: schema.Action{ID: s.id(), Command: command, Status: "running", Started: created,
			Resources: []schema.ActionResourceReference{{ID: resID, Type: resType}}},
		pollsLeft: s.ActionPolls, onDone: onDone,
	}
	if e, ok := s.failActions[command+"/"+name]; ok {
		a.fail, a.onDone = &e, nil
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
		writeError(w, http.StatusNotFound, "not_found", fmt.Sprintf("action %d not found", id))
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
	m.HandleFunc("GET /ssh_keys", s.listSSHKeys)
	m.HandleFunc("POST /ssh_keys", s.createSSHKey)
	m.HandleFunc("GET /networks", s.listNetworks)
	m.HandleFunc("POST /networks", s.createNetwork)
	m.HandleFunc("POST /networks/{id}/actions/add_subnet", s.addSubnet)
	m.HandleFunc("GET /firewalls", s.listFirewalls)
	m.HandleFunc("POST /firewalls", s.createFirewall)
	m.HandleFunc("POST /firewalls/{id}/actions/set_rules", s.setRules)
	m.HandleFunc("GET /placement_groups", s.listPlacementGroups)
	m.HandleFunc("POST /placement_groups", s.createPlacementGroup)
	m.HandleFunc("GET /locations", s.listLocations)
	m.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "not_found", "the fake does not serve "+r.Method+" "+r.URL.Path)
	})
}
