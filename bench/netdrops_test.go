package bench

import (
	"strings"
	"testing"
)

// Two CPUs' lines as Linux 6.x writes them: the second column is the
// drop count, in hexadecimal.
const softnetSample = `10037e69 0001aa00 00000122 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000
1075259a 0001c8f5 000000c8 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000001 00000000 00000000
`

const netstatSample = `TcpExt: SyncookiesSent SyncookiesRecv TCPAbortOnData TCPAbortOnTimeout TCPMemoryPressures
TcpExt: 0 0 12 9000 0
IpExt: InNoRoutes InTruncatedPkts
IpExt: 0 0
`

func TestNetLossCounters(t *testing.T) {
	got, err := backlogDrops([]byte(softnetSample))
	if want := int64(0x1aa00 + 0x1c8f5); err != nil || got != want {
		t.Errorf("backlogDrops = %d, %v; want %d", got, err, want)
	}
	if _, err := backlogDrops([]byte("10037e69\n")); err == nil {
		t.Error("a softnet line without a drop column was accepted")
	}
	n, err := netstatField([]byte(netstatSample), "TcpExt", "TCPAbortOnTimeout")
	if err != nil || n != 9000 {
		t.Errorf("TCPAbortOnTimeout = %d, %v; want 9000", n, err)
	}
	if _, err := netstatField([]byte(netstatSample), "TcpExt", "NoSuchCounter"); err == nil || !strings.Contains(err.Error(), "NoSuchCounter") {
		t.Errorf("a missing counter: %v", err)
	}
	if _, err := netstatField([]byte("TcpExt: A B\nTcpExt: 1\n"), "TcpExt", "A"); err == nil {
		t.Error("names and values of different lengths were accepted")
	}

	// This machine's counters read, and a difference of two readings is
	// never negative.
	a, err := ReadNetLoss()
	if err != nil {
		t.Fatal(err)
	}
	b, err := ReadNetLoss()
	if err != nil {
		t.Fatal(err)
	}
	if d := b.Sub(a); d.BacklogDrops < 0 || d.AbortOnTimeout < 0 {
		t.Errorf("counters went back: %+v", d)
	}
	r := Results{NetLoss: []PartLoss{{Part: "etcd watch floor N=10000", NetLoss: NetLoss{BacklogDrops: 14265, AbortOnTimeout: 9000}}}, NetdevMaxBacklog: 1000}
	if md := r.Markdown(); !strings.Contains(md, "| etcd watch floor N=10000 | 14265 | 9000 |") || !strings.Contains(md, "`net.core.netdev_max_backlog` = 1000") {
		t.Errorf("the report does not show the drops:\n%s", md)
	}
}
