package testworld

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// CertKind selects what is right or wrong with a certificate from CA.Issue,
// one kind per way a server certificate fails (or passes) verification.
type CertKind int

const (
	// CertValid is issued by the test root with the names as DNS SANs; a
	// name "*.x" becomes a wildcard SAN.
	CertValid CertKind = iota
	// CertExpired is like CertValid but its validity ended 30 days ago.
	CertExpired
	// CertNotYetValid is like CertValid but its validity starts in 30 days.
	CertNotYetValid
	// CertSelfSigned carries the names but is signed by its own key.
	CertSelfSigned
	// CertUnknownCA carries the names but chains to a second root that is
	// in no pool or file the world hands out (see CA.UnknownRootPEM).
	CertUnknownCA
	// CertWrongName is issued by the test root for "wrong.invalid" only,
	// whatever names are asked for.
	CertWrongName
	// CertIPOnly has only IP SANs: the names, which must be IP addresses.
	CertIPOnly
	// CertCNOnly has names[0] as Subject CN and no SAN at all, which modern
	// verifiers (Go's included) refuse.
	CertCNOnly
)

var certKindNames = [...]string{"valid", "expired", "not-yet-valid", "self-signed", "unknown-ca", "wrong-name", "ip-only", "cn-only"}

func (k CertKind) String() string {
	if k >= 0 && int(k) < len(certKindNames) {
		return certKindNames[k]
	}
	return fmt.Sprintf("CertKind(%d)", int(k))
}

// Cert is an issued certificate with its key, in memory and on disk.
type Cert struct {
	TLS      tls.Certificate // for tls.Config.Certificates; Leaf is set
	Leaf     *x509.Certificate
	CertPEM  []byte // the leaf certificate
	KeyPEM   []byte // PKCS #8 private key
	CertFile string // CertPEM written to a temporary file
	KeyFile  string // KeyPEM written to a temporary file
}

// CA is the world's certificate authority: a test root (trusted through
// World.CAFile or Pool) and a second, unrelated root that signs
// CertUnknownCA certificates. Both use ECDSA P-256.
type CA struct {
	t testing.TB // nil outside a test: Issue then panics on error

	root, unknown       *x509.Certificate
	rootKey, unknownKey *ecdsa.PrivateKey
	rootPEM, unknownPEM []byte

	mu     sync.Mutex
	dir    string
	serial int64
}

// NewCA creates a CA whose issued certificates and keys are written to
// dir.
func NewCA(dir string) (*CA, error) {
	c := &CA{serial: 1, dir: dir}
	var err error
	if c.root, c.rootKey, c.rootPEM, err = c.newRoot("testworld root CA"); err != nil {
		return nil, err
	}
	if c.unknown, c.unknownKey, c.unknownPEM, err = c.newRoot("testworld unknown CA"); err != nil {
		return nil, err
	}
	return c, nil
}

func (c *CA) newRoot(name string) (*x509.Certificate, *ecdsa.PrivateKey, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("testworld: generate key: %w", err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(c.nextSerial()),
		Subject:               pkix.Name{CommonName: name, Organization: []string{"testworld"}},
		NotBefore:             now.Add(-30 * 24 * time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("testworld: create root: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("testworld: parse root: %w", err)
	}
	return cert, key, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
}

func (c *CA) nextSerial() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.serial++
	return c.serial
}

// RootPEM is the PEM encoding of the test root certificate.
func (c *CA) RootPEM() []byte { return append([]byte(nil), c.rootPEM...) }

// Pool is a certificate pool holding only the test root.
func (c *CA) Pool() *x509.CertPool {
	p := x509.NewCertPool()
	p.AddCert(c.root)
	return p
}

// UnknownRootPEM is the PEM encoding of the root that signs CertUnknownCA
// certificates, for tests that want to trust it after all.
func (c *CA) UnknownRootPEM() []byte { return append([]byte(nil), c.unknownPEM...) }

// Issue creates a certificate of the given kind for names, writes it and its
// key to a temporary directory, and returns it. At least one name is needed,
// except for CertWrongName. It fails the test on error (IssueCert returns
// the error).
func (c *CA) Issue(kind CertKind, names ...string) *Cert {
	cert, err := c.IssueCert(kind, names...)
	if err != nil {
		if c.t != nil {
			c.t.Helper()
			c.t.Fatal(err)
		}
		panic(err)
	}
	return cert
}

// IssueCert is Issue returning its error.
func (c *CA) IssueCert(kind CertKind, names ...string) (*Cert, error) {
	if len(names) == 0 && kind != CertWrongName {
		return nil, fmt.Errorf("testworld: Issue(%v) needs at least one name", kind)
	}
	now := time.Now()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("testworld: generate key: %w", err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(c.nextSerial()),
		Subject:      pkix.Name{Organization: []string{"testworld"}},
		NotBefore:    now.Add(-48 * time.Hour),
		NotAfter:     now.Add(365 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	if len(names) > 0 {
		tmpl.Subject.CommonName = names[0]
	}
	parent, parentKey := c.root, c.rootKey
	switch kind {
	case CertValid:
	case CertExpired:
		tmpl.NotBefore = now.Add(-60 * 24 * time.Hour)
		tmpl.NotAfter = now.Add(-30 * 24 * time.Hour)
	case CertNotYetValid:
		tmpl.NotBefore = now.Add(30 * 24 * time.Hour)
	case CertSelfSigned:
		parent, parentKey = tmpl, key
	case CertUnknownCA:
		parent, parentKey = c.unknown, c.unknownKey
	case CertWrongName:
		names = []string{"wrong.invalid"}
		tmpl.Subject.CommonName = names[0]
	case CertIPOnly:
		tmpl.Subject.CommonName = ""
		for _, n := range names {
			ip := net.ParseIP(n)
			if ip == nil {
				return nil, fmt.Errorf("testworld: Issue(CertIPOnly): %q is not an IP address", n)
			}
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		}
	case CertCNOnly:
	default:
		return nil, fmt.Errorf("testworld: Issue: unknown kind %v", kind)
	}
	if kind != CertIPOnly && kind != CertCNOnly {
		tmpl.DNSNames = names
	}

	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		return nil, fmt.Errorf("testworld: issue %v certificate for %v: %w", kind, names, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("testworld: parse issued certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("testworld: marshal key: %w", err)
	}
	cert := &Cert{
		TLS:     tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf},
		Leaf:    leaf,
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
	}
	dir := c.dir
	serial := leaf.SerialNumber.String()
	cert.CertFile = filepath.Join(dir, "cert-"+serial+".pem")
	cert.KeyFile = filepath.Join(dir, "key-"+serial+".pem")
	if err := os.WriteFile(cert.CertFile, cert.CertPEM, 0o644); err != nil {
		return nil, fmt.Errorf("testworld: write certificate: %w", err)
	}
	if err := os.WriteFile(cert.KeyFile, cert.KeyPEM, 0o600); err != nil {
		return nil, fmt.Errorf("testworld: write key: %w", err)
	}
	return cert, nil
}
