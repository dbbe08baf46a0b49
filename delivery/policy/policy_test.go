package policy

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/mtasts"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

func sts(t *testing.T, mode string) *mtasts.Policy {
	t.Helper()
	p, err := mtasts.ParsePolicy([]byte("version: STSv1\nmode: " + mode + "\nmx: mx1.example.org\nmax_age: 86400\n"))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// Genuine error values, as the handshake and x509 give them.
var (
	errExpired = x509.CertificateInvalidError{Reason: x509.Expired, Detail: "current time 2026-11-30T02:41:08Z is after 2026-01-01T00:00:00Z"}
	errUnknown = x509.UnknownAuthorityError{}
	errHost    = x509.HostnameError{Certificate: &x509.Certificate{DNSNames: []string{"other.example"}}, Host: "mx1.example.org"}
	errAlert   = fmt.Errorf("remote error: %w", tls.AlertError(40))
)

func TestCheckConnMatrix(t *testing.T) {
	const listed, unlisted = "mx1.example.org", "mx9.example.net"
	verified := ConnState{STARTTLSOffered: true, TLS: true}
	plaintext := ConnState{}
	refused := ConnState{STARTTLSOffered: true, STARTTLSReply: 454}
	handshake := ConnState{STARTTLSOffered: true, HandshakeError: errAlert}
	fallback := ConnState{STARTTLSOffered: true, HandshakeError: errAlert, Fallback: true}
	expired := ConnState{STARTTLSOffered: true, TLS: true, CertError: errExpired}
	untrusted := ConnState{STARTTLSOffered: true, TLS: true, CertError: errUnknown}
	mismatch := ConnState{STARTTLSOffered: true, TLS: true, CertError: errHost}
	injected := ConnState{STARTTLSOffered: true, HandshakeError: ErrSTARTTLSInjection}

	enforce, testing_, none := sts(t, "enforce"), sts(t, "testing"), sts(t, "none")
	fetchFailed := Policy{FetchFailure: tlsrpt.ResultSTSPolicyFetchError, FetchReason: "http-404"}

	type want struct {
		action Action
		result tlsrpt.ResultType
		reason string
		ptype  tlsrpt.PolicyType
		count  bool
		code   int
		enh    string
	}
	S, N := tlsrpt.PolicyTypeSTS, tlsrpt.PolicyTypeNoPolicyFound
	cases := []struct {
		name string
		p    Policy
		mx   string
		c    ConnState
		want want
	}{
		// RFC 8461 §5 enforce: verified TLS to a listed MX, or the next MX.
		{"enforce verified", Policy{STS: enforce}, listed, verified, want{Use, "", "", S, true, 0, ""}},
		{"enforce plaintext", Policy{STS: enforce}, listed, plaintext, want{NextMX, tlsrpt.ResultSTARTTLSNotSupported, tlsrpt.ReasonSTARTTLSNotOffered, S, true, 451, "4.7.5"}},
		{"enforce STARTTLS refused", Policy{STS: enforce}, listed, refused, want{NextMX, tlsrpt.ResultSTARTTLSNotSupported, "starttls-reply-454", S, true, 451, "4.7.5"}},
		{"enforce handshake failed", Policy{STS: enforce}, listed, handshake, want{NextMX, tlsrpt.ResultValidationFailure, "tls-alert-handshake-failure", S, true, 451, "4.7.5"}},
		{"enforce expired", Policy{STS: enforce}, listed, expired, want{NextMX, tlsrpt.ResultCertificateExpired, "certificate-expired", S, true, 451, "4.7.5"}},
		{"enforce untrusted", Policy{STS: enforce}, listed, untrusted, want{NextMX, tlsrpt.ResultCertificateNotTrusted, "", S, true, 451, "4.7.5"}},
		{"enforce host mismatch", Policy{STS: enforce}, listed, mismatch, want{NextMX, tlsrpt.ResultCertificateHostMismatch, "certificate-host-mismatch", S, true, 451, "4.7.5"}},
		{"enforce injection", Policy{STS: enforce}, listed, injected, want{NextMX, tlsrpt.ResultValidationFailure, tlsrpt.ReasonSTARTTLSInjection, S, true, 451, "4.7.5"}},

		// RFC 8461 §5 testing: delivered whatever, the failure recorded.
		{"testing verified", Policy{STS: testing_}, listed, verified, want{Use, "", "", S, true, 0, ""}},
		{"testing unlisted MX", Policy{STS: testing_}, unlisted, verified, want{Use, tlsrpt.ResultValidationFailure, tlsrpt.ReasonMXMismatch, S, true, 0, ""}},
		{"testing unlisted MX and expired: mismatch first", Policy{STS: testing_}, unlisted, expired, want{Use, tlsrpt.ResultValidationFailure, tlsrpt.ReasonMXMismatch, S, true, 0, ""}},
		{"testing plaintext", Policy{STS: testing_}, listed, plaintext, want{Use, tlsrpt.ResultSTARTTLSNotSupported, tlsrpt.ReasonSTARTTLSNotOffered, S, true, 0, ""}},
		{"testing expired", Policy{STS: testing_}, listed, expired, want{Use, tlsrpt.ResultCertificateExpired, "certificate-expired", S, true, 0, ""}},
		{"testing handshake failed falls back, uncounted", Policy{STS: testing_}, listed, handshake, want{Fallback, tlsrpt.ResultValidationFailure, "tls-alert-handshake-failure", S, false, 0, ""}},
		{"testing plaintext fallback counts the handshake failure", Policy{STS: testing_}, listed, fallback, want{Use, tlsrpt.ResultValidationFailure, "tls-alert-handshake-failure", S, true, 0, ""}},

		// No policy (or mode none): opportunistic; only no TLS is a failure.
		{"no policy verified", Policy{}, listed, verified, want{Use, "", "", N, true, 0, ""}},
		{"no policy untrusted is no failure", Policy{}, listed, untrusted, want{Use, "", "", N, true, 0, ""}},
		{"no policy plaintext", Policy{}, listed, plaintext, want{Use, tlsrpt.ResultSTARTTLSNotSupported, tlsrpt.ReasonSTARTTLSNotOffered, N, true, 0, ""}},
		{"no policy STARTTLS refused falls back", Policy{}, listed, refused, want{Fallback, tlsrpt.ResultSTARTTLSNotSupported, "starttls-reply-454", N, false, 0, ""}},
		{"no policy fallback session", Policy{}, listed, fallback, want{Use, tlsrpt.ResultValidationFailure, "tls-alert-handshake-failure", N, true, 0, ""}},
		{"mode none is no policy", Policy{STS: none}, unlisted, untrusted, want{Use, "", "", N, true, 0, ""}},

		// RFC 8460 §4.3.2.2: record exists, fetch failed.
		{"fetch failed verified", fetchFailed, listed, verified, want{Use, tlsrpt.ResultSTSPolicyFetchError, "http-404", S, true, 0, ""}},
		{"fetch failed plaintext", fetchFailed, listed, plaintext, want{Use, tlsrpt.ResultSTSPolicyFetchError, "http-404", S, true, 0, ""}},
		{"cached enforce, new id unfetchable", Policy{STS: enforce, FetchFailure: tlsrpt.ResultSTSPolicyFetchError, FetchReason: "http-status-500"}, listed, verified, want{Use, tlsrpt.ResultSTSPolicyFetchError, "http-status-500", S, true, 0, ""}},
		{"cached enforce, new id unfetchable, TLS failure wins", Policy{STS: enforce, FetchFailure: tlsrpt.ResultSTSPolicyFetchError}, listed, expired, want{NextMX, tlsrpt.ResultCertificateExpired, "certificate-expired", S, true, 451, "4.7.5"}},
		{"cached testing, unfetchable, verified", Policy{STS: testing_, FetchFailure: tlsrpt.ResultSTSPolicyInvalid, FetchReason: "policy-syntax"}, listed, verified, want{Use, tlsrpt.ResultSTSPolicyInvalid, "policy-syntax", S, true, 0, ""}},

		// RFC 8689 §4.2.1 REQUIRETLS.
		{"requiretls enforce offered", Policy{STS: enforce, RequireTLS: true}, listed, ConnState{STARTTLSOffered: true, TLS: true, REQUIRETLSOffered: true}, want{Use, "", "", S, true, 0, ""}},
		{"requiretls enforce not offered", Policy{STS: enforce, RequireTLS: true}, listed, verified, want{NextMX, "", "", S, true, 451, "4.7.5"}},
		{"requiretls testing not offered", Policy{STS: testing_, RequireTLS: true}, listed, verified, want{NextMX, "", "", S, true, 550, "5.7.30"}},
		{"requiretls testing expired", Policy{STS: testing_, RequireTLS: true}, listed, expired, want{NextMX, tlsrpt.ResultCertificateExpired, "certificate-expired", S, true, 550, "5.7.10"}},
		{"requiretls no fallback", Policy{STS: testing_, RequireTLS: true}, listed, handshake, want{NextMX, tlsrpt.ResultValidationFailure, "tls-alert-handshake-failure", S, true, 550, "5.7.10"}},
		{"requiretls beats TLS-Required: No", Policy{STS: enforce, RequireTLS: true, TLSRequiredNo: true}, listed, plaintext, want{NextMX, tlsrpt.ResultSTARTTLSNotSupported, tlsrpt.ReasonSTARTTLSNotOffered, S, true, 451, "4.7.5"}},

		// RFC 8689 §5 TLS-Required: No: no policy applied, nothing counted.
		{"TLS-Required: No plaintext to enforce domain", Policy{STS: enforce, TLSRequiredNo: true}, unlisted, plaintext, want{Use, tlsrpt.ResultSTARTTLSNotSupported, tlsrpt.ReasonSTARTTLSNotOffered, N, false, 0, ""}},
		{"TLS-Required: No expired", Policy{STS: enforce, TLSRequiredNo: true}, listed, expired, want{Use, "", "", N, false, 0, ""}},
		{"report mail is not counted", Policy{STS: enforce, Uncounted: true}, listed, plaintext, want{NextMX, tlsrpt.ResultSTARTTLSNotSupported, tlsrpt.ReasonSTARTTLSNotOffered, S, false, 451, "4.7.5"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			v := CheckConn(c.p, c.mx, DANE{}, c.c)
			got := want{v.Action, v.Result, v.ReasonCode, v.PolicyType, v.Count, v.Code, v.Enhanced}
			w := c.want
			if w.reason == "" && w.result != "" && got.reason != "" {
				w.reason = got.reason // only the type is pinned
			}
			if got != w {
				t.Errorf("CheckConn\n got %+v\nwant %+v", got, w)
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

func TestCheckMX(t *testing.T) {
	const listed, unlisted = "mx1.example.org", "mx9.example.net"
	enforce, testing_ := sts(t, "enforce"), sts(t, "testing")
	cases := []struct {
		name   string
		p      Policy
		mx     string
		action Action
		code   int
		count  bool
	}{
		{"enforce listed", Policy{STS: enforce}, listed, Use, 0, false},
		{"enforce unlisted is never contacted (RFC 8461 §4.1)", Policy{STS: enforce}, unlisted, NextMX, 451, true},
		{"enforce unlisted, report mail: not counted", Policy{STS: enforce, Uncounted: true}, unlisted, NextMX, 451, false},
		{"testing unlisted is contacted", Policy{STS: testing_}, unlisted, Use, 0, false},
		{"no policy", Policy{}, unlisted, Use, 0, false},
		{"TLS-Required: No ignores enforce", Policy{STS: enforce, TLSRequiredNo: true}, unlisted, Use, 0, false},
		{"REQUIRETLS without policy (RFC 8689 §4.2.1)", Policy{RequireTLS: true}, listed, NextMX, 550, false},
		{"REQUIRETLS testing unlisted", Policy{STS: testing_, RequireTLS: true}, unlisted, NextMX, 550, false},
		{"REQUIRETLS testing listed", Policy{STS: testing_, RequireTLS: true}, listed, Use, 0, false},
		{"REQUIRETLS enforce unlisted defers", Policy{STS: enforce, RequireTLS: true}, unlisted, NextMX, 451, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			v := CheckMX(c.p, c.mx, DANE{})
			if v.Action != c.action || v.Code != c.code || v.Count != c.count {
				t.Errorf("got action %v code %d count %v, want %v %d %v", v.Action, v.Code, v.Count, c.action, c.code, c.count)
			}
			if v.Action == NextMX && (v.Result != tlsrpt.ResultValidationFailure || v.ReasonCode != tlsrpt.ReasonMXMismatch) {
				t.Errorf("result %q/%q, want validation-failure/%s", v.Result, v.ReasonCode, tlsrpt.ReasonMXMismatch)
			}
		})
	}
}

// Same-kind failures give the same reason code, whatever time or
// address their error text holds: they aggregate into one row.
func TestReasonCodesAreStable(t *testing.T) {
	p := Policy{STS: sts(t, "testing")}
	a := CheckConn(p, "mx1.example.org", DANE{}, ConnState{STARTTLSOffered: true, TLS: true, CertError: errExpired})
	later := x509.CertificateInvalidError{Reason: x509.Expired, Detail: "current time " + time.Now().Format(time.RFC3339) + " is after …"}
	b := CheckConn(p, "mx1.example.org", DANE{}, ConnState{STARTTLSOffered: true, TLS: true, CertError: later})
	if a.ReasonCode != b.ReasonCode || a.Result != b.Result {
		t.Errorf("%q/%q vs %q/%q", a.Result, a.ReasonCode, b.Result, b.ReasonCode)
	}
}

// TestOverrideMatrix: [[tls_policy]] overrides (like Postfix's
// smtp_tls_policy_maps) tighten any policy, and weaken an enforce
// MTA-STS policy only with override_policy (RFC 8461 §5 otherwise wins).
func TestOverrideMatrix(t *testing.T) {
	const listed, unlisted = "mx1.example.org", "mx9.example.net"
	verified := ConnState{STARTTLSOffered: true, TLS: true}
	plaintext := ConnState{}
	untrusted := ConnState{STARTTLSOffered: true, TLS: true, CertError: errUnknown}
	handshake := ConnState{STARTTLSOffered: true, HandshakeError: errAlert}
	skipped := ConnState{STARTTLSOffered: true} // security = "none": STARTTLS not tried
	enforce, testing_ := sts(t, "enforce"), sts(t, "testing")
	S, N := tlsrpt.PolicyTypeSTS, tlsrpt.PolicyTypeNoPolicyFound
	NT := tlsrpt.ResultCertificateNotTrusted
	type want struct {
		action Action
		result tlsrpt.ResultType
		ptype  tlsrpt.PolicyType
		count  bool
	}
	cases := []struct {
		name     string
		p        Policy
		mx       string
		c        ConnState
		want     want
		weakens  bool
		ignored  bool
		starttls bool
	}{
		{"verify on no policy: verified goes", Policy{Override: SecurityVerify}, listed, verified, want{Use, "", N, true}, false, false, true},
		{"verify on no policy refuses an untrusted certificate", Policy{Override: SecurityVerify}, listed, untrusted, want{NextMX, NT, N, true}, false, false, true},
		{"verify on no policy refuses plaintext", Policy{Override: SecurityVerify}, listed, plaintext, want{NextMX, tlsrpt.ResultSTARTTLSNotSupported, N, true}, false, false, true},
		{"verify on no policy: no plaintext fallback", Policy{Override: SecurityVerify}, listed, handshake, want{NextMX, tlsrpt.ResultValidationFailure, N, true}, false, false, true},
		{"verify on testing: unverified refused", Policy{STS: testing_, Override: SecurityVerify}, listed, untrusted, want{NextMX, NT, S, true}, false, false, true},
		{"encrypt on no policy: untrusted goes", Policy{Override: SecurityEncrypt}, listed, untrusted, want{Use, "", N, true}, false, false, true},
		{"encrypt on no policy refuses plaintext", Policy{Override: SecurityEncrypt}, listed, plaintext, want{NextMX, tlsrpt.ResultSTARTTLSNotSupported, N, true}, false, false, true},
		{"encrypt with REQUIRETLS still needs a verified certificate", Policy{Override: SecurityEncrypt, RequireTLS: true}, listed, untrusted, want{NextMX, NT, N, false}, false, false, true},
		{"may on no policy is opportunistic", Policy{Override: SecurityMay}, listed, handshake, want{Fallback, tlsrpt.ResultValidationFailure, N, false}, false, false, true},
		{"none on no policy: plaintext, uncounted", Policy{Override: SecurityNone}, listed, skipped, want{Use, "", N, false}, false, false, false},
		{"may cannot weaken enforce", Policy{STS: enforce, Override: SecurityMay}, listed, untrusted, want{NextMX, NT, S, true}, false, true, true},
		{"encrypt cannot weaken enforce", Policy{STS: enforce, Override: SecurityEncrypt}, listed, untrusted, want{NextMX, NT, S, true}, false, true, true},
		{"none cannot weaken enforce", Policy{STS: enforce, Override: SecurityNone}, listed, plaintext, want{NextMX, tlsrpt.ResultSTARTTLSNotSupported, S, true}, false, true, true},
		{"verify on enforce is enforce", Policy{STS: enforce, Override: SecurityVerify}, listed, verified, want{Use, "", S, true}, false, false, true},
		{"override_policy: encrypt lets untrusted through, failure reported", Policy{STS: enforce, Override: SecurityEncrypt, OverrideWeakens: true}, listed, untrusted, want{Use, NT, S, true}, true, false, true},
		{"override_policy: encrypt still refuses plaintext", Policy{STS: enforce, Override: SecurityEncrypt, OverrideWeakens: true}, listed, plaintext, want{NextMX, tlsrpt.ResultSTARTTLSNotSupported, S, true}, true, false, true},
		{"override_policy: may delivers to an unlisted MX, mismatch reported", Policy{STS: enforce, Override: SecurityMay, OverrideWeakens: true}, unlisted, untrusted, want{Use, tlsrpt.ResultValidationFailure, S, true}, true, false, true},
		{"override_policy: none goes plaintext, uncounted", Policy{STS: enforce, Override: SecurityNone, OverrideWeakens: true}, listed, skipped, want{Use, "", S, false}, true, false, false},
		{"TLS-Required: No sets the override aside too", Policy{Override: SecurityVerify, TLSRequiredNo: true}, listed, untrusted, want{Use, "", N, false}, false, false, true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if mv := CheckMX(c.p, c.mx, DANE{}); mv.Action != Use {
				if c.want.action != NextMX {
					t.Fatalf("CheckMX refused: %+v", mv)
				}
				return
			}
			v := CheckConn(c.p, c.mx, DANE{}, c.c)
			got := want{v.Action, v.Result, v.PolicyType, v.Count}
			if got != c.want {
				t.Errorf("CheckConn\n got %+v\nwant %+v", got, c.want)
			}
			if got := [3]bool{c.p.Weakens(), c.p.OverrideIgnored(), c.p.STARTTLS(DANE{})}; got != [3]bool{c.weakens, c.ignored, c.starttls} {
				t.Errorf("Weakens/OverrideIgnored/STARTTLS = %v, want %v", got, [3]bool{c.weakens, c.ignored, c.starttls})
			}
			if v.Action == NextMX && v.Reason == "" {
				t.Errorf("NextMX without a reason")
			}
		})
	}
	// An enforce policy's MX list stands unless override_policy.
	if v := CheckMX(Policy{STS: enforce, Override: SecurityMay}, unlisted, DANE{}); v.Action != NextMX {
		t.Errorf("may on enforce let an unlisted MX through: %+v", v)
	}
}
