package creds

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"filippo.io/age"

	"github.com/meshd/meshd/pkg/atomicfile"
	"github.com/meshd/meshd/pkg/registry"
)

// IdentityFile is the name of the node's age identity inside the state
// directory.
const IdentityFile = "age.key"

// LoadOrCreateIdentity returns the node's sealing identity, stored at
// <stateDir>/age.key. The first call generates it and writes it atomically
// with mode 0600; later calls read it back, so the recipient published in
// the member record stays valid across restarts. The private key is never
// logged and never leaves this file.
func LoadOrCreateIdentity(stateDir string) (*age.X25519Identity, error) {
	if stateDir == "" {
		return nil, errors.New("age identity: empty state directory")
	}
	path := filepath.Join(stateDir, IdentityFile)
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		// Same rule as the WireGuard key: a private key readable by
		// anyone else is made 0600 before use.
		if err := atomicfile.TightenPrivate(path); err != nil {
			return nil, fmt.Errorf("age identity: %w", err)
		}
		return parseIdentityFile(path, b)
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("age identity: %w", err)
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("age identity: %w", err)
	}
	id, err := age.GenerateX25519Identity()
	if err != nil {
		return nil, fmt.Errorf("age identity: generate: %w", err)
	}
	content := "# meshd sealing identity; public recipient: " + id.Recipient().String() + "\n" + id.String() + "\n"
	if err := atomicfile.WriteFile(path, []byte(content), 0o600); err != nil {
		return nil, fmt.Errorf("age identity: %w", err)
	}
	return id, nil
}

// parseIdentityFile reads an identity file: comment lines and one
// AGE-SECRET-KEY line. Errors never quote the file's content.
func parseIdentityFile(path string, b []byte) (*age.X25519Identity, error) {
	var found *age.X25519Identity
	for line := range strings.SplitSeq(string(b), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if found != nil {
			return nil, fmt.Errorf("age identity %s: more than one key", path)
		}
		id, err := age.ParseX25519Identity(line)
		if err != nil {
			return nil, fmt.Errorf("age identity %s: not an age X25519 identity", path)
		}
		found = id
	}
	if found == nil {
		return nil, fmt.Errorf("age identity %s: no key in file", path)
	}
	return found, nil
}

// Recipient returns the public recipient of id ("age1..."), the value the
// agent publishes as registry.Member.Recipient.
func Recipient(id *age.X25519Identity) string { return id.Recipient().String() }

// ParseRecipient validates a recipient read from a member record.
func ParseRecipient(s string) (*age.X25519Recipient, error) {
	r, err := age.ParseX25519Recipient(s)
	if err != nil {
		return nil, fmt.Errorf("recipient %s: %w", registry.Quoted([]byte(s)), err)
	}
	return r, nil
}
