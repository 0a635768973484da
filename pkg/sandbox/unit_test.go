package sandbox

import (
	"context"
	"encoding/binary"
	"errors"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/sys/unix"
)

func TestParseWGDump(t *testing.T) {
	dump := "cHJpdmF0ZQ==\tUFVCMQ==\t51820\toff\n" +
		"UFVCMg==\t(none)\t172.31.213.12:51820\t10.10.1.0/24\t1700000000\t92\t180\t25\n" +
		"UFVCMw==\t(none)\t(none)\t10.10.2.0/24\t0\t0\t0\toff\n"
	got, err := parseWGDump(dump)
	if err != nil {
		t.Fatal(err)
	}
	want := []WGPeer{
		{PublicKey: "UFVCMg==", Endpoint: "172.31.213.12:51820", AllowedIPs: "10.10.1.0/24", Handshake: time.Unix(1700000000, 0)},
		{PublicKey: "UFVCMw==", Endpoint: "(none)", AllowedIPs: "10.10.2.0/24"},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("peers (-want +got):\n%s", diff)
	}
	for _, bad := range []string{"", "a\tb\n", "k\tp\t1\toff\nonly\tthree\tfields\n"} {
		if _, err := parseWGDump(bad); err == nil {
			t.Errorf("parseWGDump(%q): want an error", bad)
		}
	}
}

func TestValidTag(t *testing.T) {
	for tag, ok := range map[string]bool{
		"mdsb": true, "a": true, "mdt12345c": true, "abcdefghij": true,
		"": false, "abcdefghijk": false, "Mdsb": false, "1md": false, "md-sb": false, "md sb": false,
	} {
		if err := validTag(tag); (err == nil) != ok {
			t.Errorf("validTag(%q) = %v, want ok=%v", tag, err, ok)
		}
	}
}

func TestStepString(t *testing.T) {
	s := Step{What: "n2 joined", Convergence: Convergence{Revision: 7, PerNode: map[string]time.Duration{
		"n10": 3 * time.Millisecond, "n2": 1500 * time.Microsecond, "n1": 800 * time.Microsecond,
	}}}
	want := "n2 joined (revision 7): every node applied it in 3.0ms [n1 800µs, n2 1.5ms, n10 3.0ms]"
	if got := s.String(); got != want {
		t.Errorf("got  %q\nwant %q", got, want)
	}
}

func TestICMPChecksum(t *testing.T) {
	// An echo request with its checksum filled in sums to zero.
	msg := []byte{8, 0, 0, 0, 0x12, 0x34, 0, 1, 'h', 'i', '!'}
	c := icmpChecksum(msg)
	msg[2], msg[3] = byte(c>>8), byte(c)
	if got := icmpChecksum(msg); got != 0 {
		t.Errorf("checksum over a checksummed message = %#x, want 0", got)
	}
}

func TestRxTimestamp(t *testing.T) {
	want := time.Unix(1796455092, 811723000)
	data := make([]byte, 16)
	binary.NativeEndian.PutUint64(data[0:], uint64(want.Unix()))
	binary.NativeEndian.PutUint64(data[8:], uint64(want.Nanosecond()))
	cmsg := func(level, typ int32, data []byte) []byte {
		b := make([]byte, unix.CmsgSpace(len(data)))
		h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
		h.Level, h.Type = level, typ
		h.SetLen(unix.CmsgLen(len(data)))
		copy(b[unix.CmsgLen(0):], data)
		return b
	}
	// Another control message first: the timestamp is found after it.
	oob := append(cmsg(unix.SOL_SOCKET, unix.SCM_RIGHTS, []byte{1, 2, 3, 4}), cmsg(unix.SOL_SOCKET, unix.SO_TIMESTAMPNS, data)...)
	if got, ok := rxTimestamp(oob); !ok || !got.Equal(want) {
		t.Errorf("rxTimestamp = %v, %v; want %v", got, ok, want)
	}
	for name, oob := range map[string][]byte{
		"none":      nil,
		"other":     cmsg(unix.SOL_SOCKET, unix.SCM_RIGHTS, []byte{1, 2, 3, 4}),
		"short":     cmsg(unix.SOL_SOCKET, unix.SO_TIMESTAMPNS, data[:8]),
		"truncated": cmsg(unix.SOL_SOCKET, unix.SO_TIMESTAMPNS, data)[:10],
	} {
		if got, ok := rxTimestamp(oob); ok {
			t.Errorf("%s: rxTimestamp = %v, true; want none", name, got)
		}
	}
}

func TestPreflightNamesWhatIsMissing(t *testing.T) {
	_, err := Preflight(Options{HAProxyBinary: "/nonexistent/haproxy", MeshdBinary: "/nonexistent/meshd"})
	if !errors.Is(err, ErrPreflight) {
		t.Fatalf("got %v, want ErrPreflight", err)
	}
	for _, want := range []string{"haproxy not found", "apt-get install --no-install-recommends haproxy", "meshd binary"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q lacks %q", err, want)
		}
	}
}

func TestStartRejectsBadName(t *testing.T) {
	if _, err := Start(context.Background(), Options{Name: "Bad Name"}); err == nil || !strings.Contains(err.Error(), "sandbox name") {
		t.Errorf("got %v, want a sandbox name error", err)
	}
}
