package testworld

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
)

func TestCertKinds(t *testing.T) {
	t.Parallel()
	w := New(t)
	type want int
	const (
		ok want = iota
		expired
		unknownAuthority
		wrongHost
	)
	tests := []struct {
		name  string
		kind  CertKind
		names []string
		host  string
		want  want
	}{
		{"valid cert verifies for its name", CertValid, []string{"mx1.ex.test", "mx2.ex.test"}, "mx2.ex.test", ok},
		{"valid cert fails for another name", CertValid, []string{"mx1.ex.test"}, "mx9.ex.test", wrongHost},
		{"wildcard SAN covers one label", CertValid, []string{"*.ex.test"}, "mta-sts.ex.test", ok},
		{"wildcard SAN does not cover two labels", CertValid, []string{"*.ex.test"}, "a.b.ex.test", wrongHost},
		{"wildcard SAN does not cover the parent", CertValid, []string{"*.ex.test"}, "ex.test", wrongHost},
		{"expired cert fails as expired", CertExpired, []string{"mx1.ex.test"}, "mx1.ex.test", expired},
		{"not-yet-valid cert fails as expired", CertNotYetValid, []string{"mx1.ex.test"}, "mx1.ex.test", expired},
		{"self-signed cert has an unknown authority", CertSelfSigned, []string{"mx1.ex.test"}, "mx1.ex.test", unknownAuthority},
		{"unknown-CA cert has an unknown authority", CertUnknownCA, []string{"mx1.ex.test"}, "mx1.ex.test", unknownAuthority},
		{"wrong-name cert fails the host name check", CertWrongName, []string{"mx1.ex.test"}, "mx1.ex.test", wrongHost},
		{"wrong-name cert is for wrong.invalid", CertWrongName, nil, "wrong.invalid", ok},
		{"IP-only cert fails for a host name", CertIPOnly, []string{"127.0.0.10"}, "mx1.ex.test", wrongHost},
		{"IP-only cert verifies for its IP", CertIPOnly, []string{"127.0.0.10"}, "127.0.0.10", ok},
		{"CN-only cert fails the host name check", CertCNOnly, []string{"mx1.ex.test"}, "mx1.ex.test", wrongHost},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := w.CA.Issue(tc.kind, tc.names...)
			_, err := c.Leaf.Verify(x509.VerifyOptions{DNSName: tc.host, Roots: w.CA.Pool()})
			var invalid x509.CertificateInvalidError
			var unknown x509.UnknownAuthorityError
			var hostErr x509.HostnameError
			switch tc.want {
			case ok:
				if err != nil {
					t.Errorf("verify: %v, want success", err)
				}
			case expired:
				if !errors.As(err, &invalid) || invalid.Reason != x509.Expired {
					t.Errorf("verify: %v, want an x509 expired error", err)
				}
			case unknownAuthority:
				if !errors.As(err, &unknown) {
					t.Errorf("verify: %v, want x509.UnknownAuthorityError", err)
				}
			case wrongHost:
				if !errors.As(err, &hostErr) {
					t.Errorf("verify: %v, want x509.HostnameError", err)
				}
			}
		})
	}
}

func TestCertKindDetails(t *testing.T) {
	t.Parallel()
	w := New(t)
	if c := w.CA.Issue(CertCNOnly, "mx1.ex.test"); c.Leaf.Subject.CommonName != "mx1.ex.test" || len(c.Leaf.DNSNames)+len(c.Leaf.IPAddresses) != 0 {
		t.Errorf("CN-only: CN %q SANs %v %v", c.Leaf.Subject.CommonName, c.Leaf.DNSNames, c.Leaf.IPAddresses)
	}
	if c := w.CA.Issue(CertIPOnly, "127.0.0.10"); len(c.Leaf.DNSNames) != 0 || len(c.Leaf.IPAddresses) != 1 || !c.Leaf.IPAddresses[0].Equal(net.ParseIP("127.0.0.10")) {
		t.Errorf("IP-only: SANs %v %v", c.Leaf.DNSNames, c.Leaf.IPAddresses)
	}
	// The unknown CA really is a CA: trusting it makes CertUnknownCA verify.
	unknownPool := x509.NewCertPool()
	unknownPool.AppendCertsFromPEM(w.CA.UnknownRootPEM())
	if _, err := w.CA.Issue(CertUnknownCA, "a.test").Leaf.Verify(x509.VerifyOptions{DNSName: "a.test", Roots: unknownPool}); err != nil {
		t.Errorf("unknown-CA cert against its own root: %v", err)
	}
}

func TestCertFilesAndCAFile(t *testing.T) {
	t.Parallel()
	w := New(t)
	c := w.CA.Issue(CertValid, "mx1.ex.test")
	pair, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
	if err != nil {
		t.Fatalf("load written pair: %v", err)
	}
	if string(pair.Certificate[0]) != string(c.TLS.Certificate[0]) {
		t.Errorf("file certificate differs from Cert.TLS")
	}
	pemData, err := os.ReadFile(w.CAFile())
	if err != nil {
		t.Fatal(err)
	}
	if strings.Count(string(pemData), "BEGIN CERTIFICATE") != 1 {
		t.Errorf("CA file should hold exactly the test root")
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemData) {
		t.Fatalf("CA file does not parse")
	}
	if _, err := c.Leaf.Verify(x509.VerifyOptions{DNSName: "mx1.ex.test", Roots: pool}); err != nil {
		t.Errorf("verify against CA file: %v", err)
	}
	if first := w.CAFile(); w.CAFile() != first {
		t.Errorf("CAFile should be written once")
	}
}

func TestWorldAddresses(t *testing.T) {
	t.Parallel()
	w := New(t)
	seen := map[string]bool{}
	var prefix string
	for range 20 {
		ip := net.ParseIP(w.NextIP()).To4()
		if ip == nil || ip[0] != 127 || ip[3] < firstHost {
			t.Fatalf("NextIP gave %v", ip)
		}
		p := fmt.Sprint(ip[1], ".", ip[2])
		if prefix == "" {
			prefix = p
		} else if p != prefix {
			t.Errorf("addresses leave the world's /24: %v", ip)
		}
		if seen[ip.String()] {
			t.Errorf("NextIP repeated %v", ip)
		}
		seen[ip.String()] = true
	}
	if mx := w.MXPort(); mx == 0 || w.MXPort() != mx || w.HTTPSPort() == 0 || w.HTTPSPort() == w.MXPort() {
		t.Errorf("ports: MX %d, HTTPS %d", w.MXPort(), w.HTTPSPort())
	}
}
