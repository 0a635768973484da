package atomicfile

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
)

// entries lists the directory.
func entries(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range es {
		out = append(out, e.Name())
	}
	return out
}

func check(t *testing.T, path, want string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if string(b) != want {
		t.Fatalf("%s holds %q, want %q", path, b, want)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != mode {
		t.Fatalf("%s mode %v, want %v", path, fi.Mode().Perm(), mode)
	}
}

// TestWriteFileReplaces: WriteFile and Replace (the same without the
// fsyncs) put the new content and mode in place and leave no temp file.
func TestWriteFileReplaces(t *testing.T) {
	for name, write := range map[string]func(string, []byte, os.FileMode) error{"WriteFile": WriteFile, "Replace": Replace} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "f")
			if err := write(path, []byte("one"), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := write(path, []byte("two"), 0o600); err != nil {
				t.Fatal(err)
			}
			check(t, path, "two", 0o600)
			if es := entries(t, dir); len(es) != 1 {
				t.Fatalf("directory holds %v, want only f", es)
			}
			if err := write(filepath.Join(dir, "missing", "f"), nil, 0o600); err == nil {
				t.Fatal("write into a missing directory: no error")
			}
		})
	}
}

func TestWriteNewNeverReplaces(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "key")
	if err := WriteNew(path, []byte("first"), 0o600); err != nil {
		t.Fatal(err)
	}
	err := WriteNew(path, []byte("second"), 0o600)
	if !errors.Is(err, fs.ErrExist) {
		t.Fatalf("WriteNew over an existing file: %v, want fs.ErrExist", err)
	}
	check(t, path, "first", 0o600)
	if es := entries(t, dir); len(es) != 1 {
		t.Fatalf("directory holds %v, want only key", es)
	}
}

func TestPending(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "cfg")
	if err := WriteFile(path, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}

	// Abort leaves the target alone and removes the temp file.
	p, err := Create(path, []byte("new"), 0o644)
	if err != nil {
		t.Fatal(err)
	}
	check(t, p.Name(), "new", 0o644)
	p.Abort()
	check(t, path, "old", 0o644)
	if es := entries(t, dir); len(es) != 1 {
		t.Fatalf("after Abort the directory holds %v", es)
	}

	// A rejected file is kept aside under another name.
	p, err = Create(path, []byte("bad"), 0o644)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.CommitTo(path + ".rejected"); err != nil {
		t.Fatal(err)
	}
	check(t, path+".rejected", "bad", 0o644)
	check(t, path, "old", 0o644)
	if err := p.Commit(); err == nil {
		t.Fatal("second commit of one pending file: no error")
	}

	// A tool writes the pending file (and loosens its mode); Commit puts
	// it in place with the mode asked for.
	p, err = NewPending(path, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	check(t, p.Name(), "", 0o600)
	if err := os.WriteFile(p.Name(), []byte("from a tool"), 0o666); err != nil {
		t.Fatal(err)
	}
	os.Chmod(p.Name(), 0o644)
	if err := p.Commit(); err != nil {
		t.Fatal(err)
	}
	check(t, path, "from a tool", 0o600)
	p.Abort() // after Commit: nothing
	check(t, path, "from a tool", 0o600)
	if es := entries(t, dir); len(es) != 2 {
		t.Fatalf("directory holds %v, want cfg and cfg.rejected", es)
	}
}
