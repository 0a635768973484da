package overlay

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
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

// TestImportFlannelKey: on first start the key flanneld kept (its
// WIREGUARD_KEY_FILE, base64 without a newline, mode 0400, as
// device.go writePrivateKey writes it) becomes meshd's, so the public
// key peers know does not change; afterwards the state directory's key
// wins. Without the file meshd makes a new key; a malformed file is an
// error naming the file, never its content.
func TestImportFlannelKey(t *testing.T) {
	flannelDir := t.TempDir()
	wgkey := filepath.Join(flannelDir, "wgkey")
	fk, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(wgkey, []byte(fk.String()), 0o400); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(t.TempDir(), "state")
	k, imported, err := LoadOrImportKey(dir, wgkey)
	if err != nil || !imported || k != fk {
		t.Fatalf("import: imported=%v err=%v same=%v", imported, err, k == fk)
	}
	// flanneld later rotates its file (a restart): meshd keeps its own.
	fk2, _ := wgtypes.GeneratePrivateKey()
	os.Chmod(wgkey, 0o600)
	os.WriteFile(wgkey, []byte(fk2.String()), 0o400)
	k, imported, err = LoadOrImportKey(dir, wgkey)
	if err != nil || imported || k != fk {
		t.Fatalf("second start: imported=%v err=%v kept=%v", imported, err, k == fk)
	}
	// No file: a new key.
	k, imported, err = LoadOrImportKey(filepath.Join(t.TempDir(), "s"), filepath.Join(flannelDir, "absent"))
	if err != nil || imported || k == fk || k == fk2 {
		t.Fatalf("missing file: imported=%v err=%v", imported, err)
	}
	// Malformed: an error that does not quote the content.
	bad := filepath.Join(flannelDir, "bad")
	os.WriteFile(bad, []byte("secret-looking-garbage"), 0o600)
	_, _, err = LoadOrImportKey(filepath.Join(t.TempDir(), "s"), bad)
	if !errors.Is(err, ErrBadKeyFile) || strings.Contains(err.Error(), "garbage") {
		t.Fatalf("malformed import: %v", err)
	}
}
