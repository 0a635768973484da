package hetzner

import (
	"fmt"
	"io"
	"os"
	"slices"
	"strings"
	"sync"
)

// Progress receives what happens while servers are created or deleted.
// Implementations are safe for concurrent use.
type Progress interface {
	// Server reports the new state of one server.
	Server(name, state string)
	// Note reports something that concerns no single server (a shared
	// resource was created).
	Note(msg string)
}

// NewProgress returns a display redrawn in place for a terminal and plain
// lines otherwise (pipes, logs, CI).
func NewProgress(w io.Writer, terminal bool) Progress {
	if terminal {
		return &TerminalProgress{w: w}
	}
	return &PlainProgress{w: w}
}

// IsTerminal reports whether w is a character device (a terminal).
func IsTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}

// PlainProgress writes one line per event: for logs and pipes.
type PlainProgress struct {
	mu sync.Mutex
	w  io.Writer
}

// Server implements Progress.
func (p *PlainProgress) Server(name, state string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintf(p.w, "%s: %s\n", name, state)
}

// Note implements Progress.
func (p *PlainProgress) Note(msg string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintln(p.w, msg)
}

// TerminalProgress keeps one line per server and redraws them in place.
type TerminalProgress struct {
	mu     sync.Mutex
	w      io.Writer
	names  []string
	states map[string]string
	drawn  int // lines of the server block currently on screen
}

// Server implements Progress.
func (p *TerminalProgress) Server(name, state string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.states == nil {
		p.states = map[string]string{}
	}
	if _, ok := p.states[name]; !ok {
		p.names = append(p.names, name)
		slices.Sort(p.names)
	}
	p.states[name] = state
	p.redrawLocked()
}

// Note implements Progress: notes are printed above the server block.
func (p *TerminalProgress) Note(msg string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.clearLocked()
	fmt.Fprintln(p.w, msg)
	p.redrawLocked()
}

func (p *TerminalProgress) clearLocked() {
	if p.drawn > 0 {
		// Up to the block's first line, then clear to the end of screen.
		fmt.Fprintf(p.w, "\x1b[%dA\r\x1b[J", p.drawn)
		p.drawn = 0
	}
}

func (p *TerminalProgress) redrawLocked() {
	p.clearLocked()
	width := 0
	for _, n := range p.names {
		width = max(width, len(n))
	}
	var b strings.Builder
	for _, n := range p.names {
		fmt.Fprintf(&b, "%-*s  %s\n", width, n, p.states[n])
	}
	io.WriteString(p.w, b.String())
	p.drawn = len(p.names)
}

// discardProgress drops every event.
type discardProgress struct{}

func (discardProgress) Server(string, string) {}
func (discardProgress) Note(string)           {}
