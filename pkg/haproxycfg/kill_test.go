package haproxycfg

import (
	"bufio"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestMain lets the test binary play a meshd process for
// TestMasterSurvivesKill9: with MDT_HAPROXY_CHILD set it starts the
// component, applies one app, reports, and waits to be killed.
func TestMain(m *testing.M) {
	if dir := os.Getenv("MDT_HAPROXY_CHILD"); dir != "" {
		os.Exit(childMeshd(dir))
	}
	os.Exit(m.Run())
}

func childMeshd(dir string) int {
	port, _ := strconv.Atoi(os.Getenv("MDT_PORT"))
	bport, _ := strconv.Atoi(os.Getenv("MDT_BACKEND_PORT"))
	c, err := New(testOptions(dir), slog.New(slog.DiscardHandler), nil)
	if err != nil {
		fmt.Println("error", err)
		return 1
	}
	snap := snapshot(map[string]appSpec{"web": {port, []*backend{{name: "a", port: bport}}}})
	if err := c.Apply(context.Background(), snap); err != nil {
		fmt.Println("error", err)
		return 1
	}
	fmt.Println("ready", c.Supervisor().PID())
	time.Sleep(time.Hour)
	return 0
}

// TestMasterSurvivesKill9 kills a meshd process with SIGKILL: the HAProxy
// master it started keeps serving, and the next meshd adopts it without a
// restart or a reload.
func TestMasterSurvivesKill9(t *testing.T) {
	requireHAProxy(t)
	dir := testDir(t)
	port := freePort(t)
	a := startBackend(t, "a")
	child := exec.Command(os.Args[0], "-test.run=^$")
	child.Env = append(os.Environ(), "MDT_HAPROXY_CHILD="+dir,
		"MDT_PORT="+strconv.Itoa(port), "MDT_BACKEND_PORT="+strconv.Itoa(a.port))
	out, err := child.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { child.Process.Kill(); child.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	f := strings.Fields(line)
	if err != nil || len(f) != 2 || f[0] != "ready" {
		t.Fatalf("child meshd: %q, %v", line, err)
	}
	master, _ := strconv.Atoi(f[1])
	opts := testOptions(dir)
	t.Cleanup(func() { (&Supervisor{pid: master}).Stop(5 * time.Second) })

	if err := child.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	child.Wait()
	if got, err := ask(port); err != nil || got != "a" {
		t.Fatalf("after kill -9 of meshd: %q, %v", got, err)
	}
	c := newComponent(t, opts)
	snap := snapshot(map[string]appSpec{"web": {port, []*backend{a}}})
	if err := c.Apply(t.Context(), snap); err != nil {
		t.Fatal(err)
	}
	p := procs(t, c)
	if p.Master.PID != master || p.Master.Reloads != 0 {
		t.Errorf("master %d with %d reloads; want %d untouched", p.Master.PID, p.Master.Reloads, master)
	}
	if st := status(c); st.Reloads != 0 || st.MasterPID != master {
		t.Errorf("new meshd: %+v", st)
	}
}
