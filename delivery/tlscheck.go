package delivery

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"time"
)

// RFC 8460 §4.3 result types for the failures a delivery session can see.
const (
	ResultSTARTTLSNotSupported = "starttls-not-supported"
	ResultCertHostMismatch     = "certificate-host-mismatch"
	ResultCertExpired          = "certificate-expired"
	ResultCertNotTrusted       = "certificate-not-trusted"
	ResultValidationFailure    = "validation-failure"
)

// certCheck is the outcome of checking an MX certificate.
type certCheck struct {
	Verified   bool
	ResultType string // when not verified
	Reason     string
}

// verifyCert checks the server's chain as RFC 8461 §4.2 demands: it must
// chain to a trusted root, be valid now, and carry a DNS-ID (SAN dNSName;
// never the CN, never an IP) matching the MX host name, wildcards per RFC
// 6125 (Go's x509 matches a "*." SAN against exactly one label).
func verifyCert(state tls.ConnectionState, host string, roots *x509.CertPool, now time.Time) certCheck {
	if len(state.PeerCertificates) == 0 {
		return certCheck{ResultType: ResultValidationFailure, Reason: "no certificate presented"}
	}
	leaf := state.PeerCertificates[0]
	inter := x509.NewCertPool()
	for _, c := range state.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	opts := x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now, DNSName: host}
	if _, err := leaf.Verify(opts); err != nil {
		return classifyCertError(err)
	}
	return certCheck{Verified: true}
}

// classifyCertError maps a verification error to its RFC 8460 result
// type.
func classifyCertError(err error) certCheck {
	var inv x509.CertificateInvalidError
	var unk x509.UnknownAuthorityError
	var host x509.HostnameError
	switch {
	case errors.As(err, &inv) && inv.Reason == x509.Expired:
		return certCheck{ResultType: ResultCertExpired, Reason: err.Error()}
	case errors.As(err, &unk):
		return certCheck{ResultType: ResultCertNotTrusted, Reason: err.Error()}
	case errors.As(err, &host):
		return certCheck{ResultType: ResultCertHostMismatch, Reason: err.Error()}
	default:
		return certCheck{ResultType: ResultValidationFailure, Reason: err.Error()}
	}
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
