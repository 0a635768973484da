package overlay

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// DeviceFlag is the argument that turns a meshd process into the host of
// one userspace WireGuard device: `meshd --meshd-wireguard-device=NAME`.
//
// A userspace device runs where its TUN file descriptor is read. Inside
// meshd it would die with meshd, and every restart (or crash) would cut
// the node off until the next meshd recreates it. So by default meshd
// starts the device in a process of its own, in a new session, that
// outlives meshd; the next meshd adopts the running device through its
// UAPI socket like any WireGuard interface. The process exits when its
// interface is deleted (Applier.Destroy, `ip link del`) or on SIGTERM.
//
// The same mode can run as its own service (a systemd unit running
// `meshd --meshd-wireguard-device=meshd-wg`), which meshd then adopts.
const DeviceFlag = "--meshd-wireguard-device"

// Environment of a spawned device process: its MTU, and which file
// descriptor to report readiness on (only a spawning meshd sets it; a
// device run as its own service reports nothing).
const (
	deviceMTUEnv   = "MESHD_WIREGUARD_MTU"
	deviceReadyEnv = "MESHD_WIREGUARD_READY_FD"
)

// deviceSpawnTimeout bounds the wait for a new device process to report.
const deviceSpawnTimeout = 10 * time.Second

// MaybeRunDevice runs the userspace device host and exits when args (a
// process's os.Args[1:]) asks for it with DeviceFlag; otherwise it returns
// at once. meshd's main (and any test binary whose Applier runs detached
// devices) calls it first thing.
func MaybeRunDevice(args []string) {
	if len(args) != 1 || !strings.HasPrefix(args[0], DeviceFlag+"=") {
		return
	}
	os.Exit(runDevice(strings.TrimPrefix(args[0], DeviceFlag+"="), os.Stderr))
}

// runDevice hosts the device until its interface goes away or SIGTERM.
// It reports readiness ("ok") or the error on the pipe the spawning meshd
// named in its environment.
func runDevice(name string, stderr io.Writer) int {
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelInfo})).
		With("component", "overlay-device", "interface", name)
	var ready *os.File
	if fd, err := strconv.Atoi(os.Getenv(deviceReadyEnv)); err == nil && fd > 2 {
		ready = os.NewFile(uintptr(fd), "ready")
	}
	os.Unsetenv(deviceReadyEnv)
	report := func(msg string) {
		if ready != nil {
			fmt.Fprintln(ready, msg)
			ready.Close()
			ready = nil
		}
	}
	if err := validInterfaceName(name); err != nil {
		report(err.Error())
		return 2
	}
	mtu, _ := strconv.Atoi(os.Getenv(deviceMTUEnv))
	if mtu == 0 {
		mtu = 1420
	}
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM, syscall.SIGINT)
	u, err := newUserspaceDevice(name, mtu, log)
	if err != nil {
		report(err.Error())
		log.Error("cannot start userspace WireGuard device", "err", err)
		return 1
	}
	log.Info("userspace WireGuard device running", "pid", os.Getpid())
	report("ok")
	select {
	case <-term:
		log.Info("stopping on signal")
	case <-u.dev.Wait():
		log.Info("device closed (interface deleted)")
	}
	u.Close()
	return 0
}

// spawnDevice starts a detached device process for name and waits until
// it serves its UAPI socket. The process is in its own session so that
// neither a signal to meshd's process group nor meshd's death reaches it.
func spawnDevice(name string, mtu int, log *slog.Logger) error {
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("spawn device process: %w", err)
	}
	r, w, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("spawn device process: %w", err)
	}
	defer r.Close()
	cmd := exec.Command(exe, DeviceFlag+"="+name)
	cmd.Env = append(os.Environ(), deviceMTUEnv+"="+strconv.Itoa(mtu), deviceReadyEnv+"=3")
	cmd.ExtraFiles = []*os.File{w}
	// Share meshd's stderr (the journal, a log file) unless it is a pipe:
	// whoever reads that pipe would wait for the device to end too.
	if fi, err := os.Stderr.Stat(); err == nil && fi.Mode()&os.ModeNamedPipe == 0 {
		cmd.Stderr = os.Stderr
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		w.Close()
		return fmt.Errorf("spawn device process: %w", err)
	}
	w.Close()
	// Reap it if it exits while this meshd runs (no zombie); if meshd goes
	// first, init (or the service manager) adopts it.
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()

	line := make(chan string, 1)
	go func() {
		s, _ := bufio.NewReader(r).ReadString('\n')
		line <- strings.TrimSpace(s)
	}()
	select {
	case msg := <-line:
		if msg == "ok" {
			log.Info("started userspace WireGuard device process", "interface", name, "pid", cmd.Process.Pid)
			return nil
		}
		if msg == "" {
			// Closed without a word: the binary does not know DeviceFlag
			// (its main does not call MaybeRunDevice).
			err := <-exited
			return fmt.Errorf("spawn device process: %s %s exited (%v) without starting a device: does its main call overlay.MaybeRunDevice?", exe, DeviceFlag, err)
		}
		return fmt.Errorf("spawn device process: %s", msg)
	case <-time.After(deviceSpawnTimeout):
		cmd.Process.Kill()
		return errors.New("spawn device process: no answer within " + deviceSpawnTimeout.String())
	}
}

// validInterfaceName accepts what Linux accepts as a link name and what
// is safe in a file name (the UAPI socket is /run/wireguard/<name>.sock).
func validInterfaceName(name string) error {
	if name == "" || len(name) > 15 {
		return fmt.Errorf("interface name %q: want 1..15 characters", name)
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return fmt.Errorf("interface name %q: character %q not allowed", name, c)
		}
	}
	if name == "." || name == ".." {
		return fmt.Errorf("interface name %q not allowed", name)
	}
	return nil
}
