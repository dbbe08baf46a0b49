package mtasts

import (
	"context"
	"encoding/json"
	"strings"
	"testing"

	"github.com/stsrelay/stsrelay/internal/testworld"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

func TestCheckPolicyGood(t *testing.T) {
	e := newEnv(t)
	e.stsDomain("ex.test", "a1", "version: STSv1\nmode: testing\nmx: mx1.ex.test\nmax_age: 604800\n")
	rep := CheckPolicy(context.Background(), e.dns, e.f, "ex.test")
	if !rep.OK || len(rep.Problems) != 0 {
		t.Fatalf("problems %q", rep.Problems)
	}
	if !rep.TXT.Present || rep.TXT.Count != 1 || rep.TXT.ID != "a1" || !rep.TXT.IDValid || !rep.TXT.Valid {
		t.Errorf("txt %+v", rep.TXT)
	}
	f := rep.Fetch
	if f == nil || !f.OK || f.HTTPStatus != 200 || f.ContentType != "text/plain" || !f.TLSCertOK || f.CertDaysLeft == nil || *f.CertDaysLeft < 1 ||
		!strings.HasSuffix(f.URL, "/.well-known/mta-sts.txt") {
		t.Errorf("fetch %+v", f)
	}
	if rep.Policy == nil || rep.Policy.Mode != ModeTesting || rep.Policy.MaxAgeSeconds != 604800 {
		t.Errorf("policy %+v", rep.Policy)
	}
	if len(rep.Advice) == 0 || !strings.Contains(rep.Advice[0], "testing") {
		t.Errorf("advice %q", rep.Advice)
	}
	b, _ := json.Marshal(rep)
	for _, key := range []string{`"txt":`, `"http_status":200`, `"tls_cert_ok":true`, `"cert_days_left":`, `"mode":"testing"`, `"ok":true`} {
		if !strings.Contains(string(b), key) {
			t.Errorf("JSON lacks %s: %s", key, b)
		}
	}
}

func TestCheckPolicyProblems(t *testing.T) {
	e := newEnv(t)
	// Invalid policy: every syntax problem with its line.
	e.stsDomain("bad.test", "a1", "version: STSv1\nmode: Enforce\nmx: a.test, b.test\nmax_age: 86400\n")
	rep := CheckPolicy(context.Background(), e.dns, e.f, "bad.test")
	if rep.OK || len(rep.SyntaxErrors) != 2 || rep.SyntaxErrors[0].Line != 2 || rep.SyntaxErrors[1].Line != 3 {
		t.Errorf("syntax errors %+v", rep.SyntaxErrors)
	}
	if rep.Fetch.ResultType != tlsrpt.ResultSTSPolicyInvalid {
		t.Errorf("fetch %+v", rep.Fetch)
	}
	// Bad certificate: reported with the reason, the certificate still described.
	e.w.DNS.SetTXT("_mta-sts.cert.test", []string{"v=STSv1; id=a1"})
	e.w.PolicyHost("cert.test", testworld.CertExpired).SetPolicy(basePolicy)
	rep = CheckPolicy(context.Background(), e.dns, e.f, "cert.test")
	if rep.OK || rep.Fetch.TLSCertOK || !strings.Contains(rep.Fetch.TLSCertError, "expired") || rep.Fetch.CertDaysLeft == nil || *rep.Fetch.CertDaysLeft >= 0 {
		t.Errorf("fetch %+v", rep.Fetch)
	}
	// Two records.
	e.w.DNS.SetTXT("_mta-sts.two.test", []string{"v=STSv1; id=1"}, []string{"v=STSv1; id=2"})
	rep = CheckPolicy(context.Background(), e.dns, e.f, "two.test")
	if rep.OK || rep.TXT.Count != 2 || rep.TXT.Valid {
		t.Errorf("txt %+v", rep.TXT)
	}
	// Misspelt record: no MTA-STS, but flagged.
	e.w.DNS.SetTXT("_mta-sts.case.test", []string{"v=stsv1; id=1"})
	rep = CheckPolicy(context.Background(), e.dns, e.f, "case.test")
	if rep.OK || rep.TXT.Present || rep.Fetch != nil {
		t.Errorf("report %+v", rep)
	}
	// Redirect.
	e.w.DNS.SetTXT("_mta-sts.redir.test", []string{"v=STSv1; id=1"})
	e.w.PolicyHost("redir.test", testworld.CertValid).SetRedirect("https://elsewhere.test/")
	rep = CheckPolicy(context.Background(), e.dns, e.f, "redir.test")
	if rep.OK || rep.Fetch.HTTPStatus != 301 || rep.Fetch.Location != "https://elsewhere.test/" {
		t.Errorf("fetch %+v", rep.Fetch)
	}
}

func TestCheckPolicyNoMTASTS(t *testing.T) {
	e := newEnv(t)
	rep := CheckPolicy(context.Background(), e.dns, e.f, "plain.test")
	if !rep.OK || rep.TXT.Present || rep.Fetch != nil || len(rep.Advice) != 1 {
		t.Errorf("report %+v", rep)
	}
	rep = CheckPolicy(context.Background(), e.dns, e.f, "[192.0.2.1]")
	if rep.OK {
		t.Errorf("address literal: %+v", rep)
	}
}
