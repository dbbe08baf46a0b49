package mtasts

import (
	"errors"

	"github.com/stsrelay/stsrelay/tlsrpt"
)

// Failure is a failed policy discovery or fetch, classified for TLS-RPT
// (RFC 8461 §6, RFC 8460 §4.3.2.2). Fetcher.Fetch returns one for every
// failed fetch; the policy cache (mtasts/mtastsdb) also makes one of a
// failed "_mta-sts" TXT lookup (AsFailure) when a cached policy is
// applied regardless, since that failure is reportable too.
type Failure struct {
	// ResultType is one of RFC 8460 §4.3.2.2: sts-policy-fetch-error,
	// sts-policy-invalid or sts-webpki-invalid.
	ResultType tlsrpt.ResultType
	// Reason is a short, stable failure-reason-code for TLS-RPT
	// ("http-status-404", "content-type", "certificate-expired",
	// "dns-error", "no-record", ...): no URLs, times or peer text, so
	// that failures aggregate.
	Reason string
	// Err says what went wrong. For a fetch it wraps ErrPolicyFetch,
	// ErrPolicySyntax or ErrWebPKI; for a discovery failure, ErrDNS,
	// ErrNoRecord, ErrMultipleRecords or ErrRecordSyntax.
	Err error
}

func (e *Failure) Error() string {
	if e.Err == nil {
		return string(e.ResultType)
	}
	return e.Err.Error()
}
func (e *Failure) Unwrap() error { return e.Err }

// ResultType returns the RFC 8460 result-type for an error of this
// package: that of a *Failure in the chain, else one derived from the
// sentinel errors; "" for nil or an unrelated error.
func ResultType(err error) tlsrpt.ResultType {
	if err == nil {
		return ""
	}
	var fe *Failure
	if errors.As(err, &fe) {
		return fe.ResultType
	}
	switch {
	case errors.Is(err, ErrWebPKI):
		return tlsrpt.ResultSTSWebPKIInvalid
	case errors.Is(err, ErrPolicySyntax), errors.Is(err, ErrRecordSyntax), errors.Is(err, ErrMultipleRecords):
		return tlsrpt.ResultSTSPolicyInvalid
	case errors.Is(err, ErrPolicyFetch), errors.Is(err, ErrDNS), errors.Is(err, ErrNoRecord):
		return tlsrpt.ResultSTSPolicyFetchError
	}
	return ""
}

// AsFailure classifies an error of this package (a fetch or a discovery
// error) for TLS-RPT: the *Failure in its chain, or a new one wrapping
// err with its result type and reason.
func AsFailure(err error) *Failure {
	var fe *Failure
	if errors.As(err, &fe) {
		return fe
	}
	return &Failure{ResultType: ResultType(err), Reason: reasonOf(err), Err: err}
}

// reasonOf is the failure-reason-code of a failure that is not a fetch:
// the TXT discovery (RFC 8461 §3.1).
func reasonOf(err error) string {
	var fe *Failure
	switch {
	case errors.As(err, &fe):
		return fe.Reason
	case errors.Is(err, ErrDNS):
		return "dns-error"
	case errors.Is(err, ErrNoRecord):
		return "no-record"
	case errors.Is(err, ErrMultipleRecords):
		return "multiple-records"
	case errors.Is(err, ErrRecordSyntax):
		return "record-syntax"
	}
	return "unknown"
}
