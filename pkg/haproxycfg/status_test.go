package haproxycfg

import (
	"fmt"
	"testing"
)

// TestStatusProblemsBounded: bad instances from every node of a large
// cluster do not make the published status grow with it.
func TestStatusProblemsBounded(t *testing.T) {
	var d Desired
	for i := range 300 {
		d.Problems = append(d.Problems, Problem{App: "backends/api", Reason: fmt.Sprintf("instance n%d: port 0 out of range", i)})
	}
	st := StatusOf(d, "/run/meshd/haproxy.cfg", Counters{})
	if len(st.Problems) != MaxStatusProblems || st.ProblemCount != 300 {
		t.Fatalf("%d problems listed, count %d; want %d and 300", len(st.Problems), st.ProblemCount, MaxStatusProblems)
	}
}
