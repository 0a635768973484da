package creds

import (
	"bytes"
	"encoding/base64"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// wrap64 spells b the way `openssl enc -a` does: base64 in 64-column lines.
func wrap64(b []byte) string {
	s := base64.StdEncoding.EncodeToString(b)
	var out strings.Builder
	for len(s) > 64 {
		out.WriteString(s[:64] + "\n")
		s = s[64:]
	}
	out.WriteString(s + "\n")
	return out.String()
}

func TestDecodeNixInfraSecret(t *testing.T) {
	long := bytes.Repeat([]byte("0123456789"), 20)
	for name, tc := range map[string]struct {
		in      string
		want    []byte
		wantErr string
	}{
		"short":          {in: wrap64([]byte("hunter2")), want: []byte("hunter2")},
		"wrapped":        {in: wrap64(long), want: long},
		"no newline":     {in: base64.StdEncoding.EncodeToString([]byte("x=1\n")), want: []byte("x=1\n")},
		"openssl salted": {in: wrap64(append([]byte("Salted__12345678"), 1, 2, 3)), wantErr: "encrypted with a password"},
		"not base64":     {in: "this is not base64!\n", wantErr: "not base64"},
		"empty":          {in: "\n", wantErr: "empty"},
	} {
		t.Run(name, func(t *testing.T) {
			got, err := DecodeNixInfraSecret([]byte(tc.in))
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, tc.want) {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}

func TestReadNixInfraDir(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o400); err != nil {
			t.Fatal(err)
		}
	}
	write("mongodb-app-credentials", wrap64([]byte("user:pw")))
	write("api-key", wrap64([]byte("sk-123")))
	write(".gitkeep", "")
	os.Mkdir(filepath.Join(dir, "sub"), 0o700)
	got, err := ReadNixInfraDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	want := []NamedValue{{"api-key", []byte("sk-123")}, {"mongodb-app-credentials", []byte("user:pw")}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}

	// One bad file fails the whole directory, naming the file only.
	write("bad name", wrap64([]byte("x")))
	write("broken", "not base64 at all: TOPSECRET")
	_, err = ReadNixInfraDir(dir)
	if err == nil {
		t.Fatal("bad directory accepted")
	}
	for _, s := range []string{"bad name", "broken"} {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error does not name %q: %v", s, err)
		}
	}
	if strings.Contains(err.Error(), "TOPSECRET") {
		t.Errorf("error quotes file content: %v", err)
	}
}

func FuzzDecodeNixInfraSecret(f *testing.F) {
	f.Add([]byte(wrap64([]byte("seed"))))
	f.Add([]byte("Salted__"))
	f.Fuzz(func(t *testing.T, b []byte) {
		v, err := DecodeNixInfraSecret(b)
		if err == nil && (len(v) == 0 || len(v) > MaxSecretSize) {
			t.Errorf("accepted a value of %d bytes", len(v))
		}
	})
}
