package main

import (
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/meshd/meshd/pkg/sandbox/sandboxtest"
)

func TestSandboxUsage(t *testing.T) {
	for _, args := range [][]string{
		{"sandbox", "--nodes", "1"},
		{"sandbox", "--nodes", "1000"},
		{"sandbox", "extra"},
		{"sandbox", "--bogus"},
	} {
		if code, _, stderr := ctlRun(t, "", args...); code != exitUsage {
			t.Errorf("%v: exit %d, want %d (usage); stderr %q", args, code, exitUsage, stderr)
		}
	}
	code, out, stderr := ctlRun(t, "", "sandbox", "--clean", "--name", fmt.Sprintf("mdtu%d", os.Getpid()%100000))
	if code != exitOK || !strings.Contains(out, "nothing left") {
		t.Errorf("--clean with nothing to clean: exit %d, out %q, err %q", code, out, stderr)
	}
	if code, _, stderr := ctlRun(t, "", "sandbox", "--clean", "--name", "Bad-Name"); code != exitFailed || !strings.Contains(stderr, "sandbox name") {
		t.Errorf("--clean with a bad name: exit %d, err %q", code, stderr)
	}
}

// TestSandboxCheck is `meshctl sandbox --check` end to end: 3 nodes, every
// check passes, exit 0, and nothing is left behind.
func TestSandboxCheck(t *testing.T) {
	meshd := sandboxtest.Need(t)
	tag := fmt.Sprintf("mdtm%d", os.Getpid()%100000)
	code, out, stderr := ctlRun(t, "", "sandbox", "--check", "--name", tag, "--meshd", meshd, "--nodes", "3")
	t.Log("\n" + out)
	if code != exitOK {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	for _, want := range []string{"all 3 nodes passed", "n3 joined", "removed every namespace"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	ents, _ := os.ReadDir("/run/netns")
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), tag+"-") {
			t.Errorf("namespace %s left behind", e.Name())
		}
	}
}
