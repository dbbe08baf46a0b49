package mtasts

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/testworld"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

func TestFetchOK(t *testing.T) {
	e := newEnv(t)
	ps := e.w.PolicyHost("ex.test", testworld.CertValid)
	ps.SetResponse(200, "text/plain", basePolicy, map[string]string{"ETag": `"x"`, "Cache-Control": "max-age=3600"})
	p, body, err := e.f.Fetch(context.Background(), "EX.test.")
	if err != nil {
		t.Fatal(err)
	}
	if p.Mode != ModeEnforce || !p.Matches("mx1.ex.test") || string(body) != basePolicy {
		t.Errorf("policy %+v body %q", p, body)
	}
	reqs := ps.Requests()
	if len(reqs) != 1 {
		t.Fatalf("%d requests", len(reqs))
	}
	r := reqs[0]
	if r.Method != "GET" || r.Path != "/.well-known/mta-sts.txt" || r.RawQuery != "" {
		t.Errorf("request %s %s?%s", r.Method, r.Path, r.RawQuery)
	}
	if r.Host != "mta-sts.ex.test" || r.SNI != "mta-sts.ex.test" {
		t.Errorf("Host %q SNI %q, want mta-sts.ex.test", r.Host, r.SNI)
	}
	for _, h := range []string{"If-None-Match", "If-Modified-Since", "Cache-Control"} {
		if r.Header.Get(h) != "" {
			t.Errorf("request carries %s (RFC 8461 §3.3: no HTTP caching)", h)
		}
	}
	// A second fetch is a full GET again, with no conditional header.
	if _, _, err := e.f.Fetch(context.Background(), "ex.test"); err != nil {
		t.Fatal(err)
	}
	if r := ps.Requests()[1]; r.Header.Get("If-None-Match") != "" || r.Header.Get("If-Modified-Since") != "" {
		t.Errorf("conditional request: %v", r.Header)
	}
}

func TestFetchFailures(t *testing.T) {
	e := newEnv(t)
	tests := []struct {
		name   string
		kind   testworld.CertKind
		set    func(ps *testworld.PolicyServer)
		result tlsrpt.ResultType
		msg    string
	}{
		{"404", testworld.CertValid, func(ps *testworld.PolicyServer) { ps.SetResponse(404, "text/plain", basePolicy, nil) }, tlsrpt.ResultSTSPolicyFetchError, "404"},
		{"500", testworld.CertValid, func(ps *testworld.PolicyServer) { ps.SetResponse(500, "text/plain", basePolicy, nil) }, tlsrpt.ResultSTSPolicyFetchError, "500"},
		{"201", testworld.CertValid, func(ps *testworld.PolicyServer) { ps.SetResponse(201, "text/plain", basePolicy, nil) }, tlsrpt.ResultSTSPolicyFetchError, "201"},
		{"203", testworld.CertValid, func(ps *testworld.PolicyServer) { ps.SetResponse(203, "text/plain", basePolicy, nil) }, tlsrpt.ResultSTSPolicyFetchError, "203"},
		{"204", testworld.CertValid, func(ps *testworld.PolicyServer) { ps.SetResponse(204, "text/plain", "", nil) }, tlsrpt.ResultSTSPolicyFetchError, "204"},
		{"304", testworld.CertValid, func(ps *testworld.PolicyServer) { ps.SetResponse(304, "text/plain", "", nil) }, tlsrpt.ResultSTSPolicyFetchError, "304"},
		{"text/html", testworld.CertValid, func(ps *testworld.PolicyServer) { ps.SetResponse(200, "text/html", basePolicy, nil) }, tlsrpt.ResultSTSPolicyInvalid, "text/html"},
		{"text/plain+", testworld.CertValid, func(ps *testworld.PolicyServer) { ps.SetResponse(200, "text/plain+", basePolicy, nil) }, tlsrpt.ResultSTSPolicyInvalid, "media type"},
		{"application/octet-stream", testworld.CertValid, func(ps *testworld.PolicyServer) {
			ps.SetResponse(200, "application/octet-stream", basePolicy, nil)
		}, tlsrpt.ResultSTSPolicyInvalid, "media type"},
		{"missing content type", testworld.CertValid, func(ps *testworld.PolicyServer) { ps.SetResponse(200, "", basePolicy, nil) }, tlsrpt.ResultSTSPolicyInvalid, "media type"},
		{"invalid policy", testworld.CertValid, func(ps *testworld.PolicyServer) { ps.SetPolicy("version: STSv1\nmode: enforce\nmax_age: 1\n") }, tlsrpt.ResultSTSPolicyInvalid, "mx"},
		{"expired cert", testworld.CertExpired, func(ps *testworld.PolicyServer) { ps.SetPolicy(basePolicy) }, tlsrpt.ResultSTSWebPKIInvalid, "expired"},
		{"not yet valid cert", testworld.CertNotYetValid, func(ps *testworld.PolicyServer) { ps.SetPolicy(basePolicy) }, tlsrpt.ResultSTSWebPKIInvalid, "certificate"},
		{"self-signed cert", testworld.CertSelfSigned, func(ps *testworld.PolicyServer) { ps.SetPolicy(basePolicy) }, tlsrpt.ResultSTSWebPKIInvalid, "certificate"},
		{"unknown CA", testworld.CertUnknownCA, func(ps *testworld.PolicyServer) { ps.SetPolicy(basePolicy) }, tlsrpt.ResultSTSWebPKIInvalid, "unknown authority"},
		{"wrong name", testworld.CertWrongName, func(ps *testworld.PolicyServer) { ps.SetPolicy(basePolicy) }, tlsrpt.ResultSTSWebPKIInvalid, "mta-sts.wrongname.test"},
		{"CN only", testworld.CertCNOnly, func(ps *testworld.PolicyServer) { ps.SetPolicy(basePolicy) }, tlsrpt.ResultSTSWebPKIInvalid, "certificate"},
		{"IP only", testworld.CertIPOnly, func(ps *testworld.PolicyServer) { ps.SetPolicy(basePolicy) }, tlsrpt.ResultSTSWebPKIInvalid, "certificate"},
		{"70 KB body", testworld.CertValid, func(ps *testworld.PolicyServer) {
			ps.SetPolicy(basePolicy + strings.Repeat("x: "+strings.Repeat("y", 97)+"\n", 700))
		}, tlsrpt.ResultSTSPolicyFetchError, "larger than"},
		{"huge headers", testworld.CertValid, func(ps *testworld.PolicyServer) { ps.SetPolicy(basePolicy); ps.SetHugeHeaders(64 << 10) }, tlsrpt.ResultSTSPolicyFetchError, "header"},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			domain := strings.ReplaceAll(strings.ToLower(tc.name), " ", "")
			domain = strings.NewReplacer("/", "", "+", "plus", "-", "").Replace(domain) + ".test"
			_ = i
			ps := e.w.PolicyHost(domain, tc.kind)
			tc.set(ps)
			p, _, err := e.f.Fetch(context.Background(), domain)
			if err == nil {
				t.Fatalf("Fetch = %+v, want error", p)
			}
			var fe *Failure
			if !errors.As(err, &fe) {
				t.Fatalf("error %T %v is not a *Failure", err, err)
			}
			if fe.ResultType != tc.result || ResultType(err) != tc.result {
				t.Errorf("result type %q, want %q (%v)", fe.ResultType, tc.result, err)
			}
			if !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("error %q does not mention %q", err, tc.msg)
			}
			switch tc.result {
			case tlsrpt.ResultSTSWebPKIInvalid:
				if !errors.Is(err, ErrWebPKI) {
					t.Errorf("%v does not wrap ErrWebPKI", err)
				}
			case tlsrpt.ResultSTSPolicyFetchError:
				if !errors.Is(err, ErrPolicyFetch) {
					t.Errorf("%v does not wrap ErrPolicyFetch", err)
				}
			case tlsrpt.ResultSTSPolicyInvalid:
				if !errors.Is(err, ErrPolicySyntax) {
					t.Errorf("%v does not wrap ErrPolicySyntax", err)
				}
			}
		})
	}
}

func TestFetchContentTypeParameters(t *testing.T) {
	e := newEnv(t)
	for i, ct := range []string{"text/plain; charset=utf-8; x=y", "TeXT/PlAiN", "text/plain ; charset=UTF-8", "text/plain; charset=us-ascii", "text/plain; charset=latin1"} {
		d := "ct" + string(rune('a'+i)) + ".test"
		ps := e.w.PolicyHost(d, testworld.CertValid)
		ps.SetResponse(200, ct, basePolicy, nil)
		if _, _, err := e.f.Fetch(context.Background(), d); err != nil {
			t.Errorf("Content-Type %q: %v", ct, err)
		}
	}
}

func TestFetchWildcardCert(t *testing.T) {
	e := newEnv(t)
	h := e.w.NewHTTPS("", e.w.CA.Issue(testworld.CertValid, "*.wild.test"))
	e.w.DNS.SetA("mta-sts.wild.test", h.IP())
	h.Handle("", http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		rw.Header().Set("Content-Type", "text/plain")
		rw.Write([]byte(basePolicy))
	}))
	if _, _, err := e.f.Fetch(context.Background(), "wild.test"); err != nil {
		t.Fatalf("a *.wild.test SAN must be valid for mta-sts.wild.test: %v", err)
	}
}

func TestFetchRedirectNotFollowed(t *testing.T) {
	e := newEnv(t)
	target := e.w.PolicyHost("other.test", testworld.CertValid)
	target.SetPolicy(basePolicy)
	ps := e.w.PolicyHost("ex.test", testworld.CertValid)
	ps.SetRedirect(target.URL())
	_, _, err := e.f.Fetch(context.Background(), "ex.test")
	if ResultType(err) != tlsrpt.ResultSTSPolicyFetchError || !strings.Contains(err.Error(), "301") {
		t.Fatalf("err = %v, want a fetch error naming the 301", err)
	}
	if n := target.Count(); n != 0 {
		t.Errorf("redirect target got %d requests, want 0", n)
	}
}

func TestFetchBoundedInTime(t *testing.T) {
	e := newEnv(t)
	e.f.Timeout = 1500 * time.Millisecond
	tests := []struct {
		name string
		set  func(*testworld.PolicyServer)
		max  time.Duration
	}{
		{"slow drip", func(ps *testworld.PolicyServer) { ps.SetSlowDrip(100 * time.Millisecond) }, 3 * time.Second},
		{"stall", func(ps *testworld.PolicyServer) { ps.SetPolicy(basePolicy); ps.SetStall(time.Minute) }, 3 * time.Second},
		{"endless body", func(ps *testworld.PolicyServer) { ps.SetEndless() }, time.Second},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			d := "slow" + string(rune('a'+i)) + ".test"
			ps := e.w.PolicyHost(d, testworld.CertValid)
			tc.set(ps)
			start := time.Now()
			_, _, err := e.f.Fetch(context.Background(), d)
			took := time.Since(start)
			if ResultType(err) != tlsrpt.ResultSTSPolicyFetchError {
				t.Errorf("err = %v, want %s", err, tlsrpt.ResultSTSPolicyFetchError)
			}
			if took > tc.max {
				t.Errorf("took %v, want under %v", took, tc.max)
			}
			t.Logf("%s: %v after %v", tc.name, err, took.Round(time.Millisecond))
		})
	}
}

func TestFetchNoPolicyHost(t *testing.T) {
	e := newEnv(t)
	_, _, err := e.f.Fetch(context.Background(), "nohost.test") // mta-sts.nohost.test: NXDOMAIN
	if ResultType(err) != tlsrpt.ResultSTSPolicyFetchError {
		t.Fatalf("err = %v", err)
	}
	_, _, err = e.f.Fetch(context.Background(), "[192.0.2.1]")
	if ResultType(err) != tlsrpt.ResultSTSPolicyFetchError {
		t.Fatalf("err = %v", err)
	}
}

func TestResultType(t *testing.T) {
	for err, want := range map[error]tlsrpt.ResultType{
		nil:                            "",
		errors.New("x"):                "",
		ErrWebPKI:                      tlsrpt.ResultSTSWebPKIInvalid,
		ErrPolicySyntax:                tlsrpt.ResultSTSPolicyInvalid,
		&SyntaxError{Line: 1, Msg: ""}: tlsrpt.ResultSTSPolicyInvalid,
		ErrPolicyFetch:                 tlsrpt.ResultSTSPolicyFetchError,
		ErrDNS:                         tlsrpt.ResultSTSPolicyFetchError,
		&Failure{ResultType: tlsrpt.ResultSTSWebPKIInvalid, Err: ErrPolicyFetch}: tlsrpt.ResultSTSWebPKIInvalid,
	} {
		if got := ResultType(err); got != want {
			t.Errorf("ResultType(%v) = %q, want %q", err, got, want)
		}
	}
}
