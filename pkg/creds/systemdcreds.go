package creds

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
)

// Encrypter turns a clear value into an encrypted systemd credential file.
type Encrypter interface {
	// Encrypt writes the credential for name, holding value, to the file
	// out (which it creates or truncates). Implementations must not put
	// value in an argument, the environment, a log or any other file.
	Encrypt(ctx context.Context, name string, value []byte, out string) error
}

// ErrNoSystemdCreds is returned (wrapped) when the systemd-creds binary
// cannot be found.
var ErrNoSystemdCreds = errors.New("systemd-creds not found")

// SystemdCreds is the Encrypter that runs
// `systemd-creds encrypt --with-key=K --name=NAME - OUT`, with the clear
// value only on its standard input.
type SystemdCreds struct {
	// Binary is the systemd-creds executable (default: from PATH).
	Binary string
	// WithKey is --with-key: host, tpm2, host+tpm2, auto or tpm2-absent.
	WithKey string
	// Env is added to meshd's own environment for the child (tests point
	// SYSTEMD_CREDENTIAL_SECRET at a host key of their own).
	Env []string
}

// Encrypt implements Encrypter.
func (s SystemdCreds) Encrypt(ctx context.Context, name string, value []byte, out string) error {
	bin := s.Binary
	if bin == "" {
		bin = "systemd-creds"
	}
	path, err := exec.LookPath(bin)
	if err != nil {
		return fmt.Errorf("%w: %v", ErrNoSystemdCreds, err)
	}
	withKey := s.WithKey
	if withKey == "" {
		withKey = "host"
	}
	cmd := exec.CommandContext(ctx, path, "encrypt", "--with-key="+withKey, "--name="+name, "-", out)
	cmd.Stdin = bytes.NewReader(value)
	cmd.Env = append(os.Environ(), s.Env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.Stdout = &stderr
	if err := cmd.Run(); err != nil {
		msg := strings.TrimSpace(stderr.String())
		if len(msg) > 300 {
			msg = msg[:300] + "..."
		}
		if msg != "" {
			return fmt.Errorf("systemd-creds encrypt %s: %w: %s", name, err, msg)
		}
		return fmt.Errorf("systemd-creds encrypt %s: %w", name, err)
	}
	return nil
}
