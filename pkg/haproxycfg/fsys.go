package haproxycfg

import (
	"fmt"
	"os"
	"path/filepath"
)

// writeAtomic replaces path with data: a temporary file in the same
// directory, fsynced, given its final mode, then renamed over path, and the
// directory fsynced so the rename survives a crash. A reader (HAProxy's
// master on reload) sees the old file or the new one, never a mix.
func writeAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := writeTemp(path, data, mode)
	if err != nil {
		return err
	}
	return renameSync(tmp, path)
}

// writeTemp writes data to a new temporary file next to path and returns
// its name. The caller renames or removes it.
func writeTemp(path string, data []byte, mode os.FileMode) (string, error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return "", fmt.Errorf("create temp config: %w", err)
	}
	name := f.Name()
	fail := func(err error) (string, error) {
		f.Close()
		os.Remove(name)
		return "", err
	}
	if _, err := f.Write(data); err != nil {
		return fail(fmt.Errorf("write %s: %w", name, err))
	}
	if err := f.Chmod(mode); err != nil {
		return fail(fmt.Errorf("chmod %s: %w", name, err))
	}
	if err := f.Sync(); err != nil {
		return fail(fmt.Errorf("fsync %s: %w", name, err))
	}
	if err := f.Close(); err != nil {
		os.Remove(name)
		return "", fmt.Errorf("close %s: %w", name, err)
	}
	return name, nil
}

// renameSync renames from to to and fsyncs the directory.
func renameSync(from, to string) error {
	if err := os.Rename(from, to); err != nil {
		os.Remove(from)
		return fmt.Errorf("rename %s: %w", from, err)
	}
	d, err := os.Open(filepath.Dir(to))
	if err != nil {
		return fmt.Errorf("open dir: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync dir: %w", err)
	}
	return nil
}
