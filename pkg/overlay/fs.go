package overlay

import (
	"fmt"
	"os"
)

// ensureStateDir creates dir with mode 0700 if missing and refuses a
// state directory that others can read (the private key lives there).
func ensureStateDir(dir string) error {
	if dir == "" {
		return fmt.Errorf("state directory: not set")
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("state directory %s: not a directory", dir)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("state directory %s: mode %v and cannot tighten: %w", dir, fi.Mode().Perm(), err)
		}
	}
	return nil
}
