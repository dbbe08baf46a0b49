package policy

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/internal/dane"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// decide is what delivery does with a host: CheckMX, then, when the host
// may be contacted, CheckConn on the session's state.
func decide(p Policy, mx string, d DANE, c ConnState) Verdict {
	if v := CheckMX(p, mx, d); v.Action != Use {
		return v
	}
	return CheckConn(p, mx, d, c)
}

// TestDANEPrecedence: DANE (RFC 7672) first, MTA-STS (RFC 8461) for the
// hosts without usable TLSA records, REQUIRETLS (RFC 8689) and the local
// overrides on top; one row per rule.
func TestDANEPrecedence(t *testing.T) {
	const listed, unlisted = "mx1.example.org", "mx9.example.net"
	rec := &dns.TLSA{Usage: 3, Selector: 1, MatchingType: 1, Certificate: strings.Repeat("ab", 32)}
	pkixTA := &dns.TLSA{Usage: 0, Selector: 0, MatchingType: 1, Certificate: strings.Repeat("cd", 32)}
	usable := DANE{Status: DANEUsable, Base: listed, Records: []*dns.TLSA{rec}}
	unusable := DANE{Status: DANEUnusable, Base: listed, Records: []*dns.TLSA{pkixTA}}
	lookupFailed := DANE{Status: DANELookupFailed, Base: listed, Err: errors.New("_25._tcp.mx1.example.org TLSA: server answered SERVFAIL")}
	none := DANE{}

	authenticated := ConnState{STARTTLSOffered: true, TLS: true, DANE: true}
	// DANE-EE ignores names and dates: a self-signed certificate that the
	// Web PKI refuses is authenticated by its 3 1 1 record.
	authenticatedSelfSigned := ConnState{STARTTLSOffered: true, TLS: true, DANE: true, CertError: errUnknown}
	withREQUIRETLS := ConnState{STARTTLSOffered: true, TLS: true, DANE: true, REQUIRETLSOffered: true}
	noMatch := ConnState{STARTTLSOffered: true, HandshakeError: fmt.Errorf("%w (2 records)", dane.ErrNoMatch)}
	taWrongName := ConnState{STARTTLSOffered: true, HandshakeError: fmt.Errorf("%w mx1.example.org (certificate has wrong.invalid)", dane.ErrNameMismatch)}
	taExpired := ConnState{STARTTLSOffered: true, HandshakeError: fmt.Errorf("%w (CN=mx1 expired)", dane.ErrExpired)}
	plaintext := ConnState{}
	refused := ConnState{STARTTLSOffered: true, STARTTLSReply: 454}
	handshake := ConnState{STARTTLSOffered: true, HandshakeError: errAlert}
	unchecked := ConnState{STARTTLSOffered: true, TLS: true} // set up while DANE was set aside
	verified := ConnState{STARTTLSOffered: true, TLS: true}
	untrusted := ConnState{STARTTLSOffered: true, TLS: true, CertError: errUnknown}

	enforce, testing_ := sts(t, "enforce"), sts(t, "testing")
	T, S, N := tlsrpt.PolicyTypeTLSA, tlsrpt.PolicyTypeSTS, tlsrpt.PolicyTypeNoPolicyFound
	type want struct {
		action Action
		result tlsrpt.ResultType
		reason string
		ptype  tlsrpt.PolicyType
		count  bool
		code   int
		enh    string
		dane   DANEResult
	}
	cases := []struct {
		name string
		p    Policy
		mx   string
		d    DANE
		c    ConnState
		want want
	}{
		// RFC 7672 §3: usable records authenticate the server, alone.
		{"DANE match: authenticated", Policy{}, listed, usable, authenticated, want{Use, "", "", T, true, 0, "", DANEAuthenticated}},
		{"DANE-EE match of a certificate the Web PKI refuses", Policy{}, listed, usable, authenticatedSelfSigned, want{Use, "", "", T, true, 0, "", DANEAuthenticated}},
		{"DANE mismatch: next MX, no fallback", Policy{}, listed, usable, noMatch, want{NextMX, tlsrpt.ResultTLSAInvalid, ReasonTLSANoMatch, T, true, 451, "4.7.5", DANEFailed}},
		{"DANE-TA with a wrong name", Policy{}, listed, usable, taWrongName, want{NextMX, tlsrpt.ResultTLSAInvalid, ReasonTLSANameMismatch, T, true, 451, "4.7.5", DANEFailed}},
		{"DANE-TA with an expired chain", Policy{}, listed, usable, taExpired, want{NextMX, tlsrpt.ResultTLSAInvalid, ReasonTLSAExpired, T, true, 451, "4.7.5", DANEFailed}},
		{"DANE host without STARTTLS: no plaintext", Policy{}, listed, usable, plaintext, want{NextMX, tlsrpt.ResultSTARTTLSNotSupported, tlsrpt.ReasonSTARTTLSNotOffered, T, true, 451, "4.7.5", DANEFailed}},
		{"DANE host refusing STARTTLS: no fallback", Policy{}, listed, usable, refused, want{NextMX, tlsrpt.ResultSTARTTLSNotSupported, "starttls-reply-454", T, true, 451, "4.7.5", DANEFailed}},
		{"DANE host with a failed handshake: no fallback", Policy{}, listed, usable, handshake, want{NextMX, tlsrpt.ResultValidationFailure, "tls-alert-handshake-failure", T, true, 451, "4.7.5", DANEFailed}},
		{"DANE host, session not checked against the records", Policy{}, listed, usable, unchecked, want{NextMX, tlsrpt.ResultTLSAInvalid, ReasonTLSANotChecked, T, true, 451, "4.7.5", DANEFailed}},

		// RFC 8461 §2: MTA-STS never overrides a failing DANE check; with
		// usable records DANE decides for the host.
		{"DANE mismatch while MTA-STS enforce would pass: refused", Policy{STS: enforce}, listed, usable, noMatch, want{NextMX, tlsrpt.ResultTLSAInvalid, ReasonTLSANoMatch, T, true, 451, "4.7.5", DANEFailed}},
		{"DANE mismatch under MTA-STS testing: refused", Policy{STS: testing_}, listed, usable, noMatch, want{NextMX, tlsrpt.ResultTLSAInvalid, ReasonTLSANoMatch, T, true, 451, "4.7.5", DANEFailed}},
		{"DANE match under enforce, PKIX-invalid: DANE decides", Policy{STS: enforce}, listed, usable, authenticatedSelfSigned, want{Use, "", "", T, true, 0, "", DANEAuthenticated}},
		{"DANE host the enforce policy does not list: DANE decides", Policy{STS: enforce}, unlisted, usable, authenticated, want{Use, "", "", T, true, 0, "", DANEAuthenticated}},
		{"STS fetch failure does not touch a DANE host", Policy{FetchFailure: tlsrpt.ResultSTSPolicyFetchError}, listed, usable, authenticated, want{Use, "", "", T, true, 0, "", DANEAuthenticated}},
		// STS-4.2-b: an insecure TLSA RRset is no DANE: MTA-STS wants PKIX.
		{"no DANE under enforce: a self-signed certificate is refused", Policy{STS: enforce}, listed, none, untrusted, want{NextMX, tlsrpt.ResultCertificateNotTrusted, "", S, true, 451, "4.7.5", ""}},

		// RFC 7672 §2.2: records, none usable: TLS without authentication.
		{"unusable TLSA: TLS, certificate not checked", Policy{}, listed, unusable, untrusted, want{Use, "", "", T, true, 0, "", DANETLSRequired}},
		{"unusable TLSA: no STARTTLS, no plaintext", Policy{}, listed, unusable, plaintext, want{NextMX, tlsrpt.ResultSTARTTLSNotSupported, tlsrpt.ReasonSTARTTLSNotOffered, T, true, 451, "4.7.5", DANEFailed}},
		{"unusable TLSA: failed handshake, no fallback", Policy{}, listed, unusable, handshake, want{NextMX, tlsrpt.ResultValidationFailure, "tls-alert-handshake-failure", T, true, 451, "4.7.5", DANEFailed}},
		{"unusable TLSA under enforce: MTA-STS governs", Policy{STS: enforce}, listed, unusable, untrusted, want{NextMX, tlsrpt.ResultCertificateNotTrusted, "", S, true, 451, "4.7.5", DANETLSRequired}},
		{"unusable TLSA under enforce, verified", Policy{STS: enforce}, listed, unusable, verified, want{Use, "", "", S, true, 0, "", DANETLSRequired}},
		{"unusable TLSA, host the enforce policy does not list", Policy{STS: enforce}, unlisted, unusable, verified, want{NextMX, tlsrpt.ResultValidationFailure, tlsrpt.ReasonMXMismatch, S, true, 451, "4.7.5", ""}},
		{"unusable TLSA under testing: delivered, failure recorded", Policy{STS: testing_}, listed, unusable, untrusted, want{Use, tlsrpt.ResultCertificateNotTrusted, "", S, true, 0, "", DANETLSRequired}},
		{"unusable TLSA under testing without STARTTLS: waits", Policy{STS: testing_}, listed, unusable, plaintext, want{NextMX, tlsrpt.ResultSTARTTLSNotSupported, tlsrpt.ReasonSTARTTLSNotOffered, S, true, 451, "4.7.5", DANEFailed}},
		{"unusable TLSA and security=verify: verified certificate needed", Policy{Override: SecurityVerify}, listed, unusable, untrusted, want{NextMX, tlsrpt.ResultCertificateNotTrusted, "", T, true, 451, "4.7.5", DANETLSRequired}},

		// RFC 7672 §2.2: a failed TLSA lookup in a signed zone.
		{"TLSA lookup failed: host not used", Policy{}, listed, lookupFailed, verified, want{NextMX, tlsrpt.ResultDNSSECInvalid, ReasonTLSALookupFailed, T, true, 451, "4.4.3", DANEFailed}},
		{"TLSA lookup failed under enforce: no MTA-STS rescue", Policy{STS: enforce}, listed, lookupFailed, verified, want{NextMX, tlsrpt.ResultDNSSECInvalid, ReasonTLSALookupFailed, T, true, 451, "4.4.3", DANEFailed}},

		// RFC 8689 §5: TLS-Required: No ignores DANE as it does MTA-STS.
		{"TLS-Required: No ignores DANE: plaintext goes", Policy{TLSRequiredNo: true}, listed, usable, plaintext, want{Use, tlsrpt.ResultSTARTTLSNotSupported, tlsrpt.ReasonSTARTTLSNotOffered, N, false, 0, "", ""}},
		{"TLS-Required: No ignores a failed TLSA lookup", Policy{TLSRequiredNo: true}, listed, lookupFailed, verified, want{Use, "", "", N, false, 0, "", ""}},
		{"TLS-Required: No ignores unusable TLSA", Policy{TLSRequiredNo: true}, listed, unusable, plaintext, want{Use, tlsrpt.ResultSTARTTLSNotSupported, tlsrpt.ReasonSTARTTLSNotOffered, N, false, 0, "", ""}},
		{"TLS-Required: No still falls back after a failed handshake", Policy{TLSRequiredNo: true}, listed, usable, handshake, want{Fallback, tlsrpt.ResultValidationFailure, "tls-alert-handshake-failure", N, false, 0, "", ""}},

		// RFC 8689 §4.2.1: a DANE-validated MX satisfies REQUIRETLS.
		{"REQUIRETLS to a DANE-authenticated MX", Policy{RequireTLS: true}, listed, usable, withREQUIRETLS, want{Use, "", "", T, true, 0, "", DANEAuthenticated}},
		{"REQUIRETLS to a DANE MX without REQUIRETLS", Policy{RequireTLS: true}, listed, usable, authenticated, want{NextMX, "", "", T, true, 550, "5.7.30", DANEAuthenticated}},
		{"REQUIRETLS: unusable TLSA validate nothing", Policy{RequireTLS: true}, listed, unusable, verified, want{NextMX, tlsrpt.ResultValidationFailure, tlsrpt.ReasonMXMismatch, T, false, 550, "5.7.30", ""}},
		{"REQUIRETLS beats TLS-Required: No: DANE applies", Policy{RequireTLS: true, TLSRequiredNo: true}, listed, usable, noMatch, want{NextMX, tlsrpt.ResultTLSAInvalid, ReasonTLSANoMatch, T, true, 451, "4.7.5", DANEFailed}},

		// [[tls_policy]] security = "dane" requires DANE (dane-required).
		{"security=dane with usable TLSA", Policy{Override: SecurityDANE}, listed, usable, authenticated, want{Use, "", "", T, true, 0, "", DANEAuthenticated}},
		{"security=dane without TLSA: dane-required", Policy{Override: SecurityDANE}, listed, none, verified, want{NextMX, tlsrpt.ResultDANERequired, ReasonNoSecureTLSA, T, true, 451, "4.7.5", DANEFailed}},
		{"security=dane with unusable TLSA: dane-required", Policy{Override: SecurityDANE}, listed, unusable, verified, want{NextMX, tlsrpt.ResultDANERequired, ReasonTLSAUnusable, T, true, 451, "4.7.5", DANEFailed}},
		{"security=dane under enforce without TLSA: dane-required", Policy{STS: enforce, Override: SecurityDANE}, listed, none, verified, want{NextMX, tlsrpt.ResultDANERequired, ReasonNoSecureTLSA, T, true, 451, "4.7.5", DANEFailed}},
		{"security=dane and TLS-Required: No", Policy{Override: SecurityDANE, TLSRequiredNo: true}, listed, none, plaintext, want{Use, tlsrpt.ResultSTARTTLSNotSupported, tlsrpt.ReasonSTARTTLSNotOffered, N, false, 0, "", ""}},

		// A weaker override does not weaken DANE, unless override_policy.
		{"security=may cannot weaken DANE", Policy{Override: SecurityMay}, listed, usable, noMatch, want{NextMX, tlsrpt.ResultTLSAInvalid, ReasonTLSANoMatch, T, true, 451, "4.7.5", DANEFailed}},
		{"security=may cannot weaken unusable TLSA's demand", Policy{Override: SecurityMay}, listed, unusable, handshake, want{NextMX, tlsrpt.ResultValidationFailure, "tls-alert-handshake-failure", T, true, 451, "4.7.5", DANEFailed}},
		{"override_policy: may sets DANE aside", Policy{Override: SecurityMay, OverrideWeakens: true}, listed, usable, handshake, want{Fallback, tlsrpt.ResultValidationFailure, "tls-alert-handshake-failure", N, false, 0, "", ""}},

		// RFC 8460 §5.3: report mail is not counted, DANE or not.
		{"uncounted mail to a DANE host", Policy{Uncounted: true}, listed, usable, noMatch, want{NextMX, tlsrpt.ResultTLSAInvalid, ReasonTLSANoMatch, T, false, 451, "4.7.5", DANEFailed}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			v := decide(c.p, c.mx, c.d, c.c)
			got := want{v.Action, v.Result, v.ReasonCode, v.PolicyType, v.Count, v.Code, v.Enhanced, v.DANE}
			w := c.want
			if w.reason == "" && w.result != "" && got.reason != "" {
				w.reason = got.reason // only the type is pinned
			}
			if got != w {
				t.Errorf("\n got %+v\nwant %+v", got, w)
			}
			if v.Action == NextMX && v.Reason == "" {
				t.Errorf("NextMX without a reason")
			}
			if v.Permanent != (v.Code >= 500) {
				t.Errorf("Permanent=%v with code %d", v.Permanent, v.Code)
			}
		})
	}
}

// STARTTLS and DANEStatus: what delivery asks before it dials.
func TestDANEDial(t *testing.T) {
	usable := DANE{Status: DANEUsable, Base: "mx1.example.org"}
	cases := []struct {
		name     string
		p        Policy
		d        DANE
		status   DANEStatus
		starttls bool
	}{
		{"usable records: dial with them", Policy{}, usable, DANEUsable, true},
		{"no DANE", Policy{}, DANE{}, NoDANE, true},
		{"security=none does not skip STARTTLS on a DANE host", Policy{Override: SecurityNone}, usable, DANEUsable, true},
		{"security=none on unusable TLSA: STARTTLS still", Policy{Override: SecurityNone}, DANE{Status: DANEUnusable}, DANEUnusable, true},
		{"security=none without DANE", Policy{Override: SecurityNone}, DANE{}, NoDANE, false},
		{"override_policy: none sets DANE aside", Policy{Override: SecurityNone, OverrideWeakens: true}, usable, NoDANE, false},
		{"TLS-Required: No sets DANE aside", Policy{TLSRequiredNo: true}, usable, NoDANE, true},
		{"REQUIRETLS keeps it", Policy{TLSRequiredNo: true, RequireTLS: true}, usable, DANEUsable, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := c.p.DANEStatus(c.d); got != c.status {
				t.Errorf("DANEStatus = %d, want %d", got, c.status)
			}
			if got := c.p.STARTTLS(c.d); got != c.starttls {
				t.Errorf("STARTTLS = %v, want %v", got, c.starttls)
			}
		})
	}
}
