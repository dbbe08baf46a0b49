package tlsrptsend

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/http"
	"net/mail"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-msgauth/dkim"
	"github.com/miekg/dns"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/internal/testworld"
	"github.com/stsrelay/stsrelay/tlsrpt"
	"github.com/stsrelay/stsrelay/tlsrpt/tlsrptdb"
	"github.com/stsrelay/stsrelay/tlsrpt/tlsrpttest"
)

// memQueue is a queue that keeps the report mails.
type memQueue struct {
	mu   sync.Mutex
	msgs []queuedMail
}

type queuedMail struct {
	ID, From, To string
	Body         []byte
}

func (q *memQueue) EnqueueReport(from, to string, msg io.Reader) (string, error) {
	b, err := io.ReadAll(msg)
	if err != nil {
		return "", err
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	id := fmt.Sprintf("q%d", len(q.msgs)+1)
	q.msgs = append(q.msgs, queuedMail{ID: id, From: from, To: to, Body: b})
	return id, nil
}

func (q *memQueue) List() []queuedMail {
	q.mu.Lock()
	defer q.mu.Unlock()
	return slices.Clone(q.msgs)
}

// env is a reporter under test in a test world: real DNS server and
// client, real HTTPS receivers with certificates from the world's CA.
type env struct {
	t       *testing.T
	w       *testworld.World
	res     *dnsclient.Resolver
	clock   *clock
	dir     string
	logs    *observer.ObservedLogs
	results *resultLog
	opts    Options // template for newReporter
	rec     *tlsrptdb.Recorder
	rp      *Reporter
}

type resultLog struct {
	mu  sync.Mutex
	got []string
}

func (r *resultLog) add(s string) { r.mu.Lock(); r.got = append(r.got, s); r.mu.Unlock() }
func (r *resultLog) list() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.got)
}

func newEnv(t *testing.T) *env {
	t.Helper()
	w := testworld.New(t)
	res, err := dnsclient.New([]string{w.DNS.Addr()}, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	e := &env{t: t, w: w, res: res, clock: newClock(day1.Add(time.Hour)), dir: t.TempDir(), logs: logs, results: &resultLog{}}
	e.opts = Options{
		Resolver:         res,
		RootCAs:          w.CA.Pool(),
		Timeout:          5 * time.Second,
		AllowPrivateRUA:  true, // the world's receivers are on loopback
		HTTPSPort:        w.HTTPSPort(),
		Hostname:         "relay.example.net",
		OrganizationName: "Example Org",
		ContactInfo:      "mailto:postmaster@relay.example.net",
		From:             "tlsrpt-noreply@relay.example.net",
		Now:              e.clock.Now,
		Logger:           zap.New(core),
		OnReport:         e.results.add,
		RetryBase:        10 * time.Minute,
	}
	e.restart()
	return e
}

// restart opens a new Recorder and Reporter on the same directory, as
// after a restart of the relay.
func (e *env) restart() {
	e.t.Helper()
	var err error
	if e.rec, err = tlsrptdb.NewRecorder(e.dir, e.clock.Now, e.opts.Logger); err != nil {
		e.t.Fatal(err)
	}
	o := e.opts
	o.Recorder = e.rec
	if e.rp, err = NewReporter(o); err != nil {
		e.t.Fatal(err)
	}
}

// afterDay1 is when day1's reports are made: its end plus the grace for
// sessions still being recorded.
var afterDay1 = day1.Add(24*time.Hour + time.Minute)

// recordDay1 records 3 successes and 2 failures for ex.test on day1.
func (e *env) recordDay1(domain string) {
	for i := range 3 {
		s := at(okSession, day1.Add(time.Duration(i)*time.Hour))
		s.PolicyDomain = domain
		e.rec.Record(s)
	}
	f := at(badSession, day1.Add(5*time.Hour))
	f.PolicyDomain = domain
	e.rec.Record(f)
	f.ResultType, f.FailureReasonCode = tlsrpt.ResultSTARTTLSNotSupported, ""
	e.rec.Record(f)
}

func (e *env) sendDue() { e.rp.SendDue(context.Background()) }

func (e *env) sentLogs() []observer.LoggedEntry {
	return e.logs.FilterMessage("tlsrpt_sent").All()
}

func fieldOf(le observer.LoggedEntry, key string) string {
	for _, f := range le.Context {
		if f.Key == key {
			if f.Type == zapcore.ErrorType {
				return f.Interface.(error).Error()
			}
			return f.String
		}
	}
	return ""
}

// decodeReport checks the POST and returns the report's JSON.
func decodeReport(t *testing.T, req testworld.Request) []byte {
	t.Helper()
	if req.Method != http.MethodPost {
		t.Errorf("method %s", req.Method)
	}
	if ct := req.Header.Get("Content-Type"); ct != "application/tlsrpt+gzip" { // RPT-5.4-a
		t.Errorf("Content-Type %q", ct)
	}
	if len(req.Body) < 2 || req.Body[0] != 0x1f || req.Body[1] != 0x8b { // RPT-5.2-a
		t.Fatalf("body is not gzip: % x", req.Body[:min(2, len(req.Body))])
	}
	zr, err := gzip.NewReader(bytes.NewReader(req.Body))
	if err != nil {
		t.Fatal(err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	return raw
}

// RPT-5.4-a: after the day ends the report is POSTed once, gzip, with the
// right media type, and is a valid report; it is not sent again.
func TestSendHTTPS(t *testing.T) {
	e := newEnv(t)
	rr := e.w.ReportReceiver("rua.rep.test")
	e.w.DNS.SetTXT("_smtp._tls.ex.test", []string{"v=TLSRPTv1; rua=" + rr.URL()})
	e.recordDay1("ex.test")

	e.clock.Set(day1.Add(23*time.Hour + 59*time.Minute))
	e.sendDue()
	if n := len(rr.Reports()); n != 0 {
		t.Fatalf("%d reports before the day ended", n)
	}
	if len(e.rec.Pending()) != 1 {
		t.Fatal("counts gone before the day ended")
	}

	e.clock.Set(day1.Add(24*time.Hour + time.Minute))
	e.sendDue()
	reps := rr.Reports()
	if len(reps) != 1 {
		t.Fatalf("got %d reports, want 1", len(reps))
	}
	if reps[0].Host != "rua.rep.test" || reps[0].SNI != "rua.rep.test" || reps[0].Path != "/report" {
		t.Errorf("request host %q SNI %q path %q", reps[0].Host, reps[0].SNI, reps[0].Path)
	}
	top := tlsrpttest.CheckReportSchema(t, decodeReport(t, reps[0]))
	sum := top["policies"].([]any)[0].(map[string]any)["summary"].(map[string]any)
	if fmt.Sprint(sum["total-successful-session-count"], "/", sum["total-failure-session-count"]) != "3/2" {
		t.Errorf("summary = %v", sum)
	}
	if len(e.rec.Pending()) != 0 {
		t.Error("counts still pending after the report was made")
	}
	logs := e.sentLogs()
	if len(logs) != 1 || fieldOf(logs[0], "result") != "ok" || fieldOf(logs[0], "policy_domain") != "ex.test" ||
		fieldOf(logs[0], "rua") != rr.URL() || fieldOf(logs[0], "report_id") != top["report-id"] {
		t.Errorf("tlsrpt_sent logs = %+v", logs)
	}
	if got := e.results.list(); !slices.Equal(got, []string{"ok"}) {
		t.Errorf("OnReport = %v", got)
	}

	e.clock.Advance(48 * time.Hour)
	e.sendDue()
	if n := len(rr.Reports()); n != 1 {
		t.Errorf("report sent %d times", n)
	}
	// The finished job is kept for a day, then removed.
	e.clock.Advance(48 * time.Hour)
	e.sendDue()
	if got := e.rp.Reports(); len(got) != 0 {
		t.Errorf("finished jobs not pruned: %+v", got)
	}
}

// RPT-5.5-a: a receiver answering 500 is retried with growing gaps; after
// a 200 the report is not sent again.
func TestHTTPSRetryThenSuccess(t *testing.T) {
	e := newEnv(t)
	rr := e.w.ReportReceiver("rua.rep.test")
	rr.SetStatus(http.StatusInternalServerError)
	e.w.DNS.SetTXT("_smtp._tls.ex.test", []string{"v=TLSRPTv1; rua=" + rr.URL()})
	e.recordDay1("ex.test")

	e.clock.Set(afterDay1)
	e.sendDue()
	if n := len(rr.Reports()); n != 1 {
		t.Fatalf("first attempt: %d POSTs", n)
	}
	e.clock.Advance(9 * time.Minute) // before the first retry gap (10m)
	e.sendDue()
	if n := len(rr.Reports()); n != 1 {
		t.Fatalf("retried too early: %d POSTs", n)
	}
	e.clock.Advance(time.Minute) // +10m
	e.sendDue()
	if n := len(rr.Reports()); n != 2 {
		t.Fatalf("second attempt: %d POSTs", n)
	}
	e.clock.Advance(19 * time.Minute) // the gap doubled to 20m
	e.sendDue()
	if n := len(rr.Reports()); n != 2 {
		t.Fatalf("gap did not grow: %d POSTs", n)
	}
	rr.SetStatus(http.StatusCreated) // any 2xx
	e.clock.Advance(time.Minute)
	e.sendDue()
	if n := len(rr.Reports()); n != 3 {
		t.Fatalf("third attempt: %d POSTs", n)
	}
	e.clock.Advance(24 * time.Hour)
	e.sendDue()
	if n := len(rr.Reports()); n != 3 {
		t.Errorf("resent after success: %d POSTs", n)
	}
	if got := e.results.list(); !slices.Equal(got, []string{"failed", "failed", "ok"}) {
		t.Errorf("OnReport = %v", got)
	}
	// The same report each time.
	ids := map[string]bool{}
	for _, r := range rr.Reports() {
		ids[tlsrpttest.CheckReportSchema(t, decodeReport(t, r))["report-id"].(string)] = true
	}
	if len(ids) != 1 {
		t.Errorf("retries carried %d report-ids", len(ids))
	}
}

// RPT-5.5-a: retries stop RetryFor after the first attempt, with a
// "dropped" log line.
func TestHTTPSRetryGivesUp(t *testing.T) {
	e := newEnv(t)
	e.opts.RetryFor = 2 * time.Hour
	e.restart()
	rr := e.w.ReportReceiver("rua.rep.test")
	rr.SetStatus(http.StatusServiceUnavailable)
	e.w.DNS.SetTXT("_smtp._tls.ex.test", []string{"v=TLSRPTv1; rua=" + rr.URL()})
	e.recordDay1("ex.test")
	e.clock.Set(afterDay1)
	var times []time.Time
	for range 100 {
		before := len(rr.Reports())
		e.sendDue()
		if len(rr.Reports()) > before {
			times = append(times, e.clock.Now())
		}
		e.clock.Advance(5 * time.Minute)
	}
	// Attempts at 0, 10m, 30m, 70m, 150m (>= 2h: dropped).
	want := []time.Duration{0, 10 * time.Minute, 30 * time.Minute, 70 * time.Minute, 150 * time.Minute}
	var got []time.Duration
	for _, tm := range times {
		got = append(got, tm.Sub(afterDay1))
	}
	if !slices.Equal(got, want) {
		t.Errorf("attempts at %v, want %v", got, want)
	}
	res := e.results.list()
	if len(res) != 5 || res[4] != "dropped" {
		t.Errorf("OnReport = %v", res)
	}
	logs := e.sentLogs()
	if last := logs[len(logs)-1]; fieldOf(last, "result") != "dropped" || !strings.Contains(fieldOf(last, "error"), "503") {
		t.Errorf("last log = %+v", last.Context)
	}
}

// Redirects are never followed: a 3xx is a failed attempt, retried later.
func TestHTTPSRedirectNotFollowed(t *testing.T) {
	e := newEnv(t)
	target := e.w.ReportReceiver("other.rep.test")
	redir := e.w.NewHTTPS("", e.w.CA.Issue(testworld.CertValid, "rua.rep.test"))
	e.w.DNS.SetA("rua.rep.test", redir.IP())
	redir.Handle("", http.RedirectHandler(target.URL(), http.StatusTemporaryRedirect))
	e.w.DNS.SetTXT("_smtp._tls.ex.test", []string{"v=TLSRPTv1; rua=https://rua.rep.test/r"})
	e.recordDay1("ex.test")
	e.clock.Set(afterDay1)
	e.sendDue()
	if n := len(redir.Requests()); n != 1 {
		t.Errorf("redirecting host got %d requests", n)
	}
	if n := len(target.Requests()); n != 0 {
		t.Errorf("redirect followed: target got %d requests", n)
	}
	if got := e.results.list(); !slices.Equal(got, []string{"failed"}) {
		t.Errorf("OnReport = %v", got)
	}
}

// RPT-3-e (our choice): the report endpoint's certificate is verified.
func TestHTTPSUntrustedEndpoint(t *testing.T) {
	e := newEnv(t)
	h := e.w.NewHTTPS("", e.w.CA.Issue(testworld.CertUnknownCA, "rua.rep.test"))
	e.w.DNS.SetA("rua.rep.test", h.IP())
	h.Handle("", http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {}))
	e.w.DNS.SetTXT("_smtp._tls.ex.test", []string{"v=TLSRPTv1; rua=https://rua.rep.test/r"})
	e.recordDay1("ex.test")
	e.clock.Set(afterDay1)
	e.sendDue()
	if n := len(h.Requests()); n != 0 {
		t.Errorf("report posted to an untrusted endpoint")
	}
	logs := e.sentLogs()
	if len(logs) != 1 || fieldOf(logs[0], "result") != "failed" || !strings.Contains(fieldOf(logs[0], "error"), "certificate") {
		t.Errorf("logs = %+v", logs)
	}
}

// No TLSRPT record: nothing is sent, the counts are dropped. No sessions
// in a period: no report and not even a DNS query.
func TestNoRecordNoSessions(t *testing.T) {
	e := newEnv(t)
	rr := e.w.ReportReceiver("rua.rep.test")
	e.w.DNS.SetTXT("_smtp._tls.ex.test", []string{"v=TLSRPTv1; rua=" + rr.URL()})
	e.recordDay1("norecord.test")
	e.clock.Set(afterDay1)
	e.sendDue()
	if got := e.rp.Reports(); len(got) != 1 || !got[0].Done || got[0].Outcome != "no-record" {
		t.Errorf("reports = %+v", got)
	}
	if n := e.w.DNS.CountQueries("_smtp._tls.norecord.test", dns.TypeTXT); n != 1 {
		t.Errorf("%d TXT queries", n)
	}
	if len(e.rec.Pending()) != 0 {
		t.Error("counts kept")
	}
	// Day 2 passes without sessions at all.
	e.clock.Set(day1.Add(72 * time.Hour))
	e.sendDue()
	if n := len(rr.Reports()); n != 0 {
		t.Errorf("%d reports sent", n)
	}
	if n := e.w.DNS.CountQueries("_smtp._tls.ex.test", dns.TypeTXT); n != 0 {
		t.Errorf("ex.test had no sessions but its record was queried %d times", n)
	}
	if len(e.sentLogs()) != 0 || len(e.results.list()) != 0 {
		t.Errorf("send outcomes logged: %v", e.results.list())
	}
}

// A sent report is not sent again after a restart; a failed attempt keeps
// its next-attempt time across a restart.
func TestRestart(t *testing.T) {
	e := newEnv(t)
	ok := e.w.ReportReceiver("ok.rep.test")
	bad := e.w.ReportReceiver("bad.rep.test")
	bad.SetStatus(http.StatusBadGateway)
	e.w.DNS.SetTXT("_smtp._tls.ex.test", []string{"v=TLSRPTv1; rua=" + ok.URL() + "," + bad.URL()})
	e.recordDay1("ex.test")
	e.clock.Set(afterDay1)
	e.sendDue()
	if len(ok.Reports()) != 1 || len(bad.Reports()) != 1 {
		t.Fatalf("first pass: ok %d bad %d", len(ok.Reports()), len(bad.Reports()))
	}

	e.restart()
	e.clock.Advance(time.Minute)
	e.sendDue()
	if len(ok.Reports()) != 1 || len(bad.Reports()) != 1 {
		t.Fatalf("after restart: ok %d bad %d (sent report resent or retry too early)", len(ok.Reports()), len(bad.Reports()))
	}
	bad.SetStatus(http.StatusOK)
	e.clock.Advance(9 * time.Minute)
	e.restart()
	e.sendDue()
	if len(ok.Reports()) != 1 || len(bad.Reports()) != 2 {
		t.Fatalf("retry after restart: ok %d bad %d", len(ok.Reports()), len(bad.Reports()))
	}
	e.restart()
	e.clock.Advance(12 * time.Hour)
	e.sendDue()
	if len(ok.Reports()) != 1 || len(bad.Reports()) != 2 {
		t.Errorf("resent after restart: ok %d bad %d", len(ok.Reports()), len(bad.Reports()))
	}
	if got := e.rp.Reports(); len(got) != 1 || got[0].Outcome != "sent" {
		t.Errorf("reports = %+v", got)
	}
}

// A crash after the report jobs were written but before the Recorder's
// state without those counts reached the disk: on restart the counts are
// back, but the report is not made (nor sent) twice.
func TestCrashBetweenJobAndCounts(t *testing.T) {
	e := newEnv(t)
	rr := e.w.ReportReceiver("rua.rep.test")
	e.w.DNS.SetTXT("_smtp._tls.ex.test", []string{"v=TLSRPTv1; rua=" + rr.URL()})
	e.recordDay1("ex.test")
	if err := e.rec.Flush(); err != nil {
		t.Fatal(err)
	}
	old, err := os.ReadFile(filepath.Join(e.dir, "counts.json"))
	if err != nil {
		t.Fatal(err)
	}
	e.clock.Set(afterDay1)
	e.sendDue()
	if err := os.WriteFile(filepath.Join(e.dir, "counts.json"), old, 0o600); err != nil {
		t.Fatal(err)
	}
	e.restart()
	if len(e.rec.Pending()) != 1 {
		t.Fatal("test setup: counts not restored")
	}
	e.sendDue()
	if n := len(rr.Reports()); n != 1 {
		t.Errorf("report sent %d times", n)
	}
	if len(e.rec.Pending()) != 0 {
		t.Error("restored counts not dropped")
	}
}

// A temporary DNS failure delays discovery; it is retried.
func TestDiscoveryRetried(t *testing.T) {
	e := newEnv(t)
	rr := e.w.ReportReceiver("rua.rep.test")
	e.w.DNS.SetTXT("_smtp._tls.ex.test", []string{"v=TLSRPTv1; rua=" + rr.URL()})
	e.w.DNS.SetServFail("_smtp._tls.ex.test", dns.TypeTXT, true)
	e.recordDay1("ex.test")
	e.clock.Set(afterDay1)
	e.sendDue()
	if n := len(rr.Reports()); n != 0 {
		t.Fatalf("%d reports during SERVFAIL", n)
	}
	e.w.DNS.SetServFail("_smtp._tls.ex.test", dns.TypeTXT, false)
	e.clock.Advance(10 * time.Minute)
	e.sendDue()
	if n := len(rr.Reports()); n != 1 {
		t.Errorf("%d reports after DNS recovered", n)
	}
}

// mailto: the report is queued as a multipart/report message with the RFC
// 8460 §5.3 headers, the gzip attachment, TLS-Required: No, and a DKIM
// signature that verifies.
func TestSendMailto(t *testing.T) {
	for _, keyType := range []string{"ed25519", "rsa"} {
		t.Run(keyType, func(t *testing.T) {
			e := newEnv(t)
			st := &memQueue{}
			keyFile, pubRecord := writeDKIMKey(t, keyType)
			e.opts.Enqueue = st.EnqueueReport
			e.opts.DKIM = &tlsrpt.DKIMOptions{Domain: "relay.example.net", Selector: "tls", KeyFile: keyFile}
			e.restart()

			e.w.DNS.SetTXT("_smtp._tls.ex.test", []string{"v=TLSRPTv1;rua=mailto:tls-reports@rep.test"})
			e.recordDay1("ex.test")
			e.clock.Set(afterDay1)
			e.sendDue()

			msgs := st.List()
			if len(msgs) != 1 {
				t.Fatalf("%d messages queued", len(msgs))
			}
			m := msgs[0]
			if m.From != "tlsrpt-noreply@relay.example.net" || m.To != "tls-reports@rep.test" {
				t.Errorf("envelope = %s -> %s", m.From, m.To)
			}
			checkReportMail(t, m.Body, pubRecord)
			logs := e.sentLogs()
			if len(logs) != 1 || fieldOf(logs[0], "result") != "ok" || fieldOf(logs[0], "rua") != "mailto:tls-reports@rep.test" {
				t.Errorf("logs = %+v", logs)
			}
			// Sent means queued: not queued again.
			e.restart()
			e.clock.Advance(48 * time.Hour)
			e.sendDue()
			if n := len(st.List()); n != 1 {
				t.Errorf("%d messages after restart", n)
			}
		})
	}
}

func checkReportMail(t *testing.T, raw []byte, dkimRecord string) {
	t.Helper()
	if !bytes.Contains(raw, []byte("\r\n")) || bytes.Contains(bytes.ReplaceAll(raw, []byte("\r\n"), nil), []byte("\n")) {
		t.Error("message lines do not all end in CRLF")
	}
	msg, err := mail.ReadMessage(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	h := msg.Header
	for _, k := range []string{"From", "To", "Date", "Message-ID", "MIME-Version", "Subject"} {
		if h.Get(k) == "" {
			t.Errorf("header %s missing", k)
		}
	}
	if _, err := h.Date(); err != nil {
		t.Errorf("Date: %v", err)
	}
	if h.Get("TLS-Report-Domain") != "ex.test" || h.Get("TLS-Report-Submitter") != "relay.example.net" { // RPT-5.3-b
		t.Errorf("TLS-Report-Domain %q, TLS-Report-Submitter %q", h.Get("TLS-Report-Domain"), h.Get("TLS-Report-Submitter"))
	}
	if h.Get("TLS-Required") != "No" {
		t.Errorf("TLS-Required %q", h.Get("TLS-Required"))
	}
	subj := regexp.MustCompile(`^Report\s+Domain:\s+ex\.test\s+Submitter:\s+relay\.example\.net\s+Report-ID:\s+<([^<>@\s]+@[^<>@\s]+)>\s*$`)
	sm := subj.FindStringSubmatch(h.Get("Subject")) // RPT-5.3-c
	if sm == nil {
		t.Fatalf("Subject %q", h.Get("Subject"))
	}
	mt, params, err := mime.ParseMediaType(h.Get("Content-Type")) // RPT-5.3-a
	if err != nil || mt != "multipart/report" || params["report-type"] != "tlsrpt" {
		t.Fatalf("Content-Type %q: %v", h.Get("Content-Type"), err)
	}
	mr := multipart.NewReader(msg.Body, params["boundary"])
	p1, err := mr.NextPart()
	if err != nil {
		t.Fatal(err)
	}
	if ct, _, _ := mime.ParseMediaType(p1.Header.Get("Content-Type")); ct != "text/plain" {
		t.Errorf("part 1 is %q", ct)
	}
	text, _ := io.ReadAll(p1) // multipart decodes quoted-printable
	if !strings.Contains(string(text), "ex.test") || !strings.Contains(string(text), "Failed TLS sessions: 2") {
		t.Errorf("summary text:\n%s", text)
	}
	p2, err := mr.NextPart()
	if err != nil {
		t.Fatal(err)
	}
	if ct, _, _ := mime.ParseMediaType(p2.Header.Get("Content-Type")); ct != "application/tlsrpt+gzip" {
		t.Errorf("part 2 is %q", ct)
	}
	disp, dparams, err := mime.ParseMediaType(p2.Header.Get("Content-Disposition"))
	fn := dparams["filename"]
	// RPT-5.1-a, with the brief's unique-id alphabet.
	if err != nil || disp != "attachment" || !regexp.MustCompile(`^[^!]+![^!]+!\d+!\d+(![A-Za-z0-9.]+)?\.json\.gz$`).MatchString(fn) ||
		!strings.HasPrefix(fn, "relay.example.net!ex.test!1773446400!1773532799!") {
		t.Errorf("Content-Disposition %q", p2.Header.Get("Content-Disposition"))
	}
	if p2.Header.Get("Content-Transfer-Encoding") != "base64" {
		t.Errorf("attachment encoding %q", p2.Header.Get("Content-Transfer-Encoding"))
	}
	b64, _ := io.ReadAll(p2)
	gz, err := base64.StdEncoding.DecodeString(strings.Join(strings.Fields(string(b64)), ""))
	if err != nil {
		t.Fatal(err)
	}
	top := tlsrpttest.CheckReportSchema(t, decodeReport(t, testworld.Request{Method: "POST", Body: gz,
		Header: http.Header{"Content-Type": {"application/tlsrpt+gzip"}}}))
	if top["report-id"] != sm[1] {
		t.Errorf("Subject Report-ID %q != report-id %q", sm[1], top["report-id"])
	}
	if _, err := mr.NextPart(); err != io.EOF {
		t.Errorf("more than two parts: %v", err)
	}

	// RPT-3-g: DKIM, no l=, TLS-Report-* signed.
	sig := h.Get("DKIM-Signature")
	if sig == "" {
		t.Fatal("no DKIM-Signature")
	}
	if regexp.MustCompile(`(^|;)\s*l=`).MatchString(sig) {
		t.Errorf("DKIM signature has l=: %s", sig)
	}
	vs, err := dkim.VerifyWithOptions(bytes.NewReader(raw), &dkim.VerifyOptions{
		LookupTXT: func(domain string) ([]string, error) {
			if domain != "tls._domainkey.relay.example.net" {
				return nil, fmt.Errorf("unexpected DKIM lookup %s", domain)
			}
			return []string{dkimRecord}, nil
		},
	})
	if err != nil || len(vs) != 1 || vs[0].Err != nil {
		t.Fatalf("DKIM verification: %v %+v\n%s", err, vs[0], raw)
	}
	v := vs[0]
	if v.Domain != "relay.example.net" {
		t.Errorf("d= %s", v.Domain)
	}
	for _, k := range []string{"from", "subject", "date", "message-id", "to", "tls-report-domain", "tls-report-submitter", "content-type", "mime-version"} {
		if !slices.ContainsFunc(v.HeaderKeys, func(s string) bool { return strings.EqualFold(s, k) }) {
			t.Errorf("h= lacks %s: %v", k, v.HeaderKeys)
		}
	}
	// Tampering breaks it.
	tampered := bytes.Replace(raw, []byte("Failed TLS sessions: 2"), []byte("Failed TLS sessions: 0"), 1)
	if vs, _ := dkim.VerifyWithOptions(bytes.NewReader(tampered), &dkim.VerifyOptions{
		LookupTXT: func(string) ([]string, error) { return []string{dkimRecord}, nil },
	}); len(vs) != 1 || vs[0].Err == nil {
		t.Error("tampered message still verifies")
	}
}

// writeDKIMKey writes a PEM key file and returns it with its DNS record.
// The record lists s=email:tlsrpt: RFC 8460 §3 asks for s=tlsrpt, and
// go-msgauth (like most verifiers) also wants "email" or "*".
func writeDKIMKey(t *testing.T, keyType string) (string, string) {
	t.Helper()
	var (
		signer crypto.Signer
		blk    *pem.Block
		pub    []byte
		k      string
	)
	switch keyType {
	case "ed25519":
		pk, sk, _ := ed25519.GenerateKey(rand.Reader)
		der, err := x509.MarshalPKCS8PrivateKey(sk)
		if err != nil {
			t.Fatal(err)
		}
		signer, blk, pub, k = sk, &pem.Block{Type: "PRIVATE KEY", Bytes: der}, pk, "ed25519"
	case "rsa":
		sk, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			t.Fatal(err)
		}
		pub, _ = x509.MarshalPKIXPublicKey(&sk.PublicKey)
		signer, blk, k = sk, &pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(sk)}, "rsa"
	}
	path := filepath.Join(t.TempDir(), "dkim.pem")
	if err := os.WriteFile(path, pem.EncodeToMemory(blk), 0o600); err != nil {
		t.Fatal(err)
	}
	if s, err := tlsrpt.LoadDKIMKey(path); err != nil || !s.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(signer.Public()) {
		t.Fatalf("LoadDKIMKey: %v", err)
	}
	return path, fmt.Sprintf("v=DKIM1; k=%s; s=email:tlsrpt; p=%s", k, base64.StdEncoding.EncodeToString(pub))
}

// Without DKIM the report is still queued (unsigned) and a warning logged.
func TestMailtoWithoutDKIM(t *testing.T) {
	e := newEnv(t)
	st := &memQueue{}
	e.opts.Enqueue = st.EnqueueReport
	e.restart()
	if e.logs.FilterMessage("tlsrpt_no_dkim").Len() == 0 {
		t.Error("no warning about the missing DKIM key")
	}
	e.w.DNS.SetTXT("_smtp._tls.ex.test", []string{"v=TLSRPTv1;rua=mailto:r@rep.test"})
	e.recordDay1("ex.test")
	e.clock.Set(afterDay1)
	e.sendDue()
	if n := len(st.List()); n != 1 {
		t.Fatalf("%d messages", n)
	}
	if bytes.Contains(st.List()[0].Body, []byte("DKIM-Signature")) {
		t.Error("signed without a key")
	}
}

// failingQueue refuses the first n messages.
type failingQueue struct {
	mu    sync.Mutex
	fails int
	got   int
}

func (q *failingQueue) EnqueueReport(from, to string, body io.Reader) (string, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.fails > 0 {
		q.fails--
		return "", errors.New("disk full")
	}
	q.got++
	return "id1", nil
}

func TestMailtoEnqueueFailureRetried(t *testing.T) {
	e := newEnv(t)
	q := &failingQueue{fails: 1}
	e.opts.Enqueue = q.EnqueueReport
	e.restart()
	e.w.DNS.SetTXT("_smtp._tls.ex.test", []string{"v=TLSRPTv1;rua=mailto:r@rep.test"})
	e.recordDay1("ex.test")
	e.clock.Set(afterDay1)
	e.sendDue()
	e.clock.Advance(10 * time.Minute)
	e.sendDue()
	if q.got != 1 {
		t.Errorf("queued %d", q.got)
	}
	if got := e.results.list(); !slices.Equal(got, []string{"failed", "ok"}) {
		t.Errorf("OnReport = %v", got)
	}
}

// End to end with real time: a 1-second interval, Recorder.Run and
// Reporter.Run, a session recorded now reaches the receiver.
func TestRunLoop(t *testing.T) {
	w := testworld.New(t)
	res, err := dnsclient.New([]string{w.DNS.Addr()}, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	rr := w.ReportReceiver("rua.rep.test")
	w.DNS.SetTXT("_smtp._tls.ex.test", []string{"v=TLSRPTv1; rua=" + rr.URL()})
	rec, err := tlsrptdb.NewRecorder(t.TempDir(), nil, zap.NewNop(), tlsrptdb.WithInterval(time.Second))
	if err != nil {
		t.Fatal(err)
	}
	rp, err := NewReporter(Options{Recorder: rec, Resolver: res, RootCAs: w.CA.Pool(), AllowPrivateRUA: true,
		HTTPSPort: w.HTTPSPort(), Hostname: "relay.example.net", ContactInfo: "postmaster@relay.example.net",
		Interval: time.Second, RetryBase: 100 * time.Millisecond, RetryFor: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() { rec.Run(ctx) })
	wg.Go(func() { rp.Run(ctx) })
	defer func() { cancel(); wg.Wait() }()

	rec.Record(okSession)
	deadline := time.Now().Add(10 * time.Second)
	for len(rr.Reports()) == 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	reps := rr.Reports()
	if len(reps) != 1 {
		t.Fatalf("%d reports", len(reps))
	}
	top := tlsrpttest.CheckReportSchema(t, decodeReport(t, reps[0]))
	dr := top["date-range"].(map[string]any)
	s, _ := time.Parse(time.RFC3339, dr["start-datetime"].(string))
	en, _ := time.Parse(time.RFC3339, dr["end-datetime"].(string))
	if en.Sub(s) != 0 { // a 1s period: first and last second are the same
		t.Errorf("date-range %v", dr)
	}
}

func TestNewReporterChecks(t *testing.T) {
	rec, _ := tlsrptdb.NewRecorder(t.TempDir(), nil, nil)
	res := &fakeTXT{}
	if _, err := NewReporter(Options{Recorder: rec, Resolver: res}); err == nil {
		t.Error("no hostname accepted")
	}
	if _, err := NewReporter(Options{Recorder: rec, Resolver: res, Hostname: "r.test", Interval: time.Hour}); err == nil {
		t.Error("interval mismatch accepted")
	}
	if _, err := NewReporter(Options{Recorder: rec, Resolver: res, Hostname: "r.test",
		DKIM: &tlsrpt.DKIMOptions{Domain: "r.test", Selector: "s", KeyFile: "/nonexistent"}}); err == nil {
		t.Error("missing DKIM key file accepted")
	}
	core, logs := observer.New(zapcore.WarnLevel)
	if _, err := NewReporter(Options{Recorder: rec, Resolver: res, Hostname: "relay.r.test",
		ContactInfo: "mailto:x@other.test", Logger: zap.New(core)}); err != nil {
		t.Fatal(err)
	}
	if logs.FilterMessage("tlsrpt_contact_domain").Len() != 1 {
		t.Error("no warning for contact-info outside the submitter domain")
	}
}
