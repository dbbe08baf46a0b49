package delivery

import (
	"crypto/tls"
	"crypto/x509"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/delivery/policy"
	"github.com/stsrelay/stsrelay/internal/testworld"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// RFC 8461 §4.2 and the RFC 8460 result type of each way a certificate
// can fail (STS-4.2-a).
func TestVerifyCertClassifies(t *testing.T) {
	w := testworld.New(t)
	roots := w.CA.Pool()
	tests := []struct {
		name string
		kind testworld.CertKind
		san  []string
		host string
		want tlsrpt.ResultType // "" = verified
	}{
		{"valid", testworld.CertValid, []string{"mx1.ex.test"}, "mx1.ex.test", ""},
		{"wildcard matches one label", testworld.CertValid, []string{"*.ex.test"}, "mx1.ex.test", ""},
		{"wildcard does not match two labels", testworld.CertValid, []string{"*.ex.test"}, "a.b.ex.test", tlsrpt.ResultCertificateHostMismatch},
		{"expired", testworld.CertExpired, []string{"mx1.ex.test"}, "mx1.ex.test", tlsrpt.ResultCertificateExpired},
		{"self-signed", testworld.CertSelfSigned, []string{"mx1.ex.test"}, "mx1.ex.test", tlsrpt.ResultCertificateNotTrusted},
		{"unknown CA", testworld.CertUnknownCA, []string{"mx1.ex.test"}, "mx1.ex.test", tlsrpt.ResultCertificateNotTrusted},
		{"wrong name", testworld.CertWrongName, []string{"mx1.ex.test"}, "mx1.ex.test", tlsrpt.ResultCertificateHostMismatch},
		{"IP-only SAN never matches the name", testworld.CertIPOnly, []string{"127.0.0.1"}, "mx1.ex.test", tlsrpt.ResultCertificateHostMismatch},
		{"CN only is not a DNS-ID", testworld.CertCNOnly, []string{"mx1.ex.test"}, "mx1.ex.test", tlsrpt.ResultCertificateHostMismatch},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := w.CA.Issue(tc.kind, tc.san...)
			var chain []*x509.Certificate
			for _, der := range c.TLS.Certificate {
				cert, err := x509.ParseCertificate(der)
				if err != nil {
					t.Fatal(err)
				}
				chain = append(chain, cert)
			}
			err := verifyCert(tls.ConnectionState{PeerCertificates: chain}, tc.host, roots, time.Now())
			if tc.want == "" {
				if err != nil {
					t.Fatalf("not verified: %v", err)
				}
				return
			}
			// The same classification delivery applies (policy.CheckConn).
			got, reason := policy.Classify(policy.ConnState{TLS: true, CertError: err})
			if err == nil || got != tc.want || reason == "" {
				t.Fatalf("got %q (%s, %v), want %q", got, reason, err, tc.want)
			}
		})
	}
}
