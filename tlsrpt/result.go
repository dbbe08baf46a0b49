package tlsrpt

// The vocabulary of RFC 8460 shared by delivery, mtasts and this package:
// the policy types of §4.4 and the result types of §4.3. A session's
// outcome is classified once (Classify, or a constant chosen by the
// caller) and the log line, the metric and the report all carry that same
// value.

// PolicyType is a report's "policy-type" (RFC 8460 §4.4).
type PolicyType string

// Policy types (RFC 8460 §4.4).
const (
	// PolicyTypeSTS: an MTA-STS policy applied, or the domain publishes
	// an _mta-sts record but no valid policy could be fetched (then with
	// result types sts-policy-fetch-error, sts-policy-invalid or
	// sts-webpki-invalid, §4.3.2).
	PolicyTypeSTS PolicyType = "sts"
	// PolicyTypeTLSA: DANE TLSA records applied (RFC 7672).
	PolicyTypeTLSA PolicyType = "tlsa"
	// PolicyTypeNoPolicyFound: neither applied.
	PolicyTypeNoPolicyFound PolicyType = "no-policy-found"
)

// Valid reports whether t is one of the three policy types.
func (t PolicyType) Valid() bool {
	switch t {
	case PolicyTypeSTS, PolicyTypeTLSA, PolicyTypeNoPolicyFound:
		return true
	}
	return false
}

// ResultType is a failure's "result-type" (RFC 8460 §4.3, registry §6.6).
type ResultType string

// Result types (RFC 8460 §4.3).
const (
	// §4.3.1 negotiation failures.
	ResultSTARTTLSNotSupported    ResultType = "starttls-not-supported"
	ResultCertificateHostMismatch ResultType = "certificate-host-mismatch"
	ResultCertificateExpired      ResultType = "certificate-expired"
	ResultCertificateNotTrusted   ResultType = "certificate-not-trusted"
	ResultValidationFailure       ResultType = "validation-failure"
	// §4.3.2.1 DANE (RFC 7672).
	ResultTLSAInvalid   ResultType = "tlsa-invalid"
	ResultDNSSECInvalid ResultType = "dnssec-invalid"
	ResultDANERequired  ResultType = "dane-required"
	// §4.3.2.2 MTA-STS policy failures.
	ResultSTSPolicyFetchError ResultType = "sts-policy-fetch-error"
	ResultSTSPolicyInvalid    ResultType = "sts-policy-invalid"
	ResultSTSWebPKIInvalid    ResultType = "sts-webpki-invalid"
)

// Valid reports whether t is one of the result types of §4.3.
func (t ResultType) Valid() bool {
	switch t {
	case ResultSTARTTLSNotSupported, ResultCertificateHostMismatch, ResultCertificateExpired,
		ResultCertificateNotTrusted, ResultValidationFailure, ResultTLSAInvalid, ResultDNSSECInvalid,
		ResultDANERequired, ResultSTSPolicyFetchError, ResultSTSPolicyInvalid, ResultSTSWebPKIInvalid:
		return true
	}
	return false
}

// IsSTSPolicyFailure reports whether t says an MTA-STS policy could not be
// had (§4.3.2.2). Such a session is reported under policy-type "sts" even
// though no policy was applied.
func (t ResultType) IsSTSPolicyFailure() bool {
	return t == ResultSTSPolicyFetchError || t == ResultSTSPolicyInvalid || t == ResultSTSWebPKIInvalid
}

// Reason codes ("failure-reason-code", §4.3.1, §4.3.3) for the outcomes a
// caller decides without an error value to Classify. Reason codes are
// short and stable: one code per kind of failure, never a time, a port,
// an address or text a peer sent, so that sessions failing the same way
// aggregate into one failure-details entry.
const (
	ReasonSTARTTLSNotOffered = "starttls-not-offered"
	// ReasonSTARTTLSInjection: the server sent data after its 220 reply
	// to STARTTLS, before the handshake (RFC 3207 §4.2, command injection).
	ReasonSTARTTLSInjection = "starttls-plaintext-injection"
	ReasonNoCertificate     = "no-certificate"
	// ReasonMXMismatch: the MX is not listed in the MTA-STS policy; RFC
	// 8460 has no result type of its own for it, so it is
	// validation-failure with this code (as mox reports it).
	ReasonMXMismatch = "mtasts-policy-mx-mismatch"
)
