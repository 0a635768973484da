package overlay

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestLoadOrCreateKey(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	k1, err := LoadOrCreateKey(dir)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, KeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != 0o600 {
		t.Errorf("key file mode %v, want 0600", got)
	}
	di, _ := os.Stat(dir)
	if got := di.Mode().Perm(); got != 0o700 {
		t.Errorf("state dir mode %v, want 0700", got)
	}
	k2, err := LoadOrCreateKey(dir)
	if err != nil {
		t.Fatal(err)
	}
	if k1 != k2 {
		t.Error("second load returned a different key")
	}
	if k1.PublicKey() == k1 {
		t.Error("public key equals private key")
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Errorf("state dir holds %d entries, want only the key (no temp files)", len(entries))
	}
}

func TestLoadOrCreateKeyCorrupt(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, KeyFile)
	secretish := "this is not a key but must not be echoed"
	if err := os.WriteFile(path, []byte(secretish), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := LoadOrCreateKey(dir)
	if !errors.Is(err, ErrBadKeyFile) {
		t.Fatalf("err = %v, want ErrBadKeyFile", err)
	}
	if got, _ := os.ReadFile(path); string(got) != secretish {
		t.Error("corrupt key file was overwritten")
	}
	if containsStr(err.Error(), "echoed") {
		t.Errorf("error quotes the file content: %v", err)
	}
}

func TestLoadOrCreateKeyTightensMode(t *testing.T) {
	dir := t.TempDir()
	k, err := LoadOrCreateKey(dir)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, KeyFile)
	os.Chmod(path, 0o644)
	k2, err := LoadOrCreateKey(dir)
	if err != nil || k2 != k {
		t.Fatalf("reload: %v", err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v not tightened", fi.Mode().Perm())
	}
}

func containsStr(s, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return true
		}
	}
	return false
}
