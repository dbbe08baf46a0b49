package main

// End-to-end tests of the TLS-RPT model of issue #9: delivery/policy
// classifies every session once, and the delivery log line's
// tlsrpt_result, the TLS-RPT counts (`stsrelay tlsrpt pending -json`,
// then the report) and the metric stsrelay_tls_sessions_total{result_type}
// carry that one value. Also: stable reason codes that aggregate, IDN
// policy domains as A-labels, nothing recorded for a lookup that shutdown
// cut short, and bounded state under hostile reporting inputs.

import (
	"bufio"
	"encoding/json"
	"fmt"
	"maps"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/testworld"
)

// modelPending is one entry of `stsrelay tlsrpt pending -json`: the
// counts of one period and policy domain, as report policies.
type modelPending struct {
	PeriodStart  time.Time   `json:"period_start"`
	PolicyDomain string      `json:"policy_domain"`
	Successful   int64       `json:"successful"`
	Failed       int64       `json:"failed"`
	Policies     []rptPolicy `json:"policies"`
}

// modelPendingAll runs `tlsrpt pending -json` (over the control socket,
// or from the files when the relay is stopped) and decodes it.
func modelPendingAll(t testing.TB, r *relayProc) []modelPending {
	t.Helper()
	out, code := r.cli("tlsrpt", "pending", "-json")
	if code != 0 {
		t.Fatalf("tlsrpt pending -json: exit %d: %s", code, out)
	}
	var p []modelPending
	if err := json.Unmarshal([]byte(out), &p); err != nil {
		t.Fatalf("tlsrpt pending -json: %v\n%s", err, out)
	}
	return p
}

// modelPendingOf is the entries of any of domains.
func modelPendingOf(all []modelPending, domains ...string) []modelPending {
	var out []modelPending
	for _, p := range all {
		if slices.Contains(domains, p.PolicyDomain) {
			out = append(out, p)
		}
	}
	return out
}

// modelTXTStrings cuts a TXT record into character-strings of at most 255
// octets (RFC 1035 §3.3.14), as a long record is published.
func modelTXTStrings(rec string) []string {
	var out []string
	for len(rec) > 0 {
		n := min(len(rec), 255)
		out, rec = append(out, rec[:n]), rec[n:]
	}
	return out
}

// modelMetricsAddr is a free loopback address for metrics.listen.
func modelMetricsAddr(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

var modelSessionsRe = regexp.MustCompile(`^stsrelay_tls_sessions_total\{result_type="([^"]*)"\} (\S+)$`)

// modelTLSSessions reads stsrelay_tls_sessions_total by result_type.
func modelTLSSessions(t testing.TB, addr string) map[string]float64 {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s", resp.Status)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		m := modelSessionsRe.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		v, err := strconv.ParseFloat(m[2], 64)
		if err != nil {
			t.Fatalf("metric line %q: %v", sc.Text(), err)
		}
		out[m[1]] = v
	}
	return out
}

// modelSTSDomain gives domain one MX, mx1.<domain> (STARTTLS with cert,
// or none when cert is nil), and an MTA-STS policy in mode listing the
// patterns listed (mx1.<domain> when none are given).
func modelSTSDomain(w *testworld.World, domain, mode string, cert *testworld.Cert, listed ...string) (*testworld.MXServer, *testworld.PolicyServer) {
	host := "mx1." + domain
	mx := w.NewMX(testworld.MXOptions{Hostname: host, Cert: cert})
	w.DNS.SetMX(domain, testworld.MX{Pref: 10, Host: host})
	w.DNS.SetA(host, mx.IP())
	if len(listed) == 0 {
		listed = []string{host}
	}
	pol := w.PolicyHost(domain, testworld.CertValid)
	pol.SetPolicy(strings.Join(rptPolicyLines(mode, listed...), "\n") + "\n")
	w.DNS.SetTXT("_mta-sts."+domain, []string{"v=STSv1; id=" + mode + "1"})
	return mx, pol
}

// modelPlainDomain gives domain one MX, mx1.<domain>, with opts (its
// Hostname set) and no MTA-STS policy.
func modelPlainDomain(w *testworld.World, domain string, opts testworld.MXOptions) *testworld.MXServer {
	host := "mx1." + domain
	opts.Hostname = host
	mx := w.NewMX(opts)
	w.DNS.SetMX(domain, testworld.MX{Pref: 10, Host: host})
	w.DNS.SetA(host, mx.IP())
	return mx
}

var modelDigits = regexp.MustCompile(`[0-9]`)

// modelCheckExpiredReport checks the report of a testing-mode domain whose
// MX (mx1.<domain>) has an expired certificate, after n sessions in one
// period: one sts policy, one failure-details entry counting them all,
// with a reason code that holds no time.
func modelCheckExpiredReport(t testing.TB, d *rptDoc, domain string, mx *testworld.MXServer, n int64) {
	t.Helper()
	rptCheckSTSFailure(t, d, domain, "testing", "certificate-expired", mx)
	if len(d.Policies) != 1 {
		return // reported by rptCheckSTSFailure
	}
	p := d.Policies[0]
	if p.Summary.Failure != n {
		t.Errorf("total-failure-session-count %d, want %d (all sessions in one period)\n%s", p.Summary.Failure, n, d.raw)
	}
	if len(p.FailureDetails) != 1 {
		t.Fatalf("%d failure-details entries for %d sessions failing the same way, want 1 with failed-session-count %d:\n%s",
			len(p.FailureDetails), n, n, d.raw)
	}
	fd := p.FailureDetails[0]
	if fd.Count != n {
		t.Errorf("failed-session-count %d, want %d", fd.Count, n)
	}
	if fd.ReasonCode != "certificate-expired" {
		t.Errorf("failure-reason-code %q, want the stable code certificate-expired", fd.ReasonCode)
	}
	if modelDigits.MatchString(fd.ReasonCode) {
		t.Errorf("failure-reason-code %q holds digits (a time or a port?)", fd.ReasonCode)
	}
	if fd.ReceivingHelo != "mx1."+domain {
		t.Errorf("receiving-mx-helo %q, want the greeting name mx1.%s", fd.ReceivingHelo, domain)
	}
}

// Three sessions a second apart to a testing-mode domain whose MX has an
// expired certificate give one failure-details entry with
// failed-session-count 3 and the reason code certificate-expired (no time
// in it, which would split the entry), by HTTPS and by mail.
func TestE2EModelSameFailureAggregates(t *testing.T) {
	t.Parallel()
	const iv = 8 * time.Second
	for _, transport := range []string{"https", "mailto"} {
		t.Run(transport, func(t *testing.T) {
			t.Parallel()
			const domain = "expired.test"
			const repDomain = "rep.test"
			const mailbox = "reports@" + repDomain
			w := testworld.New(t)
			mx, _ := modelSTSDomain(w, domain, "testing", w.CA.Issue(testworld.CertExpired, "mx1."+domain))
			var rcv *testworld.ReportReceiver
			var inbox *testworld.MXServer
			if transport == "https" {
				rcv = rptReceiver(w, domain)
			} else {
				inbox = w.Mailbox(repDomain)
				w.DNS.SetTXT("_smtp._tls."+domain, []string{"v=TLSRPTv1; rua=mailto:" + mailbox})
			}
			r := rptStart(t, rptConfig(t, w, iv))

			rptAlign(iv, 5*time.Second)
			const n = 3
			for i := range n {
				sent := time.Now()
				rcpt := fmt.Sprintf("u%d@%s", i, domain)
				r.mustSubmit("sender@client.test", []string{rcpt}, simpleMessage(fmt.Sprintf("expired-%s-%d", transport, i)))
				l := r.waitResult(rcpt, "delivered", rptWait)
				if l["tlsrpt_result"] != "certificate-expired" || l["sts_mode"] != "testing" || l["tls_verified"] != false {
					t.Errorf("delivery line %v: want tlsrpt_result certificate-expired, sts_mode testing, tls_verified false", l)
				}
				if i < n-1 {
					time.Sleep(time.Until(sent.Add(time.Second)))
				}
			}
			if c := mx.Connections(); c != n {
				t.Fatalf("the MX saw %d connections for %d messages: want one session each", c, n)
			}
			lines := rptFailureLines(r, domain, "certificate-expired")

			var d *rptDoc
			if transport == "https" {
				docs := rptWaitTotal(t, r, rcv, iv, (*rptDoc).failures, n, rptWait+iv)
				if len(docs) != 1 {
					t.Fatalf("%d reports for %d sessions within one period, want 1", len(docs), n)
				}
				d = docs[0]
				rptSentOK(t, r, domain, rcv.URLWithPort(), d.ReportID)
			} else {
				got := inbox.WaitMessages(t, 1, rptWait+iv)
				if !slices.Equal(got[0].Rcpts, []string{mailbox}) {
					t.Errorf("report mail to %q, want [%s]", got[0].Rcpts, mailbox)
				}
				m := rptParseMail(t, got[0].Data)
				if v := m.hdr.Get("TLS-Report-Domain"); v != domain {
					t.Errorf("TLS-Report-Domain %q, want %q", v, domain)
				}
				d = rptParse(t, m.gz, iv)
				sent := r.waitLog("tlsrpt_sent", 1, rptWait, func(l map[string]any) bool { return l["report_id"] == d.ReportID })
				if sent[0]["result"] != "ok" || sent[0]["rua"] != "mailto:"+mailbox {
					t.Errorf("tlsrpt_sent line %v", sent[0])
				}
			}
			modelCheckExpiredReport(t, d, domain, mx, n)
			rptTie(t, transport, []*rptDoc{d}, (*rptDoc).failures, lines)
			if inbox != nil {
				time.Sleep(time.Second)
				if k := len(inbox.Messages()); k != 1 {
					t.Errorf("the report mailbox got %d messages, want 1", k)
				}
			}
		})
	}
}

// modelRow is one row of the matrix: a domain and what its one session
// must be classified as.
type modelRow struct {
	domain     string
	result     string // delivery line "result"
	tlsrpt     string // tlsrpt_result; "" is a success
	policyType string
	stsMode    string
	verified   bool
}

// The decision matrix in one relay run, one domain per row: for each, the
// delivery line's tlsrpt_result is the one result `tlsrpt pending`
// counts for the domain (a failure of that type, or a success when it is
// empty), under the expected policy-type, and stsrelay_tls_sessions_total
// grows by exactly the rows' totals per result_type.
func TestE2EModelMatrix(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	rows := []modelRow{
		{domain: "enforce-nostarttls.test", result: "deferred", tlsrpt: "starttls-not-supported", policyType: "sts", stsMode: "enforce"},
		{domain: "testing-expired.test", result: "delivered", tlsrpt: "certificate-expired", policyType: "sts", stsMode: "testing"},
		{domain: "testing-unlisted.test", result: "delivered", tlsrpt: "validation-failure", policyType: "sts", stsMode: "testing", verified: true},
		{domain: "nopolicy-selfsigned.test", result: "delivered", tlsrpt: "", policyType: "no-policy-found"},
		{domain: "nopolicy-plaintext.test", result: "delivered", tlsrpt: "starttls-not-supported", policyType: "no-policy-found"},
		{domain: "record-404.test", result: "delivered", tlsrpt: "sts-policy-fetch-error", policyType: "sts", verified: true},
	}
	modelSTSDomain(w, rows[0].domain, "enforce", nil)
	modelSTSDomain(w, rows[1].domain, "testing", w.CA.Issue(testworld.CertExpired, "mx1."+rows[1].domain))
	modelSTSDomain(w, rows[2].domain, "testing", w.CA.Issue(testworld.CertValid, "mx1."+rows[2].domain), "mx9."+rows[2].domain)
	modelPlainDomain(w, rows[3].domain, testworld.MXOptions{Cert: w.CA.Issue(testworld.CertSelfSigned, "mx1."+rows[3].domain)})
	modelPlainDomain(w, rows[4].domain, testworld.MXOptions{})
	modelPlainDomain(w, rows[5].domain, testworld.MXOptions{Cert: w.CA.Issue(testworld.CertValid, "mx1."+rows[5].domain)})
	w.PolicyHost(rows[5].domain, testworld.CertValid) // answers 404
	w.DNS.SetTXT("_mta-sts."+rows[5].domain, []string{"v=STSv1; id=gone1"})

	// A day's period: nothing is reported (and taken out of `tlsrpt
	// pending`) while the test looks.
	const iv = 24 * time.Hour
	cfg := rptConfig(t, w, iv)
	cfg.Metrics.Listen = modelMetricsAddr(t)
	r := rptStart(t, cfg)
	rptAlign(iv, 2*time.Minute)
	before := modelTLSSessions(t, cfg.Metrics.Listen)

	for _, row := range rows {
		r.mustSubmit("sender@client.test", []string{"u@" + row.domain}, simpleMessage("matrix-"+row.domain))
	}
	want := map[string]float64{}
	for _, row := range rows {
		l := r.waitResult("u@"+row.domain, row.result, rptWait)
		if got := r.deliveries("u@" + row.domain); len(got) != 1 {
			t.Errorf("%s: %d delivery lines, want 1: %v", row.domain, len(got), got)
		}
		if l["tlsrpt_result"] != row.tlsrpt {
			t.Errorf("%s: delivery line tlsrpt_result %q, want %q: %v", row.domain, l["tlsrpt_result"], row.tlsrpt, l)
		}
		if l["sts_mode"] != row.stsMode || l["tls_verified"] != row.verified {
			t.Errorf("%s: delivery line sts_mode %q tls_verified %v, want %q and %v: %v", row.domain, l["sts_mode"], l["tls_verified"], row.stsMode, row.verified, l)
		}
		key := row.tlsrpt
		if key == "" {
			key = "success"
		}
		want[key]++
	}

	all := modelPendingAll(t, r)
	for _, row := range rows {
		lineRT, _ := r.deliveries("u@" + row.domain)[0]["tlsrpt_result"].(string)
		ps := modelPendingOf(all, row.domain)
		if len(ps) != 1 || len(ps[0].Policies) != 1 {
			t.Errorf("%s: tlsrpt pending has %d entries, want 1 with one policy: %+v", row.domain, len(ps), ps)
			continue
		}
		p := ps[0].Policies[0]
		if p.Policy.Type != row.policyType || p.Policy.Domain != row.domain {
			t.Errorf("%s: pending policy-type %q policy-domain %q, want %q", row.domain, p.Policy.Type, p.Policy.Domain, row.policyType)
		}
		if lineRT == "" {
			if p.Summary.Success != 1 || p.Summary.Failure != 0 || len(p.FailureDetails) != 0 {
				t.Errorf("%s: the delivery line says success; pending counts %d successful, %d failed, details %+v",
					row.domain, p.Summary.Success, p.Summary.Failure, p.FailureDetails)
			}
			continue
		}
		if p.Summary.Success != 0 || p.Summary.Failure != 1 || len(p.FailureDetails) != 1 {
			t.Errorf("%s: the delivery line says %s; pending counts %d successful, %d failed, details %+v",
				row.domain, lineRT, p.Summary.Success, p.Summary.Failure, p.FailureDetails)
			continue
		}
		if fd := p.FailureDetails[0]; fd.ResultType != lineRT || fd.Count != 1 || fd.ReasonCode == "" {
			t.Errorf("%s: the delivery line says %s; pending failure-details %+v", row.domain, lineRT, fd)
		}
	}

	after := modelTLSSessions(t, cfg.Metrics.Listen)
	keys := map[string]bool{}
	for _, m := range []map[string]float64{before, after, want} {
		for k := range m {
			keys[k] = true
		}
	}
	for k := range keys {
		if d := after[k] - before[k]; d != want[k] {
			t.Errorf("stsrelay_tls_sessions_total{result_type=%q} grew by %v, the rows total %v", k, d, want[k])
		}
	}
}

// A recipient at an IDN, submitted with SMTPUTF8, is delivered using DNS
// data published under the A-label only: MX, MTA-STS (enforce) and TLSRPT
// discovery and the report's policy-domain use xn--bcher-kva.test, and the
// delivery line names both forms.
func TestE2EModelIDN(t *testing.T) {
	t.Parallel()
	const alabel, ulabel = "xn--bcher-kva.test", "bücher.test"
	const rcpt = "user@" + ulabel
	w := testworld.New(t)
	mx := rptSTSDomain(w, alabel, "enforce", testworld.CertValid)
	rcv := rptReceiver(w, alabel)
	r := rptStart(t, rptConfig(t, w, rptInterval))

	rptAlign(rptInterval, 2*time.Second)
	if _, err := r.submit("sender@client.test", []string{rcpt}, simpleMessage("idn"),
		submitOpts{mail: &smtp.MailOptions{UTF8: true}}); err != nil {
		t.Fatalf("submit to %s: %v", rcpt, err)
	}
	l := r.waitLog("delivery", 1, rptWait, func(l map[string]any) bool { return l["domain"] == alabel })[0]
	if l["result"] != "delivered" {
		t.Fatalf("delivery line %v: want delivered", l)
	}
	if l["domain_unicode"] != ulabel || l["sts_mode"] != "enforce" || l["tls_verified"] != true || l["tlsrpt_result"] != "" || l["mx"] != "mx1."+alabel {
		t.Errorf("delivery line %v: want domain_unicode %s, sts_mode enforce, tls_verified, no tlsrpt_result, mx mx1.%s", l, ulabel, alabel)
	}
	got := mx.WaitMessages(t, 1, rptWait)[0]
	if !got.MailOptions.UTF8 {
		t.Errorf("the MX was not asked for SMTPUTF8 for the non-ASCII recipient (RCPT %q)", got.Rcpts)
	}
	t.Logf("the MX got MAIL FROM %q RCPT %q SMTPUTF8=%v", got.From, got.Rcpts, got.MailOptions.UTF8)
	if len(got.Rcpts) != 1 || (got.Rcpts[0] != rcpt && got.Rcpts[0] != "user@"+alabel) {
		t.Errorf("the MX got RCPT %q, want %s (or its A-label form)", got.Rcpts, rcpt)
	}

	docs := rptWaitTotal(t, r, rcv, rptInterval, (*rptDoc).successes, 1, rptWait)
	for _, d := range docs {
		if len(d.Policies) != 1 {
			t.Fatalf("report has %d policies, want 1:\n%s", len(d.Policies), d.raw)
		}
		p := d.Policies[0]
		if p.Policy.Domain != alabel || p.Policy.Type != "sts" {
			t.Errorf("policy-domain %q policy-type %q, want the A-label %s and sts", p.Policy.Domain, p.Policy.Type, alabel)
		}
		if !slices.Equal(p.Policy.MXHost, []string{"mx1." + alabel}) {
			t.Errorf("mx-host %q, want [mx1.%s]", p.Policy.MXHost, alabel)
		}
		if p.Summary.Success != 1 || p.Summary.Failure != 0 {
			t.Errorf("report counts %d successful and %d failed sessions, want 1 and 0", p.Summary.Success, p.Summary.Failure)
		}
		rptSentOK(t, r, alabel, rcv.URLWithPort(), d.ReportID)
	}

	// Discovery asked for A-label names only.
	seen := map[string]bool{}
	for _, q := range w.DNS.Queries() {
		name := strings.ToLower(strings.TrimSuffix(q.Name, "."))
		for i := 0; i < len(name); i++ {
			if name[i] >= 0x80 {
				t.Errorf("DNS query for a non-ASCII name %q", q.Name)
				break
			}
		}
		if strings.Contains(name, "bcher.test") && !strings.Contains(name, alabel) {
			t.Errorf("DNS query for %q, not under the A-label", q.Name)
		}
		seen[dns.TypeToString[q.Type]+" "+name] = true
	}
	for _, want := range []string{"MX " + alabel, "TXT _mta-sts." + alabel, "TXT _smtp._tls." + alabel} {
		if !seen[want] {
			t.Errorf("no DNS query %q", want)
		}
	}
}

// SIGTERM while the policy host sits on the GET: the lookup is cut short
// by shutdown, which is no failure of the domain's, so nothing is counted
// for it (no sts-policy-fetch-error anywhere) and the message stays
// queued: after a restart it is delivered and counted once, as a success.
func TestE2EModelSIGTERMDuringPolicyFetch(t *testing.T) {
	t.Parallel()
	const domain = "slow.test"
	const rcpt = "u@" + domain
	const fetchTimeout = 30 * time.Second
	w := testworld.New(t)
	mx, pol := modelSTSDomain(w, domain, "enforce", w.CA.Issue(testworld.CertValid, "mx1."+domain))
	// The policy host holds its answer back far longer than the test
	// waits, and than the fetch timeout.
	pol.SetStall(2 * time.Minute)
	const iv = 24 * time.Hour
	cfg := rptConfig(t, w, iv)
	cfg.MTASTS.FetchTimeout = config.Duration{Duration: fetchTimeout}
	r := rptStart(t, cfg)
	rptAlign(iv, 2*time.Minute)

	submitted := time.Now()
	r.mustSubmit("sender@client.test", []string{rcpt}, simpleMessage("sigterm"))
	deadline := time.Now().Add(10 * time.Second)
	for pol.Count() == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the policy host got no GET within 10s; log:\n%s", tail(r.logText(), 40))
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("the policy host got the GET %v after the submission", time.Since(submitted).Round(time.Millisecond))
	time.Sleep(300 * time.Millisecond) // the delivery is waiting for the answer
	stopped := time.Now()
	r.stop()
	t.Logf("stopped %v after SIGTERM", time.Since(stopped).Round(time.Millisecond))
	if took := time.Since(stopped); took > fetchTimeout/2 {
		t.Errorf("the relay took %v to stop after SIGTERM: it waited for the policy fetch (timeout %v)", took.Round(time.Millisecond), fetchTimeout)
	}

	// Stopped: the CLI reads the flushed counts.
	if ps := modelPendingOf(modelPendingAll(t, r), domain); len(ps) != 0 {
		t.Errorf("tlsrpt pending after SIGTERM during the fetch shows %s: %+v", domain, ps)
	}
	if data, err := os.ReadFile(filepath.Join(cfg.DataDir, "tlsrpt", "counts.json")); err == nil && strings.Contains(string(data), domain) {
		t.Errorf("counts.json names %s after SIGTERM during the fetch:\n%s", domain, data)
	}
	if ls := r.logs("delivery", func(l map[string]any) bool { return l["tlsrpt_result"] == "sts-policy-fetch-error" }); len(ls) != 0 {
		t.Errorf("delivery lines with sts-policy-fetch-error after SIGTERM: %v", ls)
	}
	if ls := r.deliveries(rcpt); len(ls) != 0 {
		t.Errorf("the attempt cut short by shutdown was logged as an attempt: %v", ls)
	}
	if n := len(mx.Messages()); n != 0 {
		t.Fatalf("the MX got %d messages before the policy was known", n)
	}

	// The message was kept: delivered after a restart, counted once.
	pol.SetStall(0)
	r.start()
	l := r.waitResult(rcpt, "delivered", rptWait)
	if l["sts_mode"] != "enforce" || l["tlsrpt_result"] != "" || l["attempt"] != float64(1) {
		t.Errorf("delivery line after the restart %v: want sts_mode enforce, no tlsrpt_result, attempt 1", l)
	}
	ps := modelPendingOf(modelPendingAll(t, r), domain)
	if len(ps) != 1 || ps[0].Successful != 1 || ps[0].Failed != 0 {
		t.Errorf("tlsrpt pending after the restart: %+v, want one successful session for %s", ps, domain)
	}
}

// modelSampler watches data_dir/tlsrpt while a test runs: the largest
// counts.json seen (and whether it ever held marker), and every report
// job file name.
type modelSampler struct {
	stop chan struct{}
	done chan struct{}

	mu        sync.Mutex
	maxCounts int
	sawMarker bool
	jobNames  map[string]bool
}

func modelSample(dir, marker string) *modelSampler {
	s := &modelSampler{stop: make(chan struct{}), done: make(chan struct{}), jobNames: map[string]bool{}}
	go func() {
		defer close(s.done)
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			data, err := os.ReadFile(filepath.Join(dir, "counts.json"))
			ents, _ := os.ReadDir(filepath.Join(dir, "reports"))
			s.mu.Lock()
			if err == nil {
				s.maxCounts = max(s.maxCounts, len(data))
				s.sawMarker = s.sawMarker || strings.Contains(string(data), marker)
			}
			for _, e := range ents {
				s.jobNames[e.Name()] = true
			}
			s.mu.Unlock()
			select {
			case <-s.stop:
				return
			case <-tick.C:
			}
		}
	}()
	return s
}

func (s *modelSampler) finish() {
	close(s.stop)
	<-s.done
}

// Hostile reporting inputs in one relay run leave the other domains'
// reports intact and the relay's state bounded: a 240-octet recipient
// domain (its report arrives, its job file name is hashed), an MX whose
// greeting word is 4000 bytes (at most 255 of them recorded) and one whose
// greeting line is 1 MB (refused, not recorded, not logged), a TLSRPT
// record with 25 mailto: rua (5 report mails), next to a plain domain
// whose report must arrive as usual.
func TestE2EModelHostileInputs(t *testing.T) {
	t.Parallel()
	const iv = 4 * time.Second
	w := testworld.New(t)

	long := strings.Repeat("a", 63) + "." + strings.Repeat("b", 63) + "." + strings.Repeat("c", 63) + "." + strings.Repeat("d", 43) + ".test"
	if len(long) != 240 {
		t.Fatalf("long domain is %d octets", len(long))
	}
	simpleDomain(w, long)
	longRcv := w.ReportReceiver("rua." + long)
	// The record is longer than one character-string (255 octets) can be.
	w.DNS.SetTXT("_smtp._tls."+long, modelTXTStrings("v=TLSRPTv1; rua="+longRcv.URLWithPort()))

	// The greeting "220 <word> ESMTP" (the word goes where Reply puts an
	// enhanced code), from MX hosts without STARTTLS: each session is a
	// starttls-not-supported failure, whose details carry the HELO word.
	// The delivery client refuses reply lines over 4096 bytes
	// (internal/smtpclient), so greet.test's word is 4000 bytes, the
	// largest round size it reads, and huge.test's 1 MB greeting is only
	// checked not to reach the state or the log.
	hostileWord := func(n int) string {
		var wb strings.Builder
		wb.WriteString("mx1.hostile.test.")
		for wb.Len() < n {
			wb.WriteString("0123456789abcdefghijklmnopqrstuvwxyz-")
		}
		return wb.String()[:n]
	}
	greetMX := func(domain, word string) {
		modelPlainDomain(w, domain, testworld.MXOptions{Script: func(c testworld.Command) *testworld.Reply {
			if c.Verb == "CONNECT" {
				return &testworld.Reply{Code: 220, Enhanced: word, Text: "ESMTP"}
			}
			return nil
		}})
	}
	const greet, huge = "greet.test", "huge.test"
	word := hostileWord(4000)
	greetMX(greet, word)
	greetRcv := rptReceiver(w, greet)
	greetMX(huge, hostileWord(1<<20))
	hugeRcv := rptReceiver(w, huge)

	// 25 mailto: rua, in character-strings of at most 255 octets.
	const many, inboxDomain = "many.test", "inbox.test"
	simpleDomain(w, many)
	inbox := w.Mailbox(inboxDomain)
	var ruas []string
	for i := 1; i <= 25; i++ {
		ruas = append(ruas, fmt.Sprintf("mailto:r%02d@%s", i, inboxDomain))
	}
	w.DNS.SetTXT("_smtp._tls."+many, modelTXTStrings("v=TLSRPTv1; rua="+strings.Join(ruas, ",")))

	const normal = "normal.test"
	simpleDomain(w, normal)
	normalRcv := rptReceiver(w, normal)

	cfg := rptConfig(t, w, iv)
	r := rptStart(t, cfg)
	smp := modelSample(filepath.Join(cfg.DataDir, "tlsrpt"), greet)

	rptAlign(iv, 3*time.Second)
	rcpts := []string{"u@" + long, "u@" + greet, "u@" + huge, "u@" + many, "u0@" + normal, "u1@" + normal}
	for i, rc := range rcpts {
		if _, err := r.submit("sender@client.test", []string{rc}, simpleMessage(fmt.Sprintf("hostile-%d", i))); err != nil {
			t.Fatalf("submit to %s: %v", rc, err)
		}
	}
	for _, rc := range rcpts {
		if rc == "u@"+huge {
			continue
		}
		l := r.waitResult(rc, "delivered", rptWait)
		if rc == "u@"+greet && l["tlsrpt_result"] != "starttls-not-supported" {
			t.Errorf("delivery line %v: want tlsrpt_result starttls-not-supported", l)
		}
	}
	hl := r.waitLog("delivery", 1, rptWait, func(l map[string]any) bool { return l["rcpt"] == "u@"+huge })[0]
	if hl["result"] == "delivered" {
		t.Errorf("delivered through a 1 MB greeting line: %v", hl)
	}
	t.Logf("1 MB greeting: %s %v %v (tlsrpt_result %q)", hl["result"], hl["code"], hl["reason"], hl["tlsrpt_result"])
	// What is pending now: every HELO word bounded.
	for _, p := range modelPendingOf(modelPendingAll(t, r), greet, huge) {
		for _, pol := range p.Policies {
			for _, fd := range pol.FailureDetails {
				if len(fd.ReceivingHelo) > 255 {
					t.Errorf("pending %s: receiving-mx-helo of %d bytes", p.PolicyDomain, len(fd.ReceivingHelo))
				}
			}
		}
	}

	// The plain domain: its report, as if nothing else happened.
	normalLines := rptSuccessLines(r, normal)
	if len(normalLines) != 2 {
		t.Fatalf("%d successful delivery lines for %s, want 2", len(normalLines), normal)
	}
	docs := rptWaitTotal(t, r, normalRcv, iv, (*rptDoc).successes, 2, rptWait)
	for _, d := range docs {
		if len(d.Policies) != 1 || d.Policies[0].Policy.Type != "no-policy-found" || d.Policies[0].Policy.Domain != normal ||
			d.failures() != 0 || len(d.Policies[0].FailureDetails) != 0 {
			t.Errorf("report for %s, want one no-policy-found policy without failures:\n%s", normal, d.raw)
		}
		rptSentOK(t, r, normal, normalRcv.URLWithPort(), d.ReportID)
	}
	rptTie(t, normal, docs, (*rptDoc).successes, normalLines)

	// The 1 MB greeting word: at most 255 bytes of it in the report.
	gdocs := rptWaitTotal(t, r, greetRcv, iv, (*rptDoc).failures, 1, rptWait)
	for _, d := range gdocs {
		for _, p := range d.Policies {
			for _, fd := range p.FailureDetails {
				if len(fd.ReceivingHelo) == 0 || len(fd.ReceivingHelo) > 255 || !strings.HasPrefix(word, fd.ReceivingHelo) {
					t.Errorf("receiving-mx-helo is %d bytes (%.40q…), want a prefix of the greeting word of at most 255 bytes", len(fd.ReceivingHelo), fd.ReceivingHelo)
				}
				if fd.ResultType != "starttls-not-supported" || fd.ReceivingMX != "mx1."+greet {
					t.Errorf("failure-details %+v: want starttls-not-supported at mx1.%s", fd, greet)
				}
			}
		}
	}

	// 25 rua: reports to the first MaxRUA (5) of them only, per period.
	inbox.WaitMessages(t, 5, rptWait)
	r.waitLog("tlsrpt_rua_excess", 1, rptWait, func(l map[string]any) bool {
		return l["policy_domain"] == many && l["used"] == float64(5) && l["ignored"] == float64(20)
	})

	// The long domain: its report arrives too.
	ldocs := rptWaitTotal(t, r, longRcv, iv, (*rptDoc).successes, 1, rptWait)
	for _, d := range ldocs {
		if len(d.Policies) != 1 || d.Policies[0].Policy.Domain != long {
			t.Errorf("report for the long domain:\n%s", d.raw)
		}
		rptSentOK(t, r, long, longRcv.URLWithPort(), d.ReportID)
	}

	// A further period passes without new mail for many.test.
	time.Sleep(iv + time.Second)
	var got []string
	for _, m := range inbox.Messages() {
		got = append(got, m.Rcpts...)
	}
	sort.Strings(got)
	want := []string{"r01@" + inboxDomain, "r02@" + inboxDomain, "r03@" + inboxDomain, "r04@" + inboxDomain, "r05@" + inboxDomain}
	if !slices.Equal(got, want) {
		t.Errorf("report mails for %s went to %q (%d messages), want one to each of %q", many, got, len(inbox.Messages()), want)
	}

	for _, d := range rptReports(t, hugeRcv, iv) {
		for _, p := range d.Policies {
			for _, fd := range p.FailureDetails {
				if len(fd.ReceivingHelo) > 255 {
					t.Errorf("report for %s: receiving-mx-helo of %d bytes", huge, len(fd.ReceivingHelo))
				}
			}
		}
	}

	smp.finish()
	smp.mu.Lock()
	defer smp.mu.Unlock()
	if !smp.sawMarker {
		t.Errorf("counts.json never held the %s session while the test watched", greet)
	}
	if smp.maxCounts >= 64<<10 {
		t.Errorf("counts.json grew to %d bytes, want under 64 KB", smp.maxCounts)
	}
	for name := range smp.jobNames {
		if len(name) > 255 {
			t.Errorf("report job file name of %d bytes", len(name))
		}
		if strings.Contains(name, "aaaaaaaaaa") && !strings.Contains(name, "~") {
			t.Errorf("report job file %q for the long domain is not hashed", name)
		}
	}
	t.Logf("counts.json at most %d bytes; report job files seen: %q", smp.maxCounts, slices.Sorted(maps.Keys(smp.jobNames)))
	// No peer's kilobytes in the log either.
	for _, line := range strings.Split(r.logText(), "\n") {
		if len(line) > 16<<10 {
			t.Errorf("a log line of %d bytes: %.200s…", len(line), line)
		}
	}
	if bad := r.logs("tlsrpt_job_write", nil); len(bad) != 0 {
		t.Errorf("tlsrpt_job_write errors: %v", bad)
	}
}
