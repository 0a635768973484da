package haproxycfg

import (
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestParseShowProc(t *testing.T) {
	out := `#<PID>          <type>          <reloads>       <uptime>        <version>      
12757           master          2 [failed: 1]   0d00h00m11s     2.6.12-1+deb12u4
# workers
12901           worker          0               0d00h00m01s     2.6.12-1+deb12u4
12858           worker          1               0d00h00m04s     2.6.12-1+deb12u4
# programs

`
	p, err := parseShowProc(out)
	if err != nil {
		t.Fatal(err)
	}
	want := Procs{Master: Proc{PID: 12757, Type: "master", Reloads: 2, Failed: 1},
		Workers: []Proc{{PID: 12901, Type: "worker"}, {PID: 12858, Type: "worker", Reloads: 1}}}
	if diff := cmp.Diff(want, p); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
	if cur, _ := p.Current(); cur.PID != 12901 {
		t.Errorf("current worker %d, want 12901", cur.PID)
	}
	if _, err := parseShowProc("Unknown command.\n"); err == nil {
		t.Error("garbage parsed without error")
	}
}
