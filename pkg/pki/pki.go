// Package pki makes the certificates of a meshd cluster's etcd: one cluster
// CA, a client certificate per node whose common name is the node name
// (etcd maps a client certificate's CN to the etcd user when it runs with
// --client-cert-auth), an operator certificate (CN "root" by default) and
// etcd server/peer certificates.
//
// The functions here are pure apart from reading randomness: the time comes
// in through Request.Now and CAOptions.Now so tests pin lifetimes. Writing
// files is in store.go.
package pki

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"time"
)

// Default lifetimes. A CA outlives several rounds of leaf rotation; leaves
// last a year so that rotation is a routine, rehearsed operation rather
// than the once-a-decade surprise nix-infra's multi-year RSA certificates
// are.
const (
	DefaultCALifetime     = 10 * 365 * 24 * time.Hour
	DefaultClientLifetime = 365 * 24 * time.Hour
	DefaultServerLifetime = 365 * 24 * time.Hour
	// backdate tolerates clock skew between the machine that issues a
	// certificate and the etcd server that checks it.
	backdate = 5 * time.Minute
)

// KeyType is the algorithm of a generated key.
type KeyType string

// The supported key types. ECDSA P-256 is the default: every TLS stack
// etcd clients use (Go, OpenSSL, etcdctl, nix-infra's Dart client)
// accepts it. Ed25519 works with Go clients only.
const (
	ECDSAP256 KeyType = "ecdsa-p256"
	Ed25519   KeyType = "ed25519"
)

// ParseKeyType validates a --key-type value ("" means ECDSA P-256).
func ParseKeyType(s string) (KeyType, error) {
	switch KeyType(s) {
	case "", ECDSAP256, "ecdsa":
		return ECDSAP256, nil
	case Ed25519:
		return Ed25519, nil
	}
	return "", fmt.Errorf("key type %q: want %s or %s", s, ECDSAP256, Ed25519)
}

// Usage says what a leaf certificate is for.
type Usage int

// Leaf certificate usages.
const (
	// Client is a node's or an operator's etcd client certificate.
	Client Usage = iota
	// Server is an etcd member's certificate: it serves clients and
	// peers and is also presented as a client (peer connections, and the
	// embedded gRPC gateway dialling its own server), so it carries both
	// extended key usages.
	Server
)

// CAOptions describes a new cluster CA.
type CAOptions struct {
	// Cluster names the cluster in the CA's subject.
	Cluster  string
	KeyType  KeyType
	Lifetime time.Duration // 0: DefaultCALifetime
	Now      time.Time
}

// CA is a loaded certificate authority.
type CA struct {
	Cert    *x509.Certificate
	CertPEM []byte
	Key     crypto.Signer
}

// Request describes a leaf certificate.
type Request struct {
	// CommonName is the node name, the operator user name ("root") or
	// the etcd member name.
	CommonName string
	Usage      Usage
	DNSNames   []string
	IPs        []net.IP
	KeyType    KeyType
	Lifetime   time.Duration // 0: the usage's default
	Now        time.Time
}

// Issued is a freshly issued certificate and its private key, both PEM.
type Issued struct {
	Cert    *x509.Certificate
	CertPEM []byte
	// KeyPEM is the private key (PKCS #8). Write it 0600; never print it.
	KeyPEM []byte
}

// NewCA creates a self-signed cluster CA.
func NewCA(o CAOptions) (*CA, []byte, error) {
	if o.Now.IsZero() {
		return nil, nil, errors.New("new ca: no time given")
	}
	lifetime := o.Lifetime
	if lifetime == 0 {
		lifetime = DefaultCALifetime
	}
	key, keyPEM, err := newKey(o.KeyType)
	if err != nil {
		return nil, nil, err
	}
	serial, err := newSerial()
	if err != nil {
		return nil, nil, err
	}
	name := "meshd etcd CA"
	if o.Cluster != "" {
		name = "meshd " + o.Cluster + " etcd CA"
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: name, Organization: []string{"meshd"}},
		NotBefore:             o.Now.Add(-backdate),
		NotAfter:              o.Now.Add(lifetime),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, fmt.Errorf("new ca: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, fmt.Errorf("new ca: %w", err)
	}
	return &CA{Cert: cert, CertPEM: pemBlock("CERTIFICATE", der), Key: key}, keyPEM, nil
}

// Issue signs a new leaf certificate with a new key. The leaf never
// outlives its CA: a longer lifetime is cut to the CA's NotAfter.
func (ca *CA) Issue(r Request) (*Issued, error) {
	if r.CommonName == "" {
		return nil, errors.New("issue: empty common name")
	}
	if r.Now.IsZero() {
		return nil, errors.New("issue: no time given")
	}
	lifetime := r.Lifetime
	if lifetime == 0 {
		lifetime = DefaultClientLifetime
		if r.Usage == Server {
			lifetime = DefaultServerLifetime
		}
	}
	if lifetime < 0 {
		return nil, fmt.Errorf("issue %s: negative lifetime", r.CommonName)
	}
	notAfter := r.Now.Add(lifetime)
	if notAfter.After(ca.Cert.NotAfter) {
		notAfter = ca.Cert.NotAfter
	}
	if !r.Now.Before(notAfter) {
		return nil, fmt.Errorf("issue %s: the CA expired on %s", r.CommonName, ca.Cert.NotAfter.Format(time.DateOnly))
	}
	key, keyPEM, err := newKey(r.KeyType)
	if err != nil {
		return nil, err
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: r.CommonName, Organization: []string{"meshd"}},
		NotBefore:             r.Now.Add(-backdate),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		DNSNames:              r.DNSNames,
		IPAddresses:           r.IPs,
	}
	if r.Usage == Server {
		if len(r.DNSNames) == 0 && len(r.IPs) == 0 {
			return nil, fmt.Errorf("issue server %s: give at least one --ip or --dns name", r.CommonName)
		}
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		return nil, fmt.Errorf("issue %s: %w", r.CommonName, err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("issue %s: %w", r.CommonName, err)
	}
	return &Issued{Cert: cert, CertPEM: pemBlock("CERTIFICATE", der), KeyPEM: keyPEM}, nil
}

// ParseCA loads a CA from its PEM certificate and key, checking that they
// belong together and that the certificate is a CA.
func ParseCA(certPEM, keyPEM []byte) (*CA, error) {
	cert, err := ParseCertificate(certPEM)
	if err != nil {
		return nil, fmt.Errorf("ca certificate: %w", err)
	}
	if !cert.IsCA {
		return nil, errors.New("ca certificate: not a CA")
	}
	b, _ := pem.Decode(keyPEM)
	if b == nil || b.Type != "PRIVATE KEY" {
		return nil, errors.New("ca key: no PKCS #8 PRIVATE KEY block")
	}
	k, err := x509.ParsePKCS8PrivateKey(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("ca key: %w", err)
	}
	signer, ok := k.(crypto.Signer)
	if !ok {
		return nil, errors.New("ca key: not a signing key")
	}
	if !publicEqual(signer.Public(), cert.PublicKey) {
		return nil, errors.New("ca key does not match the ca certificate")
	}
	return &CA{Cert: cert, CertPEM: certPEM, Key: signer}, nil
}

// ParseCertificate parses the first certificate of a PEM file.
func ParseCertificate(certPEM []byte) (*x509.Certificate, error) {
	b, _ := pem.Decode(certPEM)
	if b == nil || b.Type != "CERTIFICATE" {
		return nil, errors.New("no PEM CERTIFICATE block")
	}
	return x509.ParseCertificate(b.Bytes)
}

func publicEqual(a, b crypto.PublicKey) bool {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	e, ok := a.(equaler)
	return ok && e.Equal(b)
}

func newKey(t KeyType) (crypto.Signer, []byte, error) {
	var key crypto.Signer
	var err error
	switch t {
	case "", ECDSAP256:
		key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case Ed25519:
		_, key, err = ed25519.GenerateKey(rand.Reader)
	default:
		return nil, nil, fmt.Errorf("key type %q: want %s or %s", t, ECDSAP256, Ed25519)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("generate key: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, nil, fmt.Errorf("marshal key: %w", err)
	}
	return key, pemBlock("PRIVATE KEY", der), nil
}

func newSerial() (*big.Int, error) {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("serial: %w", err)
	}
	return s.Add(s, big.NewInt(1)), nil
}

func pemBlock(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}
