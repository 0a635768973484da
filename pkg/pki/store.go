package pki

import (
	"crypto/x509"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/meshd/meshd/pkg/atomicfile"
	"github.com/meshd/meshd/pkg/registry"
)

// ErrExists is returned (wrapped) when a file would be overwritten without
// Force.
var ErrExists = errors.New("already exists (use --force to replace it)")

// File names inside a PKI directory.
const (
	CACertFile = "ca.pem"
	CAKeyFile  = "ca-key.pem"
)

// File modes: private keys are readable by their owner only; the
// directory is private too because it holds the CA key.
const (
	KeyMode  fs.FileMode = 0o600
	CertMode fs.FileMode = 0o644
	DirMode  fs.FileMode = 0o700
)

// Dir is a PKI directory: ca.pem and ca-key.pem, and for each issued name
// <name>.pem and <name>-key.pem.
type Dir struct {
	Path string
}

// WriteOptions says how files are written.
type WriteOptions struct {
	// Force replaces existing files (atomically). Without it nothing is
	// written when any target file exists.
	Force bool
}

// CertPath is the certificate file of name.
func (d Dir) CertPath(name string) string { return filepath.Join(d.Path, name+".pem") }

// KeyPath is the private key file of name.
func (d Dir) KeyPath(name string) string { return filepath.Join(d.Path, name+"-key.pem") }

// Init creates the directory and a new CA in it.
func (d Dir) Init(o CAOptions, w WriteOptions) (*CA, error) {
	if o.Cluster != "" {
		if err := registry.ValidName(o.Cluster); err != nil {
			return nil, fmt.Errorf("cluster name: %w", err)
		}
	}
	if err := os.MkdirAll(d.Path, DirMode); err != nil {
		return nil, fmt.Errorf("pki dir: %w", err)
	}
	certPath, keyPath := filepath.Join(d.Path, CACertFile), filepath.Join(d.Path, CAKeyFile)
	if err := checkFree(w, certPath, keyPath); err != nil {
		return nil, err
	}
	ca, keyPEM, err := NewCA(o)
	if err != nil {
		return nil, err
	}
	// Key first: a certificate without its key is useless, a key without
	// its certificate is harmless (and refused by LoadCA).
	if err := writeFile(keyPath, keyPEM, KeyMode, w); err != nil {
		return nil, err
	}
	if err := writeFile(certPath, ca.CertPEM, CertMode, w); err != nil {
		return nil, err
	}
	return ca, nil
}

// LoadCA reads the directory's CA.
func (d Dir) LoadCA() (*CA, error) {
	certPEM, err := os.ReadFile(filepath.Join(d.Path, CACertFile))
	if err != nil {
		return nil, fmt.Errorf("load ca (run meshctl pki init first?): %w", err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(d.Path, CAKeyFile))
	if err != nil {
		return nil, fmt.Errorf("load ca: %w", err)
	}
	ca, err := ParseCA(certPEM, keyPEM)
	if err != nil {
		return nil, fmt.Errorf("load ca from %s: %w", d.Path, err)
	}
	return ca, nil
}

// Write stores an issued certificate and key as <name>.pem and
// <name>-key.pem. name must be a registry.ValidName, or a rotated node
// certificate's node@gen (NodeCN): it becomes a file name.
func (d Dir) Write(name string, is *Issued, w WriteOptions) error {
	if _, _, err := ParseNodeCN(name); err != nil {
		return err
	}
	if name == "ca" || strings.HasSuffix(name, "-key") {
		return fmt.Errorf("certificate name %q: reserved", name)
	}
	certPath, keyPath := d.CertPath(name), d.KeyPath(name)
	if err := checkFree(w, certPath, keyPath); err != nil {
		return err
	}
	if err := writeFile(keyPath, is.KeyPEM, KeyMode, w); err != nil {
		return err
	}
	return writeFile(certPath, is.CertPEM, CertMode, w)
}

// CertInfo summarises one certificate of the directory.
type CertInfo struct {
	File       string
	CommonName string
	Usage      string // "ca", "client" or "server"
	NotAfter   time.Time
	Err        error // set when the file does not parse
}

// List reads every certificate in the directory, sorted by file name, so
// that an operator (or a timer) can see what expires when.
func (d Dir) List() ([]CertInfo, error) {
	ents, err := os.ReadDir(d.Path)
	if err != nil {
		return nil, fmt.Errorf("pki dir: %w", err)
	}
	var out []CertInfo
	for _, e := range ents {
		n := e.Name()
		if e.IsDir() || !strings.HasSuffix(n, ".pem") || strings.HasSuffix(n, "-key.pem") {
			continue
		}
		info := CertInfo{File: n}
		b, err := os.ReadFile(filepath.Join(d.Path, n))
		if err == nil {
			var c *x509.Certificate
			if c, err = ParseCertificate(b); err == nil {
				info.CommonName, info.NotAfter, info.Usage = c.Subject.CommonName, c.NotAfter, usageOf(c)
			}
		}
		info.Err = err
		out = append(out, info)
	}
	slices.SortFunc(out, func(a, b CertInfo) int { return strings.Compare(a.File, b.File) })
	return out, nil
}

func usageOf(c *x509.Certificate) string {
	if c.IsCA {
		return "ca"
	}
	if slices.Contains(c.ExtKeyUsage, x509.ExtKeyUsageServerAuth) {
		return "server"
	}
	return "client"
}

// checkFree refuses, before anything is written, when a target exists and
// Force is off, so that a refused command leaves no half-written pair.
func checkFree(w WriteOptions, paths ...string) error {
	if w.Force {
		return nil
	}
	for _, p := range paths {
		if _, err := os.Lstat(p); err == nil {
			return fmt.Errorf("%s: %w", p, ErrExists)
		} else if !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	return nil
}

// writeFile writes atomically (atomicfile): created with its final mode
// (never briefly world-readable), synced, then renamed over the target
// (Force) or hard-linked to it, which fails if the target appeared
// meanwhile.
func writeFile(path string, data []byte, mode fs.FileMode, w WriteOptions) error {
	if w.Force {
		return atomicfile.WriteFile(path, data, mode)
	}
	if err := atomicfile.WriteNew(path, data, mode); errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("%s: %w", path, ErrExists)
	} else if err != nil {
		return err
	}
	return nil
}
