package overlay

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshd/meshd/pkg/atomicfile"
)

// KeyFile is the name of the WireGuard private key in the state directory.
const KeyFile = "wireguard.key"

// ErrBadKeyFile is returned (wrapped) when the key file exists but does
// not hold a key. meshd then refuses to start rather than generate a new
// key: a silent new key would change the node's identity and churn every
// peer, which is the flanneld behaviour meshd exists to fix.
var ErrBadKeyFile = errors.New("corrupt WireGuard key file")

// LoadOrCreateKey returns the node's WireGuard private key, kept at
// <stateDir>/wireguard.key in wg(8)'s format (base64, one line). The key
// is generated on first use, written atomically with mode 0600 in a 0700
// directory, and never changes afterwards. The key is never logged and
// never leaves the node: only its public half is published.
func LoadOrCreateKey(stateDir string) (wgtypes.Key, error) {
	k, _, err := LoadOrImportKey(stateDir, "")
	return k, err
}

// LoadOrImportKey is LoadOrCreateKey for a node that ran flanneld: on
// first use (no key in the state directory yet) it takes the private key
// flanneld's WireGuard backend kept in importFile (flannel
// pkg/backend/wireguard/device.go, setupKeys: WIREGUARD_KEY_FILE,
// default /run/flannel/wgkey, the key in wg(8)'s base64 form), so the
// node keeps its public key and no flannel peer has to learn a new one.
// A missing import file falls back to a new key (then announced through
// the flannel lease); an unreadable or malformed one is an error, since
// the operator asked for that key. imported says which happened. Once
// the state directory holds a key the import file is never read again.
func LoadOrImportKey(stateDir, importFile string) (k wgtypes.Key, imported bool, err error) {
	if err := ensureStateDir(stateDir); err != nil {
		return wgtypes.Key{}, false, err
	}
	path := filepath.Join(stateDir, KeyFile)
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		if err := atomicfile.TightenPrivate(path); err != nil {
			return wgtypes.Key{}, false, fmt.Errorf("key file: %w", err)
		}
		// Do not wrap the parse error: it could quote the file's content.
		k, perr := wgtypes.ParseKey(strings.TrimSpace(string(b)))
		if perr != nil {
			return wgtypes.Key{}, false, fmt.Errorf("%w: %s: not a base64 32-byte key (%d bytes); restore it from backup, or delete it to give the node a new identity", ErrBadKeyFile, path, len(b))
		}
		return k, false, nil
	case errors.Is(err, fs.ErrNotExist):
	default:
		return wgtypes.Key{}, false, fmt.Errorf("key file: %w", err)
	}
	if importFile != "" {
		b, err := os.ReadFile(importFile)
		switch {
		case err == nil:
			// Do not wrap the parse error: it could quote the file's content.
			k, perr := wgtypes.ParseKey(strings.TrimSpace(string(b)))
			if perr != nil {
				return wgtypes.Key{}, false, fmt.Errorf("%w: import %s: not a base64 32-byte key (%d bytes)", ErrBadKeyFile, importFile, len(b))
			}
			if err := atomicfile.WriteFile(path, []byte(k.String()+"\n"), 0o600); err != nil {
				return wgtypes.Key{}, false, err
			}
			return k, true, nil
		case errors.Is(err, fs.ErrNotExist):
		default:
			return wgtypes.Key{}, false, fmt.Errorf("import key file: %w", err)
		}
	}
	k, err = wgtypes.GeneratePrivateKey()
	if err != nil {
		return wgtypes.Key{}, false, fmt.Errorf("generate key: %w", err)
	}
	if err := atomicfile.WriteFile(path, []byte(k.String()+"\n"), 0o600); err != nil {
		return wgtypes.Key{}, false, err
	}
	return k, false, nil
}
