package delivery

import (
	"crypto/tls"
	"crypto/x509"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/testworld"
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
		want string // "" = verified
	}{
		{"valid", testworld.CertValid, []string{"mx1.ex.test"}, "mx1.ex.test", ""},
		{"wildcard matches one label", testworld.CertValid, []string{"*.ex.test"}, "mx1.ex.test", ""},
		{"wildcard does not match two labels", testworld.CertValid, []string{"*.ex.test"}, "a.b.ex.test", ResultCertHostMismatch},
		{"expired", testworld.CertExpired, []string{"mx1.ex.test"}, "mx1.ex.test", ResultCertExpired},
		{"self-signed", testworld.CertSelfSigned, []string{"mx1.ex.test"}, "mx1.ex.test", ResultCertNotTrusted},
		{"unknown CA", testworld.CertUnknownCA, []string{"mx1.ex.test"}, "mx1.ex.test", ResultCertNotTrusted},
		{"wrong name", testworld.CertWrongName, []string{"mx1.ex.test"}, "mx1.ex.test", ResultCertHostMismatch},
		{"IP-only SAN never matches the name", testworld.CertIPOnly, []string{"127.0.0.1"}, "mx1.ex.test", ResultCertHostMismatch},
		{"CN only is not a DNS-ID", testworld.CertCNOnly, []string{"mx1.ex.test"}, "mx1.ex.test", ResultCertHostMismatch},
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
			got := verifyCert(tls.ConnectionState{PeerCertificates: chain}, tc.host, roots, time.Now())
			if tc.want == "" {
				if !got.Verified {
					t.Fatalf("not verified: %s %s", got.ResultType, got.Reason)
				}
				return
			}
			if got.Verified || got.ResultType != tc.want || got.Reason == "" {
				t.Fatalf("got verified=%v %q (%s), want %q", got.Verified, got.ResultType, got.Reason, tc.want)
			}
		})
	}
}
