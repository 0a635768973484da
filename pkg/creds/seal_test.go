package creds

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"filippo.io/age/armor"
)

func TestSealOpenRoundTrip(t *testing.T) {
	id, err := LoadOrCreateIdentity(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for _, value := range [][]byte{
		[]byte("s3cret"),
		[]byte("line one\nline two\n"),
		{0, 1, 2, 255, 254},
		bytes.Repeat([]byte("x"), MaxSecretSize),
	} {
		ct, err := Seal(value, Recipient(id))
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(ct, "-----BEGIN AGE ENCRYPTED FILE-----") {
			t.Errorf("ciphertext is not armored: %.40q", ct)
		}
		if len(value) > 3 && strings.Contains(ct, string(value)) {
			t.Errorf("ciphertext contains the clear value")
		}
		got, err := Open(ct, id)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, value) {
			t.Errorf("round trip of %d bytes: got %d bytes, different", len(value), len(got))
		}
	}
}

func TestSealRejectsOversizedAndBadRecipient(t *testing.T) {
	id, err := LoadOrCreateIdentity(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Seal(make([]byte, MaxSecretSize+1), Recipient(id)); err == nil {
		t.Error("oversized value sealed")
	}
	for _, r := range []string{"", "age1notarecipient", "ssh-ed25519 AAAA"} {
		if _, err := Seal([]byte("v"), r); err == nil {
			t.Errorf("Seal to %q: no error", r)
		}
	}
}

func TestOtherNodeCannotOpen(t *testing.T) {
	a, err := LoadOrCreateIdentity(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	b, err := LoadOrCreateIdentity(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if Recipient(a) == Recipient(b) {
		t.Fatal("two state dirs gave the same identity")
	}
	ct, err := Seal([]byte("for-a-only"), Recipient(a))
	if err != nil {
		t.Fatal(err)
	}
	got, err := Open(ct, b)
	if !errors.Is(err, ErrOpen) {
		t.Fatalf("node b opened node a's secret: %q, %v", got, err)
	}
	if strings.Contains(err.Error(), "for-a-only") {
		t.Error("error mentions the value")
	}
}

// tamper decodes the armor, flips one bit at offset off from the end of
// the binary age file, and armors it again.
func tamper(t *testing.T, ct string, off int) string {
	t.Helper()
	bin, err := io.ReadAll(armor.NewReader(strings.NewReader(ct)))
	if err != nil {
		t.Fatal(err)
	}
	bin[len(bin)-off] ^= 0x01
	var buf bytes.Buffer
	w := armor.NewWriter(&buf)
	w.Write(bin)
	w.Close()
	return buf.String()
}

func TestTamperedCiphertextRejected(t *testing.T) {
	id, err := LoadOrCreateIdentity(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	ct, err := Seal([]byte("integrity matters"), Recipient(id))
	if err != nil {
		t.Fatal(err)
	}
	cases := map[string]string{
		"payload last byte": tamper(t, ct, 1),
		"payload middle":    tamper(t, ct, 20),
		"truncated":         ct[:len(ct)/2],
		"header line":       strings.Replace(ct, "YWdl", "YWdm", 1),
		"not age":           "hello",
		"empty":             "",
	}
	for name, bad := range cases {
		t.Run(name, func(t *testing.T) {
			if got, err := Open(bad, id); !errors.Is(err, ErrOpen) {
				t.Errorf("Open(tampered) = %q, %v; want ErrOpen", got, err)
			}
		})
	}
}

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

// FuzzOpen feeds Open untrusted ciphertexts, as read from etcd: it must
// return an error wrapping ErrOpen, never panic, and never accept
// anything but what was sealed.
func FuzzOpen(f *testing.F) {
	id, err := LoadOrCreateIdentity(f.TempDir())
	if err != nil {
		f.Fatal(err)
	}
	ct, err := Seal([]byte("seed value"), Recipient(id))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(ct)
	f.Add("-----BEGIN AGE ENCRYPTED FILE-----\n-----END AGE ENCRYPTED FILE-----\n")
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		v, err := Open(s, id)
		if err != nil {
			if !errors.Is(err, ErrOpen) {
				t.Errorf("error does not wrap ErrOpen: %v", err)
			}
			return
		}
		if s != ct && !bytes.Equal(v, []byte("seed value")) {
			t.Errorf("opened a ciphertext that was never sealed: %q", v)
		}
	})
}
