package main

// End-to-end tests of TLS-RPT (RFC 8460) on the real binary: the relay
// counts its own TLS sessions per policy domain and, after each period
// (seconds here, a UTC day in production), sends each domain that publishes
// an _smtp._tls record an aggregate report by HTTPS POST or by mail. Every
// count in a report is tied to the "delivery" log lines of the sessions it
// counts. Each test names the rows of /work/shared/rfc-checklist.md
// (section 2) it covers.

import (
	"bytes"
	"compress/gzip"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net"
	"net/http"
	"net/mail"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/testworld"
)

const (
	// rptInterval is the report period of most tests.
	rptInterval = 3 * time.Second
	// rptSubmitter is the relay's hostname in testConfig: the report
	// submitter (RFC 8460 §5.1 sender, §5.3 TLS-Report-Submitter).
	rptSubmitter = "relay.stsrelay.test"
	rptOrg       = "STS Relay E2E Org"
	// rptContact is in the submitter's domain, as §5.3 asks.
	rptContact = "tlsrpt-admin@" + rptSubmitter
	rptFrom    = "tlsrpt-noreply@" + rptSubmitter
	// rptSlack is how far a session's recorded time may precede its
	// delivery log line (the line is written after the message went out),
	// so a line this close after a period boundary may belong to the
	// period before.
	rptSlack = 400 * time.Millisecond
	// rptWait bounds waits for deliveries and reports.
	rptWait = 30 * time.Second
)

// rptConfig is testConfig with TLS-RPT on, reporting every interval. Each
// message gets exactly one delivery attempt (the first retry would be an
// hour later) and its own SMTP session (no connection reuse), so that each
// "delivery" log line stands for exactly one TLS-RPT session (RPT-4-j).
func rptConfig(t testing.TB, w *testworld.World, interval time.Duration) *config.Config {
	cfg := testConfig(t, w)
	cfg.TLSRPT.Enabled = true
	cfg.TLSRPT.Interval = config.Duration{Duration: interval}
	cfg.TLSRPT.OrganizationName = rptOrg
	cfg.TLSRPT.ContactInfo = "mailto:" + rptContact
	cfg.TLSRPT.From = rptFrom
	cfg.Queue.RetrySchedule = []config.Duration{{Duration: time.Hour}}
	cfg.Delivery.ConnectionReuseLimit = 1
	return cfg
}

// rptStart is startRelay that also fails the test if the relay (built
// with -race unless STSRELAY_E2E_NORACE is set) reported a data race by
// the time it stopped. In process, the race detector fails the test
// itself.
func rptStart(t testing.TB, cfg *config.Config) *relayProc {
	t.Helper()
	return rptStartMode(t, cfg, false)
}

// rptStartProcess is rptStart with the binary, for kill -9.
func rptStartProcess(t testing.TB, cfg *config.Config) *relayProc {
	t.Helper()
	return rptStartMode(t, cfg, true)
}

func rptStartMode(t testing.TB, cfg *config.Config, process bool) *relayProc {
	t.Helper()
	var r *relayProc
	// Registered before startRelay's own cleanup, so it runs after the stop.
	t.Cleanup(func() {
		if r != nil && strings.Contains(r.logText(), "WARNING: DATA RACE") {
			t.Errorf("the relay reported a data race:\n%s", tail(r.logText(), 80))
		}
	})
	r = newRelay(t, cfg, process)
	return r
}

// rptPolicyLines are the lines of an STS policy for mode and mx patterns.
func rptPolicyLines(mode string, mx ...string) []string {
	lines := []string{"version: STSv1", "mode: " + mode}
	for _, m := range mx {
		lines = append(lines, "mx: "+m)
	}
	return append(lines, "max_age: 86400")
}

// rptSTSDomain gives domain one MX, mx1.<domain>, with a STARTTLS
// certificate of kind, and an MTA-STS policy (valid policy host) in mode
// naming it.
func rptSTSDomain(w *testworld.World, domain, mode string, kind testworld.CertKind) *testworld.MXServer {
	host := "mx1." + domain
	mx := w.NewMX(testworld.MXOptions{Hostname: host, Cert: w.CA.Issue(kind, host)})
	w.DNS.SetMX(domain, testworld.MX{Pref: 10, Host: host})
	w.DNS.SetA(host, mx.IP())
	pol := w.PolicyHost(domain, testworld.CertValid)
	pol.SetPolicy(strings.Join(rptPolicyLines(mode, host), "\n") + "\n")
	w.DNS.SetTXT("_mta-sts."+domain, []string{"v=STSv1; id=" + mode + "1"})
	return mx
}

// rptReceiver starts an HTTPS report sink rua.<domain> and publishes
// domain's TLSRPT record naming it (with the port: the relay dials what
// the URI says, 443 by default).
func rptReceiver(w *testworld.World, domain string) *testworld.ReportReceiver {
	rcv := w.ReportReceiver("rua." + domain)
	w.DNS.SetTXT("_smtp._tls."+domain, []string{"v=TLSRPTv1; rua=" + rcv.URLWithPort()})
	return rcv
}

// rptAlign waits, if needed, until at least rptSlack+100ms into a period
// with `within` of it left, so that the sessions a test makes next fall in
// one period and clear of its edges (where rptTie allows either side).
func rptAlign(iv, within time.Duration) {
	lead := rptSlack + 100*time.Millisecond
	into := time.Duration(time.Now().UnixNano() % int64(iv))
	if into > iv-within {
		time.Sleep(iv - into + lead)
	} else if into < lead {
		time.Sleep(lead - into)
	}
}

// rptDoc is the RFC 8460 §4.4 report, decoded strictly: unknown keys and
// counts that are not JSON integers are errors.
type rptDoc struct {
	OrganizationName string `json:"organization-name"`
	DateRange        struct {
		Start string `json:"start-datetime"`
		End   string `json:"end-datetime"`
	} `json:"date-range"`
	ContactInfo string      `json:"contact-info"`
	ReportID    string      `json:"report-id"`
	Policies    []rptPolicy `json:"policies"`

	start, end time.Time // parsed date-range; end is the last second
	raw        []byte    // the JSON
}

type rptPolicy struct {
	Policy struct {
		Type   string   `json:"policy-type"`
		String []string `json:"policy-string"`
		Domain string   `json:"policy-domain"`
		MXHost []string `json:"mx-host"`
	} `json:"policy"`
	Summary struct {
		Success int64 `json:"total-successful-session-count"`
		Failure int64 `json:"total-failure-session-count"`
	} `json:"summary"`
	FailureDetails []rptDetail `json:"failure-details"`
}

type rptDetail struct {
	ResultType     string `json:"result-type"`
	SendingMTAIP   string `json:"sending-mta-ip"`
	ReceivingMX    string `json:"receiving-mx-hostname"`
	ReceivingHelo  string `json:"receiving-mx-helo"`
	ReceivingIP    string `json:"receiving-ip"`
	Count          int64  `json:"failed-session-count"`
	AdditionalInfo string `json:"additional-information"`
	ReasonCode     string `json:"failure-reason-code"`
}

func (d *rptDoc) successes() (n int64) {
	for _, p := range d.Policies {
		n += p.Summary.Success
	}
	return n
}

func (d *rptDoc) failures() (n int64) {
	for _, p := range d.Policies {
		n += p.Summary.Failure
	}
	return n
}

// rptParse checks and decodes a gzip report (RPT-5.2-a, RPT-4-a, RPT-4-b,
// RPT-4-d, RPT-4-i): gzip magic, every required key with its JSON type,
// date-range in RFC 3339 UTC spanning exactly one period of iv, and the
// configured organization-name and contact-info.
func rptParse(t testing.TB, gz []byte, iv time.Duration) *rptDoc {
	t.Helper()
	if len(gz) < 2 || gz[0] != 0x1f || gz[1] != 0x8b {
		t.Fatalf("report body does not start with the gzip magic 1f 8b: % x", gz[:min(len(gz), 8)])
	}
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	if err != nil {
		t.Fatalf("gzip: %v", err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		t.Fatalf("gunzip: %v", err)
	}
	// Types and presence, on the generic form.
	var m map[string]any
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	if err := dec.Decode(&m); err != nil {
		t.Fatalf("report is not a JSON object: %v\n%s", err, raw)
	}
	for _, k := range []string{"organization-name", "contact-info", "report-id"} {
		if s, ok := m[k].(string); !ok || s == "" {
			t.Errorf("report %q = %#v, want a non-empty string\n%s", k, m[k], raw)
		}
	}
	if dr, ok := m["date-range"].(map[string]any); !ok {
		t.Errorf("report date-range = %#v, want an object", m["date-range"])
	} else {
		for _, k := range []string{"start-datetime", "end-datetime"} {
			if _, ok := dr[k].(string); !ok {
				t.Errorf("date-range %q = %#v, want a string", k, dr[k])
			}
		}
	}
	pols, ok := m["policies"].([]any)
	if !ok || len(pols) == 0 {
		t.Fatalf("report policies = %#v, want a non-empty array\n%s", m["policies"], raw)
	}
	isInt := func(v any) bool {
		n, ok := v.(json.Number)
		_, err := strconv.ParseInt(string(n), 10, 64)
		return ok && err == nil
	}
	for i, p := range pols {
		pm, _ := p.(map[string]any)
		pol, _ := pm["policy"].(map[string]any)
		if _, ok := pol["policy-type"].(string); !ok {
			t.Errorf("policies[%d].policy.policy-type = %#v, want a string", i, pol["policy-type"])
		}
		if _, ok := pol["policy-domain"].(string); !ok {
			t.Errorf("policies[%d].policy.policy-domain = %#v, want a string", i, pol["policy-domain"])
		}
		if v, ok := pol["policy-string"]; ok {
			if _, ok := v.([]any); !ok {
				t.Errorf("policies[%d].policy.policy-string = %#v, want an array", i, v)
			}
		}
		if v, ok := pol["mx-host"]; ok {
			if _, ok := v.([]any); !ok {
				t.Errorf("policies[%d].policy.mx-host = %#v, want an array", i, v)
			}
		}
		sum, _ := pm["summary"].(map[string]any)
		for _, k := range []string{"total-successful-session-count", "total-failure-session-count"} {
			if !isInt(sum[k]) {
				t.Errorf("policies[%d].summary.%s = %#v, want a JSON integer", i, k, sum[k])
			}
		}
		if fd, ok := pm["failure-details"]; ok {
			fds, ok := fd.([]any)
			if !ok {
				t.Errorf("policies[%d].failure-details = %#v, want an array", i, fd)
			}
			for j, d := range fds {
				dm, _ := d.(map[string]any)
				if !isInt(dm["failed-session-count"]) {
					t.Errorf("policies[%d].failure-details[%d].failed-session-count = %#v, want an integer", i, j, dm["failed-session-count"])
				}
			}
		}
	}

	d := &rptDoc{raw: raw}
	sdec := json.NewDecoder(bytes.NewReader(raw))
	sdec.DisallowUnknownFields()
	if err := sdec.Decode(d); err != nil {
		t.Fatalf("report does not decode strictly: %v\n%s", err, raw)
	}
	if d.OrganizationName != rptOrg {
		t.Errorf("organization-name = %q, want %q", d.OrganizationName, rptOrg)
	}
	if d.ContactInfo != rptContact {
		t.Errorf("contact-info = %q, want the addr-spec %q", d.ContactInfo, rptContact)
	}
	for _, s := range []struct {
		name, v string
		dst     *time.Time
	}{{"start", d.DateRange.Start, &d.start}, {"end", d.DateRange.End, &d.end}} {
		ts, err := time.Parse(time.RFC3339, s.v)
		if err != nil || !strings.HasSuffix(s.v, "Z") {
			t.Fatalf("date-range %s-datetime %q is not RFC 3339 UTC (err %v)", s.name, s.v, err)
		}
		*s.dst = ts
	}
	if d.start.UnixNano()%int64(iv) != 0 {
		t.Errorf("date-range start %s is not at a period boundary of %v", d.DateRange.Start, iv)
	}
	if want := d.start.Add(iv - time.Second); !d.end.Equal(want) {
		t.Errorf("date-range end %s, want the period's last second %s", d.DateRange.End, want.Format(time.RFC3339))
	}
	return d
}

// rptFromPOST checks one POST of the HTTPS transport (RPT-5.4-a) and
// decodes its report.
func rptFromPOST(t testing.TB, q testworld.Request, iv time.Duration) *rptDoc {
	t.Helper()
	if q.Method != http.MethodPost {
		t.Errorf("report request method %s, want POST", q.Method)
	}
	if mt, _, err := mime.ParseMediaType(q.Header.Get("Content-Type")); err != nil || mt != "application/tlsrpt+gzip" {
		t.Errorf("report Content-Type %q, want application/tlsrpt+gzip", q.Header.Get("Content-Type"))
	}
	return rptParse(t, q.Body, iv)
}

// rptReports decodes every report rcv received.
func rptReports(t testing.TB, rcv *testworld.ReportReceiver, iv time.Duration) []*rptDoc {
	t.Helper()
	var out []*rptDoc
	for _, q := range rcv.Reports() {
		out = append(out, rptFromPOST(t, q, iv))
	}
	return out
}

// rptWaitTotal waits until the reports rcv received add up to want by
// count, and returns them.
func rptWaitTotal(t testing.TB, r *relayProc, rcv *testworld.ReportReceiver, iv time.Duration, count func(*rptDoc) int64, want int64, timeout time.Duration) []*rptDoc {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		docs := rptReports(t, rcv, iv)
		var got int64
		for _, d := range docs {
			got += count(d)
		}
		if got >= want {
			return docs
		}
		if time.Now().After(deadline) {
			t.Fatalf("after %v the %d report(s) to %s count %d sessions, want %d; log:\n%s",
				timeout, len(docs), rcv.URLWithPort(), got, want, tail(r.logText(), 60))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// rptLogTime is the ts of a log line.
func rptLogTime(t testing.TB, l map[string]any) time.Time {
	t.Helper()
	s, _ := l["ts"].(string)
	ts, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		t.Fatalf("log ts %q: %v", s, err)
	}
	return ts
}

// rptTie checks that docs (the reports for one policy domain) are one per
// period, and that each one's count equals the number of log lines (one per
// session) in its date-range; a line within rptSlack after a period
// boundary may count in either period. In all, the counts equal the lines.
func rptTie(t testing.TB, what string, docs []*rptDoc, count func(*rptDoc) int64, lines []map[string]any) {
	t.Helper()
	seen := map[string]bool{}
	var total int64
	for _, d := range docs {
		if seen[d.DateRange.Start] {
			t.Errorf("%s: two reports for the period starting %s", what, d.DateRange.Start)
		}
		seen[d.DateRange.Start] = true
		end := d.end.Add(time.Second)
		var surely, maybe int64
		for _, l := range lines {
			ts := rptLogTime(t, l)
			if !ts.Before(d.start.Add(rptSlack)) && ts.Before(end) {
				surely++
			}
			if !ts.Before(d.start) && ts.Before(end.Add(rptSlack)) {
				maybe++
			}
		}
		n := count(d)
		if n < surely || n > maybe {
			t.Errorf("%s: report for %s–%s counts %d sessions; the delivery log shows %d (%d counting lines near the period's edges)",
				what, d.DateRange.Start, d.DateRange.End, n, surely, maybe)
		}
		if n == 0 {
			t.Errorf("%s: report for %s counts no session at all", what, d.DateRange.Start)
		}
		total += n
	}
	if total != int64(len(lines)) {
		t.Errorf("%s: the reports count %d sessions in all, the delivery log shows %d", what, total, len(lines))
	}
}

// rptSentOK waits for the "tlsrpt_sent" line of report id with result ok
// and checks its fields.
func rptSentOK(t testing.TB, r *relayProc, domain, rua, id string) {
	t.Helper()
	l := r.waitLog("tlsrpt_sent", 1, rptWait, func(l map[string]any) bool {
		return l["report_id"] == id && l["result"] == "ok"
	})[0]
	if l["policy_domain"] != domain || l["rua"] != rua {
		t.Errorf("tlsrpt_sent line %v: want policy_domain %q rua %q", l, domain, rua)
	}
}

// rptFailureLines are the delivery lines of domain with tlsrpt_result rt.
func rptFailureLines(r *relayProc, domain, rt string) []map[string]any {
	return r.logs("delivery", func(l map[string]any) bool { return l["domain"] == domain && l["tlsrpt_result"] == rt })
}

// rptSuccessLines are the delivery lines of domain that went over TLS
// without a TLS-RPT failure.
func rptSuccessLines(r *relayProc, domain string) []map[string]any {
	return r.logs("delivery", func(l map[string]any) bool {
		rt, _ := l["tlsrpt_result"].(string)
		tv, _ := l["tls"].(string)
		return l["domain"] == domain && l["result"] == "delivered" && rt == "" && tv != ""
	})
}

// rptCheckSTSFailure checks an sts policy entry of a report about
// sessions that all failed with rt on mx.
func rptCheckSTSFailure(t testing.TB, d *rptDoc, domain, mode, rt string, mx *testworld.MXServer) {
	t.Helper()
	if len(d.Policies) != 1 {
		t.Fatalf("report has %d policies, want 1:\n%s", len(d.Policies), d.raw)
	}
	p := d.Policies[0]
	host := "mx1." + domain
	if p.Policy.Type != "sts" || p.Policy.Domain != domain {
		t.Errorf("policy-type %q policy-domain %q, want sts and %s", p.Policy.Type, p.Policy.Domain, domain)
	}
	if want := rptPolicyLines(mode, host); !slices.Equal(p.Policy.String, want) {
		t.Errorf("policy-string %q, want the policy lines %q", p.Policy.String, want)
	}
	if !slices.Equal(p.Policy.MXHost, []string{host}) {
		t.Errorf("mx-host %q, want [%s]", p.Policy.MXHost, host)
	}
	if p.Summary.Success != 0 {
		t.Errorf("total-successful-session-count %d, want 0", p.Summary.Success)
	}
	var sum int64
	for _, fd := range p.FailureDetails {
		sum += fd.Count
		if fd.ResultType != rt {
			t.Errorf("failure-details result-type %q, want %q", fd.ResultType, rt)
		}
		if fd.ReceivingMX != host {
			t.Errorf("receiving-mx-hostname %q, want %q", fd.ReceivingMX, host)
		}
		if fd.ReceivingIP != mx.IP() {
			t.Errorf("receiving-ip %q, want the MX's %s", fd.ReceivingIP, mx.IP())
		}
		if net.ParseIP(fd.SendingMTAIP) == nil {
			t.Errorf("sending-mta-ip %q, want the relay's address", fd.SendingMTAIP)
		}
		if strings.TrimSpace(fd.ReasonCode) == "" {
			t.Errorf("failure-reason-code empty for %s (RPT-4-f)", rt)
		}
		if fd.Count <= 0 {
			t.Errorf("failed-session-count %d", fd.Count)
		}
	}
	if len(p.FailureDetails) == 0 || sum != p.Summary.Failure {
		t.Errorf("%d failure-details adding up to %d sessions, total-failure-session-count %d:\n%s",
			len(p.FailureDetails), sum, p.Summary.Failure, d.raw)
	}
}

// A domain with an STS policy whose only MX presents a self-signed
// certificate: in enforce nothing is delivered, in testing everything is;
// either way each session is a certificate-not-trusted failure, and the
// domain's HTTPS rua gets one report per period whose counts are the
// failed sessions of the delivery log. RPT-3-a, RPT-4-a..f, RPT-4-i,
// RPT-5.2-a, RPT-5.4-a.
func TestE2ETLSRPTSTSBadCertificate(t *testing.T) {
	t.Parallel()
	for _, mode := range []string{"enforce", "testing"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			const domain = "ex.test"
			const rt = "certificate-not-trusted"
			w := testworld.New(t)
			mx := rptSTSDomain(w, domain, mode, testworld.CertSelfSigned)
			rcv := rptReceiver(w, domain)
			r := rptStart(t, rptConfig(t, w, rptInterval))

			rptAlign(rptInterval, 2*time.Second)
			const n = 3
			for i := range n {
				r.mustSubmit("sender@client.test", []string{fmt.Sprintf("u%d@%s", i, domain)}, simpleMessage(fmt.Sprintf("%s-%d", mode, i)))
			}
			want := "deferred"
			if mode == "testing" {
				want = "delivered"
			}
			for i := range n {
				l := r.waitResult(fmt.Sprintf("u%d@%s", i, domain), want, rptWait)
				if l["tlsrpt_result"] != rt || l["sts_mode"] != mode || l["ip"] != mx.IP() {
					t.Errorf("delivery line %v: want tlsrpt_result %s, sts_mode %s, ip %s", l, rt, mode, mx.IP())
				}
			}
			lines := rptFailureLines(r, domain, rt)
			if len(lines) != n {
				t.Fatalf("%d delivery lines with tlsrpt_result %s, want %d (one attempt per message)", len(lines), rt, n)
			}
			if mode == "enforce" && len(mx.Messages()) != 0 {
				t.Errorf("enforce: the MX with the self-signed certificate got %d messages", len(mx.Messages()))
			}
			if mode == "testing" && len(mx.Messages()) != n {
				t.Errorf("testing: the MX got %d messages, want %d", len(mx.Messages()), n)
			}

			docs := rptWaitTotal(t, r, rcv, rptInterval, (*rptDoc).failures, n, rptWait)
			for _, d := range docs {
				rptCheckSTSFailure(t, d, domain, mode, rt, mx)
				rptSentOK(t, r, domain, rcv.URLWithPort(), d.ReportID)
			}
			rptTie(t, mode, docs, (*rptDoc).failures, lines)
			// Nothing more happens to the domain: no further report.
			time.Sleep(rptInterval + rptInterval/3)
			if got := len(rcv.Reports()); got != len(docs) {
				t.Errorf("%d reports after the sessions' periods were reported, want %d", got, len(docs))
			}
		})
	}
}

// A domain without an MTA-STS policy but with a TLSRPT record, whose MX
// offers STARTTLS with a valid certificate: a success-only report of
// policy-type no-policy-found whose success count is the number of
// sessions. RPT-4-c, RPT-4-d, RPT-4-j.
func TestE2ETLSRPTNoPolicySuccess(t *testing.T) {
	t.Parallel()
	const domain = "ex.test"
	w := testworld.New(t)
	mx := simpleDomain(w, domain)
	rcv := rptReceiver(w, domain)
	r := rptStart(t, rptConfig(t, w, rptInterval))

	rptAlign(rptInterval, 2*time.Second)
	const n = 4
	for i := range n {
		r.mustSubmit("sender@client.test", []string{fmt.Sprintf("u%d@%s", i, domain)}, simpleMessage(fmt.Sprintf("ok-%d", i)))
	}
	for i := range n {
		l := r.waitResult(fmt.Sprintf("u%d@%s", i, domain), "delivered", rptWait)
		if l["tls_verified"] != true || l["sts_mode"] != "" {
			t.Errorf("delivery line %v: want tls_verified and no sts_mode", l)
		}
	}
	lines := rptSuccessLines(r, domain)
	if len(lines) != n {
		t.Fatalf("%d successful TLS delivery lines, want %d", len(lines), n)
	}
	if c := mx.Connections(); c != n {
		t.Errorf("MX saw %d connections for %d sessions", c, n)
	}

	docs := rptWaitTotal(t, r, rcv, rptInterval, (*rptDoc).successes, n, rptWait)
	for _, d := range docs {
		if len(d.Policies) != 1 {
			t.Fatalf("report has %d policies, want 1:\n%s", len(d.Policies), d.raw)
		}
		p := d.Policies[0]
		if p.Policy.Type != "no-policy-found" || p.Policy.Domain != domain {
			t.Errorf("policy-type %q policy-domain %q, want no-policy-found and %s", p.Policy.Type, p.Policy.Domain, domain)
		}
		if p.Summary.Failure != 0 || len(p.FailureDetails) != 0 {
			t.Errorf("failure count %d with %d failure-details, want none:\n%s", p.Summary.Failure, len(p.FailureDetails), d.raw)
		}
		rptSentOK(t, r, domain, rcv.URLWithPort(), d.ReportID)
	}
	rptTie(t, "no-policy-found", docs, (*rptDoc).successes, lines)
}

// Only a domain with exactly one valid TLSRPT record at _smtp._tls gets a
// report: none without a record, with the record at the wrong name, with
// two records, or with one not starting with v=TLSRPTv1; while a domain
// whose record sits next to an SPF record does, in the same run, across
// several periods. RPT-3-a, RPT-3-b.
func TestE2ETLSRPTNoRecordNoReport(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	good := "good.test"
	simpleDomain(w, good)
	goodRcv := w.ReportReceiver("rua." + good)
	w.DNS.SetTXT("_smtp._tls."+good, []string{"v=spf1 -all"}, []string{"v=TLSRPTv1; rua=" + goodRcv.URLWithPort()})

	// RPT-3-c, RPT-3-d: a record in two strings joined without a space,
	// with an unknown field and an ftp: rua to ignore.
	split := "split.test"
	simpleDomain(w, split)
	splitRcv := w.ReportReceiver("rua." + split)
	splitURL := splitRcv.URLWithPort()
	w.DNS.SetTXT("_smtp._tls."+split, []string{"v=TLSRPTv1; rua=ftp://rua.split.test/r," + splitURL[:12], splitURL[12:] + "; x=1"})

	bad := map[string]*testworld.ReportReceiver{}
	for _, d := range []string{"none.test", "wrongname.test", "twice.test", "noprefix.test"} {
		simpleDomain(w, d)
		rcv := w.ReportReceiver("rua." + d)
		bad[d] = rcv
		rec := "v=TLSRPTv1; rua=" + rcv.URLWithPort()
		switch d {
		case "wrongname.test":
			w.DNS.SetTXT("_smtp._tcp."+d, []string{rec})
			w.DNS.SetTXT("_tls."+d, []string{rec})
		case "twice.test":
			w.DNS.SetTXT("_smtp._tls."+d, []string{rec}, []string{rec + "; x=1"})
		case "noprefix.test":
			w.DNS.SetTXT("_smtp._tls."+d, []string{"rua=" + rcv.URLWithPort() + "; v=TLSRPTv1"})
		}
	}
	r := rptStart(t, rptConfig(t, w, 2*time.Second))

	for round := range 2 {
		for _, d := range []string{good, split, "none.test", "wrongname.test", "twice.test", "noprefix.test"} {
			rcpt := fmt.Sprintf("u%d@%s", round, d)
			r.mustSubmit("sender@client.test", []string{rcpt}, simpleMessage(fmt.Sprintf("r%d-%s", round, d)))
			r.waitResult(rcpt, "delivered", rptWait)
		}
		if round == 0 {
			// The second round goes into a later period.
			time.Sleep(2*time.Second + 200*time.Millisecond)
		}
	}
	lines := rptSuccessLines(r, good)
	docs := rptWaitTotal(t, r, goodRcv, 2*time.Second, (*rptDoc).successes, int64(len(lines)), rptWait)
	rptTie(t, good, docs, (*rptDoc).successes, lines)
	if len(docs) < 2 {
		t.Errorf("%d reports for %s over two periods with sessions, want 2", len(docs), good)
	}
	splitLines := rptSuccessLines(r, split)
	splitDocs := rptWaitTotal(t, r, splitRcv, 2*time.Second, (*rptDoc).successes, int64(len(splitLines)), rptWait)
	rptTie(t, split, splitDocs, (*rptDoc).successes, splitLines)
	// The reporter looked at each of the other domains, for each period,
	// and found no record to send to.
	for d := range bad {
		r.waitLog("tlsrpt_no_record", 2, rptWait, func(l map[string]any) bool { return l["policy_domain"] == d })
	}
	time.Sleep(time.Second)
	for d, rcv := range bad {
		if n := len(rcv.Requests()); n != 0 {
			t.Errorf("%s: its receiver got %d requests, want none", d, n)
		}
		if ls := r.logs("tlsrpt_sent", func(l map[string]any) bool { return l["policy_domain"] == d }); len(ls) != 0 {
			t.Errorf("%s: tlsrpt_sent lines %v, want none", d, ls)
		}
	}
}

// A session is one connection, not one message (RPT-4-j): with
// connection reuse on (the default), several messages share a session
// and the report counts the MX's connections, fewer than the delivery
// lines.
func TestE2ETLSRPTSessionNotMessage(t *testing.T) {
	t.Parallel()
	const domain = "ex.test"
	w := testworld.New(t)
	mx := simpleDomain(w, domain)
	rcv := rptReceiver(w, domain)
	cfg := rptConfig(t, w, rptInterval)
	cfg.Delivery.ConnectionReuseLimit = 100
	cfg.Queue.PerDomainConcurrency = 1
	r := rptStart(t, cfg)

	rptAlign(rptInterval, 2*time.Second)
	const n = 5
	for i := range n {
		rcpt := fmt.Sprintf("u%d@%s", i, domain)
		r.mustSubmit("sender@client.test", []string{rcpt}, simpleMessage(fmt.Sprintf("reuse-%d", i)))
		r.waitResult(rcpt, "delivered", rptWait)
	}
	mx.WaitMessages(t, n, rptWait)
	sessions := int64(mx.Connections())
	if sessions >= n {
		t.Fatalf("the MX saw %d connections for %d messages: no connection reuse to test with", sessions, n)
	}
	rptWaitTotal(t, r, rcv, rptInterval, (*rptDoc).successes, sessions, rptWait)
	time.Sleep(rptInterval)
	docs := rptReports(t, rcv, rptInterval)
	var got int64
	for _, d := range docs {
		got += d.successes()
	}
	if got != sessions {
		t.Errorf("reports count %d sessions; the MX saw %d connections carrying %d messages (%d delivery lines)",
			got, sessions, n, len(rptSuccessLines(r, domain)))
	}
}

// rptMailReport is a mailed report taken apart.
type rptMailReport struct {
	hdr      mail.Header
	filename string
	gz       []byte
}

// rptParseMail checks the RFC 8460 §5.3 report message and returns its
// parts (RPT-5.1-a, RPT-5.3-a, RPT-5.3-b, RPT-5.3-c).
func rptParseMail(t testing.TB, data []byte) *rptMailReport {
	t.Helper()
	msg, err := mail.ReadMessage(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("report mail: %v\n%s", err, data)
	}
	out := &rptMailReport{hdr: msg.Header}
	mt, params, err := mime.ParseMediaType(msg.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/report" || params["report-type"] != "tlsrpt" || params["boundary"] == "" {
		t.Fatalf("report mail Content-Type %q, want multipart/report; report-type=\"tlsrpt\" with a boundary", msg.Header.Get("Content-Type"))
	}
	mr := multipart.NewReader(msg.Body, params["boundary"])
	var types []string
	for {
		p, err := mr.NextRawPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("report mail MIME: %v", err)
		}
		pt, pparams, _ := mime.ParseMediaType(p.Header.Get("Content-Type"))
		types = append(types, pt)
		body, err := io.ReadAll(p)
		if err != nil {
			t.Fatal(err)
		}
		if pt != "application/tlsrpt+gzip" {
			continue
		}
		if cte := p.Header.Get("Content-Transfer-Encoding"); !strings.EqualFold(cte, "base64") {
			t.Fatalf("report attachment Content-Transfer-Encoding %q, want base64", cte)
		}
		out.gz, err = base64.StdEncoding.DecodeString(strings.Map(func(r rune) rune {
			if r == '\r' || r == '\n' {
				return -1
			}
			return r
		}, string(body)))
		if err != nil {
			t.Fatalf("report attachment base64: %v", err)
		}
		_, dparams, err := mime.ParseMediaType(p.Header.Get("Content-Disposition"))
		out.filename = dparams["filename"]
		if err != nil || out.filename == "" {
			out.filename = pparams["name"]
		}
	}
	if len(types) != 2 || types[0] != "text/plain" || types[1] != "application/tlsrpt+gzip" {
		t.Errorf("report mail parts %q, want [text/plain application/tlsrpt+gzip]", types)
	}
	if out.gz == nil {
		t.Fatalf("report mail has no application/tlsrpt+gzip part:\n%s", data)
	}
	return out
}

// A mailto: rua gets one well-formed report message (RPT-5.1-a, RPT-5.3-*),
// and the report mail is delivered even though the report domain enforces
// MTA-STS and its MX fails certificate validation — and that session is
// counted nowhere: the report domain, which publishes an https rua of its
// own, never gets a report (RPT-3-f loop prevention).
func TestE2ETLSRPTMailto(t *testing.T) {
	t.Parallel()
	const domain, repDomain = "ex.test", "rep.test"
	const mailbox = "reports@" + repDomain
	w := testworld.New(t)
	mx := simpleDomain(w, domain)
	w.DNS.SetTXT("_smtp._tls."+domain, []string{"v=TLSRPTv1; rua=mailto:" + mailbox})
	// The report domain: enforce, its only MX with a self-signed
	// certificate, and a TLSRPT record of its own.
	repMX := rptSTSDomain(w, repDomain, "enforce", testworld.CertSelfSigned)
	repRcv := rptReceiver(w, repDomain)
	r := rptStart(t, rptConfig(t, w, rptInterval))

	rptAlign(rptInterval, 2*time.Second)
	const n = 2
	for i := range n {
		rcpt := fmt.Sprintf("u%d@%s", i, domain)
		r.mustSubmit("sender@client.test", []string{rcpt}, simpleMessage(fmt.Sprintf("m%d", i)))
	}
	for i := range n {
		r.waitResult(fmt.Sprintf("u%d@%s", i, domain), "delivered", rptWait)
	}
	mx.WaitMessages(t, n, rptWait)
	lines := rptSuccessLines(r, domain)

	got := repMX.WaitMessages(t, 1, rptWait)
	deliveredAt := time.Now()
	rm := got[0]
	if !slices.Equal(rm.Rcpts, []string{mailbox}) || rm.From != rptFrom {
		t.Errorf("report mail envelope from %q to %q, want %q to [%s]", rm.From, rm.Rcpts, rptFrom, mailbox)
	}
	dl := r.waitResult(mailbox, "delivered", rptWait)
	if dl["sts_mode"] != "" {
		t.Errorf("report mail delivery line %v: the policy of %s was applied to it", dl, repDomain)
	}
	m := rptParseMail(t, rm.Data)
	h := m.hdr
	if v := h.Get("TLS-Report-Domain"); v != domain {
		t.Errorf("TLS-Report-Domain %q, want %q", v, domain)
	}
	if v := h.Get("TLS-Report-Submitter"); v != rptSubmitter {
		t.Errorf("TLS-Report-Submitter %q, want the relay's hostname %q", v, rptSubmitter)
	}
	if _, cd, _ := strings.Cut(rptContact, "@"); h.Get("TLS-Report-Submitter") != cd {
		t.Errorf("TLS-Report-Submitter %q is not the domain of contact-info %q", h.Get("TLS-Report-Submitter"), rptContact)
	}
	if v := h.Get("TLS-Required"); !strings.EqualFold(v, "No") {
		t.Errorf("TLS-Required %q, want No", v)
	}
	d := rptParse(t, m.gz, rptInterval)
	subj := regexp.MustCompile(`^Report Domain: (\S+) Submitter: (\S+) Report-ID: <(\S+)>$`).FindStringSubmatch(h.Get("Subject"))
	if subj == nil {
		t.Errorf("Subject %q, want Report Domain: … Submitter: … Report-ID: <…>", h.Get("Subject"))
	} else if subj[1] != domain || subj[2] != rptSubmitter || subj[3] != d.ReportID {
		t.Errorf("Subject %q: want domain %s, submitter %s, report-id %s", h.Get("Subject"), domain, rptSubmitter, d.ReportID)
	}
	fnRe := regexp.MustCompile(`^([^!]+)!([^!]+)!(\d+)!(\d+)(![A-Za-z0-9.]+)?\.json\.gz$`)
	if fn := fnRe.FindStringSubmatch(m.filename); fn == nil {
		t.Errorf("attachment filename %q does not match RFC 8460 §5.1", m.filename)
	} else if fn[1] != rptSubmitter || fn[2] != domain || fn[3] != strconv.FormatInt(d.start.Unix(), 10) || fn[4] != strconv.FormatInt(d.end.Unix(), 10) {
		t.Errorf("attachment filename %q: want %s!%s!%d!%d[!unique].json.gz", m.filename, rptSubmitter, domain, d.start.Unix(), d.end.Unix())
	}
	if len(d.Policies) != 1 || d.Policies[0].Policy.Type != "no-policy-found" || d.Policies[0].Policy.Domain != domain {
		t.Errorf("mailed report policies, want one no-policy-found for %s:\n%s", domain, d.raw)
	}
	rptTie(t, "mailed", []*rptDoc{d}, (*rptDoc).successes, lines)
	sent := r.waitLog("tlsrpt_sent", 1, rptWait, func(l map[string]any) bool { return l["report_id"] == d.ReportID })
	if sent[0]["result"] != "ok" || sent[0]["rua"] != "mailto:"+mailbox || sent[0]["policy_domain"] != domain {
		t.Errorf("tlsrpt_sent line %v", sent[0])
	}

	// Loop prevention: the report mail's session is not pending anywhere
	// and, periods later, the report domain has had no report.
	out, code := r.cli("tlsrpt", "pending", "-json")
	if code != 0 {
		t.Fatalf("tlsrpt pending: exit %d: %s", code, out)
	}
	if strings.Contains(out, repDomain) {
		t.Errorf("tlsrpt pending shows the report mail's session:\n%s", out)
	}
	time.Sleep(time.Until(deliveredAt.Add(2*rptInterval + rptInterval/2)))
	if n := len(repRcv.Requests()); n != 0 {
		t.Errorf("the report domain %s got %d report requests: the report mail was counted", repDomain, n)
	}
	if ls := r.logs("tlsrpt_sent", func(l map[string]any) bool { return l["policy_domain"] == repDomain }); len(ls) != 0 {
		t.Errorf("reports about %s were sent: %v", repDomain, ls)
	}
	if n := len(repMX.Messages()); n != 1 {
		t.Errorf("the report mailbox got %d messages, want exactly 1", n)
	}
}

// rptPending is one entry of `stsrelay tlsrpt pending -json`.
type rptPending struct {
	PeriodStart  time.Time `json:"period_start"`
	PolicyDomain string    `json:"policy_domain"`
	Successful   int64     `json:"successful"`
	Failed       int64     `json:"failed"`
}

// Counts survive kill -9: sessions flushed (about once a second) before
// the crash are in `tlsrpt pending` after the restart and in the report
// that follows, next to those made after it.
func TestE2ETLSRPTCountsSurviveKill9(t *testing.T) {
	t.Parallel()
	const iv = 10 * time.Second
	const okDom, badDom = "ok.test", "bad.test"
	const rt = "certificate-not-trusted"
	w := testworld.New(t)
	simpleDomain(w, okDom)
	okRcv := rptReceiver(w, okDom)
	badMX := rptSTSDomain(w, badDom, "enforce", testworld.CertSelfSigned)
	badRcv := rptReceiver(w, badDom)
	r := rptStartProcess(t, rptConfig(t, w, iv))

	rptAlign(iv, 8*time.Second)
	periodEnd := time.Now().Truncate(iv).Add(iv)
	const nOK, nBad = 3, 2
	for i := range nOK {
		r.mustSubmit("sender@client.test", []string{fmt.Sprintf("u%d@%s", i, okDom)}, simpleMessage(fmt.Sprintf("ok%d", i)))
	}
	for i := range nBad {
		r.mustSubmit("sender@client.test", []string{fmt.Sprintf("u%d@%s", i, badDom)}, simpleMessage(fmt.Sprintf("bad%d", i)))
	}
	for i := range nOK {
		r.waitResult(fmt.Sprintf("u%d@%s", i, okDom), "delivered", rptWait)
	}
	for i := range nBad {
		r.waitResult(fmt.Sprintf("u%d@%s", i, badDom), "deferred", rptWait)
	}
	time.Sleep(1600 * time.Millisecond) // the recorder flushes every second
	r.kill9()
	r.restart()

	out, code := r.cli("tlsrpt", "pending", "-json")
	if time.Now().After(periodEnd) {
		t.Fatalf("the test was too slow: the period ended before `tlsrpt pending` ran")
	}
	if code != 0 {
		t.Fatalf("tlsrpt pending -json: exit %d: %s", code, out)
	}
	var pending []rptPending
	if err := json.Unmarshal([]byte(out), &pending); err != nil {
		t.Fatalf("tlsrpt pending -json: %v\n%s", err, out)
	}
	okLines, badLines := rptSuccessLines(r, okDom), rptFailureLines(r, badDom, rt)
	if len(okLines) != nOK || len(badLines) != nBad {
		t.Fatalf("delivery log shows %d successful sessions to %s and %d failed ones to %s, want %d and %d", len(okLines), okDom, len(badLines), badDom, nOK, nBad)
	}
	var sawOK, sawBad bool
	for _, p := range pending {
		switch p.PolicyDomain {
		case okDom:
			sawOK = true
			if p.Successful != nOK || p.Failed != 0 {
				t.Errorf("pending %s: %d successful, %d failed; the log shows %d successful sessions", okDom, p.Successful, p.Failed, nOK)
			}
		case badDom:
			sawBad = true
			// The restart may already have retried the deferred messages.
			lines := rptFailureLines(r, badDom, rt)
			if p.Successful != 0 || p.Failed < nBad || p.Failed > int64(len(lines)) {
				t.Errorf("pending %s: %d successful, %d failed; the log shows %d failed sessions", badDom, p.Successful, p.Failed, len(lines))
			}
		}
	}
	if !sawOK || !sawBad {
		t.Fatalf("tlsrpt pending after kill -9 lacks %s or %s:\n%s", okDom, badDom, out)
	}
	if len(okRcv.Reports())+len(badRcv.Reports()) != 0 {
		t.Fatalf("a report arrived before the period ended")
	}

	okDocs := rptWaitTotal(t, r, okRcv, iv, (*rptDoc).successes, nOK, 2*iv+rptWait)
	// Leave time for a retry after the restart to be logged.
	badDocs := rptWaitTotal(t, r, badRcv, iv, (*rptDoc).failures, int64(len(rptFailureLines(r, badDom, rt))), 2*iv+rptWait)
	rptTie(t, okDom, okDocs, (*rptDoc).successes, rptSuccessLines(r, okDom))
	rptTie(t, badDom, badDocs, (*rptDoc).failures, rptFailureLines(r, badDom, rt))
	for _, d := range badDocs {
		rptCheckSTSFailure(t, d, badDom, "enforce", rt, badMX)
	}
}

// rptJobFile is the reporter's job file for domain (data_dir/tlsrpt/
// reports/<period start>_<domain>.json).
func rptJobFile(t testing.TB, cfg *config.Config, domain string) string {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(cfg.DataDir, "tlsrpt", "reports", "*_"+domain+".json"))
	if err != nil || len(files) != 1 {
		t.Fatalf("report job files for %s: %v (%v)", domain, files, err)
	}
	return files[0]
}

// A receiver answering 500 gets the same report again later (RPT-5.4-a,
// RPT-5.5-a). The first retry is tlsrptsend.DefaultRetryBase (5 min) after the
// failure and no configuration key shortens it, so the test checks that
// the retry is scheduled that far out, then stops the relay, moves the
// persisted job's next attempt to now and starts it again: the retry must
// carry the same report-id and the same report, and stop once accepted.
func TestE2ETLSRPTRetryAfter500(t *testing.T) {
	t.Parallel()
	const domain = "ex.test"
	w := testworld.New(t)
	simpleDomain(w, domain)
	rcv := rptReceiver(w, domain)
	rcv.SetStatus(http.StatusInternalServerError)
	cfg := rptConfig(t, w, 2*time.Second)
	r := rptStart(t, cfg)

	r.mustSubmit("sender@client.test", []string{"u@" + domain}, simpleMessage("retry"))
	r.waitResult("u@"+domain, "delivered", rptWait)
	failed := r.waitLog("tlsrpt_sent", 1, rptWait, func(l map[string]any) bool {
		return l["policy_domain"] == domain && l["result"] == "failed"
	})[0]
	failedAt := time.Now()
	id, _ := failed["report_id"].(string)
	if failed["rua"] != rcv.URLWithPort() || id == "" {
		t.Errorf("tlsrpt_sent failed line %v", failed)
	}
	first := rptReports(t, rcv, 2*time.Second)
	if len(first) != 1 || first[0].ReportID != id {
		t.Fatalf("receiver got %d reports, want 1 with report-id %s", len(first), id)
	}
	rptTie(t, "first attempt", first, (*rptDoc).successes, rptSuccessLines(r, domain))

	// The retry is scheduled, with backoff, not given up.
	time.Sleep(time.Second)
	if n := len(rcv.Reports()); n != 1 {
		t.Errorf("receiver got %d POSTs within a second of the failure, want 1", n)
	}
	r.stop()
	path := rptJobFile(t, cfg, domain)
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var job map[string]any
	if err := json.Unmarshal(data, &job); err != nil {
		t.Fatalf("job file %s: %v", path, err)
	}
	targets, _ := job["targets"].([]any)
	if len(targets) != 1 || job["done"] == true {
		t.Fatalf("job file %s: want one target, not done:\n%s", path, data)
	}
	tg := targets[0].(map[string]any)
	next, err := time.Parse(time.RFC3339Nano, fmt.Sprint(tg["next_attempt"]))
	if tg["state"] != "pending" || err != nil {
		t.Fatalf("job target %v: want state pending with a next_attempt", tg)
	}
	if gap := next.Sub(failedAt); gap < 4*time.Minute || gap > 6*time.Minute {
		t.Errorf("next attempt %v after the failure, want about tlsrptsend.DefaultRetryBase (5m)", gap)
	}
	tg["next_attempt"] = time.Now().Add(-time.Second).UTC().Format(time.RFC3339Nano)
	data, _ = json.Marshal(job)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}

	rcv.SetStatus(http.StatusOK)
	r.start()
	rptSentOK(t, r, domain, rcv.URLWithPort(), id)
	all := rptReports(t, rcv, 2*time.Second)
	if len(all) != 2 {
		t.Fatalf("receiver got %d POSTs, want 2 (the failed one and the retry)", len(all))
	}
	if all[1].ReportID != id || !bytes.Equal(all[0].raw, all[1].raw) {
		t.Errorf("the retry differs from the first attempt:\n%s\n%s", all[0].raw, all[1].raw)
	}
	time.Sleep(2 * time.Second)
	if n := len(rcv.Reports()); n != 2 {
		t.Errorf("receiver got %d POSTs after accepting the retry, want 2", n)
	}
}
