package main

// `stsrelay demo`: MTA-STS, DANE and TLS-RPT at work in one command, on
// loopback, without root or Internet access. A small world from
// internal/testworld (DNS server, demo CA, MX hosts, policy hosts, a
// TLS-RPT receiver) and a real relay (serve, in this process, on a
// generated configuration) with one message per kind of destination.
//
// The world's DNS server sets the AD bit on dane.demo's names, as a
// validating resolver would for a DNSSEC-signed zone; it is on loopback,
// which is what dns.trust_ad = "loopback" trusts.

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"github.com/miekg/dns"
	"github.com/pelletier/go-toml/v2"
	"go.uber.org/zap"
	"golang.org/x/crypto/bcrypt"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/dane"
	"github.com/stsrelay/stsrelay/internal/logging"
	"github.com/stsrelay/stsrelay/internal/testworld"
	"github.com/stsrelay/stsrelay/mtasts/forecast"
)

const (
	// demoBudget bounds the whole demo.
	demoBudget = 14 * time.Second
	// demoReportInterval is the TLS-RPT period of the demo relay.
	demoReportInterval = 2 * time.Second
	demoUser           = "demo"
	demoSender         = "app@sender.demo"
)

// demoStep is one destination of the demo and what became of its message.
type demoStep struct {
	Domain   string `json:"domain"`
	Setup    string `json:"setup"`
	Expected string `json:"expected"`
	// Outcome is what happened: delivered-verified-tls, refused,
	// delivered-recorded-failure, delivered-opportunistic, or
	// something else when the step misbehaved.
	Outcome string   `json:"outcome"`
	OK      bool     `json:"ok"`
	QueueID string   `json:"queue_id,omitempty"`
	Details []string `json:"details,omitempty"`
	// Delivery is the relay's delivery log line for the message.
	Delivery map[string]any `json:"delivery,omitempty"`
	// Report is the TLS-RPT report the domain received (decoded JSON).
	Report json.RawMessage `json:"tlsrpt_report,omitempty"`
	// reportDomain is the policy domain the report is for, when it is
	// not Domain: for DANE the TLSA base domain (RFC 8460 §3).
	reportDomain string
}

// policyDomain is the TLS-RPT policy domain of the step's sessions.
func (s *demoStep) policyDomain() string {
	if s.reportDomain != "" {
		return s.reportDomain
	}
	return s.Domain
}

// demoResult is the -json output.
type demoResult struct {
	OK       bool               `json:"ok"`
	Steps    []*demoStep        `json:"steps"`
	Forecast []forecast.Summary `json:"forecast,omitempty"`
	// LogLines are the relay's delivery log lines, exactly as written.
	LogLines []string `json:"log_lines"`
	DataDir  string   `json:"data_dir,omitempty"`
	Config   string   `json:"config,omitempty"`
	Elapsed  string   `json:"elapsed"`
}

func cmdDemo(args []string) error {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "print the outcome as JSON")
	keep := fs.String("keep", "", "keep the relay's data dir, config and log in this directory")
	if err := fs.Parse(args); err != nil {
		return &usageError{err.Error()}
	}
	if fs.NArg() > 0 {
		return &usageError{"demo: unexpected argument " + fs.Arg(0)}
	}
	var out io.Writer = os.Stdout
	if *asJSON {
		out = io.Discard
	}
	res, err := runDemo(*keep, out)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := jsonOut()
		enc.SetIndent("", "  ")
		if err := enc.Encode(res); err != nil {
			return err
		}
	}
	if !res.OK {
		return &exitError{exitFailed}
	}
	return nil
}

// demoWorld is the loopback Internet of the demo.
type demoWorld struct {
	w        *testworld.World
	reports  *testworld.ReportReceiver
	mx       map[string]*testworld.MXServer // by MX host name
	impostor *testworld.MXServer
}

// buildDemoWorld starts the demo's loopback Internet in dir: the DNS
// server, the demo CA, the TLS-RPT receiver and the five destination
// domains with their MX and policy hosts.
func buildDemoWorld(dir string) (*demoWorld, error) {
	w, err := testworld.NewWorld(testworld.Options{Dir: dir})
	if err != nil {
		return nil, err
	}
	dw := &demoWorld{w: w, mx: map[string]*testworld.MXServer{}}
	ok := false
	defer func() {
		if !ok {
			w.Close()
		}
	}()
	if dw.reports, err = w.StartReportReceiver("reports.demo"); err != nil {
		return nil, err
	}
	rua := dw.reports.URLWithPort()
	for _, d := range []string{"good.demo", "spoofed.demo", "rollout.demo", "plain.demo"} {
		w.DNS.SetTXT("_smtp._tls."+d, []string{"v=TLSRPTv1; rua=" + rua})
		w.DNS.SetMX(d, testworld.MX{Pref: 10, Host: "mx." + d})
	}
	if err := dw.addMTASTSDomains(); err != nil {
		return nil, err
	}
	if err := dw.addDANEDomain(rua); err != nil {
		return nil, err
	}
	ok = true
	return dw, nil
}

// startMX starts an MX host with STARTTLS and a certificate of the given
// kind for host.
func (dw *demoWorld) startMX(host string, kind testworld.CertKind) (*testworld.MXServer, error) {
	o := testworld.MXOptions{Hostname: host}
	c, err := dw.w.CA.IssueCert(kind, host)
	if err != nil {
		return nil, err
	}
	o.Cert = c
	s, err := dw.w.StartMX(o)
	if err != nil {
		return nil, err
	}
	dw.mx[host] = s
	return s, nil
}

// publishPolicy serves an MTA-STS policy of the given mode naming mxHost
// for domain, and publishes its _mta-sts record.
func (dw *demoWorld) publishPolicy(domain, mode, mxHost string) error {
	p, err := dw.w.StartPolicyHost(domain, testworld.CertValid)
	if err != nil {
		return err
	}
	p.SetPolicy(fmt.Sprintf("version: STSv1\nmode: %s\nmx: %s\nmax_age: 86400\n", mode, mxHost))
	dw.w.DNS.SetTXT("_mta-sts."+domain, []string{"v=STSv1; id=demo1"})
	return nil
}

// addMTASTSDomains sets up good.demo, spoofed.demo, rollout.demo and
// plain.demo: their MX hosts, addresses and policies.
func (dw *demoWorld) addMTASTSDomains() error {
	w := dw.w
	// good.demo: enforce, and an MX with a valid certificate.
	good, err := dw.startMX("mx.good.demo", testworld.CertValid)
	if err != nil {
		return err
	}
	w.DNS.SetA("mx.good.demo", good.IP())
	if err := dw.publishPolicy("good.demo", "enforce", "mx.good.demo"); err != nil {
		return err
	}

	// spoofed.demo: enforce, but DNS answers with the address of an
	// impostor that has a self-signed certificate for the MX's name.
	if dw.impostor, err = dw.startMX("mx.spoofed.demo", testworld.CertSelfSigned); err != nil {
		return err
	}
	w.DNS.SetA("mx.spoofed.demo", dw.impostor.IP())
	if err := dw.publishPolicy("spoofed.demo", "enforce", "mx.spoofed.demo"); err != nil {
		return err
	}

	// rollout.demo: testing, and its MX's certificate has expired.
	roll, err := dw.startMX("mx.rollout.demo", testworld.CertExpired)
	if err != nil {
		return err
	}
	w.DNS.SetA("mx.rollout.demo", roll.IP())
	if err := dw.publishPolicy("rollout.demo", "testing", "mx.rollout.demo"); err != nil {
		return err
	}

	// plain.demo: no policy; its MX offers STARTTLS with a self-signed
	// certificate, which is fine where nobody asks for verification.
	plain, err := dw.startMX("mx.plain.demo", testworld.CertSelfSigned)
	if err != nil {
		return err
	}
	w.DNS.SetA("mx.plain.demo", plain.IP())
	return nil
}

// addDANEDomain sets up dane.demo, with TLS-RPT reports to rua.
//
// dane.demo is DNSSEC-signed (AD on its MX, address and TLSA answers),
// and has a TLSA 3 1 1 record (DANE-EE, SPKI, SHA-256) for its MX's
// self-signed certificate: DANE authenticates what the Web PKI cannot
// (RFC 7672 §3.1.1). TLS-RPT for DANE goes to the TLSA base domain,
// mx.dane.demo (RFC 8460 §3).
func (dw *demoWorld) addDANEDomain(rua string) error {
	w := dw.w
	dcert, err := w.CA.IssueCert(testworld.CertSelfSigned, "mx.dane.demo")
	if err != nil {
		return err
	}
	dm, err := w.StartMX(testworld.MXOptions{Hostname: "mx.dane.demo", Cert: dcert})
	if err != nil {
		return err
	}
	dw.mx["mx.dane.demo"] = dm
	w.DNS.SetMX("dane.demo", testworld.MX{Pref: 10, Host: "mx.dane.demo"})
	w.DNS.SetA("mx.dane.demo", dm.IP())
	rec := dane.Record(3, 1, 1, dcert.Leaf)
	rec.Hdr = dns.RR_Header{Name: "_25._tcp.mx.dane.demo.", Rrtype: dns.TypeTLSA, Class: dns.ClassINET, Ttl: testworld.DefaultTTL}
	w.DNS.AddRR(rec)
	for _, n := range []string{"dane.demo", "mx.dane.demo", "_25._tcp.mx.dane.demo"} {
		w.DNS.SetAD(n, true)
	}
	w.DNS.SetTXT("_smtp._tls.mx.dane.demo", []string{"v=TLSRPTv1; rua=" + rua})
	return nil
}

// demoConfig is the relay's configuration in the demo world.
func demoConfig(dw *demoWorld, dir, password string) (*config.Config, error) {
	w := dw.w
	hash, err := bcrypt.GenerateFromPassword([]byte(password), bcrypt.MinCost)
	if err != nil {
		return nil, err
	}
	cert, err := w.CA.IssueCert(testworld.CertValid, "relay.demo")
	if err != nil {
		return nil, err
	}
	cfg := config.Default()
	cfg.Hostname = "relay.demo"
	cfg.DataDir = filepath.Join(dir, "data")
	cfg.Submission.Listen = []string{"127.0.0.1:0"}
	cfg.Submission.TLSCertFile, cfg.Submission.TLSKeyFile = cert.CertFile, cert.KeyFile
	cfg.Submission.Users = []config.User{{Username: demoUser, PasswordHash: string(hash)}}
	// The refused message stays queued for the whole demo.
	cfg.Queue.RetrySchedule = []config.Duration{{Duration: time.Hour}}
	cfg.Queue.DelayNoticeAfter = config.Duration{}
	cfg.DNS.Servers = []string{w.DNS.Addr()}
	cfg.DNS.Timeout = config.Duration{Duration: 2 * time.Second}
	cfg.Delivery.Port = w.MXPort()
	cfg.Delivery.ConnectTimeout = config.Duration{Duration: 3 * time.Second}
	cfg.Delivery.CommandTimeout = config.Duration{Duration: 5 * time.Second}
	cfg.Delivery.ShutdownTimeout = config.Duration{Duration: 2 * time.Second}
	cfg.TLS.ExtraRootCAFile = w.CAFile()
	cfg.MTASTS.HTTPSPort = w.HTTPSPort()
	cfg.MTASTS.FetchTimeout = config.Duration{Duration: 3 * time.Second}
	cfg.TLSRPT.Enabled = true
	cfg.TLSRPT.Interval = config.Duration{Duration: demoReportInterval}
	cfg.TLSRPT.AllowPrivateRUA = true // the demo's report receiver is on loopback
	cfg.TLSRPT.OrganizationName = "stsrelay demo"
	cfg.TLSRPT.ContactInfo = "mailto:postmaster@relay.demo"
	cfg.TLSRPT.From = "tlsrpt-noreply@relay.demo"
	cfg.Log.Level = "info"
	cfg.Log.Format = "json"
	cfg.Log.Output = filepath.Join(dir, "stsrelay.log")
	data, err := toml.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	path := filepath.Join(dir, "stsrelay.toml")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		return nil, err
	}
	// Load it back: the relay runs on exactly what `serve -config` reads.
	return config.Load(path)
}

// runDemo builds the demo world, runs a relay in it, sends one message
// per destination and judges what became of each, narrating to out.
func runDemo(keep string, out io.Writer) (*demoResult, error) {
	start := time.Now()
	deadline := start.Add(demoBudget)
	dir, cleanup, err := demoDir(keep)
	if err != nil {
		return nil, err
	}
	defer cleanup()
	say := func(format string, a ...any) { fmt.Fprintf(out, format+"\n", a...) }

	say("stsrelay demo: a loopback world with a DNS server, a demo CA, five destination domains and a TLS-RPT receiver.")
	dw, err := buildDemoWorld(filepath.Join(dir, "world"))
	if err != nil {
		return nil, fmt.Errorf("demo: building the world: %w", err)
	}
	defer dw.w.Close()
	pw := make([]byte, 12)
	_, _ = rand.Read(pw)
	password := hex.EncodeToString(pw)
	cfg, err := demoConfig(dw, dir, password)
	if err != nil {
		return nil, fmt.Errorf("demo: config: %w", err)
	}
	log, closeLog, err := logging.New(cfg.Log)
	if err != nil {
		return nil, fmt.Errorf("demo: log: %w", err)
	}
	defer closeLog()

	say("DNS server %s, MX port %d, HTTPS port %d, demo CA %s", dw.w.DNS.Addr(), dw.w.MXPort(), dw.w.HTTPSPort(), cfg.TLS.ExtraRootCAFile)
	say("starting the relay (the code of `stsrelay serve`) on %s", cfg.Path)
	relay := startDemoRelay(cfg, log)
	defer relay.stopIfRunning()
	addr, err := relay.submissionAddr(deadline)
	if err != nil {
		return nil, err
	}
	say("relay listening for submission on %s (STARTTLS, AUTH PLAIN as %q)\n", addr, demoUser)

	steps := demoSteps()
	tlsCfg := &tls.Config{ServerName: "relay.demo", RootCAs: dw.w.CA.Pool()}
	submitDemoSteps(steps, addr, tlsCfg, password, say)
	relay.awaitDeliveries(steps, deadline)
	for _, s := range steps {
		judgeDemoStep(s, dw, cfg)
	}
	say("\nwaiting for the TLS-RPT period (%v) to end and the reports to arrive...", demoReportInterval)
	checkDemoReports(steps, dw.reports, deadline)

	res := &demoResult{OK: true, Steps: steps}
	if sums, err := readForecast(cfg, "rollout.demo"); err == nil {
		res.Forecast = sums
	}
	narrateDemo(res, relay.logf, say)
	if err := relay.stop(); err != nil {
		res.OK = false
		say("\nrelay stopped with an error: %v", err)
	}
	res.Elapsed = time.Since(start).Round(time.Millisecond).String()
	if keep != "" {
		res.DataDir, res.Config = cfg.DataDir, cfg.Path
		say("\nkept: config %s, data dir %s, log %s", cfg.Path, cfg.DataDir, cfg.Log.Output)
		say("try: go run ./cmd/stsrelay policy forecast -config %s", cfg.Path)
	}
	if res.OK {
		say("\nall steps behaved as expected (%s).", res.Elapsed)
	} else {
		say("\nsome steps did not behave as expected (%s).", res.Elapsed)
	}
	return res, nil
}

// demoDir is the directory the demo works in: keep, made absolute, when
// given (and not already holding a demo's data), else a temporary one
// that cleanup removes.
func demoDir(keep string) (dir string, cleanup func(), err error) {
	if keep == "" {
		d, err := os.MkdirTemp("", "stsrelay-demo-")
		if err != nil {
			return "", nil, err
		}
		return d, func() { os.RemoveAll(d) }, nil
	}
	if err := os.MkdirAll(keep, 0o750); err != nil {
		return "", nil, err
	}
	dir, _ = filepath.Abs(keep)
	if _, err := os.Stat(filepath.Join(dir, "data")); err == nil {
		return "", nil, fmt.Errorf("demo: %s already holds a demo's data; pick an empty directory", dir)
	}
	return dir, func() {}, nil
}

// demoRelay is the demo's relay: serve, in a goroutine of this process.
type demoRelay struct {
	logf   *logFollower
	served chan struct{} // closed when serve returns
	err    error         // what serve returned, once served is closed
	cancel context.CancelFunc
	// stopped is set once stop has been called.
	stopped bool
}

// startDemoRelay runs serve on cfg until stop.
func startDemoRelay(cfg *config.Config, log *zap.Logger) *demoRelay {
	ctx, cancel := context.WithCancel(context.Background())
	r := &demoRelay{logf: &logFollower{path: cfg.Log.Output}, served: make(chan struct{}), cancel: cancel}
	go func() { r.err = serve(ctx, cfg, log); close(r.served) }()
	return r
}

// stop stops the relay and returns serve's error, or an error if it does
// not return within 10s.
func (r *demoRelay) stop() error {
	r.stopped = true
	r.cancel()
	select {
	case <-r.served:
		return r.err
	case <-time.After(10 * time.Second):
		return errors.New("relay did not stop within 10s")
	}
}

// stopIfRunning stops the relay unless stop was called already.
func (r *demoRelay) stopIfRunning() {
	if !r.stopped {
		_ = r.stop()
	}
}

// submissionAddr waits, until deadline, for the relay's "started" log line
// and returns the first submission address it names.
func (r *demoRelay) submissionAddr(deadline time.Time) (string, error) {
	started, err := r.logf.wait(time.Until(deadline), r.served, func(m map[string]any) bool { return m["msg"] == "started" })
	if err != nil {
		return "", fmt.Errorf("demo: relay did not start: %w\n%s", err, r.logf.text())
	}
	addr := ""
	if l, ok := started["listen"].([]any); ok && len(l) > 0 {
		addr, _ = l[0].(string)
	}
	return addr, nil
}

// awaitDeliveries waits for the delivery log line of each submitted
// step's message, leaving 4s of the deadline for the TLS-RPT reports.
func (r *demoRelay) awaitDeliveries(steps []*demoStep, deadline time.Time) {
	for _, s := range steps {
		if s.QueueID == "" {
			continue
		}
		s.Delivery, _ = r.logf.wait(time.Until(deadline)-4*time.Second, r.served, func(m map[string]any) bool {
			return m["msg"] == "delivery" && m["queue_id"] == s.QueueID
		})
	}
}

// demoSteps are the demo's destinations, one per kind, and what should
// become of a message to each.
func demoSteps() []*demoStep {
	return []*demoStep{
		{Domain: "good.demo", Setup: "MTA-STS enforce; its MX has a valid certificate", Expected: "delivered-verified-tls"},
		{Domain: "spoofed.demo", Setup: "MTA-STS enforce; DNS now points mx.spoofed.demo at an impostor with a self-signed certificate", Expected: "refused"},
		{Domain: "rollout.demo", Setup: "MTA-STS testing; its MX's certificate has expired", Expected: "delivered-recorded-failure"},
		{Domain: "plain.demo", Setup: "no MTA-STS policy; its MX has a self-signed certificate", Expected: "delivered-opportunistic"},
		{Domain: "dane.demo", Setup: "DNSSEC-signed, with a TLSA 3 1 1 record at _25._tcp.mx.dane.demo for its MX's self-signed certificate",
			Expected: "delivered-dane-authenticated", reportDomain: "mx.dane.demo"},
	}
}

// submitDemoSteps submits one message per step to the relay at addr and
// records its queue ID, or why it was not submitted.
func submitDemoSteps(steps []*demoStep, addr string, tlsCfg *tls.Config, password string, say func(string, ...any)) {
	for _, s := range steps {
		rcpt := "someone@" + s.Domain
		id, err := demoSubmit(addr, tlsCfg, password, rcpt, s.Domain)
		if err != nil {
			s.Outcome = "not-submitted"
			s.Details = append(s.Details, "submission failed: "+err.Error())
			continue
		}
		s.QueueID = id
		say("submitted a message to %s: queued as %s", rcpt, id)
	}
}

// checkDemoReports waits, until shortly before deadline, for one TLS-RPT
// report per step, and fails a step whose report is missing or does not
// show the expected result.
func checkDemoReports(steps []*demoStep, receiver *testworld.ReportReceiver, deadline time.Time) {
	reports := map[string]json.RawMessage{}
	for time.Now().Before(deadline.Add(-time.Second)) && len(reports) < len(steps) {
		for _, r := range receiver.Reports() {
			if dom, js, err := decodeReport(r.Body); err == nil {
				reports[dom] = js
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	for _, s := range steps {
		js, ok := reports[s.policyDomain()]
		if !ok {
			s.OK = false
			s.Details = append(s.Details, "no TLS-RPT report arrived")
			continue
		}
		s.Report = js
		if !reportAgrees(s, js) {
			s.OK = false
			s.Details = append(s.Details, "the TLS-RPT report does not show the expected result")
		}
	}
}

// narrateDemo says how each step went, the forecast and the reports, and
// the relay's delivery log lines, which it also keeps in res; a failed
// step makes res not OK.
func narrateDemo(res *demoResult, logf *logFollower, say func(string, ...any)) {
	for _, s := range res.Steps {
		mark := "OK "
		if !s.OK {
			mark = "BAD"
			res.OK = false
		}
		say("\n[%s] %s — %s", mark, s.Domain, s.Setup)
		say("      expected %s, got %s", s.Expected, s.Outcome)
		for _, d := range s.Details {
			say("      %s", d)
		}
	}
	if len(res.Forecast) > 0 {
		say("\nenforce forecast for rollout.demo (`stsrelay policy forecast`):\n      %s", res.Forecast[0].Verdict)
	}
	for _, s := range res.Steps {
		if len(s.Report) == 0 {
			continue
		}
		var buf bytes.Buffer
		_ = json.Indent(&buf, s.Report, "      ", "  ")
		say("\nTLS-RPT report received for %s:\n      %s", s.policyDomain(), buf.String())
	}
	say("\ndelivery log lines:")
	for _, l := range logf.rawLines(func(m map[string]any) bool { return m["msg"] == "delivery" }) {
		res.LogLines = append(res.LogLines, l)
		say("%s", l)
	}
	if res.LogLines == nil {
		res.LogLines = []string{}
	}
}

// judgeDemoStep decides what happened to a step's message.
func judgeDemoStep(s *demoStep, dw *demoWorld, cfg *config.Config) {
	if s.QueueID == "" {
		return
	}
	l := s.Delivery
	if l == nil {
		s.Outcome = "no-delivery-attempt"
		s.Details = append(s.Details, "no delivery log line within the time allowed")
		return
	}
	str := func(k string) string { v, _ := l[k].(string); return v }
	verified, _ := l["tls_verified"].(bool)
	result, mode, tlsv, rr := str("result"), str("sts_mode"), str("tls"), str("tlsrpt_result")
	received := 0
	if mx := dw.mx["mx."+s.Domain]; mx != nil {
		received = len(mx.Messages())
	}
	switch {
	case result == "delivered" && verified && mode == "enforce" && rr == "":
		s.Outcome = "delivered-verified-tls"
		s.Details = append(s.Details, fmt.Sprintf("delivered to %s over %s, certificate verified, under enforce", str("mx"), tlsv))
	case result == "deferred" && mode == "enforce":
		s.Outcome = "refused"
		s.Details = append(s.Details, fmt.Sprintf("refused under enforce, deferred with %s %s (TLS-RPT result %s): %s", jsonNum(l["code"]), str("enhanced_code"), rr, str("reason")))
		if received == 0 {
			s.Details = append(s.Details, fmt.Sprintf("the impostor at %s was sent nothing (%d connection(s), 0 messages)", dw.impostor.IP(), dw.impostor.Connections()))
		} else {
			s.Outcome = "leaked-to-impostor"
		}
		if m, err := controlClient(cfg).QueueShow(context.Background(), s.QueueID); err != nil {
			s.Outcome = "not-in-queue"
			s.Details = append(s.Details, fmt.Sprintf("queue show %s: %v", s.QueueID, err))
		} else {
			r := m.Rcpts[0]
			s.Details = append(s.Details, fmt.Sprintf("still in the queue (`stsrelay queue show %s`): %s after %d attempt(s), next attempt %s; reason: %s",
				s.QueueID, r.Status, r.Attempts, r.NextAttempt.UTC().Format(time.RFC3339), r.LastError))
		}
	case result == "delivered" && mode == "testing" && rr != "":
		s.Outcome = "delivered-recorded-failure"
		s.Details = append(s.Details, fmt.Sprintf("delivered to %s over %s under testing; recorded as %s for TLS-RPT", str("mx"), tlsv, rr))
	case result == "delivered" && str("dane") == "authenticated" && rr == "":
		s.Outcome = "delivered-dane-authenticated"
		s.Details = append(s.Details, fmt.Sprintf("delivered to %s over %s, its certificate authenticated by the domain's TLSA record (DANE-EE), though the Web PKI would refuse it (tls_verified %v)",
			str("mx"), tlsv, verified))
	case result == "delivered" && mode == "":
		s.Outcome = "delivered-opportunistic"
		v := "not verified, which no policy asks for"
		if verified {
			v = "verified"
		}
		s.Details = append(s.Details, fmt.Sprintf("delivered to %s over %s (certificate %s), without a policy", str("mx"), orNone(tlsv), v))
	default:
		s.Outcome = fmt.Sprintf("%s(sts_mode=%q tls_verified=%v tlsrpt_result=%q)", result, mode, verified, rr)
	}
	s.OK = s.Outcome == s.Expected
	if s.OK && s.Outcome != "refused" && received != 1 {
		s.OK = false
		s.Details = append(s.Details, fmt.Sprintf("the MX holds %d message(s), want 1", received))
	}
}

func orNone(s string) string {
	if s == "" {
		return "plaintext"
	}
	return s
}

func jsonNum(v any) string {
	if f, ok := v.(float64); ok {
		return fmt.Sprint(int(f))
	}
	return fmt.Sprint(v)
}

// reportAgrees checks a domain's TLS-RPT report against the outcome:
// a success for good.demo and plain.demo, a success under policy-type
// tlsa for dane.demo, a failure for the others.
func reportAgrees(s *demoStep, js json.RawMessage) bool {
	var r struct {
		Policies []struct {
			Policy struct {
				PolicyType string `json:"policy-type"`
			} `json:"policy"`
			Summary struct {
				Success int `json:"total-successful-session-count"`
				Failure int `json:"total-failure-session-count"`
			} `json:"summary"`
		} `json:"policies"`
	}
	if json.Unmarshal(js, &r) != nil || len(r.Policies) == 0 {
		return false
	}
	var succ, fail int
	for _, p := range r.Policies {
		succ += p.Summary.Success
		fail += p.Summary.Failure
	}
	switch s.Domain {
	case "good.demo", "plain.demo":
		return succ > 0 && fail == 0
	case "dane.demo":
		return succ > 0 && fail == 0 && r.Policies[0].Policy.PolicyType == "tlsa"
	default:
		return fail > 0
	}
}

// decodeReport gunzips a report and returns its policy domain and JSON.
func decodeReport(body []byte) (string, json.RawMessage, error) {
	zr, err := gzip.NewReader(bytes.NewReader(body))
	if err != nil {
		return "", nil, err
	}
	data, err := io.ReadAll(io.LimitReader(zr, 1<<20))
	if err != nil {
		return "", nil, err
	}
	var r struct {
		Policies []struct {
			Policy struct {
				PolicyDomain string `json:"policy-domain"`
			} `json:"policy"`
		} `json:"policies"`
	}
	if err := json.Unmarshal(data, &r); err != nil || len(r.Policies) == 0 {
		return "", nil, fmt.Errorf("not a report")
	}
	return r.Policies[0].Policy.PolicyDomain, json.RawMessage(data), nil
}

// demoSubmit sends one message over STARTTLS with AUTH PLAIN and returns
// its queue ID.
func demoSubmit(addr string, tlsCfg *tls.Config, password, rcpt, domain string) (string, error) {
	c, err := smtp.DialStartTLS(addr, tlsCfg)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if err := c.Hello("app.sender.demo"); err != nil {
		return "", err
	}
	if err := c.Auth(sasl.NewPlainClient("", demoUser, password)); err != nil {
		return "", err
	}
	if err := c.Mail(demoSender, nil); err != nil {
		return "", err
	}
	if err := c.Rcpt(rcpt, nil); err != nil {
		return "", err
	}
	msg := fmt.Sprintf("From: <%s>\r\nTo: <%s>\r\nSubject: stsrelay demo to %s\r\nMessage-ID: <demo.%s@sender.demo>\r\n\r\nHello from the stsrelay demo.\r\n",
		demoSender, rcpt, domain, domain)
	id, err := dataQueued(c, strings.NewReader(msg))
	if err != nil {
		return "", err
	}
	_ = c.Quit()
	return id, nil
}

// dataQueued sends body with DATA and returns the queue ID of the
// relay's "250 2.0.0 OK queued as ID" reply.
func dataQueued(c *smtp.Client, body io.Reader) (string, error) {
	w, err := c.Data()
	if err != nil {
		return "", err
	}
	if _, err := io.Copy(w, body); err != nil {
		return "", err
	}
	resp, err := w.CloseWithResponse()
	if err != nil {
		return "", err
	}
	const prefix = "2.0.0 OK queued as "
	if !strings.HasPrefix(resp.StatusText, prefix) {
		return "", fmt.Errorf("unexpected 250 text %q", resp.StatusText)
	}
	return strings.TrimPrefix(resp.StatusText, prefix), nil
}

// logFollower reads the relay's JSON log file as it grows.
type logFollower struct {
	path string
	off  int64
	raw  []string
	objs []map[string]any
	part []byte
}

func (f *logFollower) poll() {
	fh, err := os.Open(f.path)
	if err != nil {
		return
	}
	defer fh.Close()
	if _, err := fh.Seek(f.off, io.SeekStart); err != nil {
		return
	}
	data, _ := io.ReadAll(fh)
	f.off += int64(len(data))
	data = append(f.part, data...)
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	consumed := 0
	for sc.Scan() {
		line := sc.Bytes()
		if consumed+len(line) >= len(data) || data[consumed+len(line)] != '\n' {
			break // a partial last line: keep it for the next poll
		}
		consumed += len(line) + 1
		var m map[string]any
		if json.Unmarshal(line, &m) == nil {
			f.raw = append(f.raw, string(line))
			f.objs = append(f.objs, m)
		}
	}
	f.part = append([]byte(nil), data[consumed:]...)
}

// wait polls until a line matches, the relay stops, or d passes.
func (f *logFollower) wait(d time.Duration, served <-chan struct{}, match func(map[string]any) bool) (map[string]any, error) {
	end := time.Now().Add(d)
	for {
		f.poll()
		for _, m := range f.objs {
			if match(m) {
				return m, nil
			}
		}
		select {
		case <-served:
			return nil, errors.New("relay stopped")
		default:
		}
		if time.Now().After(end) {
			return nil, errors.New("timed out")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (f *logFollower) rawLines(match func(map[string]any) bool) []string {
	f.poll()
	var out []string
	for i, m := range f.objs {
		if match(m) {
			out = append(out, f.raw[i])
		}
	}
	return out
}

func (f *logFollower) text() string {
	f.poll()
	return strings.Join(f.raw, "\n")
}
