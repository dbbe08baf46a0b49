// Package policy decides, for one message and one MX host, whether a
// delivery session may be used: before connecting (CheckMX) and once the
// session is set up (CheckConn). It is pure (no sockets, no clock, no
// state), so the whole matrix of DANE, MTA-STS modes, transports,
// certificate failures, REQUIRETLS and "TLS-Required: No" is tested as a
// table.
//
// DANE (RFC 7672) comes first. An MX host with usable DNSSEC-secure TLSA
// records is authenticated by them and by nothing else: when that fails
// the host is not used, and neither plaintext nor an MTA-STS policy
// rescues it (RFC 8461 §2: MTA-STS "MUST NOT" override a failing DANE
// validation); the next MX is tried, then the message waits. MTA-STS
// governs the hosts without usable TLSA records, as before.
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

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/internal/dane"
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
	// §4.2.1): an MX validated by MTA-STS or DANE, verified TLS (PKIX or
	// DANE), and REQUIRETLS offered by the server, or the message is not
	// sent.
	RequireTLS bool
	// TLSRequiredNo is the message's "TLS-Required: No" header (RFC 8689
	// §5): neither MTA-STS nor DANE is applied to it (STARTTLS is still
	// used when offered) and TLS-RPT does not count its sessions. Ignored
	// with RequireTLS, which wins (RFC 8689 §5).
	TLSRequiredNo bool
	// Uncounted keeps the message's sessions out of TLS-RPT: a report
	// mail (RFC 8460 §5.3: reports about report delivery would loop).
	Uncounted bool
	// Override is the local TLS override for the destination (a
	// [[tls_policy]], or a route's require_tls), "" when none.
	Override Security
	// OverrideWeakens (override_policy) lets an Override weaker than
	// verify set an enforce MTA-STS policy aside: the policy is then
	// applied as in testing mode (failures recorded, not enforced); and
	// set DANE aside for the domain's MX hosts. Without it such an
	// Override is ignored under enforce (RFC 8461 §5) and for hosts with
	// DANE.
	OverrideWeakens bool
}

// DANE is what TLSA discovery (RFC 7672 §2.2) found for one MX host. The
// zero value is "no DANE".
type DANE struct {
	Status DANEStatus
	// Base is the TLSA base domain (RFC 7672 §2.2.3): the name whose
	// "_25._tcp." TLSA records were found (or whose lookup failed). It is
	// the SNI (§8.1), a reference identifier for DANE-TA (§3.2.3), and
	// the policy domain of the host's TLS-RPT sessions (RFC 8460 §3).
	Base string
	// Records is the secure TLSA RRset, usable records or not: the
	// TLS-RPT policy-string (RFC 8460 §4.4). Shared: not to be modified.
	Records []*dns.TLSA
	// Err is why the lookup failed (DANELookupFailed).
	Err error
}

// DANEStatus says whether and how DANE applies to an MX host.
type DANEStatus uint8

// DANE statuses (RFC 7672 §2.2).
const (
	// NoDANE: DANE does not apply. It is off or the resolver's AD bit is
	// not trusted; or the MX RRset, the host's address records or its
	// TLSA RRset are not DNSSEC-secure; or there are no TLSA records.
	NoDANE DANEStatus = iota
	// DANEUsable: a secure TLSA RRset with at least one usable record
	// (RFC 7672 §3.1.3): STARTTLS, and a certificate chain those records
	// authenticate (§3), or the host is not used.
	DANEUsable
	// DANEUnusable: a secure TLSA RRset whose records are all unusable:
	// STARTTLS is mandatory, but the server cannot be authenticated by
	// DANE (RFC 7672 §2.2, §3.1.3). No plaintext fallback.
	DANEUnusable
	// DANELookupFailed: the host's address records are secure but its
	// TLSA lookup failed (a validating resolver answers SERVFAIL for
	// bogus data; or a timeout): whether DANE applies is unknown, so the
	// host is not used (RFC 7672 §2.2; TLS-RPT dnssec-invalid).
	DANELookupFailed
)

// DANEResult is what DANE made of a host or session: the delivery line's
// dane field.
type DANEResult string

// DANE results; "" when DANE did not apply.
const (
	// DANEAuthenticated: TLS with a chain the TLSA records authenticate.
	DANEAuthenticated DANEResult = "authenticated"
	// DANETLSRequired: TLS, required by TLSA records none of which is
	// usable; the server is not authenticated by DANE.
	DANETLSRequired DANEResult = "tls-required"
	// DANEFailed: DANE applied (or was required by tls_policy) and the
	// host could not be used under it.
	DANEFailed DANEResult = "failed"
)

// Security is a local TLS requirement, as in Postfix's
// smtp_tls_policy_maps.
type Security string

// Security levels, strongest first.
const (
	// SecurityDANE: DANE (RFC 7672) required. An MX host without usable
	// DNSSEC-secure TLSA records is not used (TLS-RPT dane-required,
	// RFC 8460 §4.3.2.1); those with them are authenticated by DANE.
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
// would weaken an enforce policy without OverrideWeakens. SecurityDANE
// counts as verify here (a host it lets through is authenticated); what
// it adds is CheckMX's.
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

// securityFor is security for a host whose DANE status is dn: an
// Override weaker than verify does not weaken DANE either, unless
// OverrideWeakens (which makes dn NoDANE).
func (p *Policy) securityFor(dn DANEStatus) Security {
	s := p.security()
	if dn != NoDANE && weak(s) {
		return ""
	}
	return s
}

// weak reports whether a Security is weaker than verify.
func weak(s Security) bool {
	return s == SecurityEncrypt || s == SecurityMay || s == SecurityNone
}

// STARTTLS reports whether a session to a host with DANE d should try
// STARTTLS at all (not with security = "none", unless DANE demands it).
func (p Policy) STARTTLS(d DANE) bool { return p.securityFor(p.daneStatus(d)) != SecurityNone }

// DANEStatus is the DANE status that applies to a host with DANE d: d's,
// or NoDANE when the message sets DANE aside ("TLS-Required: No", RFC
// 8689 §5) or an override weaker than verify does with OverrideWeakens.
// A session to a host whose status is DANEUsable is set up with its TLSA
// records.
func (p Policy) DANEStatus(d DANE) DANEStatus { return p.daneStatus(d) }

func (p *Policy) daneStatus(d DANE) DANEStatus {
	if p.ignoresSTS() || (p.OverrideWeakens && weak(p.Override)) {
		return NoDANE
	}
	return d.Status
}

// requiresDANE reports whether a tls_policy demands DANE (security =
// "dane"); "TLS-Required: No" sets that aside like any override.
func (p *Policy) requiresDANE() bool { return p.Override == SecurityDANE && !p.ignoresSTS() }

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

// policyTypeFor is policyType for a host whose DANE status is dn: TLSA
// records that apply are the policy (RFC 8460 §4.4), except that
// MTA-STS still governs a host whose records are all unusable.
func (p *Policy) policyTypeFor(dn DANEStatus) tlsrpt.PolicyType {
	t := p.policyType()
	switch {
	case dn == DANEUsable || dn == DANELookupFailed:
		return tlsrpt.PolicyTypeTLSA
	case dn == DANEUnusable && t == tlsrpt.PolicyTypeNoPolicyFound:
		return tlsrpt.PolicyTypeTLSA
	}
	return t
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
	// DANE: the handshake checked the server's chain against the host's
	// usable TLSA records (RFC 7672 §3) and it matched. A mismatch fails
	// the handshake (HandshakeError wraps the internal/dane error).
	DANE bool
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
	// PolicyType is the policy the session falls under; for
	// PolicyTypeTLSA the policy domain is the host's TLSA base domain
	// (DANE.Base) and the policy-string its records (RFC 8460 §3, §4.4).
	PolicyType tlsrpt.PolicyType
	// Count: record this verdict as one TLS-RPT session (and in the
	// tls-sessions metric). A Fallback verdict is never counted: the
	// plaintext session that follows is, with the TLS failure as its
	// result.
	Count bool
	// DANE is what DANE made of the host or session, "" when it did not
	// apply.
	DANE DANEResult
}

// Success reports whether the verdict records a successful session.
func (v Verdict) Success() bool { return v.Result == "" }

// CheckMX decides whether to connect to an MX host with DANE d at all:
//
//   - a TLSA lookup that failed for a host with secure addresses: not
//     used (RFC 7672 §2.2), dnssec-invalid;
//   - tls_policy security = "dane" and no usable TLSA records: not used,
//     dane-required (RFC 8460 §4.3.2.1);
//   - usable TLSA records: DANE decides, at CheckConn. The host's MX
//     RRset is DNSSEC-secure, so the MTA-STS MX list adds nothing and is
//     not applied, and it counts as validated for REQUIRETLS (RFC 8689
//     §4.2.1);
//   - otherwise MTA-STS (RFC 8461 §4.1, §5): in enforce mode a host the
//     policy does not list is never contacted; and REQUIRETLS (RFC 8689
//     §4.2.1): a REQUIRETLS message goes only to a host validated by
//     MTA-STS.
func CheckMX(p Policy, mx string, d DANE) Verdict {
	dn := p.daneStatus(d)
	v := Verdict{Action: Use, PolicyType: p.policyTypeFor(dn)}
	switch {
	case dn == DANELookupFailed:
		v.Action, v.Result, v.ReasonCode, v.DANE = NextMX, tlsrpt.ResultDNSSECInvalid, ReasonTLSALookupFailed, DANEFailed
		v.Code, v.Enhanced = 451, "4.4.3"
		v.Reason = "TLSA lookup for " + mx + " failed, its address records being DNSSEC-signed"
		if d.Err != nil {
			v.Reason += ": " + d.Err.Error()
		}
		v.Count = p.counted()
		return v
	case p.requiresDANE() && dn != DANEUsable:
		v.PolicyType = tlsrpt.PolicyTypeTLSA
		v.Action, v.Result, v.DANE = NextMX, tlsrpt.ResultDANERequired, DANEFailed
		v.ReasonCode = ReasonNoSecureTLSA
		v.Reason = "MX host " + mx + " has no DNSSEC-secure TLSA records, required by tls_policy security=dane"
		if dn == DANEUnusable {
			v.ReasonCode = ReasonTLSAUnusable
			v.Reason = "MX host " + mx + " has no usable TLSA records, required by tls_policy security=dane"
		}
		v.Code, v.Enhanced = 451, "4.7.5"
		v.Count = p.counted()
		return v
	case dn == DANEUsable:
		return v
	}
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

// CheckConn decides whether a session set up to a host with DANE d may
// carry the message, and what TLS-RPT records for it.
//
//   - a host CheckMX refuses is refused here too;
//   - usable TLSA records (RFC 7672 §2.2, §3): STARTTLS and a chain the
//     records authenticate, or the next MX; no plaintext fallback, and
//     no MTA-STS rescue (RFC 8461 §2). Reported under policy-type tlsa;
//   - TLSA records, none usable (RFC 7672 §2.2): STARTTLS is mandatory
//     (no plaintext fallback) but the certificate is not authenticated,
//     as security = "encrypt"; the rest of the policy (MTA-STS, an
//     override) still applies on top;
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
func CheckConn(p Policy, mx string, d DANE, c ConnState) Verdict {
	dn := p.daneStatus(d)
	switch {
	case dn == DANELookupFailed || (p.requiresDANE() && dn != DANEUsable):
		return CheckMX(p, mx, d)
	case dn == DANEUsable:
		return checkDANE(p, mx, c)
	}
	v := Verdict{Action: Use, PolicyType: p.policyTypeFor(dn), Count: p.counted()}
	mode := p.mode()
	sec := p.securityFor(dn)
	// RFC 7672 §2.2: TLSA records, none usable: TLS without
	// authentication, as encrypt does, but demanded by the domain.
	tlsRequired := dn == DANEUnusable
	if tlsRequired {
		v.DANE = DANETLSRequired
		if !c.TLS {
			v.DANE = DANEFailed
		}
	}
	strict := mode == mtasts.ModeEnforce || p.RequireTLS || sec == SecurityVerify || sec == SecurityEncrypt || tlsRequired

	tlsResult, tlsReason := Classify(c)
	why := describe(mx, c)
	tlsFailed := c.STARTTLSReply != 0 || c.HandshakeError != nil
	// What blocks the session: any TLS failure, except that encrypt (and
	// unusable TLSA records) accept an unverified certificate
	// (REQUIRETLS still does not).
	blocked := tlsResult != ""
	if (sec == SecurityEncrypt || tlsRequired && sec != SecurityVerify) && !p.RequireTLS && mode != mtasts.ModeEnforce && c.TLS && c.CertError != nil {
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
				// The local override alone, or the TLSA records: the
				// message waits.
				v.Reason = why + ", required by tls_policy security=" + string(sec)
				if tlsRequired && sec != SecurityVerify {
					v.Reason = why + ", required by the TLSA records of " + d.Base + " (none usable, RFC 7672 §2.2)"
				}
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

// checkDANE is CheckConn for a host with usable TLSA records (RFC 7672
// §2.2, §3): DANE alone decides. The session must run over TLS whose
// handshake the records authenticated (ConnState.DANE); anything else
// (no STARTTLS, a refused or failed handshake, a chain no record matches)
// makes the host unusable for this message, without plaintext fallback
// and whatever an MTA-STS policy would have said of the session (RFC 8461
// §2). A DANE-authenticated session satisfies REQUIRETLS's certificate
// and MX checks (RFC 8689 §4.2.1); the server must still offer
// REQUIRETLS.
func checkDANE(p Policy, mx string, c ConnState) Verdict {
	v := Verdict{Action: Use, PolicyType: tlsrpt.PolicyTypeTLSA, Count: p.counted(), DANE: DANEAuthenticated}
	if c.TLS && c.DANE {
		if p.RequireTLS && !c.REQUIRETLSOffered {
			// TLS itself succeeded: the session counts as that.
			v.Action, v.Code, v.Enhanced, v.Permanent = NextMX, 550, "5.7.30", true
			v.Reason = "REQUIRETLS: " + mx + " does not offer REQUIRETLS"
		}
		return v
	}
	v.Action, v.DANE = NextMX, DANEFailed
	v.Code, v.Enhanced = 451, "4.7.5"
	if c.TLS {
		// A session whose handshake did not check the records (set up
		// while DANE was set aside for another message): not for this
		// one.
		v.Result, v.ReasonCode = tlsrpt.ResultTLSAInvalid, ReasonTLSANotChecked
		v.Reason = "TLS session with " + mx + " was not authenticated by its TLSA records"
		return v
	}
	v.Result, v.ReasonCode = Classify(c)
	v.Reason = describe(mx, c) + ", required by DANE (RFC 7672 §2.2)"
	return v
}

// Reason codes of DANE failures (RFC 8460 §4.3.1, §4.3.2.1), stable like
// tlsrpt's.
const (
	// ReasonTLSANoMatch: no usable TLSA record matches the chain.
	ReasonTLSANoMatch = "tlsa-no-match"
	// ReasonTLSANameMismatch: a DANE-TA record matched, but the leaf
	// names neither the TLSA base domain nor the MX host (RFC 7672
	// §3.2.2, §3.2.3).
	ReasonTLSANameMismatch = "tlsa-name-mismatch"
	// ReasonTLSAExpired: a DANE-TA record matched, but a certificate on
	// the path is outside its validity period.
	ReasonTLSAExpired = "tlsa-certificate-expired"
	// ReasonTLSAUnusable: the TLSA records are all unusable.
	ReasonTLSAUnusable = "tlsa-unusable"
	// ReasonTLSANotChecked: a TLS session whose handshake did not use
	// the host's TLSA records.
	ReasonTLSANotChecked = "tlsa-not-checked"
	// ReasonTLSALookupFailed: the TLSA lookup failed (dnssec-invalid).
	ReasonTLSALookupFailed = "tlsa-lookup-failed"
	// ReasonNoSecureTLSA: DANE required locally, no secure TLSA records
	// (dane-required).
	ReasonNoSecureTLSA = "no-secure-tlsa"
)

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

// classify adds the failures only delivery knows of to tlsrpt.Classify:
// among them DANE's, which fail the handshake (RFC 7672 §3; RFC 8460
// §4.3.2.1 tlsa-invalid: none of the records matched).
func classify(err error) (tlsrpt.ResultType, string) {
	switch {
	case errors.Is(err, dane.ErrNoMatch):
		return tlsrpt.ResultTLSAInvalid, ReasonTLSANoMatch
	case errors.Is(err, dane.ErrNameMismatch):
		return tlsrpt.ResultTLSAInvalid, ReasonTLSANameMismatch
	case errors.Is(err, dane.ErrExpired):
		return tlsrpt.ResultTLSAInvalid, ReasonTLSAExpired
	case errors.Is(err, dane.ErrNoUsableRecords):
		return tlsrpt.ResultTLSAInvalid, ReasonTLSAUnusable
	case errors.Is(err, dane.ErrNoCertificate):
		return tlsrpt.ResultTLSAInvalid, tlsrpt.ReasonNoCertificate
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
