package tlsrpt

import (
	"strings"

	"golang.org/x/net/publicsuffix"
)

// ContactMatchesSubmitter reports whether the domain of contact-info (a
// mailto: URI or an address) is the submitter's domain — the relay's
// hostname — or a parent of it up to the organisational domain (public
// suffix plus one label): relay.example.net may give
// postmaster@example.net, not postmaster@net. RFC 8460 §5.3 asks that
// TLS-Report-Submitter be the domain responsible for the reports.
func ContactMatchesSubmitter(contactInfo, hostname string) bool {
	_, dom, ok := strings.Cut(ContactAddress(contactInfo), "@")
	if !ok {
		return false
	}
	dom, host := NormDomain(dom), NormDomain(hostname)
	if dom == "" || host == "" {
		return false
	}
	if dom == host {
		return true
	}
	if !strings.HasSuffix(host, "."+dom) {
		return false
	}
	org, err := publicsuffix.EffectiveTLDPlusOne(host)
	if err != nil {
		return false
	}
	// dom is a parent of host; it must not be above the organisation.
	return dom == org || strings.HasSuffix(dom, "."+org)
}
