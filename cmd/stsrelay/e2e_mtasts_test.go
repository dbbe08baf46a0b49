package main

// End-to-end tests of MTA-STS (RFC 8461) on the real binary: how a policy
// in force changes where and how mail is delivered. Each test names the
// rows of /work/shared/rfc-checklist.md (section 1) it covers.
//
// The other e2e_mtasts_*_test.go files hold the policy discovery and fetch
// tests (e2e_mtasts_fetch_test.go) and the cache, refresh, CLI and
// connection-reuse tests (e2e_mtasts_cache_test.go).

import (
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/internal/testworld"
)

// Time limits for waiting on one delivery outcome.
const (
	stsWait = 15 * time.Second
)

// stsPolicy is a policy body with LF line ends and max_age 86400.
func stsPolicy(mode string, mx ...string) string {
	var b strings.Builder
	b.WriteString("version: STSv1\nmode: " + mode + "\n")
	for _, m := range mx {
		b.WriteString("mx: " + m + "\n")
	}
	b.WriteString("max_age: 86400\n")
	return b.String()
}

// stsDomain publishes "_mta-sts.<domain> TXT v=STSv1; id=<id>" and a policy
// host with a valid certificate serving policy.
func stsDomain(w *testworld.World, domain, id, policy string) *testworld.PolicyServer {
	pol := w.PolicyHost(domain, testworld.CertValid)
	pol.SetPolicy(policy)
	w.DNS.SetTXT("_mta-sts."+domain, []string{"v=STSv1; id=" + id})
	return pol
}

// mxHost starts an MX server playing host (greeting name host) and
// publishes its A record; the MX record is left to the caller.
func mxHost(w *testworld.World, host string, opts testworld.MXOptions) *testworld.MXServer {
	opts.Hostname = host
	mx := w.NewMX(opts)
	w.DNS.SetA(host, mx.IP())
	return mx
}

// mxWithCert starts an MX for host whose STARTTLS certificate is of the
// given kind (for CertIPOnly: an IP SAN of the server's own address).
func mxWithCert(w *testworld.World, host string, kind testworld.CertKind) *testworld.MXServer {
	ip := w.NextIP()
	name := host
	if kind == testworld.CertIPOnly {
		name = ip
	}
	return mxHost(w, host, testworld.MXOptions{IP: ip, Cert: w.CA.Issue(kind, name)})
}

// policyGETs lists the requests for the policy path.
func policyGETs(p requester) []testworld.Request {
	var out []testworld.Request
	for _, r := range p.Requests() {
		if r.Path == testworld.PolicyPath {
			out = append(out, r)
		}
	}
	return out
}

// mailCommands counts the MAIL commands an MX received.
func mailCommands(mx *testworld.MXServer) int {
	n := 0
	for _, c := range mx.Commands() {
		if c.Verb == "MAIL" {
			n++
		}
	}
	return n
}

// send submits one message to rcpt with a unique subject.
func (r *relayProc) send(rcpt, subject string) string {
	r.t.Helper()
	return r.mustSubmit("s@client.test", []string{rcpt}, simpleMessage(subject))
}

// waitAttempts waits for n delivery lines for rcpt with result.
func (r *relayProc) waitAttempts(rcpt, result string, n int, timeout time.Duration) []map[string]any {
	r.t.Helper()
	return r.waitLog("delivery", n, timeout, func(l map[string]any) bool { return l["rcpt"] == rcpt && l["result"] == result })
}

// noResult fails the test if rcpt has a delivery line with result.
func (r *relayProc) noResult(rcpt, result string) {
	r.t.Helper()
	for _, l := range r.deliveries(rcpt) {
		if l["result"] == result {
			r.t.Errorf("%s was %s: %v", rcpt, result, l)
		}
	}
}

// checkFields compares log fields.
func checkFields(t *testing.T, what string, l map[string]any, want map[string]any) {
	t.Helper()
	for k, v := range want {
		if l[k] != v {
			t.Errorf("%s: %s = %#v, want %#v (line %v)", what, k, l[k], v, l)
		}
	}
}

// The default world of the checklist: enforce, one MX with a valid
// certificate. Delivered over verified TLS; the log names the mode and
// id; the policy host saw exactly one GET of the well-known path with SNI
// and Host mta-sts.ex.test; the MX saw SNI mx1.ex.test; the TXT record
// was looked up at _mta-sts.ex.test.
// STS-3.1-a, STS-3.2-a, STS-4.2-a (valid), STS-5-a (positive), STS-7.1-a.
func TestE2EMTASTSEnforceGoodMX(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := simpleDomain(w, "ex.test")
	pol := stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "mx1.ex.test"))
	r := startRelay(t, testConfig(t, w))

	id := r.send("u@ex.test", "enforce-good")
	l := r.waitResult("u@ex.test", "delivered", stsWait)
	checkFields(t, "delivery", l, map[string]any{"queue_id": id, "mx": "mx1.ex.test", "tls_verified": true,
		"sts_mode": "enforce", "sts_policy_id": "a1", "tlsrpt_result": ""})
	got := mx.WaitMessages(t, 1, stsWait)
	if !got[0].TLS || got[0].SNI != "mx1.ex.test" {
		t.Errorf("MX session TLS=%v SNI=%q, want TLS with SNI mx1.ex.test (STS-7.1-a)", got[0].TLS, got[0].SNI)
	}
	reqs := pol.Requests()
	if len(reqs) != 1 {
		t.Fatalf("policy host got %d requests, want exactly 1: %+v", len(reqs), reqs)
	}
	q := reqs[0]
	if q.Method != "GET" || q.Path != testworld.PolicyPath || q.RawQuery != "" || q.SNI != "mta-sts.ex.test" || q.Host != "mta-sts.ex.test" {
		t.Errorf("policy request %s %s?%s SNI %q Host %q, want GET %s with SNI and Host mta-sts.ex.test",
			q.Method, q.Path, q.RawQuery, q.SNI, q.Host, testworld.PolicyPath)
	}
	if n := w.DNS.CountQueries("_mta-sts.ex.test", dnsTypeTXT); n < 1 {
		t.Errorf("no TXT query for _mta-sts.ex.test")
	}
	f := r.waitLog("mtasts_fetch", 1, stsWait, nil)
	checkFields(t, "mtasts_fetch", f[0], map[string]any{"domain": "ex.test", "id": "a1", "mode": "enforce", "result": "ok"})
}

// The first delivery to a domain with an _mta-sts record waits for the
// policy (design decision): the policy host answers after 1.5 s, the MX
// has a self-signed certificate; the message is deferred, never sent in
// the clear or over unverified TLS while the fetch runs.
func TestE2EMTASTSFirstDeliveryWaitsForFetch(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := mxWithCert(w, "mx1.ex.test", testworld.CertSelfSigned)
	w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
	pol := stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "mx1.ex.test"))
	pol.SetStall(1500 * time.Millisecond)
	r := startRelay(t, testConfig(t, w))

	start := time.Now()
	r.send("u@ex.test", "waits")
	l := r.waitAttempts("u@ex.test", "deferred", 1, stsWait)[0]
	if el := time.Since(start); el < 1400*time.Millisecond {
		t.Errorf("outcome after %v, before the policy host answered", el)
	}
	checkFields(t, "delivery", l, map[string]any{"sts_mode": "enforce", "sts_policy_id": "a1", "tlsrpt_result": "certificate-not-trusted"})
	if n := mailCommands(mx); n != 0 || len(mx.Messages()) != 0 {
		t.Errorf("MX got %d MAIL commands, %d messages; want none", n, len(mx.Messages()))
	}
}

// enforce: an MX outside the policy is never contacted and the recipient
// is deferred, again and again, never bounced; with a second MX that the
// policy lists, the message goes there in the same attempt.
// STS-5-a (i), STS-5-d (transient), STS-5.1-c.
func TestE2EMTASTSEnforceMXNotInPolicy(t *testing.T) {
	t.Parallel()
	t.Run("only-mx-unlisted", func(t *testing.T) {
		t.Parallel()
		w := testworld.New(t)
		mx := mxWithCert(w, "mx1.ex.test", testworld.CertValid)
		w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
		stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "mx.other.test"))
		r := startRelay(t, testConfig(t, w))

		r.send("u@ex.test", "unlisted")
		ls := r.waitAttempts("u@ex.test", "deferred", 3, 20*time.Second)
		for i, l := range ls[:3] {
			checkFields(t, fmt.Sprintf("attempt %d", i+1), l, map[string]any{"attempt": float64(i + 1), "mx": "mx1.ex.test",
				"sts_mode": "enforce", "sts_policy_id": "a1", "tlsrpt_result": "validation-failure"})
			if c, _ := l["code"].(float64); c < 400 || c >= 500 {
				t.Errorf("attempt %d: code %v, want 4xx", i+1, l["code"])
			}
		}
		r.noResult("u@ex.test", "bounced")
		r.noResult("u@ex.test", "delivered")
		if n := mx.Connections(); n != 0 {
			t.Errorf("unlisted MX got %d connections, want 0", n)
		}
	})
	t.Run("second-mx-listed", func(t *testing.T) {
		t.Parallel()
		w := testworld.New(t)
		mx1 := mxWithCert(w, "mx1.ex.test", testworld.CertValid)
		mx2 := mxWithCert(w, "mx2.ex.test", testworld.CertValid)
		w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"}, testworld.MX{Pref: 20, Host: "mx2.ex.test"})
		stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "mx2.ex.test"))
		r := startRelay(t, testConfig(t, w))

		r.send("u@ex.test", "second-listed")
		l := r.waitResult("u@ex.test", "delivered", stsWait)
		// tlsrpt_result is about the session that carried the message
		// (mx2's), not the host passed over.
		checkFields(t, "delivery", l, map[string]any{"attempt": float64(1), "mx": "mx2.ex.test", "ip": mx2.IP(),
			"tls_verified": true, "sts_mode": "enforce", "tlsrpt_result": ""})
		mx2.WaitMessages(t, 1, stsWait)
		if n := mx1.Connections(); n != 0 {
			t.Errorf("unlisted mx1 got %d connections, want 0", n)
		}
		r.noResult("u@ex.test", "deferred")
	})
}

// enforce: an MX whose certificate fails validation gets no MAIL; the
// recipient is deferred (never bounced) with the RFC 8460 result type of
// the failure. A wildcard certificate covers exactly one label.
// STS-4.2-a, STS-5-a (iv), STS-5-d.
func TestE2EMTASTSEnforceBadCertificate(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		kind   testworld.CertKind
		result string
	}{
		{"expired", testworld.CertExpired, "certificate-expired"},
		{"self-signed", testworld.CertSelfSigned, "certificate-not-trusted"},
		{"unknown-ca", testworld.CertUnknownCA, "certificate-not-trusted"},
		{"wrong-name", testworld.CertWrongName, "certificate-host-mismatch"},
		{"ip-only-san", testworld.CertIPOnly, "certificate-host-mismatch"},
		{"cn-only", testworld.CertCNOnly, "certificate-host-mismatch"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			w := testworld.New(t)
			mx := mxWithCert(w, "mx1.ex.test", tc.kind)
			w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
			stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "mx1.ex.test"))
			r := startRelay(t, testConfig(t, w))

			r.send("u@ex.test", "badcert")
			ls := r.waitAttempts("u@ex.test", "deferred", 2, 20*time.Second)
			for _, l := range ls {
				checkFields(t, "delivery", l, map[string]any{"mx": "mx1.ex.test", "sts_mode": "enforce",
					"sts_policy_id": "a1", "tlsrpt_result": tc.result, "tls_verified": false})
			}
			r.noResult("u@ex.test", "bounced")
			r.noResult("u@ex.test", "delivered")
			if n := mailCommands(mx); n != 0 || len(mx.Messages()) != 0 {
				t.Errorf("MX got %d MAIL commands and %d messages, want none", n, len(mx.Messages()))
			}
			if mx.Connections() == 0 {
				t.Errorf("MX never contacted: the certificate was not even looked at")
			}
		})
	}
	t.Run("wildcard-one-label-ok", func(t *testing.T) {
		t.Parallel()
		w := testworld.New(t)
		mx := mxHost(w, "mx1.ex.test", testworld.MXOptions{Cert: w.CA.Issue(testworld.CertValid, "*.ex.test")})
		w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
		stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "mx1.ex.test"))
		r := startRelay(t, testConfig(t, w))
		r.send("u@ex.test", "wild")
		l := r.waitResult("u@ex.test", "delivered", stsWait)
		checkFields(t, "delivery", l, map[string]any{"tls_verified": true, "sts_mode": "enforce"})
		mx.WaitMessages(t, 1, stsWait)
	})
	t.Run("wildcard-two-labels-mismatch", func(t *testing.T) {
		t.Parallel()
		w := testworld.New(t)
		mx := mxHost(w, "a.b.ex.test", testworld.MXOptions{Cert: w.CA.Issue(testworld.CertValid, "*.ex.test")})
		w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "a.b.ex.test"})
		stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "a.b.ex.test"))
		r := startRelay(t, testConfig(t, w))
		r.send("u@ex.test", "wild2")
		l := r.waitAttempts("u@ex.test", "deferred", 1, stsWait)[0]
		checkFields(t, "delivery", l, map[string]any{"tlsrpt_result": "certificate-host-mismatch", "sts_mode": "enforce"})
		if n := mailCommands(mx); n != 0 {
			t.Errorf("MX got %d MAIL commands, want 0", n)
		}
	})
	// STS-4.2-b: a TLSA record (unsigned zone) matching the self-signed
	// certificate is no substitute for PKIX under MTA-STS.
	t.Run("tlsa-no-substitute", func(t *testing.T) {
		t.Parallel()
		w := testworld.New(t)
		ip := w.NextIP()
		cert := w.CA.Issue(testworld.CertSelfSigned, "mx1.ex.test")
		mx := mxHost(w, "mx1.ex.test", testworld.MXOptions{IP: ip, Cert: cert})
		w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
		w.DNS.AddRR(tlsaRR("_25._tcp.mx1.ex.test", cert))
		stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "mx1.ex.test"))
		r := startRelay(t, testConfig(t, w))
		r.send("u@ex.test", "tlsa")
		l := r.waitAttempts("u@ex.test", "deferred", 1, stsWait)[0]
		checkFields(t, "delivery", l, map[string]any{"tlsrpt_result": "certificate-not-trusted"})
		if n := mailCommands(mx); n != 0 {
			t.Errorf("MX got %d MAIL commands, want 0", n)
		}
	})
}

// enforce: an MX without STARTTLS, one that answers STARTTLS with 454
// and one whose TLS handshake fails are not used, with no plaintext
// fallback: deferred, never bounced. With a good MX next in preference
// order, the message goes there in the same attempt. STS-5-a (ii, iii),
// STS-5.1-c.
func TestE2EMTASTSEnforceNoTLS(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		opts    func(w *testworld.World) testworld.MXOptions
		results []string
	}{
		{"no-starttls", func(w *testworld.World) testworld.MXOptions { return testworld.MXOptions{} },
			[]string{"starttls-not-supported"}},
		{"starttls-454", func(w *testworld.World) testworld.MXOptions {
			return testworld.MXOptions{STARTTLSReply: 454}
		}, []string{"starttls-not-supported", "validation-failure"}},
		{"handshake-failure", func(w *testworld.World) testworld.MXOptions {
			return testworld.MXOptions{HandshakeFail: true, Cert: w.CA.Issue(testworld.CertValid, "mx1.ex.test")}
		}, []string{"validation-failure"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			w := testworld.New(t)
			mx := mxHost(w, "mx1.ex.test", tc.opts(w))
			w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
			stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "mx1.ex.test"))
			r := startRelay(t, testConfig(t, w))

			r.send("u@ex.test", "notls")
			ls := r.waitAttempts("u@ex.test", "deferred", 2, 20*time.Second)
			for _, l := range ls {
				checkFields(t, "delivery", l, map[string]any{"mx": "mx1.ex.test", "sts_mode": "enforce", "tls": ""})
				if rt, _ := l["tlsrpt_result"].(string); !slices.Contains(tc.results, rt) {
					t.Errorf("tlsrpt_result %q, want one of %v", rt, tc.results)
				}
			}
			r.noResult("u@ex.test", "bounced")
			r.noResult("u@ex.test", "delivered")
			if n := mailCommands(mx); n != 0 || len(mx.Messages()) != 0 {
				t.Errorf("MX got %d MAIL commands and %d messages in the clear, want none", n, len(mx.Messages()))
			}
		})
	}
	t.Run("next-mx-same-attempt", func(t *testing.T) {
		t.Parallel()
		w := testworld.New(t)
		mx1 := mxHost(w, "mx1.ex.test", testworld.MXOptions{})
		mx2 := mxWithCert(w, "mx2.ex.test", testworld.CertValid)
		w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"}, testworld.MX{Pref: 20, Host: "mx2.ex.test"})
		stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "mx1.ex.test", "mx2.ex.test"))
		r := startRelay(t, testConfig(t, w))
		r.send("u@ex.test", "next")
		l := r.waitResult("u@ex.test", "delivered", stsWait)
		checkFields(t, "delivery", l, map[string]any{"attempt": float64(1), "mx": "mx2.ex.test", "tls_verified": true})
		mx2.WaitMessages(t, 1, stsWait)
		if mx1.Connections() == 0 {
			t.Errorf("mx1 (preference 10) was never tried")
		}
		if n := mailCommands(mx1); n != 0 {
			t.Errorf("mx1 without STARTTLS got %d MAIL commands", n)
		}
	})
}

// testing: every failure that enforce refuses is delivered anyway (in the
// clear when there is no usable STARTTLS), and the failure is logged as
// tlsrpt_result. STS-5-b.
func TestE2EMTASTSTestingMode(t *testing.T) {
	t.Parallel()
	type setup func(w *testworld.World) (*testworld.MXServer, string) // MX and the pattern listed
	certMX := func(kind testworld.CertKind) setup {
		return func(w *testworld.World) (*testworld.MXServer, string) {
			return mxWithCert(w, "mx1.ex.test", kind), "mx1.ex.test"
		}
	}
	optsMX := func(f func(w *testworld.World) testworld.MXOptions) setup {
		return func(w *testworld.World) (*testworld.MXServer, string) {
			return mxHost(w, "mx1.ex.test", f(w)), "mx1.ex.test"
		}
	}
	for _, tc := range []struct {
		name    string
		setup   setup
		tls     bool // delivered over TLS
		results []string
	}{
		{"mx-not-in-policy", func(w *testworld.World) (*testworld.MXServer, string) {
			return mxWithCert(w, "mx1.ex.test", testworld.CertValid), "mx.other.test"
		}, true, []string{"validation-failure"}},
		{"no-starttls", optsMX(func(w *testworld.World) testworld.MXOptions { return testworld.MXOptions{} }),
			false, []string{"starttls-not-supported"}},
		{"starttls-454", optsMX(func(w *testworld.World) testworld.MXOptions { return testworld.MXOptions{STARTTLSReply: 454} }),
			false, []string{"starttls-not-supported", "validation-failure"}},
		{"handshake-failure", optsMX(func(w *testworld.World) testworld.MXOptions {
			return testworld.MXOptions{HandshakeFail: true, Cert: w.CA.Issue(testworld.CertValid, "mx1.ex.test")}
		}), false, []string{"starttls-not-supported", "validation-failure"}},
		{"expired", certMX(testworld.CertExpired), true, []string{"certificate-expired"}},
		{"self-signed", certMX(testworld.CertSelfSigned), true, []string{"certificate-not-trusted"}},
		{"unknown-ca", certMX(testworld.CertUnknownCA), true, []string{"certificate-not-trusted"}},
		{"wrong-name", certMX(testworld.CertWrongName), true, []string{"certificate-host-mismatch"}},
		{"ip-only-san", certMX(testworld.CertIPOnly), true, []string{"certificate-host-mismatch"}},
		{"cn-only", certMX(testworld.CertCNOnly), true, []string{"certificate-host-mismatch"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			w := testworld.New(t)
			mx, pattern := tc.setup(w)
			w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
			stsDomain(w, "ex.test", "a1", stsPolicy("testing", pattern))
			r := startRelay(t, testConfig(t, w))

			r.send("u@ex.test", "testing")
			l := r.waitResult("u@ex.test", "delivered", stsWait)
			checkFields(t, "delivery", l, map[string]any{"attempt": float64(1), "mx": "mx1.ex.test", "sts_mode": "testing", "sts_policy_id": "a1"})
			if rt, _ := l["tlsrpt_result"].(string); !slices.Contains(tc.results, rt) {
				t.Errorf("tlsrpt_result %q, want one of %v", rt, tc.results)
			}
			got := mx.WaitMessages(t, 1, stsWait)
			if got[0].TLS != tc.tls {
				t.Errorf("delivered with TLS=%v, want %v", got[0].TLS, tc.tls)
			}
			if tc.tls && l["tls"] == "" || !tc.tls && l["tls"] != "" {
				t.Errorf("log tls = %q, want TLS=%v", l["tls"], tc.tls)
			}
		})
	}
}

// mode none: the domain is treated as having no policy; an unlisted MX
// with a bad certificate gets the message (opportunistic TLS). STS-5-c.
func TestE2EMTASTSModeNone(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := mxWithCert(w, "mx1.ex.test", testworld.CertSelfSigned)
	w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
	pol := stsDomain(w, "ex.test", "n1", stsPolicy("none", "mx.other.test"))
	r := startRelay(t, testConfig(t, w))

	r.send("u@ex.test", "none")
	l := r.waitResult("u@ex.test", "delivered", stsWait)
	checkFields(t, "delivery", l, map[string]any{"attempt": float64(1), "mx": "mx1.ex.test", "sts_mode": "none", "tls_verified": false})
	got := mx.WaitMessages(t, 1, stsWait)
	if !got[0].TLS {
		t.Errorf("opportunistic TLS not used with mode none")
	}
	if rt := l["tlsrpt_result"]; rt == "validation-failure" {
		t.Errorf("mode none logged an MX mismatch (%v): it has no MX list to enforce", rt)
	}
	if n := len(policyGETs(pol)); n != 1 {
		t.Errorf("policy GETs = %d, want 1", n)
	}
}

// An MX that speaks only TLS 1.2 and one that speaks only TLS 1.3 both
// work under enforce. STS-7.2-a.
func TestE2EMTASTSTLSVersions(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		v    uint16
		log  string
	}{{"tls1.2-only", tls.VersionTLS12, "TLS1.2"}, {"tls1.3-only", tls.VersionTLS13, "TLS1.3"}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			w := testworld.New(t)
			mx := mxHost(w, "mx1.ex.test", testworld.MXOptions{Cert: w.CA.Issue(testworld.CertValid, "mx1.ex.test"), MinTLS: tc.v, MaxTLS: tc.v})
			w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
			stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "mx1.ex.test"))
			r := startRelay(t, testConfig(t, w))
			r.send("u@ex.test", "ver")
			l := r.waitResult("u@ex.test", "delivered", stsWait)
			checkFields(t, "delivery", l, map[string]any{"tls": tc.log, "tls_verified": true, "sts_mode": "enforce"})
			if got := mx.WaitMessages(t, 1, stsWait); got[0].TLSVersion != tc.v {
				t.Errorf("MX saw TLS version %x, want %x", got[0].TLSVersion, tc.v)
			}
		})
	}
}

// MX name matching (RFC 8461 §4.1): the MX record's name is matched, not
// its CNAME target; "*" stands for exactly one left-most label; case and
// a trailing dot do not matter; IDNs compare as A-labels.
// STS-4.1-a, STS-4.1-b, STS-3.2-j.
func TestE2EMTASTSMXMatching(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name    string
		mxName  string // MX record target
		target  string // where its address lives (CNAME target when != mxName)
		certFor string
		pattern string
		match   bool
	}{
		{"cname-mx-name-matches", "mx1.ex.test", "h.cdn.test", "mx1.ex.test", "mx1.ex.test", true},
		{"cname-target-does-not-match", "mx1.ex.test", "h.cdn.test", "mx1.ex.test", "h.cdn.test", false},
		{"wildcard-one-label", "mail.ex.test", "mail.ex.test", "mail.ex.test", "*.ex.test", true},
		{"wildcard-not-two-labels", "a.b.ex.test", "a.b.ex.test", "a.b.ex.test", "*.ex.test", false},
		{"wildcard-not-apex", "ex.test", "ex.test", "ex.test", "*.ex.test", false},

		{"case-and-dot", "MX1.EX.TEST.", "mx1.ex.test", "mx1.ex.test", "mx1.ex.test", true},
		{"pattern-case", "mx1.ex.test", "mx1.ex.test", "mx1.ex.test", "MX1.Ex.Test", true},
		// "mx*.ex.test" never matches: the relay goes further and rejects
		// the policy (sts-policy-invalid), see TestE2EMTASTSPolicySyntax.
		{"idn-a-label", "xn--bcher-kva.test", "xn--bcher-kva.test", "xn--bcher-kva.test", "xn--bcher-kva.test", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			w := testworld.New(t)
			mx := w.NewMX(testworld.MXOptions{Hostname: tc.certFor, Cert: w.CA.Issue(testworld.CertValid, tc.certFor)})
			w.DNS.SetA(tc.target, mx.IP())
			if !strings.EqualFold(strings.TrimSuffix(tc.mxName, "."), tc.target) {
				w.DNS.SetCNAME(tc.mxName, tc.target)
			}
			w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: tc.mxName})
			stsDomain(w, "ex.test", "a1", stsPolicy("enforce", tc.pattern))
			r := startRelay(t, testConfig(t, w))
			r.send("u@ex.test", "match")
			if tc.match {
				l := r.waitResult("u@ex.test", "delivered", stsWait)
				checkFields(t, "delivery", l, map[string]any{"sts_mode": "enforce", "tls_verified": true})
				got := mx.WaitMessages(t, 1, stsWait)
				if want := strings.ToLower(strings.TrimSuffix(tc.mxName, ".")); got[0].SNI != want {
					t.Errorf("SNI %q, want the MX name %q", got[0].SNI, want)
				}
				return
			}
			l := r.waitAttempts("u@ex.test", "deferred", 1, stsWait)[0]
			checkFields(t, "delivery", l, map[string]any{"sts_mode": "enforce", "tlsrpt_result": "validation-failure"})
			if n := mx.Connections(); n != 0 {
				t.Errorf("MX not matching the policy got %d connections", n)
			}
		})
	}
}

const (
	dnsTypeTXT = dns.TypeTXT
	dnsTypeA   = dns.TypeA
)

// requester is a server of the world that logs the HTTPS requests it got.
type requester interface {
	Requests() []testworld.Request
}

func jsonUnmarshal(s string, v any) error { return json.Unmarshal([]byte(s), v) }

// tlsaRR is "owner TLSA 3 1 1 <sha256 of cert's SPKI>".
func tlsaRR(owner string, c *testworld.Cert) dns.RR {
	sum := sha256.Sum256(c.Leaf.RawSubjectPublicKeyInfo)
	return &dns.TLSA{
		Hdr:          dns.RR_Header{Name: dns.Fqdn(owner), Rrtype: dns.TypeTLSA, Class: dns.ClassINET, Ttl: 300},
		Usage:        3,
		Selector:     1,
		MatchingType: 1,
		Certificate:  hex.EncodeToString(sum[:]),
	}
}
