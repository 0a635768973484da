package dashboard

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"

	"github.com/meshd/meshd/pkg/registry"
)

//go:embed static
var static embed.FS

var indexTmpl = template.Must(template.ParseFS(static, "static/index.html"))

// Options configures a Server.
type Options struct {
	// Client reads the registry; the dashboard only lists and watches.
	Client *clientv3.Client
	Log    *slog.Logger
	// Coalesce is how long a burst of changes settles before the view is
	// rebuilt (default 100 ms): at most about ten views a second reach a
	// page however busy the cluster is.
	Coalesce time.Duration
	// Now is the clock (default time.Now).
	Now func() time.Time
}

// Server watches the registry and serves the page and its event stream.
type Server struct {
	o     Options
	store *registry.Store
	mem   *memory
	kick  chan struct{}

	mu      sync.Mutex
	view    []byte        // the newest view, JSON
	changed chan struct{} // closed when view is replaced
}

// New builds a server; Run starts its watch.
func New(o Options) (*Server, error) {
	if o.Client == nil {
		return nil, errors.New("dashboard: no etcd client")
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Coalesce == 0 {
		o.Coalesce = 100 * time.Millisecond
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	return &Server{o: o, store: registry.NewStore(), mem: newMemory(o.Now()),
		kick: make(chan struct{}, 1), changed: make(chan struct{})}, nil
}

// prefixes are what the page shows: the cluster and the nodes' status.
var prefixes = []string{registry.ClusterPrefix, registry.StatusPrefix}

// Run watches the registry and rebuilds the view on every change until
// ctx ends.
func (s *Server) Run(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	for _, p := range prefixes {
		w := &registry.Watcher{Client: s.o.Client, Prefix: p, Store: s.store, Notify: s.notify, Log: s.o.Log}
		g.Go(func() error { return w.Run(ctx) })
	}
	g.Go(func() error {
		for {
			select {
			case <-ctx.Done():
				return nil
			case <-s.kick:
			}
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(s.o.Coalesce):
			}
			s.rebuild()
		}
	})
	err := g.Wait()
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

func (s *Server) notify() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// rebuild publishes the view of the store's current snapshot, once every
// prefix has been listed (a half-listed registry would show nodes down).
func (s *Server) rebuild() {
	for _, p := range prefixes {
		if !s.store.Listed(p) {
			return
		}
	}
	v := Build(s.store.Snapshot(), s.mem, s.o.Now())
	b, err := json.Marshal(v)
	if err != nil {
		s.o.Log.Error("dashboard: encoding the view", "err", err)
		return
	}
	s.mu.Lock()
	s.view = b
	close(s.changed)
	s.changed = make(chan struct{})
	s.mu.Unlock()
}

// current returns the newest view (nil before the first) and a channel
// closed when it is replaced.
func (s *Server) current() ([]byte, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.view, s.changed
}

// Handler serves the page (/), its assets, the live view (/events, server-
// sent events) and the view as JSON (/view.json).
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	assets, _ := fs.Sub(static, "static")
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		indexTmpl.Execute(w, nil)
	})
	mux.Handle("GET /static/", http.StripPrefix("/static/", http.FileServerFS(assets)))
	mux.HandleFunc("GET /view.json", func(w http.ResponseWriter, r *http.Request) {
		v, _ := s.current()
		if v == nil {
			http.Error(w, "the registry is not listed yet", http.StatusServiceUnavailable)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.Write(v)
	})
	mux.HandleFunc("GET /events", s.events)
	return secure(mux)
}

// keepAlive is how often an idle event stream gets a comment line, so
// proxies and SSH forwards do not close it.
const keepAlive = 15 * time.Second

// events streams the view: the current one at once, then every new one.
func (s *Server) events(w http.ResponseWriter, r *http.Request) {
	fl, ok := w.(http.Flusher)
	if !ok {
		http.Error(w, "streaming unsupported", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
	fl.Flush()
	tick := time.NewTicker(keepAlive)
	defer tick.Stop()
	for {
		v, changed := s.current()
		if v != nil {
			// JSON has no raw newlines: one data line per event.
			if _, err := fmt.Fprintf(w, "event: view\ndata: %s\n\n", v); err != nil {
				return
			}
			fl.Flush()
		}
	wait:
		for {
			select {
			case <-r.Context().Done():
				return
			case <-changed:
				break wait
			case <-tick.C:
				if _, err := fmt.Fprint(w, ": keep-alive\n\n"); err != nil {
					return
				}
				fl.Flush()
			}
		}
	}
}

// secure adds the headers that keep the page's content from ever running
// as script (a strict Content-Security-Policy: no inline script, nothing
// from another origin) and refuses requests whose Host is a name other
// than localhost: a web page the operator visits cannot read the
// dashboard by pointing its own domain at 127.0.0.1 (DNS rebinding).
func secure(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !allowedHost(r.Host) {
			http.Error(w, "dashboard: use an IP address or localhost in the URL", http.StatusMisdirectedRequest)
			return
		}
		hd := w.Header()
		hd.Set("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
		hd.Set("X-Content-Type-Options", "nosniff")
		hd.Set("Referrer-Policy", "no-referrer")
		hd.Set("X-Frame-Options", "DENY")
		h.ServeHTTP(w, r)
	})
}

func allowedHost(hostport string) bool {
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	}
	if host == "localhost" {
		return true
	}
	_, err := netip.ParseAddr(host)
	return err == nil
}

// Serve runs the watch and serves the page on ln until ctx ends.
func Serve(ctx context.Context, o Options, ln net.Listener) error {
	s, err := New(o)
	if err != nil {
		return err
	}
	g, ctx := errgroup.WithContext(ctx)
	srv := &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second,
		// Requests end with ctx: event streams do not end by themselves.
		BaseContext: func(net.Listener) context.Context { return ctx }}
	g.Go(func() error { return s.Run(ctx) })
	g.Go(func() error {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		return srv.Shutdown(sctx)
	})
	g.Go(func() error {
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	})
	return g.Wait()
}

// Banner is what meshctl prints when the page is up: where it is, and how
// to reach it from another machine.
func Banner(addr string) string {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Sprintf("dashboard on http://%s/\n", addr)
	}
	s := fmt.Sprintf("dashboard on http://%s/ (Ctrl-C to stop)\n", net.JoinHostPort(host, port))
	if ip, err := netip.ParseAddr(host); err == nil && ip.IsLoopback() {
		s += fmt.Sprintf("from another machine: ssh -N -L %s:%s THIS-HOST, then open http://127.0.0.1:%s/\n",
			port, net.JoinHostPort(host, port), port)
	} else {
		s += "warning: not on loopback; the page has no authentication, anyone who reaches this address can read the mesh's state\n"
	}
	return s
}
