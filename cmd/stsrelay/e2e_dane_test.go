package main

// End-to-end tests of DANE (RFC 7672) on the real binary, with a real
// validating resolver: unbound (internal/testworld/dnssec) validates a
// DNSSEC tree signed in the test, from a trust anchor for its root down,
// and the relay's dns.servers is unbound alone. The AD bits the relay acts
// on are earned, not set by hand. The MX hosts, the CA and the report
// receivers are the test world's; their names live in the signed tree.

import (
	"fmt"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/internal/dane"
	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/internal/testworld"
	"github.com/stsrelay/stsrelay/internal/testworld/dnssec"
)

// The signed tree's server and unbound get loopback addresses of their
// own, apart from the test world's random /24 and the dnssec package's
// own tests (127.0.53.x).
const (
	daneTreeIP    = "127.0.55.1"
	daneUnboundIP = "127.0.55.2"
)

// daneTree is the signed tree in front of a test world:
//
//	good.test.   signed; mx.good.test has a self-signed certificate and a
//	             TLSA 3 1 1 record that matches it
//	bad.test.    signed; mx.bad.test has a certificate valid under the Web
//	             PKI and a TLSA 3 1 1 record for another one
//	bogus.test.  signed; the signatures over mx.bogus.test's TLSA RRset
//	             are broken, so unbound answers SERVFAIL
//	plain.test.  unsigned (provably insecure); mx.plain.test has a
//	             self-signed certificate, a TLSA 3 1 1 record that matches
//	             it, and an enforce MTA-STS policy names it
//
// Each MX host's TLSA base domain publishes a TLSRPT record whose rua is
// a report receiver of the world.
type daneTree struct {
	w   *testworld.World
	srv *dnssec.Server
	u   *dnssec.Unbound
	mx  map[string]*testworld.MXServer       // by domain
	rcv map[string]*testworld.ReportReceiver // by domain
	rec map[string]*dns.TLSA                 // the TLSA record of each domain's MX
}

func newDANETree(t *testing.T) *daneTree {
	t.Helper()
	w := testworld.New(t)
	srv := dnssec.NewServer(t, daneTreeIP)
	srv.AddZone("test.", true)
	for _, d := range []string{"good.test.", "bad.test.", "bogus.test."} {
		srv.AddZone(d, true)
	}
	srv.AddZone("plain.test.", false)
	tr := &daneTree{w: w, srv: srv, mx: map[string]*testworld.MXServer{},
		rcv: map[string]*testworld.ReportReceiver{}, rec: map[string]*dns.TLSA{}}
	for _, c := range []struct {
		domain  string
		kind    testworld.CertKind
		matches bool
	}{
		{"good.test", testworld.CertSelfSigned, true},
		{"bad.test", testworld.CertValid, false},
		{"bogus.test", testworld.CertValid, true},
		{"plain.test", testworld.CertSelfSigned, true},
	} {
		host := "mx." + c.domain
		cert := w.CA.Issue(c.kind, host)
		mx := w.NewMX(testworld.MXOptions{Hostname: host, Cert: cert})
		rec := dane.Record(3, 1, 1, cert.Leaf)
		if !c.matches {
			rec = dane.Record(3, 1, 1, w.CA.Issue(testworld.CertValid, host).Leaf)
		}
		rec.Hdr = dns.RR_Header{Name: "_25._tcp." + host + ".", Rrtype: dns.TypeTLSA, Class: dns.ClassINET, Ttl: 300}
		srv.AddRR(rec)
		srv.Add(fmt.Sprintf("%s. 300 IN MX 10 %s.", c.domain, host))
		srv.Add(fmt.Sprintf("%s. 300 IN A %s", host, mx.IP()))
		rcv := w.ReportReceiver("rua." + c.domain)
		srv.Add(fmt.Sprintf("rua.%s. 300 IN A %s", c.domain, rcv.IP()))
		// RFC 8460 §3: for DANE the policy domain is the TLSA base
		// domain, the MX host here.
		srv.Add(fmt.Sprintf("_smtp._tls.%s. 300 IN TXT \"v=TLSRPTv1; rua=%s\"", host, rcv.URLWithPort()))
		tr.mx[c.domain], tr.rcv[c.domain], tr.rec[c.domain] = mx, rcv, rec
	}
	srv.Break("_25._tcp.mx.bogus.test.", dns.TypeTLSA)
	pol := w.PolicyHost("plain.test", testworld.CertValid)
	pol.SetPolicy(stsPolicy("enforce", "mx.plain.test"))
	srv.Add("mta-sts.plain.test. 300 IN A " + pol.IP())
	srv.Add(`_mta-sts.plain.test. 300 IN TXT "v=STSv1; id=p1"`)
	tr.u = dnssec.StartUnboundAt(t, srv, daneUnboundIP)
	return tr
}

// relay starts a relay whose only resolver is unbound, reporting TLS-RPT
// every rptInterval, with a metrics endpoint.
func (tr *daneTree) relay(t *testing.T, trustAD string) (*relayProc, string) {
	t.Helper()
	cfg := rptConfig(t, tr.w, rptInterval)
	cfg.DNS.Servers = []string{tr.u.Addr()}
	cfg.DNS.TrustAD = trustAD
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Metrics.Listen = ln.Addr().String()
	ln.Close()
	return rptStart(t, cfg), cfg.Metrics.Listen
}

// RFC 7672 against a validating resolver: a matching DANE-EE record
// authenticates a self-signed certificate; a mismatch, and a bogus TLSA
// RRset, keep the message queued; a zone that is not signed gets no DANE,
// so a matching record there does not rescue a certificate an enforce
// MTA-STS policy refuses (checklist STS-4.2-b). Each TLSA base domain
// gets a TLS-RPT report of policy-type tlsa with its records as
// policy-string (RFC 8460 §4.4).
func TestE2EDANEValidatingResolver(t *testing.T) {
	t.Parallel()
	tr := newDANETree(t)
	r, metricsAddr := tr.relay(t, dnsclient.TrustADLoopback)
	if l := r.waitLog("dane", 1, rptWait, nil)[0]; l["enabled"] != true {
		t.Fatalf("DANE is off with unbound on loopback: %v", l)
	}

	rptAlign(rptInterval, 2*time.Second)
	for _, d := range []string{"good.test", "bad.test", "bogus.test", "plain.test"} {
		r.mustSubmit("sender@client.test", []string{"u@" + d}, simpleMessage("dane-"+strings.TrimSuffix(d, ".test")))
	}

	good := r.waitResult("u@good.test", "delivered", rptWait)
	if good["dane"] != "authenticated" || good["tls_verified"] != false || good["tlsrpt_result"] != "" || good["mx"] != "mx.good.test" {
		t.Errorf("good.test delivery line %v: want dane authenticated (a self-signed certificate, tls_verified false)", good)
	}
	if !slices.ContainsFunc(r.logs("delivery", nil), func(l map[string]any) bool { return l["rcpt"] == "u@good.test" }) ||
		!strings.Contains(r.logText(), `"dane":"authenticated"`) {
		t.Errorf("no raw delivery line with \"dane\":\"authenticated\"")
	}
	if msgs := tr.mx["good.test"].Messages(); len(msgs) != 1 || msgs[0].SNI != "mx.good.test" {
		t.Errorf("mx.good.test got %d messages (SNI %v), want 1 with SNI mx.good.test", len(msgs), tr.mx["good.test"].SNIs())
	}

	for _, c := range []struct {
		domain, rt, enhanced string
	}{
		{"bad.test", "tlsa-invalid", "4.7.5"},
		{"bogus.test", "dnssec-invalid", "4.4.3"},
	} {
		l := r.waitResult("u@"+c.domain, "deferred", rptWait)
		if l["dane"] != "failed" || l["tlsrpt_result"] != c.rt || l["enhanced_code"] != c.enhanced {
			t.Errorf("%s delivery line %v: want dane failed, tlsrpt_result %s, enhanced_code %s", c.domain, l, c.rt, c.enhanced)
		}
		if n := len(tr.mx[c.domain].Messages()); n != 0 {
			t.Errorf("mx.%s got %d messages, want none", c.domain, n)
		}
	}
	if n := tr.mx["bogus.test"].Connections(); n != 0 {
		t.Errorf("mx.bogus.test was contacted %d times although its TLSA lookup failed", n)
	}

	plain := r.waitResult("u@plain.test", "deferred", rptWait)
	if plain["dane"] != "" || plain["tlsrpt_result"] != "certificate-not-trusted" || plain["sts_mode"] != "enforce" {
		t.Errorf("plain.test delivery line %v: want no DANE (unsigned zone) and the enforce refusal", plain)
	}

	// TLS-RPT: one report per TLSA base domain that saw a session.
	hex := func(d string) []string { return dane.PolicyStrings([]*dns.TLSA{tr.rec[d]}) }
	for _, c := range []struct {
		domain         string
		success, fails int64
		rt             string
	}{
		{"good.test", 1, 0, ""},
		{"bad.test", 0, 1, "tlsa-invalid"},
		{"bogus.test", 0, 1, "dnssec-invalid"},
	} {
		host := "mx." + c.domain
		count := (*rptDoc).successes
		if c.fails > 0 {
			count = (*rptDoc).failures
		}
		docs := rptWaitTotal(t, r, tr.rcv[c.domain], rptInterval, count, max(c.success, c.fails), rptWait)
		if len(docs) != 1 || len(docs[0].Policies) != 1 {
			t.Fatalf("%s: %d reports, want one with one policy", host, len(docs))
		}
		p := docs[0].Policies[0]
		if p.Policy.Type != "tlsa" || p.Policy.Domain != host || p.Summary.Success != c.success || p.Summary.Failure != c.fails {
			t.Errorf("%s: report policy %+v summary %+v, want tlsa for %s with %d/%d sessions\n%s",
				host, p.Policy, p.Summary, host, c.success, c.fails, docs[0].raw)
		}
		wantStrings := hex(c.domain)
		if c.domain == "bogus.test" {
			wantStrings = nil // no records could be had
		}
		if !slices.Equal(p.Policy.String, wantStrings) || (wantStrings != nil && !strings.HasPrefix(p.Policy.String[0], "3 1 1 ")) {
			t.Errorf("%s: policy-string %q, want %q", host, p.Policy.String, wantStrings)
		}
		for _, fd := range p.FailureDetails {
			if fd.ResultType != c.rt || fd.ReceivingMX != host {
				t.Errorf("%s: failure-details %+v, want %s at %s", host, fd, c.rt, host)
			}
		}
		rptSentOK(t, r, host, tr.rcv[c.domain].URLWithPort(), docs[0].ReportID)
	}
	// The recipient domains themselves publish no TLSRPT record; the
	// plain.test session was MTA-STS's, reported to nobody.
	if n := len(tr.rcv["plain.test"].Reports()); n != 0 {
		t.Errorf("mx.plain.test got %d tlsa reports, want none: its zone is not signed", n)
	}

	body := httpGet(t, "http://"+metricsAddr+"/metrics")
	for _, rt := range []string{"success", "tlsa-invalid", "dnssec-invalid"} {
		if !strings.Contains(body, `stsrelay_tls_sessions_total{result_type="`+rt+`"}`) {
			t.Errorf("metric stsrelay_tls_sessions_total{result_type=%q} missing:\n%s", rt, grepLines(body, "tls_sessions"))
		}
	}
}

// dns.trust_ad = "never": the AD bits unbound earned are not believed,
// DANE is off, and the certificate bad.test's TLSA record does not match
// is judged as without DANE: valid, delivered.
func TestE2EDANEUntrustedResolver(t *testing.T) {
	t.Parallel()
	tr := newDANETree(t)
	r, _ := tr.relay(t, dnsclient.TrustADNever)
	if l := r.waitLog("dane", 1, rptWait, nil)[0]; l["enabled"] != false {
		t.Errorf("start-up line %v, want DANE off", l)
	}
	r.mustSubmit("sender@client.test", []string{"u@bad.test"}, simpleMessage("dane-untrusted"))
	l := r.waitResult("u@bad.test", "delivered", rptWait)
	if l["dane"] != "" || l["tls_verified"] != true {
		t.Errorf("delivery line %v: want no DANE and a verified certificate", l)
	}
}
