package pki

import (
	"bytes"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

var now = time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)

func newTestCA(t *testing.T, kt KeyType) *CA {
	t.Helper()
	ca, keyPEM, err := NewCA(CAOptions{Cluster: "test", KeyType: kt, Now: now})
	if err != nil {
		t.Fatal(err)
	}
	if len(keyPEM) == 0 {
		t.Fatal("no CA key")
	}
	return ca
}

func verify(t *testing.T, ca *CA, c *x509.Certificate, usage x509.ExtKeyUsage, dns string) error {
	t.Helper()
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	_, err := c.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{usage}, CurrentTime: now.Add(time.Hour), DNSName: dns})
	return err
}

func TestIssueClient(t *testing.T) {
	for _, kt := range []KeyType{ECDSAP256, Ed25519} {
		t.Run(string(kt), func(t *testing.T) {
			ca := newTestCA(t, kt)
			if got, want := ca.Cert.NotAfter, now.Add(DefaultCALifetime); !got.Equal(want) {
				t.Errorf("CA NotAfter = %v, want %v", got, want)
			}
			is, err := ca.Issue(Request{CommonName: "worker001", KeyType: kt, Now: now})
			if err != nil {
				t.Fatal(err)
			}
			if is.Cert.Subject.CommonName != "worker001" {
				t.Errorf("CN = %q", is.Cert.Subject.CommonName)
			}
			if got, want := is.Cert.NotAfter, now.Add(DefaultClientLifetime); !got.Equal(want) {
				t.Errorf("NotAfter = %v, want %v", got, want)
			}
			if diff := cmp.Diff([]x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}, is.Cert.ExtKeyUsage); diff != "" {
				t.Errorf("ext key usage (-want +got):\n%s", diff)
			}
			if err := verify(t, ca, is.Cert, x509.ExtKeyUsageClientAuth, ""); err != nil {
				t.Errorf("client cert does not verify as client: %v", err)
			}
			if err := verify(t, ca, is.Cert, x509.ExtKeyUsageServerAuth, ""); err == nil {
				t.Error("client cert verifies as a server certificate")
			}
			other := newTestCA(t, kt)
			if err := verify(t, other, is.Cert, x509.ExtKeyUsageClientAuth, ""); err == nil {
				t.Error("cert verifies against an unrelated CA")
			}
		})
	}
}

func TestIssueServer(t *testing.T) {
	ca := newTestCA(t, ECDSAP256)
	if _, err := ca.Issue(Request{CommonName: "etcd0", Usage: Server, Now: now}); err == nil {
		t.Fatal("server cert without names accepted")
	}
	is, err := ca.Issue(Request{CommonName: "etcd0", Usage: Server, Now: now, DNSNames: []string{"etcd0.example"}, IPs: []net.IP{net.ParseIP("127.0.0.1")}})
	if err != nil {
		t.Fatal(err)
	}
	if err := verify(t, ca, is.Cert, x509.ExtKeyUsageServerAuth, "etcd0.example"); err != nil {
		t.Errorf("server cert does not verify as server: %v", err)
	}
	if err := verify(t, ca, is.Cert, x509.ExtKeyUsageServerAuth, "other.example"); err == nil {
		t.Error("server cert verifies for a name it does not carry")
	}
	if err := verify(t, ca, is.Cert, x509.ExtKeyUsageClientAuth, ""); err != nil {
		t.Errorf("server cert must also be a client cert (peers, gateway): %v", err)
	}
}

func TestLeafNeverOutlivesCA(t *testing.T) {
	ca, _, err := NewCA(CAOptions{Now: now, Lifetime: 30 * 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	is, err := ca.Issue(Request{CommonName: "n1", Now: now, Lifetime: 365 * 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	if !is.Cert.NotAfter.Equal(ca.Cert.NotAfter) {
		t.Errorf("leaf NotAfter %v, CA NotAfter %v", is.Cert.NotAfter, ca.Cert.NotAfter)
	}
	if _, err := ca.Issue(Request{CommonName: "n1", Now: now.Add(31 * 24 * time.Hour)}); err == nil {
		t.Error("issued from an expired CA")
	}
}

func TestParseCARejectsForeignKey(t *testing.T) {
	d1, d2 := Dir{t.TempDir()}, Dir{t.TempDir()}
	if _, err := d1.Init(CAOptions{Now: now}, WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := d2.Init(CAOptions{Now: now}, WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	cert, _ := os.ReadFile(filepath.Join(d1.Path, CACertFile))
	key, _ := os.ReadFile(filepath.Join(d2.Path, CAKeyFile))
	if _, err := ParseCA(cert, key); err == nil {
		t.Fatal("CA with a foreign key accepted")
	}
	if _, err := d1.LoadCA(); err != nil {
		t.Fatalf("load own CA: %v", err)
	}
}

func mode(t *testing.T, p string) os.FileMode {
	t.Helper()
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode().Perm()
}

func TestDirModesAndNoOverwrite(t *testing.T) {
	d := Dir{filepath.Join(t.TempDir(), "pki")}
	ca, err := d.Init(CAOptions{Cluster: "prod", Now: now}, WriteOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for p, want := range map[string]os.FileMode{d.Path: DirMode, filepath.Join(d.Path, CAKeyFile): KeyMode, filepath.Join(d.Path, CACertFile): CertMode} {
		if got := mode(t, p); got != want {
			t.Errorf("%s: mode %v, want %v", p, got, want)
		}
	}
	caPEM, _ := os.ReadFile(filepath.Join(d.Path, CACertFile))

	if _, err := d.Init(CAOptions{Now: now}, WriteOptions{}); !errors.Is(err, ErrExists) {
		t.Fatalf("second init: err %v, want ErrExists", err)
	}
	if got, _ := os.ReadFile(filepath.Join(d.Path, CACertFile)); !bytes.Equal(got, caPEM) {
		t.Fatal("refused init changed the CA")
	}

	is, err := ca.Issue(Request{CommonName: "worker001", Now: now})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Write("worker001", is, WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	if got := mode(t, d.KeyPath("worker001")); got != KeyMode {
		t.Errorf("node key mode %v", got)
	}
	is2, _ := ca.Issue(Request{CommonName: "worker001", Now: now})
	if err := d.Write("worker001", is2, WriteOptions{}); !errors.Is(err, ErrExists) {
		t.Fatalf("overwrite without force: %v", err)
	}
	if got, _ := os.ReadFile(d.KeyPath("worker001")); !bytes.Equal(got, is.KeyPEM) {
		t.Fatal("refused write changed the key")
	}
	if err := d.Write("worker001", is2, WriteOptions{Force: true}); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(d.KeyPath("worker001")); !bytes.Equal(got, is2.KeyPEM) {
		t.Fatal("forced write did not replace the key")
	}
	if got := mode(t, d.KeyPath("worker001")); got != KeyMode {
		t.Errorf("replaced key mode %v", got)
	}
	if _, err := d.Init(CAOptions{Now: now}, WriteOptions{Force: true}); err != nil {
		t.Fatalf("forced init: %v", err)
	}
	if got, _ := os.ReadFile(filepath.Join(d.Path, CACertFile)); bytes.Equal(got, caPEM) {
		t.Fatal("forced init kept the old CA")
	}
	ents, _ := os.ReadDir(d.Path)
	for _, e := range ents {
		if e.Name()[0] == '.' {
			t.Errorf("temporary file left behind: %s", e.Name())
		}
	}
}

func TestWriteRejectsBadNames(t *testing.T) {
	d := Dir{t.TempDir()}
	ca, err := d.Init(CAOptions{Now: now}, WriteOptions{})
	if err != nil {
		t.Fatal(err)
	}
	is, _ := ca.Issue(Request{CommonName: "x", Now: now})
	for _, n := range []string{"", "../evil", "a/b", "ca", "foo-key", "with space", "nöde", ".hidden"} {
		if err := d.Write(n, is, WriteOptions{Force: true}); err == nil {
			t.Errorf("name %q accepted", n)
		}
	}
	if _, err := d.LoadCA(); err != nil {
		t.Fatalf("CA damaged by a refused name: %v", err)
	}
}

func TestList(t *testing.T) {
	d := Dir{t.TempDir()}
	ca, err := d.Init(CAOptions{Now: now}, WriteOptions{})
	if err != nil {
		t.Fatal(err)
	}
	is, _ := ca.Issue(Request{CommonName: "n1", Now: now, Lifetime: 24 * time.Hour})
	srv, _ := ca.Issue(Request{CommonName: "etcd0", Usage: Server, Now: now, IPs: []net.IP{net.ParseIP("10.0.0.1")}})
	if err := d.Write("n1", is, WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := d.Write("etcd0", srv, WriteOptions{}); err != nil {
		t.Fatal(err)
	}
	got, err := d.List()
	if err != nil {
		t.Fatal(err)
	}
	want := []CertInfo{
		{File: "ca.pem", CommonName: "meshd etcd CA", Usage: "ca", NotAfter: now.Add(DefaultCALifetime)},
		{File: "etcd0.pem", CommonName: "etcd0", Usage: "server", NotAfter: now.Add(DefaultServerLifetime)},
		{File: "n1.pem", CommonName: "n1", Usage: "client", NotAfter: now.Add(24 * time.Hour)},
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("List (-want +got):\n%s", diff)
	}
}

func TestParseKeyType(t *testing.T) {
	for in, want := range map[string]KeyType{"": ECDSAP256, "ecdsa": ECDSAP256, "ecdsa-p256": ECDSAP256, "ed25519": Ed25519} {
		if got, err := ParseKeyType(in); err != nil || got != want {
			t.Errorf("ParseKeyType(%q) = %v, %v", in, got, err)
		}
	}
	if _, err := ParseKeyType("rsa"); err == nil {
		t.Error("rsa accepted")
	}
}
