package creds

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/meshd/meshd/pkg/registry"
)

// NamedValue is one secret read for import.
type NamedValue struct {
	Name  string
	Value []byte
}

// ReadNixInfraDir reads a nix-infra `secrets/` directory: one file per
// secret, named after it, holding the value in base64 as written by
// nix-infra's `openssl enc -pbkdf2 -a` (a command that names no cipher, so
// it only base64-encodes, wrapped at 64 columns). Hidden files and
// directories are ignored. Every file is checked before anything is
// returned, so a bad file makes the whole import fail and write nothing.
// Errors name the file, never its content.
func ReadNixInfraDir(dir string) ([]NamedValue, error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("secrets directory: %w", err)
	}
	var out []NamedValue
	var errs []error
	for _, e := range entries {
		name := e.Name()
		if strings.HasPrefix(name, ".") || e.IsDir() {
			continue
		}
		if !e.Type().IsRegular() {
			errs = append(errs, fmt.Errorf("%s: not a regular file", name))
			continue
		}
		if err := registry.ValidName(name); err != nil {
			errs = append(errs, fmt.Errorf("%s: file name is not a valid secret name: %w", name, err))
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, name))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		v, err := DecodeNixInfraSecret(b)
		clear(b)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", name, err))
			continue
		}
		out = append(out, NamedValue{Name: name, Value: v})
	}
	if err := errors.Join(errs...); err != nil {
		for _, nv := range out {
			clear(nv.Value)
		}
		return nil, err
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("secrets directory %s: no secret files", dir)
	}
	slices.SortFunc(out, func(a, b NamedValue) int { return strings.Compare(a.Name, b.Name) })
	return out, nil
}

// opensslSalted is how `openssl enc` starts a file it really encrypted
// with a password.
var opensslSalted = []byte("Salted__")

// DecodeNixInfraSecret decodes one nix-infra secret file (base64, possibly
// wrapped). A file that openssl really encrypted (it starts with
// "Salted__") is refused with a hint: meshd has no password to open it.
func DecodeNixInfraSecret(b []byte) ([]byte, error) {
	compact := bytes.Join(bytes.Fields(b), nil)
	if len(compact) == 0 {
		return nil, errors.New("empty file")
	}
	v := make([]byte, base64.StdEncoding.DecodedLen(len(compact)))
	n, err := base64.StdEncoding.Decode(v, compact)
	clear(compact)
	if err != nil {
		clear(v)
		return nil, errors.New("not base64 (is it a nix-infra secrets/ file?)")
	}
	v = v[:n]
	if bytes.HasPrefix(v, opensslSalted) {
		clear(v)
		return nil, errors.New("encrypted with a password by openssl: decrypt it with the matching `openssl enc -d` and use `meshctl secret put` instead")
	}
	if len(v) == 0 {
		return nil, errors.New("empty value")
	}
	if len(v) > MaxSecretSize {
		clear(v)
		return nil, fmt.Errorf("value is %d bytes, at most %d", n, MaxSecretSize)
	}
	return v, nil
}
