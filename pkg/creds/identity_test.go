package creds

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestIdentityPersistsWithMode0600(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	id1, err := LoadOrCreateIdentity(dir)
	if err != nil {
		t.Fatal(err)
	}
	id2, err := LoadOrCreateIdentity(dir)
	if err != nil {
		t.Fatal(err)
	}
	if id1.String() != id2.String() {
		t.Error("identity changed across loads")
	}
	fi, err := os.Stat(filepath.Join(dir, IdentityFile))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("identity file mode %v, want 0600", fi.Mode().Perm())
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("state dir holds %d entries, want only %s (no temp file left)", len(entries), IdentityFile)
	}
}

func TestIdentityBadFile(t *testing.T) {
	for name, content := range map[string]string{
		"garbage": "AGE-SECRET-KEY-1NOTAKEY\n",
		"empty":   "# nothing\n",
		"two":     "AGE-SECRET-KEY-1A\nAGE-SECRET-KEY-1B\n",
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, IdentityFile), []byte(content), 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := LoadOrCreateIdentity(dir)
			if err == nil {
				t.Fatal("bad identity file accepted")
			}
			if strings.Contains(err.Error(), "AGE-SECRET-KEY") {
				t.Errorf("error quotes the file: %v", err)
			}
			// The bad file is left for the operator, not overwritten.
			b, _ := os.ReadFile(filepath.Join(dir, IdentityFile))
			if string(b) != content {
				t.Error("bad identity file was replaced")
			}
		})
	}
}

// TestIdentityLoosenedModeIsTightened: an age.key someone made readable
// by others (0644) is back to 0600 after the next load, like the
// WireGuard key.
func TestIdentityLoosenedModeIsTightened(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	id1, err := LoadOrCreateIdentity(dir)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, IdentityFile)
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	id2, err := LoadOrCreateIdentity(dir)
	if err != nil || id2.String() != id1.String() {
		t.Fatalf("reload: %v (same key: %v)", err, err == nil && id2.String() == id1.String())
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("age.key mode %v after load, want 0600", fi.Mode().Perm())
	}
}
