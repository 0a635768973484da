package registry

import (
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// MaxQuoted is how many bytes of a value Quoted keeps.
const MaxQuoted = 64

// Printable returns s with every character that could move a terminal's
// cursor, change its state or fake a table's layout (control characters,
// escapes, invalid UTF-8, tabs and newlines) written as a Go escape, so
// text that came from etcd can be printed as it is. Ordinary text,
// spaces and non-ASCII letters are kept.
func Printable(s string) string {
	clean := true
	for _, r := range s {
		if r == utf8.RuneError || !unicode.IsPrint(r) && r != ' ' {
			clean = false
			break
		}
	}
	if clean {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); {
		r, n := utf8.DecodeRuneInString(s[i:])
		switch {
		case r == utf8.RuneError && n <= 1:
			b.WriteString(`\x` + strconv.FormatUint(uint64(s[i])|0x100, 16)[1:])
		case unicode.IsPrint(r) || r == ' ':
			b.WriteString(s[i : i+n])
		default:
			q := strconv.QuoteRune(r)
			b.WriteString(q[1 : len(q)-1])
		}
		i += n
	}
	return b.String()
}

// Quoted returns a value for a log line or an error: quoted, escaped and
// cut to MaxQuoted bytes (with the full length said), so a hostile 256 KiB
// value costs a log line of bounded size.
func Quoted(b []byte) string {
	if len(b) <= MaxQuoted {
		return strconv.Quote(string(b))
	}
	cut := MaxQuoted
	for cut > 0 && !utf8.RuneStart(b[cut]) {
		cut--
	}
	return strconv.Quote(string(b[:cut])) + "…(" + strconv.Itoa(len(b)) + " bytes)"
}

// MaxStatusText bounds an error text in a node's published status.
const MaxStatusText = 512

// StatusText returns s cut to at most MaxStatusText bytes on a rune
// boundary, with "…" added when it was cut: an error joined over every
// peer or route of a large cluster must not make a node's status grow
// with the cluster (the log has the whole text).
func StatusText(s string) string {
	if len(s) <= MaxStatusText {
		return s
	}
	cut := MaxStatusText
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}
