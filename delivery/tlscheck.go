package delivery

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"time"

	"github.com/stsrelay/stsrelay/delivery/policy"
)

// verifyCert checks the server's chain as RFC 8461 §4.2 demands: it must
// chain to a trusted root, be valid now, and carry a DNS-ID (SAN dNSName;
// never the CN, never an IP) matching the MX host name, wildcards per RFC
// 6125 (Go's x509 matches a "*." SAN against exactly one label). It
// returns nil for a valid certificate, else the verification error, which
// policy.CheckConn classifies.
func verifyCert(state tls.ConnectionState, host string, roots *x509.CertPool, now time.Time) error {
	if len(state.PeerCertificates) == 0 {
		return policy.ErrNoCertificate
	}
	leaf := state.PeerCertificates[0]
	inter := x509.NewCertPool()
	for _, c := range state.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	_, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now, DNSName: host})
	return err
}

func tlsVersionName(v uint16) string {
	switch v {
	case tls.VersionTLS10:
		return "TLS1.0"
	case tls.VersionTLS11:
		return "TLS1.1"
	case tls.VersionTLS12:
		return "TLS1.2"
	case tls.VersionTLS13:
		return "TLS1.3"
	case 0:
		return ""
	}
	return fmt.Sprintf("0x%04x", v)
}
