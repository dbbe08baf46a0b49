package dane

import (
	"crypto/tls"
	"slices"
	"time"

	"github.com/miekg/dns"
)

// Config returns a *tls.Config for a DANE-authenticated session: a clone of
// base (a zero Config if base is nil) with ServerName set to sni, which per
// RFC 7672 §8.1 is the TLSA base domain; InsecureSkipVerify set, because
// DANE replaces WebPKI verification; and a VerifyConnection that runs
// Verify(rrs, cs.PeerCertificates, names, now()) and fails the handshake
// with its error (the client then sends a bad_certificate alert). Any
// VerifyConnection in base is replaced. rrs and names are copied. A nil now
// means time.Now. base is not modified.
func Config(base *tls.Config, sni string, rrs []*dns.TLSA, names []string, now func() time.Time) *tls.Config {
	var c *tls.Config
	if base != nil {
		c = base.Clone()
	} else {
		c = &tls.Config{}
	}
	if now == nil {
		now = time.Now
	}
	rrs = slices.Clone(rrs)
	names = slices.Clone(names)
	c.ServerName = sni
	c.InsecureSkipVerify = true
	c.VerifyConnection = func(cs tls.ConnectionState) error {
		return Verify(rrs, cs.PeerCertificates, names, now())
	}
	return c
}
