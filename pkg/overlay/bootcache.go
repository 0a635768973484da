package overlay

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sync"

	"github.com/meshd/meshd/pkg/atomicfile"
	"github.com/meshd/meshd/pkg/overlay/desired"
)

// bootCache is the overlay's boot cache: the last applied state on disk,
// from which Boot brings the overlay up before etcd is reachable. It is
// rewritten only when the applied state changed, not on every registry
// revision.
//
// While run runs (the component's Run), offer hands the state to it and
// returns: the write, flushed to disk twice, stays out of the reconcile
// pass, and a burst of changes during a write costs one more write, of
// the newest state. Without run, offer writes at once.
type bootCache struct {
	dir, iface string
	// write is saveCache; tests replace it.
	write func(stateDir string, c cacheFile) error
	// changed, when set (before use), is called after a write whose
	// outcome (failed or not) differs from the one before: the status
	// shows cacheError.
	changed func()

	wmu     sync.Mutex // held by save, across the write
	mu      sync.Mutex // the fields below
	cached  []byte     // JSON of the state last written (or read)
	gen     uint64     // target generation the file is known to hold
	err     error      // last failure to write, nil once it works
	pending *cacheEntry
	running bool          // run is writing offers
	wake    chan struct{} // run's: an offer is pending
}

// cacheEntry is a state offered for writing.
type cacheEntry struct {
	st  desired.State
	gen uint64
	rev int64
}

// offer has st (target generation gen, registry revision rev) written:
// by run when it runs, else now (the error is save's).
func (b *bootCache) offer(st desired.State, gen uint64, rev int64) error {
	b.mu.Lock()
	if b.running {
		b.pending = &cacheEntry{st, gen, rev}
		b.mu.Unlock()
		select {
		case b.wake <- struct{}{}:
		default: // a wake-up is pending already
		}
		return nil
	}
	b.mu.Unlock()
	return b.save(st, gen, rev)
}

// run writes offered states until ctx ends, then the last one pending,
// logging a failure (the status shows it too: lastErr).
func (b *bootCache) run(ctx context.Context, log *slog.Logger) {
	b.mu.Lock()
	b.wake = make(chan struct{}, 1)
	b.running = true
	b.mu.Unlock()
	flush := func() {
		b.mu.Lock()
		e := b.pending
		b.pending = nil
		b.mu.Unlock()
		if e == nil {
			return
		}
		if err := b.save(e.st, e.gen, e.rev); err != nil {
			// The overlay is up; only the next boot without etcd suffers.
			log.Warn("cannot write overlay cache", "err", err)
		}
	}
	for {
		select {
		case <-b.wake:
			flush()
		case <-ctx.Done():
			b.mu.Lock()
			b.running = false
			b.mu.Unlock()
			flush()
			return
		}
	}
}

// load reads the file (ErrNoCache when there is none).
func (b *bootCache) load() (cacheFile, error) { return loadCache(b.dir) }

// loaded records that the file holds st, target generation gen.
func (b *bootCache) loaded(st desired.State, gen uint64) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.cached, b.gen = stateJSON(st), gen
}

// save writes st (target generation gen, registry revision rev) unless
// the file already holds it or a newer generation (generations only
// grow). A failure is kept for the status: the overlay is up, only the
// next boot without etcd suffers.
func (b *bootCache) save(st desired.State, gen uint64, rev int64) error {
	b.wmu.Lock() // one write at a time, in generation order
	defer b.wmu.Unlock()
	b.mu.Lock()
	if gen <= b.gen { // the file holds this generation or a newer one
		b.mu.Unlock()
		return nil
	}
	enc := stateJSON(st)
	if bytes.Equal(enc, b.cached) {
		b.gen = gen
		b.mu.Unlock()
		return nil
	}
	write := b.write
	b.mu.Unlock()
	if write == nil {
		write = saveCache
	}
	// Not under mu: an offer must not wait for the disk.
	err := write(b.dir, cacheFile{Interface: b.iface, Revision: rev, State: st})
	b.mu.Lock()
	flipped := (err != nil) != (b.err != nil)
	if err != nil {
		b.err = err
	} else {
		b.cached, b.gen, b.err = enc, gen, nil
	}
	b.mu.Unlock()
	if flipped && b.changed != nil {
		b.changed()
	}
	return err
}

// lastErr is the last write failure (nil once a write worked).
func (b *bootCache) lastErr() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.err
}

// stateJSON is the applied part of st, encoded, for change detection.
func stateJSON(st desired.State) []byte {
	st.Problems = nil
	b, _ := json.Marshal(st)
	return b
}

// CacheFile is the name of the last applied overlay state in the state
// directory.
const CacheFile = "overlay.json"

// cacheVersion is bumped when the file's meaning changes; a file of
// another version is ignored (the node then waits for etcd).
const cacheVersion = 1

// ErrNoCache is returned by loadCache when no cache exists yet.
var ErrNoCache = errors.New("no overlay cache")

// cacheFile is what overlay.json holds. It has no secret in it: peers'
// public keys and endpoints, addresses, routes.
type cacheFile struct {
	Version   int           `json:"version"`
	Interface string        `json:"interface"`
	Revision  int64         `json:"revision"`
	State     desired.State `json:"state"`
}

func cachePath(stateDir string) string { return filepath.Join(stateDir, CacheFile) }

// saveCache writes the applied state atomically (0600: it is not secret,
// but it maps the cluster, and nothing else needs to read it).
func saveCache(stateDir string, c cacheFile) error {
	c.Version = cacheVersion
	c.State.Problems = nil
	b, err := json.MarshalIndent(c, "", "  ")
	if err != nil {
		return fmt.Errorf("encode overlay cache: %w", err)
	}
	return atomicfile.WriteFile(cachePath(stateDir), append(b, '\n'), 0o600)
}

// loadCache reads the cache. A missing file is ErrNoCache; a file that
// does not decode or validate is an error naming the file.
func loadCache(stateDir string) (cacheFile, error) {
	path := cachePath(stateDir)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return cacheFile{}, ErrNoCache
	}
	if err != nil {
		return cacheFile{}, fmt.Errorf("overlay cache: %w", err)
	}
	var c cacheFile
	if err := json.Unmarshal(b, &c); err != nil {
		return cacheFile{}, fmt.Errorf("overlay cache %s: %w", path, err)
	}
	if c.Version != cacheVersion {
		return cacheFile{}, fmt.Errorf("overlay cache %s: version %d, want %d", path, c.Version, cacheVersion)
	}
	if err := validState(c.State); err != nil {
		return cacheFile{}, fmt.Errorf("overlay cache %s: %w", path, err)
	}
	return c, nil
}

// validState checks a state read from disk before it reaches the kernel.
func validState(s desired.State) error {
	if len(s.Addresses) == 0 {
		return errors.New("no interface address")
	}
	for _, a := range s.Addresses {
		if !a.IsValid() {
			return errors.New("invalid address")
		}
	}
	if s.ListenPort < 1 || s.ListenPort > 65535 {
		return fmt.Errorf("listen port %d", s.ListenPort)
	}
	if s.MTU != 0 && (s.MTU < 1280 || s.MTU > 65535) {
		return fmt.Errorf("mtu %d", s.MTU)
	}
	if s.RouteTable < 1 || !s.Network.IsValid() {
		return errors.New("route table or network missing")
	}
	for _, r := range s.Routes {
		if !r.IsValid() || !s.Network.Contains(r.Addr()) || r.Bits() < s.Network.Bits() {
			return fmt.Errorf("route %v outside network %v", r, s.Network)
		}
	}
	for _, p := range s.Peers {
		if err := desired.ValidKey(p.PublicKey); err != nil {
			return fmt.Errorf("peer %s: %w", p.Name, err)
		}
		for _, a := range p.AllowedIPs {
			if !a.IsValid() || !s.Network.Contains(a.Addr()) || a.Bits() < s.Network.Bits() {
				return fmt.Errorf("peer %s: allowed IP %v outside network %v", p.Name, a, s.Network)
			}
		}
	}
	return nil
}
