// Package atomicfile writes files so that a reader (or a crash) sees the
// old content or the new, never a torn mix: temp file in the same
// directory, final mode set before any byte is written (never briefly
// more readable than meant), fsync, rename (or link), fsync of the
// directory. It is meshd's one copy of that sequence, in three forms:
// WriteFile (replace), WriteNew (create only if absent) and Pending (a
// complete temp file to check, or have a tool write, before Commit or
// Abort); Replace is WriteFile without the fsyncs.
package atomicfile

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// WriteFile atomically replaces path with data, with mode perm.
func WriteFile(path string, data []byte, perm os.FileMode) error {
	p, err := Create(path, data, perm)
	if err != nil {
		return err
	}
	return p.Commit()
}

// Replace atomically replaces path with data, with mode perm, like
// WriteFile but without flushing anything to disk: a reader sees the old
// content or the new, never a torn mix, but after a crash of the machine
// path may hold the old content or, on some filesystems, be empty. It is
// for a file that is written again whenever that matters (HAProxy's
// rendered configuration), where WriteFile's two flushes per write cost
// more than they protect.
func Replace(path string, data []byte, perm os.FileMode) error {
	p, err := NewPending(path, perm)
	if err != nil {
		return err
	}
	p.noSync = true
	if err := p.write(data); err != nil {
		p.Abort()
		return fmt.Errorf("write %s: %w", path, err)
	}
	p.synced = true
	return p.Commit()
}

// WriteNew atomically creates path with data and mode perm, only if path
// does not exist: the temp file is hard-linked to path, which fails (an
// error matching fs.ErrExist) if path appeared meanwhile. It never
// replaces anything.
func WriteNew(path string, data []byte, perm os.FileMode) error {
	p, err := Create(path, data, perm)
	if err != nil {
		return err
	}
	defer p.Abort()
	if err := os.Link(p.tmp, path); err != nil {
		var le *os.LinkError
		if errors.As(err, &le) && errors.Is(le.Err, fs.ErrExist) {
			return fmt.Errorf("write %s: %w", path, fs.ErrExist)
		}
		return fmt.Errorf("write %s: %w", path, err)
	}
	return SyncDir(filepath.Dir(path))
}

// Pending is a temporary file next to its target: complete once written,
// not in place until Commit. Abort (or a failed Commit) removes it.
type Pending struct {
	path, tmp string
	perm      os.FileMode
	synced    bool // written and synced by Create
	noSync    bool // Replace: nothing is flushed
	done      bool
}

// NewPending creates an empty temporary file for path, with mode perm,
// for a tool to write (Name). Commit makes whatever it then holds
// durable and puts it in place.
func NewPending(path string, perm os.FileMode) (*Pending, error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return nil, fmt.Errorf("write %s: %w", path, err)
	}
	p := &Pending{path: path, tmp: f.Name(), perm: perm}
	err = f.Chmod(perm)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		p.Abort()
		return nil, fmt.Errorf("write %s: %w", path, err)
	}
	return p, nil
}

// Create writes data to a new pending file for path (mode perm, synced).
func Create(path string, data []byte, perm os.FileMode) (*Pending, error) {
	p, err := NewPending(path, perm)
	if err != nil {
		return nil, err
	}
	if err := p.write(data); err != nil {
		p.Abort()
		return nil, fmt.Errorf("write %s: %w", path, err)
	}
	p.synced = true
	return p, nil
}

func (p *Pending) write(data []byte) error {
	f, err := os.OpenFile(p.tmp, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if !p.noSync {
		if err := f.Sync(); err != nil {
			f.Close()
			return err
		}
	}
	return f.Close()
}

// Name is the temporary file's path.
func (p *Pending) Name() string { return p.tmp }

// Commit puts the file in place of its target.
func (p *Pending) Commit() error { return p.CommitTo(p.path) }

// CommitTo puts the file at path instead of its target (a file rejected
// by a check is kept aside under another name). A file a tool wrote
// (NewPending) gets its mode again (the tool may have changed it) and is
// synced before the rename; the directory is synced after.
func (p *Pending) CommitTo(path string) error {
	if p.done {
		return fmt.Errorf("write %s: already committed or aborted", path)
	}
	if err := p.commit(path); err != nil {
		p.Abort()
		return fmt.Errorf("write %s: %w", path, err)
	}
	p.done = true
	if p.noSync {
		return nil
	}
	return SyncDir(filepath.Dir(path))
}

func (p *Pending) commit(path string) error {
	if !p.synced {
		if err := os.Chmod(p.tmp, p.perm); err != nil {
			return err
		}
		f, err := os.Open(p.tmp)
		if err != nil {
			return err
		}
		err = f.Sync()
		f.Close()
		if err != nil {
			return err
		}
	}
	return os.Rename(p.tmp, path)
}

// Abort removes the temporary file; after Commit it does nothing.
func (p *Pending) Abort() {
	if !p.done {
		p.done = true
		os.Remove(p.tmp)
	}
}

// SyncDir makes a rename or removal in dir durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", dir, err)
	}
	return nil
}

// TightenPrivate makes an existing secret file (a private key) readable by
// its owner only: mode 0600 when any group or other bit is set.
func TightenPrivate(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return err
	}
	if fi.Mode().Perm()&0o077 == 0 {
		return nil
	}
	if err := os.Chmod(path, 0o600); err != nil {
		return fmt.Errorf("%s: tighten mode: %w", path, err)
	}
	return nil
}
