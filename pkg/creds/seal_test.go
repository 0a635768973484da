package creds

import (
	"bytes"
	"errors"
	"io"
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
