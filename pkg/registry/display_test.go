package registry

import (
	"strings"
	"testing"
	"unicode/utf8"
)

func TestPrintable(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"worker1", "worker1"},
		{"café ok", "café ok"},
		{"a\x1b[2Jb", `a\x1b[2Jb`},
		{"row\nfake  UP", `row\nfake  UP`},
		{"tab\there", `tab\there`},
		{"bad\xffutf8", `bad\xffutf8`},
		{"bidi\u202eevil", `bidi\u202eevil`},
	} {
		if got := Printable(tc.in); got != tc.want {
			t.Errorf("Printable(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestQuotedBounded(t *testing.T) {
	if got := Quoted([]byte(`{"a":1}`)); got != `"{\"a\":1}"` {
		t.Errorf("short value: %s", got)
	}
	big := []byte(strings.Repeat("é", 100000))
	got := Quoted(big)
	if len(got) > 2*MaxQuoted+32 {
		t.Errorf("Quoted of %d bytes is %d bytes long", len(big), len(got))
	}
	if !strings.Contains(got, "(200000 bytes)") {
		t.Errorf("Quoted does not say the full length: %s", got)
	}
}

func TestStatusText(t *testing.T) {
	if got := StatusText("short"); got != "short" {
		t.Errorf("short text changed: %q", got)
	}
	long := strings.Repeat("é", MaxStatusText) // 2 bytes each
	got := StatusText(long)
	if len(got) > MaxStatusText+len("…") || !strings.HasSuffix(got, "…") || !utf8.ValidString(got) {
		t.Errorf("cut text: %d bytes, valid %v", len(got), utf8.ValidString(got))
	}
}
