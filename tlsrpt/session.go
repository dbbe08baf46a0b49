package tlsrpt

import "time"

// Session is the outcome of one SMTP session: one connection and TLS
// negotiation attempt to one MX IP (RFC 8460 §4.2), not one message.
type Session struct {
	// Time is when the session happened; it picks the period. Zero means
	// the recorder's now().
	Time time.Time
	// PolicyDomain is the policy domain (the recipient domain, or the
	// next hop's), as an A-label (domain.Domain.ASCII).
	PolicyDomain string
	// PolicyType is the policy applied; empty or unknown means
	// no-policy-found. A failure with an sts-policy-* result type
	// (the domain publishes an _mta-sts record but no valid policy could
	// be had) is always counted under PolicyTypeSTS, with the
	// PolicyString and MXPatterns given (usually none), as §4.3.2.2
	// requires.
	PolicyType PolicyType
	// PolicyString is the applied policy, one element per line (each mx
	// line separately, §4.5); for TLSA one element per RR.
	PolicyString []string
	// MXPatterns are the policy's mx patterns (§4.4 "mx-host").
	MXPatterns []string
	// Success: a policy-compliant TLS session was negotiated (§4.2.1).
	Success bool
	// ResultType is the §4.3 result type of a failure; empty or unknown
	// on failure means validation-failure.
	ResultType ResultType
	// SendingIP is our address, ReceivingMX the MX host name,
	// ReceivingHelo the first word of its greeting, ReceivingIP its
	// address. Empty when the failure came before any MX was tried.
	SendingIP, ReceivingMX, ReceivingHelo, ReceivingIP string
	// FailureReasonCode is a short, stable code (§4.3.1, §4.3.3), as
	// Classify gives: no times, ports or peer text, which would make
	// every session its own failure-details entry. AdditionalInfo is an
	// optional URI (§4.4 "additional-information").
	FailureReasonCode, AdditionalInfo string
}

// Bounds on the strings of a Session that reach the aggregate key, the
// counts file and the report (the MX's greeting word and host name come
// from peers). Record truncates longer strings and replaces bytes outside
// printable ASCII with '?'.
const (
	MaxNameLen   = 255 // policy domain, MX host name, HELO name
	MaxIPLen     = 64  // IP addresses (an IPv6 address with a zone fits)
	MaxReasonLen = 64  // failure-reason-code
	MaxInfoLen   = 255 // additional-information
)

// Bound returns s cut to at most n bytes, with every byte outside
// printable ASCII replaced by '?'. It does not allocate when s is already
// within bounds.
func Bound(s string, n int) string {
	clean := len(s) <= n
	for i := 0; clean && i < len(s); i++ {
		clean = s[i] >= 0x20 && s[i] < 0x7f
	}
	if clean {
		return s
	}
	b := []byte(s[:min(len(s), n)])
	for i, c := range b {
		if c < 0x20 || c >= 0x7f {
			b[i] = '?'
		}
	}
	return string(b)
}
