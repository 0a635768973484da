package creds

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/meshd/meshd/pkg/atomicfile"
	"github.com/meshd/meshd/pkg/registry"
)

// ManifestFile is the name, inside the state directory, of the record of
// the credentials meshd wrote. Only those are ever deleted.
const ManifestFile = "creds-manifest.json"

type manifest struct {
	Credentials map[string]delivered `json:"credentials"`
}

func loadManifest(stateDir string) (map[string]delivered, error) {
	path := filepath.Join(stateDir, ManifestFile)
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]delivered{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("credentials manifest: %w", err)
	}
	var m manifest
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, fmt.Errorf("credentials manifest %s: %w", path, err)
	}
	out := map[string]delivered{}
	for name, d := range m.Credentials {
		// A name that is not valid never came from meshd: ignore it rather
		// than let it name a file to delete.
		if registry.ValidName(name) == nil {
			out[name] = d
		}
	}
	return out, nil
}

func saveManifest(stateDir string, entries map[string]delivered) error {
	b, err := json.MarshalIndent(manifest{Credentials: entries}, "", "  ")
	if err != nil {
		return fmt.Errorf("credentials manifest: %w", err)
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return fmt.Errorf("credentials manifest: %w", err)
	}
	return atomicfile.WriteFile(filepath.Join(stateDir, ManifestFile), append(b, '\n'), 0o600)
}
