package creds

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"

	"filippo.io/age"
	"filippo.io/age/armor"
)

// MaxSecretSize bounds a secret's clear value. The armored ciphertext of
// the largest value still fits registry.MaxValueSize with room to spare;
// systemd credentials are meant for keys and passwords, not blobs.
const MaxSecretSize = 64 << 10

// ErrOpen is returned (wrapped) when a ciphertext does not open with the
// node's identity: it was sealed to another node, or it was altered.
var ErrOpen = errors.New("ciphertext does not open with this node's identity")

// Seal encrypts value to one age X25519 recipient and returns the ASCII
// armored ciphertext stored in etcd.
func Seal(value []byte, recipient string) (string, error) {
	if len(value) > MaxSecretSize {
		return "", fmt.Errorf("seal: value is %d bytes, at most %d", len(value), MaxSecretSize)
	}
	r, err := ParseRecipient(recipient)
	if err != nil {
		return "", fmt.Errorf("seal: %w", err)
	}
	var buf bytes.Buffer
	aw := armor.NewWriter(&buf)
	w, err := age.Encrypt(aw, r)
	if err != nil {
		return "", fmt.Errorf("seal: %w", err)
	}
	if _, err := w.Write(value); err != nil {
		return "", fmt.Errorf("seal: %w", err)
	}
	if err := w.Close(); err != nil {
		return "", fmt.Errorf("seal: %w", err)
	}
	if err := aw.Close(); err != nil {
		return "", fmt.Errorf("seal: %w", err)
	}
	return buf.String(), nil
}

// Open decrypts an armored ciphertext with the node's identity. A
// ciphertext sealed to another recipient, truncated or tampered with
// returns an error wrapping ErrOpen; the error never contains any part of
// the value.
func Open(ciphertext string, id *age.X25519Identity) ([]byte, error) {
	if id == nil {
		return nil, errors.New("open: no identity")
	}
	r, err := age.Decrypt(armor.NewReader(strings.NewReader(ciphertext)), id)
	if err != nil {
		var nm *age.NoIdentityMatchError
		if errors.As(err, &nm) {
			return nil, fmt.Errorf("%w: sealed to another recipient", ErrOpen)
		}
		return nil, fmt.Errorf("%w: %v", ErrOpen, err)
	}
	// The payload is authenticated chunk by chunk: a tampered chunk fails
	// here, before Open returns anything.
	value, err := io.ReadAll(io.LimitReader(r, MaxSecretSize+1))
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrOpen, err)
	}
	if len(value) > MaxSecretSize {
		clear(value)
		return nil, fmt.Errorf("%w: value larger than %d bytes", ErrOpen, MaxSecretSize)
	}
	return value, nil
}
