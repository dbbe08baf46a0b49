package main

import (
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/internal/dane"
	"github.com/stsrelay/stsrelay/internal/testworld"
)

// The DANE part of `stsrelay check`. The test world's DNS server is on
// loopback, so the resolver trusts its AD bit (dns.trust_ad "loopback",
// the default), and SetAD marks the names a validating resolver would
// have found secure.

const daneTLSAName = "_25._tcp.mx1.ex.test"

// daneCheckWorld is ex.test with one MX, mx1.ex.test, serving a valid
// certificate from the world's CA, a TLS-RPT record and, when withSTS,
// an enforce MTA-STS policy. secure marks the MX RRset and the MX host's
// address as DNSSEC-secure.
type daneCheckWorld struct {
	w       *testworld.World
	mx      *testworld.MXServer
	served  *testworld.Cert
	cfgPath string
}

func newDANECheckWorld(t *testing.T, served testworld.CertKind, withSTS, secure bool) *daneCheckWorld {
	t.Helper()
	w := testworld.New(t)
	cert := w.CA.Issue(served, "mx1.ex.test")
	mx := w.NewMX(testworld.MXOptions{Hostname: "mx1.ex.test", Cert: cert})
	w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
	w.DNS.SetA("mx1.ex.test", mx.IP())
	w.DNS.SetTXT("_smtp._tls.ex.test", []string{"v=TLSRPTv1; rua=mailto:tlsrpt@ex.test"})
	if withSTS {
		w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=d1"})
		w.PolicyHost("ex.test", testworld.CertValid).SetPolicy("version: STSv1\nmode: enforce\nmx: mx1.ex.test\nmax_age: 604800\n")
	}
	if secure {
		w.DNS.SetAD("ex.test", true)
		w.DNS.SetAD("mx1.ex.test", true)
	}
	return &daneCheckWorld{w: w, mx: mx, served: cert, cfgPath: writeCheckConfig(t, w)}
}

// addTLSA publishes records at _25._tcp.mx1.ex.test.
func (d *daneCheckWorld) addTLSA(rrs ...*dns.TLSA) {
	for _, r := range rrs {
		r.Hdr.Name = daneTLSAName + "."
		r.Hdr.Ttl = 300
		d.w.DNS.AddRR(r)
	}
}

func record311(c *testworld.Cert) string {
	return dane.PolicyStrings([]*dns.TLSA{dane.Record(3, 1, 1, c.Leaf)})[0]
}

// checkBoth runs the check with -json and as text; both must exit with
// wantCode.
func (d *daneCheckWorld) checkBoth(t *testing.T, wantCode int) (*checkReport, string) {
	t.Helper()
	out, code := runCheckCLI(t, d.cfgPath, "-json", "ex.test")
	if code != wantCode {
		t.Fatalf("check -json: exit %d, want %d:\n%s", code, wantCode, out)
	}
	var rep checkReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("bad JSON: %v\n%s", err, out)
	}
	if len(rep.MX) != 1 {
		t.Fatalf("want one MX: %+v", rep.MX)
	}
	text, code := runCheckCLI(t, d.cfgPath, "ex.test")
	if code != wantCode {
		t.Fatalf("check: exit %d, want %d:\n%s", code, wantCode, text)
	}
	return &rep, text
}

func hasSub(list []string, sub string) bool {
	return slices.ContainsFunc(list, func(s string) bool { return strings.Contains(s, sub) })
}

// A secure TLSA 3 1 1 for the certificate served: DANE-authenticated, no
// problem; an unusable PKIX-EE record beside it is listed as such.
func TestE2ECheckDANEMatch(t *testing.T) {
	t.Parallel()
	d := newDANECheckWorld(t, testworld.CertValid, true, true)
	d.w.DNS.SetAD(daneTLSAName, true)
	d.addTLSA(dane.Record(3, 1, 1, d.served.Leaf), dane.Record(1, 1, 1, d.served.Leaf))
	rep, text := d.checkBoth(t, 0)
	if !rep.DNSSEC.ADTrusted || !rep.DNSSEC.MXSecure {
		t.Errorf("dnssec = %+v, want AD trusted and MX secure", rep.DNSSEC)
	}
	dn := rep.MX[0].DANE
	ip := d.mx.IP()
	if dn.Status != "authenticated" || !dn.AddressesSecure || !dn.TLSASecure || dn.BaseDomain != "mx1.ex.test" || dn.TLSAName != daneTLSAName {
		t.Errorf("dane = %+v", dn)
	}
	if len(dn.Records) != 2 || dn.Records[0].Record != record311(d.served) || !dn.Records[0].Usable ||
		!slices.Equal(dn.Records[0].Matches, []string{ip}) || dn.Records[1].Usable || len(dn.Records[1].Matches) != 0 {
		t.Errorf("records = %+v", dn.Records)
	}
	if len(dn.Certificates) != 1 || !dn.Certificates[0].Authenticated || dn.Certificates[0].IP != ip {
		t.Errorf("certificates = %+v", dn.Certificates)
	}
	if !rep.OK || len(rep.Problems) != 0 {
		t.Errorf("problems: %q", rep.Problems)
	}
	for _, want := range []string{"DNSSEC / DANE", "[ok  ] MX RRset of ex.test: DNSSEC-secure", "[ok  ] MX mx1.ex.test",
		"matches the certificate at " + ip, "unusable for SMTP", "Result: sound"} {
		if !strings.Contains(text, want) {
			t.Errorf("text output lacks %q:\n%s", want, text)
		}
	}
}

// The classic DANE outage: the TLSA record is for the old key, the MX
// now serves a new certificate (valid under WebPKI, so MTA-STS senders
// do not notice). The check fails, says so, and gives the record for
// the certificate now served.
func TestE2ECheckDANERollover(t *testing.T) {
	t.Parallel()
	d := newDANECheckWorld(t, testworld.CertValid, true, true)
	old := d.w.CA.Issue(testworld.CertValid, "mx1.ex.test")
	d.w.DNS.SetAD(daneTLSAName, true)
	d.addTLSA(dane.Record(3, 1, 1, old.Leaf))
	rep, text := d.checkBoth(t, 1)
	ip := d.mx.IP()
	const warning = "TLSA for mx1.ex.test does not match the certificate now served — delivery from DANE senders fails (certificate rolled over without updating TLSA?)"
	if rep.OK || !hasSub(rep.Problems, "MX mx1.ex.test ["+ip+"]: "+warning) || len(rep.Problems) != 1 {
		t.Errorf("problems %q lack the rollover warning (alone)", rep.Problems)
	}
	dn := rep.MX[0].DANE
	if dn.Status != "mismatch" || len(dn.Records) != 1 || dn.Records[0].Record != record311(old) || len(dn.Records[0].Matches) != 0 {
		t.Errorf("dane = %+v", dn)
	}
	if len(dn.Certificates) != 1 || dn.Certificates[0].Authenticated || dn.Certificates[0].SuggestedRecord != record311(d.served) ||
		!strings.Contains(dn.Certificates[0].Error, "no TLSA record matches") {
		t.Errorf("certificates = %+v", dn.Certificates)
	}
	suggestion := daneTLSAName + ". IN TLSA " + record311(d.served)
	if !hasSub(rep.Advice, suggestion) {
		t.Errorf("advice %q lacks the record for the new certificate", rep.Advice)
	}
	for _, want := range []string{"[FAIL] MX mx1.ex.test: addresses secure; TLSA " + daneTLSAName + " secure, 1 of 1 usable",
		"matches no certificate now served", ip + ": " + warning, "record for the certificate now served: " + suggestion, "Result: 1 problem(s)"} {
		if !strings.Contains(text, want) {
			t.Errorf("text output lacks %q:\n%s", want, text)
		}
	}
}

// A TLSA lookup that fails (SERVFAIL, as a validating resolver answers for
// bogus data) while the MX RRset and the addresses are secure: DANE
// senders defer, an error.
func TestE2ECheckDANEServFail(t *testing.T) {
	t.Parallel()
	d := newDANECheckWorld(t, testworld.CertValid, true, true)
	d.w.DNS.SetServFail(daneTLSAName, dns.TypeTLSA, true)
	rep, text := d.checkBoth(t, 1)
	if !hasSub(rep.Problems, "MX mx1.ex.test: TLSA lookup at "+daneTLSAName+": DNSSEC lookup failed (bogus?) — DANE senders defer") || len(rep.Problems) != 1 {
		t.Errorf("problems = %q", rep.Problems)
	}
	if dn := rep.MX[0].DANE; dn.Status != "dnssec-failed" || dn.TLSAError == "" {
		t.Errorf("dane = %+v", dn)
	}
	if !strings.Contains(text, "[FAIL] MX mx1.ex.test: addresses secure; TLSA "+daneTLSAName+": DNSSEC lookup failed (bogus?)") {
		t.Errorf("text output:\n%s", text)
	}
}

// TLSA records in a zone that is not signed (no AD anywhere) are ignored,
// even one that matches nothing: a warning, exit 0.
func TestE2ECheckDANEInsecureIgnored(t *testing.T) {
	t.Parallel()
	d := newDANECheckWorld(t, testworld.CertValid, true, false)
	old := d.w.CA.Issue(testworld.CertValid, "mx1.ex.test")
	d.addTLSA(dane.Record(3, 1, 1, old.Leaf))
	rep, text := d.checkBoth(t, 0)
	if !rep.OK || !hasSub(rep.Advice, "MX mx1.ex.test: TLSA ignored: zone not signed (the MX RRset of ex.test is not DNSSEC-secure") {
		t.Errorf("problems %q, advice %q", rep.Problems, rep.Advice)
	}
	if !rep.DNSSEC.ADTrusted || rep.DNSSEC.MXSecure {
		t.Errorf("dnssec = %+v", rep.DNSSEC)
	}
	if dn := rep.MX[0].DANE; dn.Status != "insecure" || dn.TLSASecure || len(dn.Records) != 1 {
		t.Errorf("dane = %+v", dn)
	}
	for _, want := range []string{"[info] MX RRset of ex.test is not DNSSEC-signed: DANE does not apply",
		"[warn] MX mx1.ex.test: TLSA ignored: zone not signed", "Result: sound"} {
		if !strings.Contains(text, want) {
			t.Errorf("text output lacks %q:\n%s", want, text)
		}
	}
}

// A secure TLSA RRset with only unusable records (PKIX usages): TLS is
// required but the server is not authenticated, a note, not an error.
func TestE2ECheckDANEUnusable(t *testing.T) {
	t.Parallel()
	d := newDANECheckWorld(t, testworld.CertValid, true, true)
	d.w.DNS.SetAD(daneTLSAName, true)
	d.addTLSA(dane.Record(1, 1, 1, d.served.Leaf), dane.Record(0, 0, 1, d.served.Leaf))
	rep, text := d.checkBoth(t, 0)
	if !rep.OK || !hasSub(rep.Advice, "TLS required but unauthenticated (usages 0/1 are not used for SMTP, RFC 7672 §3.1.3)") {
		t.Errorf("problems %q, advice %q", rep.Problems, rep.Advice)
	}
	if dn := rep.MX[0].DANE; dn.Status != "tls-required" || len(dn.Records) != 2 || dn.Records[0].Usable || dn.Records[1].Usable {
		t.Errorf("dane = %+v", dn)
	}
	if !strings.Contains(text, "[warn] MX mx1.ex.test: addresses secure; TLSA "+daneTLSAName+" secure, 0 of 2 usable") {
		t.Errorf("text output:\n%s", text)
	}
}

// A self-signed certificate pinned by DANE-EE on a domain without
// MTA-STS, the common DANE deployment: the WebPKI failure is advice, not
// a problem.
func TestE2ECheckDANESelfSigned(t *testing.T) {
	t.Parallel()
	d := newDANECheckWorld(t, testworld.CertSelfSigned, false, true)
	d.w.DNS.SetAD(daneTLSAName, true)
	d.addTLSA(dane.Record(3, 1, 1, d.served.Leaf))
	rep, text := d.checkBoth(t, 0)
	if !rep.OK || rep.MX[0].DANE.Status != "authenticated" || !hasSub(rep.Advice, "but DANE-authenticated") {
		t.Errorf("problems %q, advice %q, dane %+v", rep.Problems, rep.Advice, rep.MX[0].DANE)
	}
	if !strings.Contains(text, "certificate not WebPKI-valid (certificate-not-trusted), DANE-authenticated") {
		t.Errorf("text output:\n%s", text)
	}
}

// The domains of the existing checks have no DNSSEC: one info line, and
// an MX's dane object says "insecure".
func TestE2ECheckDANEUnsignedDomain(t *testing.T) {
	t.Parallel()
	_, cfgPath := checkWorld(t, testworld.CertValid)
	out, code := runCheckCLI(t, cfgPath, "-json", "ex.test")
	if code != 0 {
		t.Fatalf("exit %d:\n%s", code, out)
	}
	var rep checkReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatal(err)
	}
	if len(rep.MX) != 1 || rep.MX[0].DANE.Status != "insecure" || len(rep.MX[0].DANE.Records) != 0 || hasSub(rep.Advice, "TLSA") {
		t.Errorf("dane = %+v, advice %q", rep.MX, rep.Advice)
	}
	text, _ := runCheckCLI(t, cfgPath, "ex.test")
	section := text[strings.Index(text, "DNSSEC / DANE"):]
	section = section[:strings.Index(section, "\n\n")]
	if section != "DNSSEC / DANE\n[info] MX RRset of ex.test is not DNSSEC-signed: DANE does not apply" {
		t.Errorf("DANE section of an unsigned domain:\n%s", section)
	}
}
