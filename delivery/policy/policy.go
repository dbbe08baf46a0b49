// Package policy decides, for one message and one MX host, whether a
// delivery session may be used: before connecting (CheckMX) and once the
// session is set up (CheckConn). It is pure (no sockets, no clock, no
// state), so the whole matrix of MTA-STS modes, transports, certificate
// failures, REQUIRETLS and "TLS-Required: No" is tested as a table.
//
// Every path of delivery goes through these two functions: a fresh
// connection, a parked one, the plaintext fallback, report mail. A Verdict
// carries the session's TLS-RPT result (RFC 8460 §4.3) with a stable
// reason code, and delivery logs, counts and reports exactly that value,
// so the log line, the metric and the report always agree.
package policy

import (
	"errors"
	"net/textproto"

	"github.com/stsrelay/stsrelay/mtasts"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// Policy is what the decision knows of a message's destination.
type Policy struct {
	// STS is the MTA-STS policy in force, nil when there is none. A
	// policy in mode none counts as none (RFC 8461 §5).
	STS *mtasts.Policy
	// FetchFailure is set when the domain publishes an _mta-sts record
	// but no valid policy could be fetched (RFC 8460 §4.3.2.2). Without a
	// cached policy delivery goes on as without one (RFC 8461 §5), and
	// each session is reported under policy-type sts with this result,
	// not as no-policy-found. With a cached policy (a new id that could
	// not be fetched, RFC 8461 §5.1), the cached policy applies and a
	// session that TLS did not fail otherwise is reported with this
	// result: the domain owner learns that the new policy is
	// unreachable.
	FetchFailure tlsrpt.ResultType
	// FetchReason is FetchFailure's reason code.
	FetchReason string
	// RequireTLS is the message's REQUIRETLS MAIL parameter (RFC 8689
	// §4.2.1): an MX validated by MTA-STS, verified TLS, and REQUIRETLS
	// offered by the server, or the message is not sent.
	RequireTLS bool
	// TLSRequiredNo is the message's "TLS-Required: No" header (RFC 8689
	// §5): MTA-STS is not applied to it and TLS-RPT does not count its
	// sessions. Ignored with RequireTLS, which wins (RFC 8689 §5).
	TLSRequiredNo bool
	// Uncounted keeps the message's sessions out of TLS-RPT: a report
	// mail (RFC 8460 §5.3: reports about report delivery would loop).
	Uncounted bool
	// Override is the local TLS override for the destination (a
	// [[tls_policy]], or a route's require_tls), "" when none.
	Override Security
	// OverrideWeakens (override_policy) lets an Override weaker than
	// verify set an enforce MTA-STS policy aside: the policy is then
	// applied as in testing mode (failures recorded, not enforced).
	// Without it such an Override is ignored under enforce (RFC 8461 §5).
	OverrideWeakens bool
}

// Security is a local TLS requirement, as in Postfix's
// smtp_tls_policy_maps.
type Security string

// Security levels, strongest first.
const (
	// SecurityDANE is accepted and treated as SecurityVerify until DANE
	// (RFC 7672) is implemented.
	SecurityDANE Security = "dane"
	// SecurityVerify: STARTTLS and a certificate verified for the MX name.
	SecurityVerify Security = "verify"
	// SecurityEncrypt: STARTTLS required, the certificate not checked.
	SecurityEncrypt Security = "encrypt"
	// SecurityMay: opportunistic TLS, plaintext when it fails.
	SecurityMay Security = "may"
	// SecurityNone: no STARTTLS.
	SecurityNone Security = "none"
)

// rawEnforce reports whether an enforce policy is in force before any
// override.
func (p *Policy) rawEnforce() bool {
	return p.STS != nil && !p.ignoresSTS() && p.STS.Mode == mtasts.ModeEnforce
}

// security is the Override that applies: "" when there is none, when the
// message sets policies aside (TLS-Required: No, RFC 8689 §5), or when it
// would weaken an enforce policy without OverrideWeakens.
func (p *Policy) security() Security {
	o := p.Override
	if o == SecurityDANE {
		o = SecurityVerify
	}
	if o == "" || p.ignoresSTS() {
		return ""
	}
	if o != SecurityVerify && p.rawEnforce() && !p.OverrideWeakens {
		return ""
	}
	return o
}

// Weakens reports whether the Override sets an enforce MTA-STS policy
// aside (override_policy): delivery logs a warning at each use.
func (p Policy) Weakens() bool {
	s := p.security()
	return p.rawEnforce() && s != "" && s != SecurityVerify
}

// OverrideIgnored reports whether an Override is configured but does not
// apply, because it would weaken an enforce MTA-STS policy.
func (p Policy) OverrideIgnored() bool {
	return p.Override != "" && !p.ignoresSTS() && p.security() == ""
}

// STARTTLS reports whether a session should try STARTTLS at all (not
// with security = "none").
func (p Policy) STARTTLS() bool { return p.security() != SecurityNone }

// mode is the MTA-STS mode that applies: "" when none does.
func (p *Policy) mode() mtasts.Mode {
	if p.STS == nil || p.ignoresSTS() || p.STS.Mode == mtasts.ModeNone {
		return ""
	}
	if p.Weakens() {
		// override_policy: enforce is applied as testing.
		return mtasts.ModeTesting
	}
	return p.STS.Mode
}

func (p *Policy) ignoresSTS() bool { return p.TLSRequiredNo && !p.RequireTLS }

// counted reports whether the message's sessions count for TLS-RPT.
func (p *Policy) counted() bool { return !p.Uncounted && !p.ignoresSTS() }

// policyType is the RFC 8460 §4.4 policy type the sessions fall under.
func (p *Policy) policyType() tlsrpt.PolicyType {
	if p.mode() != "" || p.fetchFailed() {
		return tlsrpt.PolicyTypeSTS
	}
	return tlsrpt.PolicyTypeNoPolicyFound
}

// fetchFailed reports whether the session is to be counted as the
// policy fetch failure.
func (p *Policy) fetchFailed() bool {
	return p.FetchFailure != "" && !p.ignoresSTS()
}

// matches reports whether the MX host is listed by the policy in force
// (RFC 8461 §4.1).
func (p *Policy) matches(mx string) bool { return p.STS != nil && p.STS.Matches(mx) }

// ConnState is what a session set-up learnt about TLS.
type ConnState struct {
	// STARTTLSOffered: the server's first EHLO reply listed STARTTLS.
	STARTTLSOffered bool
	// STARTTLSReply is the reply code when STARTTLS was refused (454,
	// say); 0 otherwise.
	STARTTLSReply int
	// HandshakeError is why the TLS handshake failed (or
	// ErrSTARTTLSInjection); nil when it succeeded or was not tried.
	HandshakeError error
	// TLS: the session runs over TLS.
	TLS bool
	// CertError is nil when the MX certificate chained to a trusted root,
	// was valid now and matched the MX host name (RFC 8461 §4.2), and
	// otherwise the verification error.
	CertError error
	// REQUIRETLSOffered: the EHLO reply after STARTTLS listed REQUIRETLS.
	REQUIRETLSOffered bool
	// Fallback: this is a new plaintext connection made after TLS failed
	// on the previous one (STARTTLSReply or HandshakeError says how).
	Fallback bool
}

// ErrSTARTTLSInjection is the HandshakeError of a server that sent data
// after its 220 reply to STARTTLS, before the handshake (RFC 3207 §4.2:
// plaintext injection); the session is never used.
var ErrSTARTTLSInjection = errors.New("server sent data after its STARTTLS reply")

// Action is what delivery does with an MX host or session.
type Action int

// Actions.
const (
	// Use: carry the message on this session (or connect to this MX).
	Use Action = iota
	// Fallback: TLS failed and nothing demands it; connect again without
	// STARTTLS, as a sender without a policy would, and check that
	// session (ConnState.Fallback).
	Fallback
	// NextMX: do not use this host; try the next one, and when none is
	// left the message is deferred (or bounced, when Permanent) with the
	// verdict's reply.
	NextMX
)

func (a Action) String() string {
	switch a {
	case Use:
		return "use"
	case Fallback:
		return "fallback"
	case NextMX:
		return "next-mx"
	}
	return "unknown"
}

// Verdict is the decision about one MX host or session.
type Verdict struct {
	Action Action
	// Code, Enhanced and Reason are the reply recorded for the
	// recipients when the message cannot go (NextMX): 451 4.7.5 for a
	// policy failure, which defers; 550 5.7.x for REQUIRETLS, which is
	// Permanent.
	Code      int
	Enhanced  string
	Reason    string
	Permanent bool
	// Result is the session's RFC 8460 result type, "" for a success;
	// ReasonCode its failure-reason-code.
	Result     tlsrpt.ResultType
	ReasonCode string
	PolicyType tlsrpt.PolicyType
	// Count: record this verdict as one TLS-RPT session (and in the
	// tls-sessions metric). A Fallback verdict is never counted: the
	// plaintext session that follows is, with the TLS failure as its
	// result.
	Count bool
}

// Success reports whether the verdict records a successful session.
func (v Verdict) Success() bool { return v.Result == "" }

// CheckMX decides whether to connect to an MX host at all (RFC 8461
// §4.1, §5: in enforce mode a host the policy does not list is never
// contacted; RFC 8689 §4.2.1: a REQUIRETLS message goes only to a host
// validated by MTA-STS).
func CheckMX(p Policy, mx string) Verdict {
	v := Verdict{Action: Use, PolicyType: p.policyType()}
	mode := p.mode()
	if p.RequireTLS && !p.matches(mx) {
		v.Action, v.Result, v.ReasonCode = NextMX, tlsrpt.ResultValidationFailure, tlsrpt.ReasonMXMismatch
		v.Code, v.Enhanced, v.Permanent = 550, "5.7.30", true
		v.Reason = "REQUIRETLS: MX host " + mx + " is not validated by MTA-STS"
		if mode == mtasts.ModeEnforce {
			// The policy refuses it anyway: defer as enforce does, and
			// count it as enforce counts it.
			v.Code, v.Enhanced, v.Permanent = 451, "4.7.5", false
			v.Reason = "MX host " + mx + " is not allowed by the MTA-STS policy"
			v.Count = p.counted()
		}
		return v
	}
	if mode == mtasts.ModeEnforce && !p.matches(mx) {
		// Never contacted: a failure without a session. (In testing
		// mode the session that follows is counted instead.)
		v.Action, v.Result, v.ReasonCode = NextMX, tlsrpt.ResultValidationFailure, tlsrpt.ReasonMXMismatch
		v.Code, v.Enhanced = 451, "4.7.5"
		v.Reason = "MX host " + mx + " is not allowed by the MTA-STS policy"
		v.Count = p.counted()
	}
	return v
}

// CheckConn decides whether a set-up session may carry the message, and
// what TLS-RPT records for it.
//
//   - enforce (RFC 8461 §5): STARTTLS and a verified certificate, or the
//     next MX; no plaintext fallback.
//   - testing (RFC 8461 §5): the message goes whatever TLS gave, and the
//     first failure is recorded: the MX not listed, else the TLS failure.
//   - no policy, mode none, fetch failed: opportunistic TLS, a failed
//     handshake falls back to plaintext; an unverified certificate is
//     not a failure where no policy asks for verification. A fetch
//     failure is every session's result (RFC 8460 §4.3.2.2).
//   - REQUIRETLS (RFC 8689 §4.2.1): verified TLS and REQUIRETLS offered,
//     or the next MX, and a bounce when none is left.
func CheckConn(p Policy, mx string, c ConnState) Verdict {
	v := Verdict{Action: Use, PolicyType: p.policyType(), Count: p.counted()}
	mode := p.mode()
	sec := p.security()
	strict := mode == mtasts.ModeEnforce || p.RequireTLS || sec == SecurityVerify || sec == SecurityEncrypt

	tlsResult, tlsReason := Classify(c)
	why := describe(mx, c)
	tlsFailed := c.STARTTLSReply != 0 || c.HandshakeError != nil
	// What blocks the session: any TLS failure, except that encrypt
	// accepts an unverified certificate (REQUIRETLS still does not).
	blocked := tlsResult != ""
	if sec == SecurityEncrypt && !p.RequireTLS && mode != mtasts.ModeEnforce && c.TLS && c.CertError != nil {
		blocked = false
	}
	if sec == SecurityNone {
		// No TLS was tried: there is no TLS result to report.
		v.Count = false
	}

	if strict {
		if blocked {
			v.Action, v.Result, v.ReasonCode, v.Reason = NextMX, tlsResult, tlsReason, why+", required by policy"
			v.Code, v.Enhanced = 451, "4.7.5"
			if mode != mtasts.ModeEnforce && !p.RequireTLS {
				// The local override alone: the message waits.
				v.Reason = why + ", required by tls_policy security=" + string(sec)
				if mode == mtasts.ModeTesting && !p.matches(mx) {
					v.Result, v.ReasonCode = tlsrpt.ResultValidationFailure, tlsrpt.ReasonMXMismatch
				}
				return v
			}
			if mode != mtasts.ModeEnforce {
				// REQUIRETLS alone: RFC 8689 §4.2.1, 5.7.10 when TLS
				// could not be had.
				v.Code, v.Enhanced, v.Permanent = 550, "5.7.10", true
				v.Reason = "REQUIRETLS: " + why
				v.Count = v.Count && mode != ""
				if mode == mtasts.ModeTesting && !p.matches(mx) {
					v.Result, v.ReasonCode = tlsrpt.ResultValidationFailure, tlsrpt.ReasonMXMismatch
				}
			}
			return v
		}
		if p.RequireTLS && !c.REQUIRETLSOffered {
			// TLS itself succeeded: the session counts as that.
			v.Action, v.Code, v.Enhanced, v.Permanent = NextMX, 550, "5.7.30", true
			v.Reason = "REQUIRETLS: " + mx + " does not offer REQUIRETLS"
			if mode == mtasts.ModeEnforce {
				v.Code, v.Enhanced, v.Permanent = 451, "4.7.5", false
				v.Reason = mx + " does not offer REQUIRETLS"
			}
			v.Count = v.Count && mode != ""
			return v
		}
		switch {
		case mode == mtasts.ModeTesting && !p.matches(mx):
			v.Result, v.ReasonCode = tlsrpt.ResultValidationFailure, tlsrpt.ReasonMXMismatch
		case mode == mtasts.ModeTesting && tlsResult != "":
			// encrypt under testing (or a weakened enforce): the
			// unverified certificate is the failure recorded.
			v.Result, v.ReasonCode = tlsResult, tlsReason
		case p.fetchFailed():
			v.Result, v.ReasonCode = p.FetchFailure, p.FetchReason
		}
		return v
	}

	if sec == SecurityNone && !c.TLS {
		// STARTTLS not tried, by local choice: nothing to record.
		return v
	}
	if tlsFailed && !c.Fallback {
		// Opportunistic: try again in plaintext. Counted then.
		v.Action, v.Count = Fallback, false
		v.Result, v.ReasonCode, v.Reason = tlsResult, tlsReason, why
		return v
	}
	switch {
	case mode == mtasts.ModeTesting && !p.matches(mx):
		// RFC 8461 §5 testing: delivered to an MX the policy does not
		// list; that mismatch is the failure TLS-RPT records.
		v.Result, v.ReasonCode = tlsrpt.ResultValidationFailure, tlsrpt.ReasonMXMismatch
	case mode == mtasts.ModeTesting && tlsResult != "":
		v.Result, v.ReasonCode = tlsResult, tlsReason
	case p.fetchFailed():
		v.Result, v.ReasonCode = p.FetchFailure, p.FetchReason
	case tlsFailed || !c.TLS:
		// Without a policy only the lack of TLS is a failure.
		v.Result, v.ReasonCode = tlsResult, tlsReason
	}
	return v
}

// Classify says what TLS gave a session, as an RFC 8460 result type and
// a stable reason code: "" when TLS was negotiated with a valid
// certificate. A certificate failure is a failure here even where no
// policy asks for verification; CheckConn decides whether it counts.
func Classify(c ConnState) (tlsrpt.ResultType, string) {
	switch {
	case c.STARTTLSReply != 0:
		return tlsrpt.Classify(&textproto.Error{Code: c.STARTTLSReply})
	case c.HandshakeError != nil:
		return classify(c.HandshakeError)
	case !c.TLS:
		return tlsrpt.ResultSTARTTLSNotSupported, tlsrpt.ReasonSTARTTLSNotOffered
	case c.CertError != nil:
		return classify(c.CertError)
	}
	return "", ""
}

// describe says what TLS gave, for the log line and the DSN.
func describe(mx string, c ConnState) string {
	switch {
	case c.STARTTLSReply != 0:
		return "STARTTLS refused by " + mx
	case c.HandshakeError != nil:
		return "TLS handshake with " + mx + " failed: " + c.HandshakeError.Error()
	case !c.TLS:
		return "STARTTLS not offered by " + mx
	case c.CertError != nil:
		return "certificate of " + mx + " not valid: " + c.CertError.Error()
	}
	return ""
}

// ErrNoCertificate is the CertError of a server that completed the
// handshake without a certificate.
var ErrNoCertificate = errors.New("no certificate presented")

// classify adds the failures only delivery knows of to tlsrpt.Classify.
func classify(err error) (tlsrpt.ResultType, string) {
	switch {
	case errors.Is(err, ErrSTARTTLSInjection):
		return tlsrpt.ResultValidationFailure, tlsrpt.ReasonSTARTTLSInjection
	case errors.Is(err, ErrNoCertificate):
		return tlsrpt.ResultValidationFailure, tlsrpt.ReasonNoCertificate
	}
	rt, reason := tlsrpt.Classify(err)
	if rt == "" {
		rt, reason = tlsrpt.ResultValidationFailure, "unknown"
	}
	return rt, reason
}
