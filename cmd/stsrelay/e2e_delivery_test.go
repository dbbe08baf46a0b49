package main

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/testworld"
	"github.com/stsrelay/stsrelay/queue"
)

// A message submitted over STARTTLS+AUTH reaches the MX byte-exact (dot-
// stuffed lines, 8-bit bytes), over verified TLS with SNI = MX name, and
// the delivery log line carries the contract's fields.
func TestE2EDeliveryByteExact(t *testing.T) {
	w := testworld.New(t)
	mx := simpleDomain(w, "ex.test")
	r := startRelay(t, testConfig(t, w))

	body := []byte("From: <s@client.test>\r\nTo: <u@ex.test>\r\nSubject: bytes\r\n\r\n" +
		".leading dot\r\n..two dots\r\n.\r\nnot the end\r\n" +
		"8-bit: \xc3\xa9t\xc3\xa9 \xff\xfe\r\n")
	id := r.mustSubmit("s@client.test", []string{"u@ex.test"}, body)
	got := mx.WaitMessages(t, 1, 15*time.Second)
	if !bytes.Equal(afterReceived(t, got[0].Data), body) {
		t.Fatalf("delivered body differs:\n got %q\nwant %q", afterReceived(t, got[0].Data), body)
	}
	if got[0].SNI != "mx1.ex.test" || !got[0].TLS {
		t.Errorf("TLS %v SNI %q, want TLS with SNI mx1.ex.test", got[0].TLS, got[0].SNI)
	}
	if got[0].Helo != "relay.stsrelay.test" {
		t.Errorf("EHLO name %q", got[0].Helo)
	}
	l := r.waitResult("u@ex.test", "delivered", 10*time.Second)
	for k, want := range map[string]any{"queue_id": id, "from": "s@client.test", "domain": "ex.test",
		"mx": "mx1.ex.test", "ip": mx.IP(), "attempt": float64(1), "code": float64(250),
		"tls_verified": true, "sts_mode": "", "tlsrpt_result": ""} {
		if l[k] != want {
			t.Errorf("delivery log %s = %v, want %v", k, l[k], want)
		}
	}
	for _, k := range []string{"enhanced_code", "reason", "tls", "sts_policy_id"} {
		if _, ok := l[k]; !ok {
			t.Errorf("delivery log lacks %s", k)
		}
	}
	if !strings.HasPrefix(l["tls"].(string), "TLS1.") {
		t.Errorf("tls = %v", l["tls"])
	}
}

// ---- helpers ----

// waitLogAt waits for a delivery line for rcpt with the given attempt
// number.
func (r *relayProc) waitAttempt(rcpt string, attempt int, timeout time.Duration) map[string]any {
	r.t.Helper()
	return r.waitLog("delivery", 1, timeout, func(l map[string]any) bool {
		return l["rcpt"] == rcpt && l["attempt"] == float64(attempt)
	})[0]
}

// logTime is the ts of a log line.
func logTime(t testing.TB, l map[string]any) time.Time {
	t.Helper()
	s, _ := l["ts"].(string)
	ts, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		t.Fatalf("log ts %q: %v", s, err)
	}
	return ts
}

// messageIDs counts the delivered messages by Message-ID header.
func messageIDs(t testing.TB, msgs []testworld.Received) map[string]int {
	t.Helper()
	n := map[string]int{}
	for _, m := range msgs {
		n[headerValue(t, m.Data, "Message-ID")]++
	}
	return n
}

// countVerbs counts the MX's logged commands by verb.
func countVerbs(cmds []testworld.Command) map[string]int {
	n := map[string]int{}
	for _, c := range cmds {
		n[c.Verb]++
	}
	return n
}

// cmdSniffer is a TCP proxy in front of a plaintext MX that records the
// command lines each client connection sent (message data excluded), so
// a test can see commands the MX does not log (RSET).
type cmdSniffer struct {
	mu    sync.Mutex
	conns [][]string
}

// sniff starts a proxy on a fresh address of w at the MX port, forwarding
// to mx, and returns its IP and the recorder.
func sniff(t *testing.T, w *testworld.World, mx *testworld.MXServer) (string, *cmdSniffer) {
	t.Helper()
	ip := w.NextIP()
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(w.MXPort())))
	if err != nil {
		t.Fatal(err)
	}
	s := &cmdSniffer{}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", mx.Addr())
			if err != nil {
				c.Close()
				continue
			}
			s.mu.Lock()
			s.conns = append(s.conns, nil)
			k := len(s.conns) - 1
			s.mu.Unlock()
			wg.Add(2)
			go func() { defer wg.Done(); io.Copy(c, up); c.Close() }()
			go func() {
				defer wg.Done()
				defer up.Close()
				br := bufio.NewReader(c)
				inData := false
				for {
					line, err := br.ReadString('\n')
					if len(line) > 0 {
						if _, werr := io.WriteString(up, line); werr != nil {
							return
						}
						cmd := strings.TrimRight(line, "\r\n")
						switch {
						case inData:
							inData = cmd != "."
						default:
							verb, _, _ := strings.Cut(strings.ToUpper(cmd), " ")
							inData = verb == "DATA"
							s.mu.Lock()
							s.conns[k] = append(s.conns[k], verb)
							s.mu.Unlock()
						}
					}
					if err != nil {
						return
					}
				}
			}()
		}
	}()
	return ip, s
}

func (s *cmdSniffer) connections() [][]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([][]string, len(s.conns))
	for i, c := range s.conns {
		out[i] = append([]string(nil), c...)
	}
	return out
}

// ---- tests ----

// A 10 MiB message (dot-stuffed lines included) arrives byte-exact.
func TestE2EDeliveryLargeMessage(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := simpleDomain(w, "ex.test")
	r := startRelay(t, testConfig(t, w))

	var b bytes.Buffer
	b.WriteString("From: <s@client.test>\r\nTo: <u@ex.test>\r\nSubject: large\r\nMessage-ID: <large@client.test>\r\n\r\n")
	for i := 0; b.Len() < 10<<20; i++ {
		if i%1000 == 0 {
			b.WriteString(".dot-stuffed line\r\n")
		}
		fmt.Fprintf(&b, "line %08d abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789\r\n", i)
	}
	body := b.Bytes()
	r.mustSubmit("s@client.test", []string{"u@ex.test"}, body)
	got := mx.WaitMessages(t, 1, 30*time.Second)
	if d := afterReceived(t, got[0].Data); !bytes.Equal(d, body) {
		t.Fatalf("10 MiB message differs: got %d bytes, want %d", len(d), len(body))
	}
	r.waitResult("u@ex.test", "delivered", 10*time.Second)
}

// RFC 5321 §5.1 (SMTP-5.1-h): the primary MX answers 421 at the greeting,
// the secondary takes the message in the same attempt.
func TestE2EDeliverySecondaryMXSameAttempt(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	primary := w.NewMX(testworld.MXOptions{Hostname: "mx1.ex.test", Cert: w.CA.Issue(testworld.CertValid, "mx1.ex.test"),
		Script: func(c testworld.Command) *testworld.Reply {
			if c.Verb == "CONNECT" {
				return &testworld.Reply{Code: 421, Enhanced: "4.3.2", Text: "too busy", Close: true}
			}
			return nil
		}})
	secondary := w.NewMX(testworld.MXOptions{Hostname: "mx2.ex.test", Cert: w.CA.Issue(testworld.CertValid, "mx2.ex.test")})
	w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"}, testworld.MX{Pref: 20, Host: "mx2.ex.test"})
	w.DNS.SetA("mx1.ex.test", primary.IP())
	w.DNS.SetA("mx2.ex.test", secondary.IP())
	r := startRelay(t, testConfig(t, w))

	r.mustSubmit("s@client.test", []string{"u@ex.test"}, simpleMessage("secondary"))
	l := r.waitResult("u@ex.test", "delivered", 15*time.Second)
	if l["attempt"] != float64(1) || l["mx"] != "mx2.ex.test" || l["ip"] != secondary.IP() {
		t.Errorf("delivered at attempt %v via %v (%v), want attempt 1 via mx2.ex.test (%s)", l["attempt"], l["mx"], l["ip"], secondary.IP())
	}
	if n := len(r.deliveries("u@ex.test")); n != 1 {
		t.Errorf("%d delivery lines, want 1 (no deferral in between)", n)
	}
	if len(secondary.WaitMessages(t, 1, 5*time.Second)) != 1 {
		t.Errorf("secondary did not get the message once")
	}
	v := countVerbs(primary.Commands())
	if v["CONNECT"] < 1 || v["MAIL"] != 0 {
		t.Errorf("primary: %v, want a connection and no MAIL", v)
	}
}

// SMTP-rcpt, DSN-a: one recipient refused with 550 is bounced while the
// other is delivered; the DSN goes to the sender from <>, is a
// multipart/report of type delivery-status that names the bounced
// recipient only, and returns the original header.
func TestE2EDeliveryPartialBounceDSN(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := scriptedDomain(w, "ex.test", func(c testworld.Command) *testworld.Reply {
		if c.Verb == "RCPT" && c.Arg == "bad@ex.test" {
			return &testworld.Reply{Code: 550, Enhanced: "5.1.1", Text: "no such user"}
		}
		return nil
	})
	mb := w.Mailbox("client.test")
	r := startRelay(t, testConfig(t, w))

	body := []byte("From: <s@client.test>\r\nTo: <ok@ex.test>, <bad@ex.test>\r\nSubject: partial bounce\r\nMessage-ID: <partial@client.test>\r\n\r\nHello.\r\n")
	id := r.mustSubmit("s@client.test", []string{"ok@ex.test", "bad@ex.test"}, body)
	r.waitResult("ok@ex.test", "delivered", 15*time.Second)
	l := r.waitResult("bad@ex.test", "bounced", 15*time.Second)
	if l["code"] != float64(550) || l["enhanced_code"] != "5.1.1" || l["attempt"] != float64(1) {
		t.Errorf("bounce log line %v", l)
	}
	got := mx.WaitMessages(t, 1, 5*time.Second)
	if len(got[0].Rcpts) != 1 || got[0].Rcpts[0] != "ok@ex.test" {
		t.Errorf("MX accepted recipients %v", got[0].Rcpts)
	}

	d := waitDSN(t, mb, 1, 15*time.Second)
	if rc := mb.Messages()[0].Rcpts; len(rc) != 1 || rc[0] != "s@client.test" {
		t.Errorf("DSN sent to %v, want s@client.test", rc)
	}
	if len(d.Rcpts) != 1 {
		t.Fatalf("DSN has %d recipient blocks, want 1: %v", len(d.Rcpts), d.Rcpts)
	}
	h, ok := d.rcpt("bad@ex.test")
	if !ok {
		t.Fatalf("DSN does not name bad@ex.test: %v", d.Rcpts)
	}
	if _, ok := d.rcpt("ok@ex.test"); ok {
		t.Errorf("DSN names the delivered recipient")
	}
	for k, want := range map[string]string{"Action": "failed", "Status": "5.1.1", "Remote-MTA": "dns; mx1.ex.test"} {
		if got := h.Get(k); got != want {
			t.Errorf("DSN %s = %q, want %q", k, got, want)
		}
	}
	if dc := h.Get("Diagnostic-Code"); !strings.HasPrefix(dc, "smtp;") || !strings.Contains(dc, "550") {
		t.Errorf("DSN Diagnostic-Code %q", dc)
	}
	if !strings.Contains(d.PerMessage.Get("Reporting-MTA"), "relay.stsrelay.test") {
		t.Errorf("Reporting-MTA %q", d.PerMessage.Get("Reporting-MTA"))
	}
	if !strings.Contains(string(d.Returned), "Subject: partial bounce") || !strings.Contains(string(d.Returned), "Message-ID: <partial@client.test>") {
		t.Errorf("DSN does not carry the original headers (%s):\n%s", d.ReturnedType, d.Returned)
	}
	if strings.Contains(string(d.Returned), "Hello.") && d.ReturnedType == "text/rfc822-headers" {
		t.Errorf("headers-only part carries the body")
	}
	if d.Header.Get("Auto-Submitted") == "" || !strings.Contains(string(mb.Messages()[0].Data), id) {
		t.Errorf("DSN lacks Auto-Submitted or the queue ID %s", id)
	}
}

// SMTP-5.1-c: SERVFAIL on the MX lookup defers; once DNS answers, a retry
// delivers.
func TestE2EDeliveryServFailDefers(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := simpleDomain(w, "ex.test")
	w.DNS.SetServFail("ex.test", dns.TypeMX, true)
	r := startRelay(t, testConfig(t, w))

	r.mustSubmit("s@client.test", []string{"u@ex.test"}, simpleMessage("servfail"))
	l := r.waitResult("u@ex.test", "deferred", 15*time.Second)
	if l["attempt"] != float64(1) || !strings.HasPrefix(l["enhanced_code"].(string), "4.") {
		t.Errorf("deferred line %v", l)
	}
	r.waitAttempt("u@ex.test", 2, 10*time.Second)
	if n := len(r.logs("delivery", func(l map[string]any) bool { return l["result"] != "deferred" })); n != 0 {
		t.Fatalf("%d non-deferred results while DNS fails", n)
	}
	if mx.Connections() != 0 {
		t.Errorf("MX contacted while its MX lookup fails")
	}
	w.DNS.SetServFail("ex.test", dns.TypeMX, false)
	l = r.waitResult("u@ex.test", "delivered", 15*time.Second)
	if l["attempt"].(float64) < 2 {
		t.Errorf("delivered at attempt %v", l["attempt"])
	}
	mx.WaitMessages(t, 1, 5*time.Second)
}

// NULLMX-3-a: a null MX bounces at once with 5.1.10 and no connection to
// anything (not even the domain's own A record); the DSN says 5.1.10.
func TestE2EDeliveryNullMX(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	trap := w.NewMX(testworld.MXOptions{Hostname: "ex.test"})
	w.DNS.SetNullMX("ex.test")
	w.DNS.SetA("ex.test", trap.IP())
	mb := w.Mailbox("client.test")
	r := startRelay(t, testConfig(t, w))

	r.mustSubmit("s@client.test", []string{"u@ex.test"}, simpleMessage("nullmx"))
	l := r.waitResult("u@ex.test", "bounced", 15*time.Second)
	if l["attempt"] != float64(1) || l["enhanced_code"] != "5.1.10" || l["mx"] != "" || l["ip"] != "" {
		t.Errorf("bounce line %v, want attempt 1, 5.1.10, no mx", l)
	}
	d := waitDSN(t, mb, 1, 15*time.Second)
	h, ok := d.rcpt("u@ex.test")
	if !ok || h.Get("Status") != "5.1.10" || h.Get("Action") != "failed" {
		t.Errorf("DSN recipient blocks %v, want u@ex.test failed 5.1.10", d.Rcpts)
	}
	if n := trap.Connections(); n != 0 {
		t.Errorf("the null-MX domain's A host got %d connection(s)", n)
	}
	if n := len(r.deliveries("u@ex.test")); n != 1 {
		t.Errorf("%d attempts, want 1", n)
	}
}

// SMTP-5.1-d: a domain with only an A record is its own MX.
func TestE2EDeliveryImplicitMX(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := w.NewMX(testworld.MXOptions{Hostname: "ex.test", Cert: w.CA.Issue(testworld.CertValid, "ex.test")})
	w.DNS.SetA("ex.test", mx.IP())
	r := startRelay(t, testConfig(t, w))

	body := simpleMessage("implicit")
	r.mustSubmit("s@client.test", []string{"u@ex.test"}, body)
	got := mx.WaitMessages(t, 1, 15*time.Second)
	if !bytes.Equal(afterReceived(t, got[0].Data), body) {
		t.Errorf("body differs")
	}
	l := r.waitResult("u@ex.test", "delivered", 10*time.Second)
	if l["mx"] != "ex.test" || l["ip"] != mx.IP() || l["tls_verified"] != true {
		t.Errorf("delivery line %v, want mx ex.test, verified TLS", l)
	}
	if got[0].SNI != "ex.test" {
		t.Errorf("SNI %q, want ex.test", got[0].SNI)
	}
}

// SMTP-5.1-e: with an MX record present, the domain's own A record is
// never used, even when the MX is dead.
func TestE2EDeliveryDeadMXNoAFallback(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	trap := w.NewMX(testworld.MXOptions{Hostname: "ex.test"})
	w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
	w.DNS.SetA("mx1.ex.test", w.NextIP()) // nothing listens there
	w.DNS.SetA("ex.test", trap.IP())
	r := startRelay(t, testConfig(t, w))

	r.mustSubmit("s@client.test", []string{"u@ex.test"}, simpleMessage("deadmx"))
	l := r.waitResult("u@ex.test", "deferred", 15*time.Second)
	if l["mx"] != "mx1.ex.test" {
		t.Errorf("deferred line %v, want mx mx1.ex.test", l)
	}
	r.waitAttempt("u@ex.test", 2, 10*time.Second)
	if n := trap.Connections(); n != 0 {
		t.Errorf("the domain's A host got %d connection(s)", n)
	}
	for _, l := range r.deliveries("u@ex.test") {
		if l["result"] != "deferred" || l["ip"] == trap.IP() {
			t.Errorf("line %v", l)
		}
	}
}

// SMTP-5.1-b: a recipient domain that does not exist bounces at once.
func TestE2EDeliveryNXDomainBounces(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mb := w.Mailbox("client.test")
	r := startRelay(t, testConfig(t, w))

	r.mustSubmit("s@client.test", []string{"u@nx.test"}, simpleMessage("nxdomain"))
	l := r.waitResult("u@nx.test", "bounced", 15*time.Second)
	if l["attempt"] != float64(1) || !strings.HasPrefix(l["enhanced_code"].(string), "5.") {
		t.Errorf("bounce line %v", l)
	}
	d := waitDSN(t, mb, 1, 15*time.Second)
	if h, ok := d.rcpt("u@nx.test"); !ok || h.Get("Action") != "failed" || !strings.HasPrefix(h.Get("Status"), "5.") {
		t.Errorf("DSN %v", d.Rcpts)
	}
	time.Sleep(1200 * time.Millisecond)
	if n := len(r.deliveries("u@nx.test")); n != 1 {
		t.Errorf("%d attempts, want 1 (no retry of NXDOMAIN)", n)
	}
}

// SMTP-4.5.4.1-b: a message always deferred is bounced once
// max_queue_time has passed, not before, with a "failed" DSN.
func TestE2EDeliveryExpiryBounces(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	busyDomain(w, "ex.test")
	mb := w.Mailbox("client.test")
	cfg := testConfig(t, w)
	cfg.Queue.MaxQueueTime.Duration = 3 * time.Second
	r := startRelay(t, cfg)

	r.mustSubmit("s@client.test", []string{"u@ex.test"}, simpleMessage("expiry"))
	acc := r.waitLog("accepted", 1, 5*time.Second, nil)[0]
	l := r.waitResult("u@ex.test", "bounced", 20*time.Second)
	if el := logTime(t, l).Sub(logTime(t, acc)); el < 2900*time.Millisecond {
		t.Errorf("bounced %v after acceptance, before max_queue_time 3s", el)
	}
	if n := len(r.logs("delivery", func(l map[string]any) bool { return l["rcpt"] == "u@ex.test" && l["result"] == "deferred" })); n < 2 {
		t.Errorf("%d deferred attempts before the bounce, want ≥2", n)
	}
	if !strings.HasPrefix(l["enhanced_code"].(string), "5.") {
		t.Errorf("bounce enhanced code %v", l["enhanced_code"])
	}
	d := waitDSN(t, mb, 1, 15*time.Second)
	h, ok := d.rcpt("u@ex.test")
	if !ok || h.Get("Action") != "failed" || !strings.HasPrefix(h.Get("Status"), "5.") {
		t.Errorf("DSN %v", d.Rcpts)
	}
	waitQueueEmpty(t, r, 10*time.Second)
}

// A "delayed" DSN goes out once after delay_notice_after, and not again
// on later deferrals.
func TestE2EDeliveryDelayedDSNOnce(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	busyDomain(w, "ex.test")
	mb := w.Mailbox("client.test")
	cfg := testConfig(t, w)
	cfg.Queue.DelayNoticeAfter.Duration = 2 * time.Second
	r := startRelay(t, cfg)

	id := r.mustSubmit("s@client.test", []string{"u@ex.test"}, simpleMessage("delayed"))
	d := waitDSN(t, mb, 1, 15*time.Second)
	h, ok := d.rcpt("u@ex.test")
	if !ok || h.Get("Action") != "delayed" || !strings.HasPrefix(h.Get("Status"), "4.") || h.Get("Will-Retry-Until") == "" {
		t.Errorf("delayed DSN %v", d.Rcpts)
	}
	first := len(r.deliveries("u@ex.test"))
	r.waitAttempt("u@ex.test", first+3, 15*time.Second)
	if n := len(mb.Messages()); n != 1 {
		t.Errorf("sender got %d DSNs, want exactly one delayed DSN", n)
	}
	if n := len(r.logs("dsn", func(l map[string]any) bool { return l["queue_id"] == id })); n != 1 {
		t.Errorf("%d dsn log lines, want 1", n)
	}
	if m := queueShow(t, r, id); !m.DelayNotified || m.Rcpts[0].Status != "deferred" {
		t.Errorf("queue show: delay_notified %v status %s", m.DelayNotified, m.Rcpts[0].Status)
	}
}

// Deferred messages survive a restart: they are retried on schedule
// after it and each is delivered exactly once.
func TestE2EDeliveryRestartWhileDeferred(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	var up atomic.Bool
	mx := scriptedDomain(w, "ex.test", func(c testworld.Command) *testworld.Reply {
		if up.Load() {
			return nil
		}
		return tempFail(c)
	})
	r := startRelay(t, testConfig(t, w))

	const n = 5
	var ids []string
	for i := range n {
		ids = append(ids, r.mustSubmit("s@client.test", []string{fmt.Sprintf("u%d@ex.test", i)}, simpleMessage(fmt.Sprintf("restart-%d", i))))
	}
	for _, id := range ids {
		waitQueued(t, r, id, 15*time.Second)
	}
	r.restart()
	if got := len(queueList(t, r)); got != n {
		t.Fatalf("after restart the queue holds %d messages, want %d", got, n)
	}
	up.Store(true)
	for i := range n {
		l := r.waitResult(fmt.Sprintf("u%d@ex.test", i), "delivered", 20*time.Second)
		if l["attempt"].(float64) < 2 || l["queue_id"] != ids[i] {
			t.Errorf("delivered line %v: want attempt ≥2 (state kept) and queue_id %s", l, ids[i])
		}
	}
	waitQueueEmpty(t, r, 10*time.Second)
	time.Sleep(1500 * time.Millisecond)
	counts := messageIDs(t, mx.Messages())
	for i := range n {
		if c := counts[fmt.Sprintf("<restart-%d@client.test>", i)]; c != 1 {
			t.Errorf("message %d delivered %d times", i, c)
		}
	}
	if len(counts) != n {
		t.Errorf("MX got %d distinct messages, want %d", len(counts), n)
	}
}

// Connection reuse: 20 messages to one domain take far fewer than 20
// connections (at most one per concurrent worker), with RSET between the
// messages of a connection.
func TestE2EDeliveryConnectionReuse(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := w.NewMX(testworld.MXOptions{Hostname: "mx1.ex.test"}) // plaintext, so the proxy reads commands
	proxyIP, sn := sniff(t, w, mx)
	w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
	w.DNS.SetA("mx1.ex.test", proxyIP)
	cfg := testConfig(t, w)
	cfg.Queue.PerDomainConcurrency = 4
	r := startRelay(t, cfg)

	const n = 20
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for k := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := k; i < n; i += 4 {
				if _, err := r.submit("s@client.test", []string{fmt.Sprintf("u%d@ex.test", i)}, simpleMessage(fmt.Sprintf("reuse-%d", i))); err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	got := mx.WaitMessages(t, n, 20*time.Second)
	if c := messageIDs(t, got); len(c) != n {
		t.Errorf("%d distinct messages delivered, want %d", len(c), n)
	}
	conns := mx.Connections()
	if conns >= n || conns > cfg.Queue.PerDomainConcurrency {
		t.Errorf("%d connections for %d messages, want at most per_domain_concurrency = %d", conns, n, cfg.Queue.PerDomainConcurrency)
	}
	// RFC 5321 §4.1.1.5: after a completed transaction the next MAIL
	// needs no RSET, and a reused session never says EHLO again.
	reused := false
	for i, c := range sn.connections() {
		mails, ehlos := 0, 0
		for _, v := range c {
			switch v {
			case "MAIL":
				mails++
			case "RSET":
				t.Errorf("connection %d: RSET after a completed transaction: %v", i, c)
			case "EHLO", "HELO":
				ehlos++
			}
		}
		if ehlos > 1 {
			t.Errorf("connection %d: %d EHLOs without STARTTLS: %v", i, ehlos, c)
		}
		reused = reused || mails > 1
	}
	if !reused {
		t.Errorf("no connection carried two messages: %v", sn.connections())
	}
	t.Logf("%d connections for %d messages", conns, n)
}

// SMTP-4.5.4.1-c: two recipients at one MX take one MAIL, two RCPTs and
// one DATA.
func TestE2EDeliveryOneTransactionPerMX(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := simpleDomain(w, "ex.test")
	r := startRelay(t, testConfig(t, w))

	r.mustSubmit("s@client.test", []string{"a@ex.test", "b@ex.test"}, simpleMessage("tworcpt"))
	r.waitResult("a@ex.test", "delivered", 15*time.Second)
	r.waitResult("b@ex.test", "delivered", 15*time.Second)
	got := mx.WaitMessages(t, 1, 5*time.Second)
	if len(got) != 1 || len(got[0].Rcpts) != 2 {
		t.Fatalf("MX got %d messages, first with recipients %v; want one with both", len(got), got[0].Rcpts)
	}
	v := countVerbs(mx.Commands())
	if v["MAIL"] != 1 || v["RCPT"] != 2 || v["DATA"] != 1 {
		t.Errorf("MX commands %v, want MAIL 1, RCPT 2, DATA 1", v)
	}
}

// SMTP-rcpt: RCPT replies are per recipient: 250 → delivered, 450 →
// deferred, 550 → bounced; the DSN names the bounced one only.
func TestE2EDeliveryPerRecipientReplies(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := scriptedDomain(w, "ex.test", func(c testworld.Command) *testworld.Reply {
		switch {
		case c.Verb == "RCPT" && c.Arg == "r2@ex.test":
			return &testworld.Reply{Code: 450, Enhanced: "4.2.1", Text: "mailbox busy"}
		case c.Verb == "RCPT" && c.Arg == "r3@ex.test":
			return &testworld.Reply{Code: 550, Enhanced: "5.1.1", Text: "no such user"}
		}
		return nil
	})
	mb := w.Mailbox("client.test")
	r := startRelay(t, testConfig(t, w))

	id := r.mustSubmit("s@client.test", []string{"r1@ex.test", "r2@ex.test", "r3@ex.test"}, simpleMessage("perrcpt"))
	r.waitResult("r1@ex.test", "delivered", 15*time.Second)
	if l := r.waitResult("r2@ex.test", "deferred", 15*time.Second); l["code"] != float64(450) {
		t.Errorf("r2 line %v", l)
	}
	r.waitResult("r3@ex.test", "bounced", 15*time.Second)
	d := waitDSN(t, mb, 1, 15*time.Second)
	if len(d.Rcpts) != 1 {
		t.Errorf("DSN names %d recipients, want 1: %v", len(d.Rcpts), d.Rcpts)
	}
	if h, ok := d.rcpt("r3@ex.test"); !ok || h.Get("Status") != "5.1.1" {
		t.Errorf("DSN %v, want r3@ex.test 5.1.1", d.Rcpts)
	}
	got := mx.WaitMessages(t, 1, 5*time.Second)
	if len(got[0].Rcpts) != 1 || got[0].Rcpts[0] != "r1@ex.test" {
		t.Errorf("MX accepted %v", got[0].Rcpts)
	}
	// r2 is retried alone; r1 and r3 are final.
	r.waitAttempt("r2@ex.test", 2, 10*time.Second)
	m := queueShow(t, r, id)
	st := map[string]queue.Status{}
	for _, rc := range m.Rcpts {
		st[rc.Addr] = rc.Status
	}
	if st["r1@ex.test"] != queue.Delivered || st["r2@ex.test"] != queue.Deferred || st["r3@ex.test"] != queue.Bounced {
		t.Errorf("recipient states %v", st)
	}
	if n := len(r.deliveries("r1@ex.test")); n != 1 {
		t.Errorf("r1 attempted %d times", n)
	}
	if n := len(mx.Messages()); n != 1 {
		t.Errorf("MX got %d messages, want 1", n)
	}
}

// SMTP-4.5.4-a: a message with the null reverse path that fails for good
// makes no DSN.
func TestE2EDeliveryNoBounceOfBounce(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	scriptedDomain(w, "ex.test", func(c testworld.Command) *testworld.Reply {
		if c.Verb == "RCPT" {
			return &testworld.Reply{Code: 550, Enhanced: "5.1.1", Text: "no such user"}
		}
		return nil
	})
	r := startRelay(t, testConfig(t, w))

	id := r.mustSubmit("", []string{"u@ex.test"}, simpleMessage("nullsender"))
	l := r.waitResult("u@ex.test", "bounced", 15*time.Second)
	if l["from"] != "" || l["queue_id"] != id {
		t.Errorf("bounce line %v", l)
	}
	waitQueueEmpty(t, r, 10*time.Second)
	time.Sleep(1200 * time.Millisecond)
	if n := len(r.logs("dsn", nil)); n != 0 {
		t.Errorf("%d dsn log lines for a message from <>", n)
	}
	if msgs := queueList(t, r); len(msgs) != 0 {
		t.Errorf("queue holds %d message(s)", len(msgs))
	}
	if n := len(r.logs("delivery", nil)); n != 1 {
		t.Errorf("%d delivery lines, want 1", n)
	}
}

// A message that needs SMTPUTF8 is bounced with 5.6.7 by an MX without
// it, before MAIL.
func TestE2EDeliverySMTPUTF8Unsupported(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := w.NewMX(testworld.MXOptions{Hostname: "mx1.ex.test", Cert: w.CA.Issue(testworld.CertValid, "mx1.ex.test"), NoSMTPUTF8: true})
	w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
	w.DNS.SetA("mx1.ex.test", mx.IP())
	mb := w.Mailbox("client.test")
	r := startRelay(t, testConfig(t, w))

	rcpt := "jörg@ex.test"
	if _, err := r.submit("s@client.test", []string{rcpt}, simpleMessage("utf8"), submitOpts{mail: &smtp.MailOptions{UTF8: true}}); err != nil {
		t.Fatal(err)
	}
	l := r.waitResult(rcpt, "bounced", 15*time.Second)
	if l["enhanced_code"] != "5.6.7" || l["attempt"] != float64(1) {
		t.Errorf("bounce line %v, want 5.6.7 at attempt 1", l)
	}
	d := waitDSN(t, mb, 1, 15*time.Second)
	if len(d.Rcpts) != 1 || d.Rcpts[0].Get("Status") != "5.6.7" {
		t.Errorf("DSN %v", d.Rcpts)
	}
	if v := countVerbs(mx.Commands()); v["MAIL"] != 0 {
		t.Errorf("MX got MAIL: %v", v)
	}
}

// An idle relay sleeps: under 0.1 s of CPU over 3 s.
func TestE2EIdleCPU(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	simpleDomain(w, "ex.test")
	r := startRelayProcess(t, testConfig(t, w))
	time.Sleep(time.Second)
	cpu := func() time.Duration {
		data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", r.cmd.Process.Pid))
		if err != nil {
			t.Fatalf("read /proc stat: %v", err)
		}
		s := string(data)
		f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
		ut, _ := strconv.ParseInt(f[11], 10, 64)            // field 14
		st, _ := strconv.ParseInt(f[12], 10, 64)            // field 15
		return time.Duration(ut+st) * 10 * time.Millisecond // USER_HZ = 100
	}
	before := cpu()
	time.Sleep(3 * time.Second)
	if used := cpu() - before; used >= 100*time.Millisecond {
		t.Errorf("idle relay used %v CPU in 3s", used)
	}
}

// A destination none of whose hosts answers is suspended for its first
// retry interval: the messages queued behind the failing one are deferred
// without a connection attempt each, and delivered once the MX is back.
func TestE2EDeliveryDeadDestinationSuspended(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	ip := w.NextIP() // nothing listens here: connection refused
	w.DNS.SetMX("down.test", testworld.MX{Pref: 10, Host: "mx1.down.test"})
	w.DNS.SetA("mx1.down.test", ip)
	cfg := testConfig(t, w)
	cfg.Queue.RetrySchedule = []config.Duration{{Duration: 3 * time.Second}}
	cfg.Queue.PerDomainConcurrency = 1
	r := startRelay(t, cfg)
	var rcpts []string
	for i := range 5 {
		rc := fmt.Sprintf("u%d@down.test", i)
		rcpts = append(rcpts, rc)
		r.mustSubmit("s@client.test", []string{rc}, simpleMessage(fmt.Sprintf("dead%d", i)))
	}
	for _, rc := range rcpts {
		r.waitResult(rc, "deferred", 15*time.Second)
	}
	suspended := r.logs("delivery", func(l map[string]any) bool {
		reason, _ := l["reason"].(string)
		return strings.Contains(reason, "temporarily suspended")
	})
	if len(suspended) == 0 {
		t.Fatalf("no delivery was deferred by the suspension; log:\n%s", tail(r.logText(), 30))
	}
	for _, l := range suspended {
		if l["ip"] != "" {
			t.Errorf("a suspended delivery names an address it tried: %v", l)
		}
	}
	// The MX comes up on that address: after the suspension the messages
	// are delivered.
	mx := w.NewMX(testworld.MXOptions{IP: ip, Hostname: "mx1.down.test", Cert: w.CA.Issue(testworld.CertValid, "mx1.down.test")})
	mx.WaitMessages(t, 5, 30*time.Second)
}
