// Package dane authenticates an SMTP server's certificate chain against
// DANE TLSA records, as RFC 7672 §3 ("DANE Authentication") describes, with
// the TLSA semantics of RFC 6698, the names of RFC 7218 and the updates of
// RFC 7671.
//
// The package only answers "does this chain match these records?". Whether
// DANE applies at all is the caller's decision: the TLSA RRset must have
// been obtained with a DNSSEC-validated ("secure") answer, and so must the
// MX RRset and the MX host's address records (RFC 7672 §2.1 and §2.2). A
// secure TLSA RRset whose records are all unusable (see Usable) means
// "STARTTLS is required but the server cannot be authenticated"
// (RFC 7672 §2.2); that too is for the caller to act on. DNSSEC status, CNAME
// expansion of the TLSA base domain and the choice of reference identifiers
// (RFC 7672 §3.2.3) are not this package's concern: Verify receives the
// names it must check.
//
// Names are compared as ASCII (A-label) DNS names, case-insensitively and
// ignoring one trailing dot; the caller converts any U-labels first.
package dane

import (
	"crypto/sha256"
	"crypto/sha512"
	"crypto/x509"
	"encoding/hex"
	"fmt"
	"strings"

	"github.com/miekg/dns"
)

// Certificate usages (RFC 6698 §2.1.1, acronyms from RFC 7218 §2.1).
const (
	UsagePKIXTA uint8 = 0 // unusable for SMTP (RFC 7672 §3.1.3)
	UsagePKIXEE uint8 = 1 // unusable for SMTP (RFC 7672 §3.1.3)
	UsageDANETA uint8 = 2 // trust anchor assertion (RFC 7672 §3.1.2)
	UsageDANEEE uint8 = 3 // domain-issued certificate (RFC 7672 §3.1.1)
)

// Selectors (RFC 6698 §2.1.2, RFC 7218 §2.2).
const (
	SelectorCert uint8 = 0 // the full DER certificate
	SelectorSPKI uint8 = 1 // the DER SubjectPublicKeyInfo
)

// Matching types (RFC 6698 §2.1.3, RFC 7218 §2.3).
const (
	MatchFull   uint8 = 0 // the selected content itself
	MatchSHA256 uint8 = 1 // SHA2-256 of the selected content
	MatchSHA512 uint8 = 2 // SHA2-512 of the selected content
)

// Usable reports whether a TLSA record is usable for SMTP (RFC 7672 §3.1.3):
// usage DANE-TA(2) or DANE-EE(3), selector Cert(0) or SPKI(1), matching type
// Full(0), SHA2-256(1) or SHA2-512(2), and association data that is valid
// hex of the right length for the matching type (32 or 64 bytes for 1 or 2,
// non-empty for 0). PKIX-TA(0) and PKIX-EE(1) are unusable for SMTP: there
// is no agreed set of public CAs for MTA-to-MTA SMTP (RFC 7672 §3.1.3), so
// this package, like other DANE SMTP clients, treats them as unusable.
// Unknown parameters are unusable too (RFC 6698 §4.1, RFC 7671 §4).
func Usable(r *dns.TLSA) bool {
	if r == nil {
		return false
	}
	if r.Usage != UsageDANETA && r.Usage != UsageDANEEE {
		return false
	}
	if r.Selector != SelectorCert && r.Selector != SelectorSPKI {
		return false
	}
	data, err := hex.DecodeString(r.Certificate)
	if err != nil {
		return false
	}
	switch r.MatchingType {
	case MatchFull:
		return len(data) > 0
	case MatchSHA256:
		return len(data) == sha256.Size
	case MatchSHA512:
		return len(data) == sha512.Size
	}
	return false
}

// UsableRecords returns the usable records of rrs, in their order.
func UsableRecords(rrs []*dns.TLSA) []*dns.TLSA {
	var out []*dns.TLSA
	for _, r := range rrs {
		if Usable(r) {
			out = append(out, r)
		}
	}
	return out
}

// associationData computes the certificate association data of cert for a
// selector and matching type (RFC 6698 §2.1.2, §2.1.3). ok is false for an
// unknown selector or matching type.
func associationData(selector, matchingType uint8, cert *x509.Certificate) (data []byte, ok bool) {
	var content []byte
	switch selector {
	case SelectorCert:
		content = cert.Raw
	case SelectorSPKI:
		content = cert.RawSubjectPublicKeyInfo
	default:
		return nil, false
	}
	switch matchingType {
	case MatchFull:
		return content, true
	case MatchSHA256:
		sum := sha256.Sum256(content)
		return sum[:], true
	case MatchSHA512:
		sum := sha512.Sum512(content)
		return sum[:], true
	}
	return nil, false
}

// Record builds a TLSA record with the given usage, selector and matching
// type for cert. The owner name is left empty and the TTL zero: callers set
// them (the name is _25._tcp.<TLSA base domain>, RFC 7672 §2.2.3). For an
// unknown selector or matching type the association data is empty, so the
// record is not Usable.
func Record(usage, selector, matchingType uint8, cert *x509.Certificate) *dns.TLSA {
	r := &dns.TLSA{
		Hdr:          dns.RR_Header{Rrtype: dns.TypeTLSA, Class: dns.ClassINET},
		Usage:        usage,
		Selector:     selector,
		MatchingType: matchingType,
	}
	if cert != nil {
		if data, ok := associationData(selector, matchingType, cert); ok {
			r.Certificate = hex.EncodeToString(data)
		}
	}
	return r
}

// PolicyStrings renders records for the policy-string of a TLS-RPT report of
// policy type "tlsa" (RFC 8460 §4.4): one element per record, "U S M data",
// with the data in lowercase hex, e.g. "3 1 1 0a1b...". A nil record renders
// as an empty string, so the result stays parallel to rrs.
func PolicyStrings(rrs []*dns.TLSA) []string {
	out := make([]string, len(rrs))
	for i, r := range rrs {
		if r == nil {
			continue
		}
		out[i] = fmt.Sprintf("%d %d %d %s", r.Usage, r.Selector, r.MatchingType, strings.ToLower(r.Certificate))
	}
	return out
}

// shortRecord renders a record for a log line: "3 1 1 0a1b2c3d…".
func shortRecord(r *dns.TLSA) string {
	data := strings.ToLower(r.Certificate)
	if len(data) > 8 {
		data = data[:8] + "…"
	}
	return fmt.Sprintf("%d %d %d %s", r.Usage, r.Selector, r.MatchingType, data)
}

// shortRecords renders at most three records for a log line.
func shortRecords(rrs []*dns.TLSA) string {
	const max = 3
	parts := make([]string, 0, max+1)
	for i, r := range rrs {
		if i == max {
			parts = append(parts, fmt.Sprintf("+%d more", len(rrs)-max))
			break
		}
		parts = append(parts, shortRecord(r))
	}
	return strings.Join(parts, ", ")
}
