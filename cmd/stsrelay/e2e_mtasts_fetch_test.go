package main

// MTA-STS discovery and policy fetch, end to end: TXT record variants,
// broken policy hosts, policy syntax. The MX in these tests has a
// self-signed certificate, so the outcome shows whether a policy was
// applied: enforce → deferred; no policy (or testing, or none) →
// delivered over unverified TLS.

import (
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/testworld"
)

// badCertDomain publishes "MX 10 mx1.<domain>" served with a self-signed
// certificate.
func badCertDomain(w *testworld.World, domain string) *testworld.MXServer {
	mx := mxWithCert(w, "mx1."+domain, testworld.CertSelfSigned)
	w.DNS.SetMX(domain, testworld.MX{Pref: 10, Host: "mx1." + domain})
	return mx
}

// TXT record discovery (RFC 8461 §3.1). A record that is not exactly one
// valid v=STSv1 record means no policy: no GET, and the bad-cert MX gets
// the message. STS-3.1-a (negative), STS-3.1-b, STS-3.1-c, STS-3.1-d,
// STS-3.1-e, STS-3.1-f, STS-3.1-g, STS-3.1-h.
func TestE2EMTASTSTXTVariants(t *testing.T) {
	t.Parallel()
	id32 := strings.Repeat("a1", 16)
	txt := func(recs ...[]string) func(w *testworld.World) {
		return func(w *testworld.World) { w.DNS.SetTXT("_mta-sts.ex.test", recs...) }
	}
	for _, tc := range []struct {
		name   string
		dns    func(w *testworld.World)
		wantID string // "" = no policy
	}{
		{"plain", txt([]string{"v=STSv1; id=a1"}), "a1"},
		{"txt-at-domain-not-_mta-sts", func(w *testworld.World) { w.DNS.SetTXT("ex.test", []string{"v=STSv1; id=a1"}) }, ""},
		{"version-not-first", txt([]string{"id=a1; v=STSv1"}), ""},
		{"version-lowercase", txt([]string{"v=stsv1; id=a1"}), ""},
		{"two-sts-records", txt([]string{"v=STSv1; id=a1"}, []string{"v=STSv1; id=b2"}), ""},
		{"sts-plus-spf", txt([]string{"v=STSv1; id=a1"}, []string{"v=spf1 -all"}), "a1"},
		{"id-33-chars", txt([]string{"v=STSv1; id=" + id32 + "x"}), ""},
		{"id-with-hyphens", txt([]string{"v=STSv1; id=2024-01-01"}), ""},
		{"id-empty", txt([]string{"v=STSv1; id="}), ""},
		{"no-id", txt([]string{"v=STSv1;"}), ""},
		{"id-32-chars", txt([]string{"v=STSv1; id=" + id32}), id32},
		{"multi-string-joined-without-space", txt([]string{"v=STSv1; id=ab", "cd"}), "abcd"},
		{"unknown-field-ignored", txt([]string{"v=STSv1; id=a1; foo=bar"}), "a1"},
		{"duplicate-id-first-wins", txt([]string{"v=STSv1; id=a1; id=b2"}), "a1"},
		{"no-space-after-semicolon", txt([]string{"v=STSv1;id=a1"}), "a1"},
		{"trailing-semicolon", txt([]string{"v=STSv1; id=a1;"}), "a1"},
		{"cname-chain", func(w *testworld.World) {
			w.DNS.SetCNAME("_mta-sts.ex.test", "_mta-sts.mid.test")
			w.DNS.SetCNAME("_mta-sts.mid.test", "_mta-sts.prov.test")
			w.DNS.SetTXT("_mta-sts.prov.test", []string{"v=STSv1; id=c1"})
		}, "c1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			w := testworld.New(t)
			mx := badCertDomain(w, "ex.test")
			pol := w.PolicyHost("ex.test", testworld.CertValid)
			pol.SetPolicy(stsPolicy("enforce", "mx1.ex.test"))
			tc.dns(w)
			r := startRelay(t, testConfig(t, w))

			r.send("u@ex.test", "txt")
			if tc.wantID == "" {
				l := r.waitResult("u@ex.test", "delivered", stsWait)
				checkFields(t, "delivery", l, map[string]any{"sts_mode": "", "sts_policy_id": ""})
				mx.WaitMessages(t, 1, stsWait)
				if n := pol.Count(); n != 0 {
					t.Errorf("policy host got %d requests, want 0", n)
				}
				return
			}
			l := r.waitAttempts("u@ex.test", "deferred", 1, stsWait)[0]
			checkFields(t, "delivery", l, map[string]any{"sts_mode": "enforce", "sts_policy_id": tc.wantID})
			gets := policyGETs(pol)
			if len(gets) != 1 {
				t.Fatalf("policy GETs = %d, want 1", len(gets))
			}
			// STS-3.1-h: the policy host stays mta-sts.<recipient domain>.
			if gets[0].SNI != "mta-sts.ex.test" || gets[0].Host != "mta-sts.ex.test" {
				t.Errorf("GET with SNI %q Host %q, want mta-sts.ex.test", gets[0].SNI, gets[0].Host)
			}
			if n := mailCommands(mx); n != 0 {
				t.Errorf("bad-cert MX got %d MAIL commands under enforce", n)
			}
		})
	}
}

// STS-3.1-e (second half): the id of a multi-string record is the joined
// string, so publishing it as one string afterwards is no change: no
// refetch (checked across a restart, since the relay re-reads the TXT
// record only after its 60 s grace).
func TestE2EMTASTSMultiStringIDStable(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	simpleDomain(w, "ex.test")
	pol := w.PolicyHost("ex.test", testworld.CertValid)
	pol.SetPolicy(stsPolicy("enforce", "mx1.ex.test"))
	w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=ab", "cd"})
	r := startRelay(t, testConfig(t, w))
	r.send("u1@ex.test", "ms1")
	checkFields(t, "delivery", r.waitResult("u1@ex.test", "delivered", stsWait), map[string]any{"sts_policy_id": "abcd"})

	w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=abcd"})
	r.restart()
	before := w.DNS.CountQueries("_mta-sts.ex.test", dnsTypeTXT)
	r.send("u2@ex.test", "ms2")
	checkFields(t, "delivery", r.waitResult("u2@ex.test", "delivered", stsWait), map[string]any{"sts_policy_id": "abcd", "sts_mode": "enforce"})
	if w.DNS.CountQueries("_mta-sts.ex.test", dnsTypeTXT) == before {
		t.Errorf("the TXT record was not looked up again after the restart")
	}
	if n := len(policyGETs(pol)); n != 1 {
		t.Errorf("policy GETs = %d, want 1 (same id, no refetch)", n)
	}
}

// STS-3.1-h: with _mta-sts a CNAME to a provider, the policy host is still
// mta-sts.<recipient domain>: a certificate valid only for the provider's
// policy host fails the Web PKI check, so no policy applies.
func TestE2EMTASTSTXTCNAMEProviderCert(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := badCertDomain(w, "ex.test")
	prov := w.PolicyHost("prov.test", testworld.CertValid)
	prov.SetPolicy(stsPolicy("enforce", "mx1.ex.test"))
	w.DNS.SetA("mta-sts.ex.test", prov.IP())
	w.DNS.SetCNAME("_mta-sts.ex.test", "_mta-sts.prov.test")
	w.DNS.SetTXT("_mta-sts.prov.test", []string{"v=STSv1; id=p1"})
	r := startRelay(t, testConfig(t, w))

	r.send("u@ex.test", "provcert")
	checkFields(t, "delivery", r.waitResult("u@ex.test", "delivered", stsWait), map[string]any{"sts_mode": ""})
	mx.WaitMessages(t, 1, stsWait)
	reqs := prov.Requests()
	for _, q := range reqs {
		if q.SNI != "mta-sts.ex.test" {
			t.Errorf("policy request with SNI %q, want mta-sts.ex.test", q.SNI)
		}
	}
	f := r.waitLog("mtasts_fetch", 1, stsWait, nil)
	checkFields(t, "mtasts_fetch", f[0], map[string]any{"domain": "ex.test", "result": "sts-webpki-invalid"})
}

// Every way a policy fetch can fail, with nothing cached: the message is
// delivered as if the domain had no policy (to the bad-cert MX, over
// unverified TLS), the failure is logged with its RFC 8460 result type,
// and slow or stalled hosts hold delivery up no longer than fetch_timeout
// (3 s) and a few seconds. STS-3.2-b, STS-3.3-a, STS-3.3-b, STS-3.3-c,
// STS-3.3-d, STS-3.3-g, STS-3.3-h.
func TestE2EMTASTSBrokenFetch(t *testing.T) {
	t.Parallel()
	good := stsPolicy("enforce", "mx1.ex.test")
	big := func() string {
		var b strings.Builder
		b.WriteString("version: STSv1\nmode: enforce\nmx: mx1.ex.test\n")
		for i := 0; b.Len() < 2500; i++ {
			fmt.Fprintf(&b, "mx: pad%04d.ex.test\n", i)
		}
		b.WriteString("max_age: 86400\n")
		return b.String()
	}()
	fixed := func(status int, ctype, body string) func(w *testworld.World) requester {
		return func(w *testworld.World) requester {
			p := w.PolicyHost("ex.test", testworld.CertValid)
			p.SetResponse(status, ctype, body, nil)
			return p
		}
	}
	certKind := func(k testworld.CertKind) func(w *testworld.World) requester {
		return func(w *testworld.World) requester {
			p := w.PolicyHost("ex.test", k)
			p.SetPolicy(good)
			return p
		}
	}
	var redirectTarget = map[string]requester{} // by test name; written before t.Parallel
	for _, tc := range []struct {
		name   string
		pol    func(w *testworld.World) requester
		result string
		cfg    func(c *config.Config)
		slow   bool // must end by fetch_timeout, not sooner
	}{
		{"status-404", fixed(404, "text/plain", good), "sts-policy-fetch-error", nil, false},
		{"status-500", fixed(500, "text/plain", good), "sts-policy-fetch-error", nil, false},
		{"status-201", fixed(201, "text/plain", good), "sts-policy-fetch-error", nil, false},
		{"status-203", fixed(203, "text/plain", good), "sts-policy-fetch-error", nil, false},
		{"status-204", fixed(204, "text/plain", ""), "sts-policy-fetch-error", nil, false},
		{"redirect-not-followed", func(w *testworld.World) requester {
			other := w.PolicyHost("other.test", testworld.CertValid)
			other.SetPolicy(good)
			redirectTarget["redirect-not-followed"] = other
			p := w.PolicyHost("ex.test", testworld.CertValid)
			p.SetRedirect(other.URL())
			return p
		}, "sts-policy-fetch-error", nil, false},
		{"content-type-text-html", fixed(200, "text/html", good), "sts-policy-invalid", nil, false},
		{"content-type-missing", fixed(200, "", good), "sts-policy-invalid", nil, false},
		{"cert-self-signed", certKind(testworld.CertSelfSigned), "sts-webpki-invalid", nil, false},
		{"cert-expired", certKind(testworld.CertExpired), "sts-webpki-invalid", nil, false},
		{"cert-unknown-ca", certKind(testworld.CertUnknownCA), "sts-webpki-invalid", nil, false},
		{"cert-wrong-name", certKind(testworld.CertWrongName), "sts-webpki-invalid", nil, false},
		{"cert-cn-only", certKind(testworld.CertCNOnly), "sts-webpki-invalid", nil, false},
		{"cert-ip-only", certKind(testworld.CertIPOnly), "sts-webpki-invalid", nil, false},
		{"cert-partial-wildcard", func(w *testworld.World) requester {
			return customPolicyHost(w, "ex.test", w.CA.Issue(testworld.CertValid, "mta*.ex.test"), good)
		}, "sts-webpki-invalid", nil, false},
		{"body-over-max-policy-bytes", fixed(200, "text/plain", big), "sts-policy-fetch-error",
			func(c *config.Config) { c.MTASTS.MaxPolicyBytes = 2048 }, false},
		{"endless-body", func(w *testworld.World) requester {
			p := w.PolicyHost("ex.test", testworld.CertValid)
			p.SetEndless()
			return p
		}, "sts-policy-fetch-error", nil, false},
		{"huge-headers", func(w *testworld.World) requester {
			p := w.PolicyHost("ex.test", testworld.CertValid)
			p.SetPolicy(good)
			p.SetHugeHeaders(64 << 10)
			return p
		}, "sts-policy-fetch-error", nil, false},
		{"slow-drip", func(w *testworld.World) requester {
			p := w.PolicyHost("ex.test", testworld.CertValid)
			p.SetPolicy(good)
			p.SetSlowDrip(300 * time.Millisecond)
			return p
		}, "sts-policy-fetch-error", nil, true},
		{"stall", func(w *testworld.World) requester {
			p := w.PolicyHost("ex.test", testworld.CertValid)
			p.SetPolicy(good)
			p.SetStall(5 * time.Minute)
			return p
		}, "sts-policy-fetch-error", nil, true},
		{"no-policy-host-address", func(w *testworld.World) requester {
			p := w.PolicyHost("ex.test", testworld.CertValid)
			p.SetPolicy(good)
			w.DNS.Remove("mta-sts.ex.test", dnsTypeA)
			return p
		}, "sts-policy-fetch-error", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := testworld.New(t)
			mx := badCertDomain(w, "ex.test")
			pol := tc.pol(w)
			other := redirectTarget[tc.name]
			t.Parallel()
			w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=a1"})
			cfg := testConfig(t, w)
			if tc.cfg != nil {
				tc.cfg(cfg)
			}
			r := startRelay(t, cfg)

			start := time.Now()
			r.send("u@ex.test", "broken")
			l := r.waitAttempts("u@ex.test", "delivered", 1, 20*time.Second)[0]
			el := time.Since(start)
			checkFields(t, "delivery", l, map[string]any{"attempt": float64(1), "sts_mode": "", "tls_verified": false})
			mx.WaitMessages(t, 1, stsWait)
			if limit := cfg.MTASTS.FetchTimeout.Duration + 4*time.Second; el > limit {
				t.Errorf("delivered %v after submission, want within fetch_timeout + 4s = %v", el, limit)
			}
			if tc.slow && el < cfg.MTASTS.FetchTimeout.Duration-500*time.Millisecond {
				t.Errorf("delivered %v after submission: the relay did not wait for the fetch", el)
			}
			f := r.waitLog("mtasts_fetch", 1, stsWait, nil)
			checkFields(t, "mtasts_fetch", f[0], map[string]any{"domain": "ex.test", "id": "a1", "result": tc.result})
			if tc.result != "sts-webpki-invalid" && tc.name != "no-policy-host-address" && len(pol.Requests()) == 0 {
				t.Errorf("the policy host was never asked")
			}
			if other != nil {
				if n := len(other.Requests()); n != 0 {
					t.Errorf("redirect target got %d requests, want 0 (STS-3.3-d)", n)
				}
			}
		})
	}
}

// customPolicyHost serves policy as mta-sts.<domain> with cert.
// It returns the HTTPS server, whose request log shows the fetches.
func customPolicyHost(w *testworld.World, domain string, cert *testworld.Cert, policy string) *testworld.HTTPSServer {
	// The handler of a PolicyServer for another name, behind an HTTPS
	// server with cert; mta-sts.<domain> points there.
	p := w.PolicyHost("handler-"+domain, testworld.CertValid)
	p.SetPolicy(policy)
	h := w.NewHTTPS("", cert)
	h.Handle("", p)
	w.DNS.SetA("mta-sts."+domain, h.IP())
	return h
}

// Policy syntax (RFC 8461 §3.2): lenient where the RFC allows, strict
// where it must be. A valid enforce policy defers the bad-cert MX; an
// invalid one is no policy (delivered, sts-policy-invalid logged).
// STS-3.2-b, STS-3.2-c, STS-3.2-d, STS-3.2-e, STS-3.2-f, STS-3.2-g,
// STS-3.2-h, STS-3.2-i, STS-3.3-b.
func TestE2EMTASTSPolicySyntax(t *testing.T) {
	t.Parallel()
	const (
		invalid = "invalid"
	)
	for _, tc := range []struct {
		name  string
		ctype string
		body  string
		mode  string // mode applied, or invalid
	}{
		{"lf", "text/plain", "version: STSv1\nmode: enforce\nmx: mx1.ex.test\nmax_age: 86400\n", "enforce"},
		{"crlf", "text/plain", "version: STSv1\r\nmode: enforce\r\nmx: mx1.ex.test\r\nmax_age: 86400\r\n", "enforce"},
		{"mixed-line-ends", "text/plain", "version: STSv1\r\nmode: enforce\nmx: mx1.ex.test\r\nmax_age: 86400\n", "enforce"},
		{"no-final-newline", "text/plain", "version: STSv1\nmode: enforce\nmx: mx1.ex.test\nmax_age: 86400", "enforce"},
		{"no-space-after-colon", "text/plain", "version:STSv1\nmode:enforce\nmx:mx1.ex.test\nmax_age:86400\n", "enforce"},
		{"trailing-whitespace", "text/plain", "version: STSv1\nmode: enforce  \nmx: mx1.ex.test\t\nmax_age: 86400 \n", "enforce"},
		{"unknown-key", "text/plain", "version: STSv1\nmode: enforce\nfoo: bar\nmx: mx1.ex.test\nmax_age: 86400\n", "enforce"},
		{"duplicate-mode-first-wins", "text/plain", "version: STSv1\nmode: testing\nmode: enforce\nmx: mx1.ex.test\nmax_age: 86400\n", "testing"},
		{"mx-accumulate", "text/plain", "version: STSv1\nmode: enforce\nmx: mx0.ex.test\nmx: mx1.ex.test\nmax_age: 86400\n", "enforce"},
		{"max-age-over-maximum", "text/plain", "version: STSv1\nmode: enforce\nmx: mx1.ex.test\nmax_age: 9999999999\n", "enforce"},
		{"charset-and-other-params", "text/plain; charset=utf-8; x=y", stsPolicy("enforce", "mx1.ex.test"), "enforce"},
		{"mode-none-without-mx", "text/plain", "version: STSv1\nmode: none\nmax_age: 86400\n", "none"},
		{"version-STSv2", "text/plain", "version: STSv2\nmode: enforce\nmx: mx1.ex.test\nmax_age: 86400\n", invalid},
		{"version-lowercase", "text/plain", "version: stsv1\nmode: enforce\nmx: mx1.ex.test\nmax_age: 86400\n", invalid},
		{"no-version", "text/plain", "mode: enforce\nmx: mx1.ex.test\nmax_age: 86400\n", invalid},
		{"mode-Enforce", "text/plain", "version: STSv1\nmode: Enforce\nmx: mx1.ex.test\nmax_age: 86400\n", invalid},
		{"mode-strict", "text/plain", "version: STSv1\nmode: strict\nmx: mx1.ex.test\nmax_age: 86400\n", invalid},
		{"no-mode", "text/plain", "version: STSv1\nmx: mx1.ex.test\nmax_age: 86400\n", invalid},
		{"enforce-without-mx", "text/plain", "version: STSv1\nmode: enforce\nmax_age: 86400\n", invalid},
		{"max-age-negative", "text/plain", "version: STSv1\nmode: enforce\nmx: mx1.ex.test\nmax_age: -1\n", invalid},
		{"max-age-exponent", "text/plain", "version: STSv1\nmode: enforce\nmx: mx1.ex.test\nmax_age: 1e5\n", invalid},
		{"max-age-11-digits", "text/plain", "version: STSv1\nmode: enforce\nmx: mx1.ex.test\nmax_age: 10000000000\n", invalid},
		{"no-max-age", "text/plain", "version: STSv1\nmode: enforce\nmx: mx1.ex.test\n", invalid},
		{"partial-wildcard-mx", "text/plain", "version: STSv1\nmode: enforce\nmx: mx*.ex.test\nmax_age: 86400\n", invalid},
		{"leading-whitespace-key", "text/plain", "version: STSv1\n mode: enforce\nmx: mx1.ex.test\nmax_age: 86400\n", invalid},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			w := testworld.New(t)
			mx := badCertDomain(w, "ex.test")
			pol := w.PolicyHost("ex.test", testworld.CertValid)
			pol.SetResponse(http.StatusOK, tc.ctype, tc.body, nil)
			w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=a1"})
			r := startRelay(t, testConfig(t, w))

			r.send("u@ex.test", "syntax")
			switch tc.mode {
			case "enforce":
				l := r.waitAttempts("u@ex.test", "deferred", 1, stsWait)[0]
				checkFields(t, "delivery", l, map[string]any{"sts_mode": "enforce", "sts_policy_id": "a1"})
				if n := mailCommands(mx); n != 0 {
					t.Errorf("bad-cert MX got %d MAIL commands under enforce", n)
				}
			case invalid:
				l := r.waitResult("u@ex.test", "delivered", stsWait)
				checkFields(t, "delivery", l, map[string]any{"sts_mode": ""})
				f := r.waitLog("mtasts_fetch", 1, stsWait, nil)
				checkFields(t, "mtasts_fetch", f[0], map[string]any{"result": "sts-policy-invalid"})
			default:
				l := r.waitResult("u@ex.test", "delivered", stsWait)
				checkFields(t, "delivery", l, map[string]any{"sts_mode": tc.mode, "sts_policy_id": "a1"})
			}
			if tc.name == "max-age-over-maximum" {
				var e struct {
					MaxAge int64 `json:"max_age"`
				}
				out, code := r.cli("policy", "show", "-json", "ex.test")
				if code != 0 || jsonUnmarshal(out, &e) != nil {
					t.Fatalf("policy show: exit %d: %s", code, out)
				}
				if e.MaxAge <= 0 || e.MaxAge > 31557600 {
					t.Errorf("max_age 9999999999 cached as %d s, want capped at <= 31557600", e.MaxAge)
				}
			}
		})
	}
	// STS-3.2-f: "mx: a, b" on one line is either invalid or never
	// matches; either way enforce never delivers on its strength.
	t.Run("two-patterns-one-line", func(t *testing.T) {
		t.Parallel()
		w := testworld.New(t)
		mx := simpleDomain(w, "ex.test")
		stsDomain(w, "ex.test", "a1", "version: STSv1\nmode: enforce\nmx: mx1.ex.test, mx2.ex.test\nmax_age: 86400\n")
		r := startRelay(t, testConfig(t, w))
		r.send("u@ex.test", "twopat")
		l := r.waitLog("delivery", 1, stsWait, func(l map[string]any) bool { return l["rcpt"] == "u@ex.test" })[0]
		if l["sts_mode"] == "enforce" && l["result"] == "delivered" {
			t.Errorf("\"mx: a, b\" matched mx1.ex.test: %v", l)
		}
		if l["sts_mode"] == "enforce" && mx.Connections() != 0 {
			t.Errorf("MX contacted under a pattern that cannot match")
		}
	})
	// STS-3.3-b: a policy host certificate with SAN *.ex.test is valid.
	t.Run("policy-host-wildcard-cert", func(t *testing.T) {
		t.Parallel()
		w := testworld.New(t)
		mx := badCertDomain(w, "ex.test")
		pol := customPolicyHost(w, "ex.test", w.CA.Issue(testworld.CertValid, "*.ex.test"), stsPolicy("enforce", "mx1.ex.test"))
		w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=a1"})
		r := startRelay(t, testConfig(t, w))
		r.send("u@ex.test", "wildpol")
		checkFields(t, "delivery", r.waitAttempts("u@ex.test", "deferred", 1, stsWait)[0], map[string]any{"sts_mode": "enforce"})
		if n := mailCommands(mx); n != 0 {
			t.Errorf("bad-cert MX got MAIL under enforce")
		}
		if len(policyGETs(pol)) != 1 {
			t.Errorf("policy GETs = %d, want 1", len(policyGETs(pol)))
		}
	})
}

// Policy domain selection (RFC 8461 §3.4): a subdomain recipient never
// uses its parent's policy, and address literals have no policy.
// STS-3.4-b, STS-3.4-c.
func TestE2EMTASTSPolicyDomain(t *testing.T) {
	t.Parallel()
	t.Run("subdomain-not-parent", func(t *testing.T) {
		t.Parallel()
		w := testworld.New(t)
		mx := badCertDomain(w, "mail.ex.test")
		pol := stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "mx1.mail.ex.test"))
		r := startRelay(t, testConfig(t, w))
		r.send("u@mail.ex.test", "sub")
		l := r.waitResult("u@mail.ex.test", "delivered", stsWait)
		checkFields(t, "delivery", l, map[string]any{"sts_mode": "", "attempt": float64(1)})
		mx.WaitMessages(t, 1, stsWait)
		if n := w.DNS.CountQueries("_mta-sts.ex.test", dnsTypeTXT); n != 0 {
			t.Errorf("parent's _mta-sts.ex.test queried %d times", n)
		}
		if n := pol.Count(); n != 0 {
			t.Errorf("parent's policy host got %d requests", n)
		}
		if n := w.DNS.CountQueries("_mta-sts.mail.ex.test", dnsTypeTXT); n == 0 {
			t.Errorf("_mta-sts.mail.ex.test was not looked up")
		}
	})
	t.Run("address-literal", func(t *testing.T) {
		t.Parallel()
		w := testworld.New(t)
		mx := w.NewMX(testworld.MXOptions{Hostname: "lit.test", Cert: w.CA.Issue(testworld.CertSelfSigned, "lit.test")})
		r := startRelay(t, testConfig(t, w))
		rcpt := "u@[" + mx.IP() + "]"
		r.send(rcpt, "literal")
		t.Logf("%v", r.waitLog("delivery", 1, stsWait, func(l map[string]any) bool { return l["rcpt"] == rcpt }))
		// (The sender's domain may be looked up for a DSN: only names
		// made from the literal count.)
		for _, q := range w.DNS.Queries() {
			if n := strings.ToLower(q.Name); strings.HasPrefix(n, "_mta-sts.") && (strings.Contains(n, mx.IP()) || strings.Contains(n, "[")) {
				t.Errorf("address literal caused a query for %s", q.Name)
			}
		}
		if n := len(r.logs("mtasts_fetch", func(l map[string]any) bool { return l["domain"] != "client.test" })); n != 0 {
			t.Errorf("address literal caused %d policy fetches", n)
		}
	})
}

// STS-3.1-j (our choice): a SERVFAIL on the TXT lookup with nothing cached
// defers (the relay cannot tell whether the domain requires TLS); once DNS
// answers, the message goes out under the policy.
func TestE2EMTASTSTXTServfail(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := simpleDomain(w, "ex.test")
	stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "mx1.ex.test"))
	w.DNS.SetServFail("_mta-sts.ex.test", dnsTypeTXT, true)
	r := startRelay(t, testConfig(t, w))
	r.send("u@ex.test", "servfail")
	l := r.waitAttempts("u@ex.test", "deferred", 1, stsWait)[0]
	if !strings.Contains(fmt.Sprint(l["reason"]), "MTA-STS") {
		t.Errorf("deferral reason %q does not name MTA-STS", l["reason"])
	}
	if mx.Connections() != 0 {
		t.Errorf("MX contacted while the policy was unknown")
	}
	w.DNS.SetServFail("_mta-sts.ex.test", dnsTypeTXT, false)
	// The failed lookup is not remembered for the TXT grace: the retry a
	// second later asks DNS again.
	l = r.waitResult("u@ex.test", "delivered", 20*time.Second)
	checkFields(t, "delivery", l, map[string]any{"sts_mode": "enforce", "sts_policy_id": "a1"})
}
