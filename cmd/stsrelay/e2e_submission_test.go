package main

// End-to-end tests of submission and of the operator's queue tools: who
// may submit, what the 250 reply promises (a queue ID the CLI finds), and
// retry / delete / bounce on a deferred message.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/mail"
	"net/textproto"
	"os/exec"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/internal/testworld"
	"github.com/stsrelay/stsrelay/queue"
)

// ---- helpers shared by the submission, delivery and crash tests ----

// tempFail answers 451 to every RCPT: the relay keeps the message queued
// and retries.
func tempFail(c testworld.Command) *testworld.Reply {
	if c.Verb == "RCPT" {
		return &testworld.Reply{Code: 451, Enhanced: "4.3.0", Text: "try again later"}
	}
	return nil
}

// scriptedDomain sets up domain with one MX host mx1.<domain> (valid
// certificate) that replies as script says.
func scriptedDomain(w *testworld.World, domain string, script func(testworld.Command) *testworld.Reply) *testworld.MXServer {
	host := "mx1." + domain
	mx := w.NewMX(testworld.MXOptions{Hostname: host, Cert: w.CA.Issue(testworld.CertValid, host), Script: script})
	w.DNS.SetMX(domain, testworld.MX{Pref: 10, Host: host})
	w.DNS.SetA(host, mx.IP())
	return mx
}

// busyDomain is scriptedDomain with an MX that answers 451 to every RCPT.
func busyDomain(w *testworld.World, domain string) *testworld.MXServer {
	return scriptedDomain(w, domain, tempFail)
}

// queueList runs "queue list -json" and decodes it.
func queueList(t testing.TB, r *relayProc) []*queue.Message {
	t.Helper()
	out, code := r.cli("queue", "list", "-json")
	if code != 0 {
		t.Fatalf("queue list -json: exit %d: %s", code, out)
	}
	var msgs []*queue.Message
	if err := json.Unmarshal([]byte(out), &msgs); err != nil {
		t.Fatalf("queue list -json: %v in %q", err, out)
	}
	return msgs
}

// queueShow runs "queue show ID -json" and decodes it.
func queueShow(t testing.TB, r *relayProc, id string) *queue.Message {
	t.Helper()
	out, code := r.cli("queue", "show", id, "-json")
	if code != 0 {
		t.Fatalf("queue show %s -json: exit %d: %s", id, code, out)
	}
	var m queue.Message
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("queue show -json: %v in %q", err, out)
	}
	return &m
}

// waitQueued waits until "queue show" reports every recipient of id
// deferred after at least one attempt (the attempt's state is on disk).
func waitQueued(t testing.TB, r *relayProc, id string, timeout time.Duration) *queue.Message {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		m := queueShow(t, r, id)
		ok := true
		for _, rc := range m.Rcpts {
			if rc.Status != queue.Deferred || rc.Attempts < 1 {
				ok = false
			}
		}
		if ok {
			return m
		}
		if time.Now().After(deadline) {
			t.Fatalf("message %s not deferred after %v: %+v", id, timeout, m.Rcpts)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitQueueEmpty waits until the queue holds nothing.
func waitQueueEmpty(t testing.TB, r *relayProc, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		msgs := queueList(t, r)
		if len(msgs) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("queue not empty after %v: %d message(s), first %s %+v", timeout, len(msgs), msgs[0].ID, msgs[0].Rcpts)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// headerValue returns a header field of a message (the first one).
func headerValue(t testing.TB, data []byte, name string) string {
	t.Helper()
	m, err := mail.ReadMessage(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("parse message: %v\n%.500s", err, data)
	}
	return m.Header.Get(name)
}

// dsnReport is a parsed RFC 3464 delivery status notification.
type dsnReport struct {
	Header     mail.Header
	ReportType string
	PerMessage textproto.MIMEHeader
	Rcpts      []textproto.MIMEHeader
	// Returned is the third part (text/rfc822-headers or message/rfc822).
	Returned     []byte
	ReturnedType string
}

// parseDSN parses a DSN as delivered to the sender's mailbox; it fails
// the test unless it is a multipart/report; report-type=delivery-status
// with a message/delivery-status part.
func parseDSN(t testing.TB, data []byte) *dsnReport {
	t.Helper()
	m, err := mail.ReadMessage(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("DSN: %v\n%s", err, data)
	}
	mt, params, err := mime.ParseMediaType(m.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/report" {
		t.Fatalf("DSN Content-Type %q (%v), want multipart/report", m.Header.Get("Content-Type"), err)
	}
	d := &dsnReport{Header: m.Header, ReportType: params["report-type"]}
	if d.ReportType != "delivery-status" {
		t.Fatalf("DSN report-type %q, want delivery-status", d.ReportType)
	}
	mr := multipart.NewReader(m.Body, params["boundary"])
	seenStatus := false
	for i := 0; ; i++ {
		p, err := mr.NextRawPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("DSN part %d: %v", i, err)
		}
		body, _ := io.ReadAll(p)
		ct, _, _ := mime.ParseMediaType(p.Header.Get("Content-Type"))
		switch {
		case ct == "message/delivery-status":
			seenStatus = true
			blocks := strings.Split(strings.ReplaceAll(string(body), "\r\n", "\n"), "\n\n")
			for j, b := range blocks {
				if strings.TrimSpace(b) == "" {
					continue
				}
				h, err := textproto.NewReader(bufio.NewReader(strings.NewReader(b + "\n\n"))).ReadMIMEHeader()
				if err != nil {
					t.Fatalf("delivery-status block %d: %v\n%s", j, err, b)
				}
				if d.PerMessage == nil {
					d.PerMessage = h
				} else {
					d.Rcpts = append(d.Rcpts, h)
				}
			}
		case ct == "text/rfc822-headers" || ct == "message/rfc822":
			d.Returned, d.ReturnedType = body, ct
		}
	}
	if !seenStatus {
		t.Fatalf("DSN has no message/delivery-status part:\n%s", data)
	}
	if d.PerMessage.Get("Reporting-MTA") == "" {
		t.Errorf("DSN lacks Reporting-MTA")
	}
	return d
}

// rcptField returns field of the per-recipient block for addr, and
// whether there is one.
func (d *dsnReport) rcpt(addr string) (textproto.MIMEHeader, bool) {
	for _, h := range d.Rcpts {
		if strings.EqualFold(strings.TrimSpace(strings.TrimPrefix(strings.ReplaceAll(h.Get("Final-Recipient"), " ", ""), "rfc822;")), addr) {
			return h, true
		}
	}
	return nil, false
}

// waitDSN waits for the n-th message at mailbox and parses it as a DSN
// sent with the null reverse path.
func waitDSN(t testing.TB, mb *testworld.MXServer, n int, timeout time.Duration) *dsnReport {
	t.Helper()
	got := mb.WaitMessages(t, n, timeout)
	if got[n-1].From != "" {
		t.Errorf("DSN sent with MAIL FROM:<%s>, want <>", got[n-1].From)
	}
	return parseDSN(t, got[n-1].Data)
}

// smtpCode returns the reply code and enhanced code of a go-smtp error.
func smtpCode(err error) (int, string) {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return se.Code, fmt.Sprintf("%d.%d.%d", se.EnhancedCode[0], se.EnhancedCode[1], se.EnhancedCode[2])
	}
	return 0, ""
}

// ---- tests ----

// The queue ID in the 250 reply is the ID the operator's tools know the
// message by: "queue list -json" lists it and "queue show ID -json" shows
// its envelope and recipient state.
func TestE2ESubmitQueueIDInCLI(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	busyDomain(w, "ex.test")
	r := startRelay(t, testConfig(t, w))

	body := simpleMessage("listed")
	id := r.mustSubmit("s@client.test", []string{"u@ex.test"}, body)
	if !queue.ValidID(id) {
		t.Fatalf("queue ID %q is not of the documented form", id)
	}
	acc := r.waitLog("accepted", 1, 10*time.Second, nil)[0]
	if acc["queue_id"] != id || acc["user"] != testUser || acc["from"] != "s@client.test" {
		t.Errorf("accepted log line %v, want queue_id %s user %s", acc, id, testUser)
	}

	var found *queue.Message
	for _, m := range queueList(t, r) {
		if m.ID == id {
			found = m
		}
	}
	if found == nil {
		t.Fatalf("queue list -json does not list %s", id)
	}
	if found.Env.From != "s@client.test" || len(found.Rcpts) != 1 || found.Rcpts[0].Addr != "u@ex.test" {
		t.Errorf("listed envelope %+v recipients %+v", found.Env, found.Rcpts)
	}
	if found.Size < int64(len(body)) {
		t.Errorf("listed size %d < body %d", found.Size, len(body))
	}
	r.waitResult("u@ex.test", "deferred", 10*time.Second)
	m := waitQueued(t, r, id, 10*time.Second)
	if m.ID != id || m.Env.User != testUser || m.Rcpts[0].LastCode != 451 {
		t.Errorf("queue show: id %s user %q last code %d, want %s %q 451", m.ID, m.Env.User, m.Rcpts[0].LastCode, id, testUser)
	}
	// The human form names it too.
	out, code := r.cli("queue", "list")
	if code != 0 || !strings.Contains(out, id) {
		t.Errorf("queue list (text) exit %d, lacks %s:\n%s", code, id, out)
	}
}

// The same with swaks, a client outside Go: its transcript shows the 250
// reply's queue ID, and the queue lists it.
func TestE2ESubmitSwaks(t *testing.T) {
	t.Parallel()
	swaks, err := exec.LookPath("swaks")
	if err != nil {
		t.Skip("swaks not installed")
	}
	w := testworld.New(t)
	busyDomain(w, "ex.test")
	r := startRelay(t, testConfig(t, w))

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, swaks, "--server", r.addr, "--tls",
		"--auth", "PLAIN", "--auth-user", testUser, "--auth-password", testPassword,
		"--helo", "client.test", "--from", "s@client.test", "--to", "u@ex.test",
		"--header", "Subject: swaks e2e", "--body", "Sent by swaks.")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("swaks: %v\n%s", err, out)
	}
	mt := regexp.MustCompile(`250 2\.0\.0 OK queued as ([0-9a-v]{14})`).FindSubmatch(out)
	if mt == nil {
		t.Fatalf("no \"queued as ID\" in swaks transcript:\n%s", out)
	}
	id := string(mt[1])
	if !bytes.Contains(out, []byte("STARTTLS")) {
		t.Errorf("swaks transcript shows no STARTTLS:\n%s", out)
	}
	listed := false
	for _, m := range queueList(t, r) {
		listed = listed || m.ID == id
	}
	if !listed {
		t.Fatalf("queue list -json does not list swaks's message %s", id)
	}
	if m := queueShow(t, r, id); m.Env.From != "s@client.test" || m.Rcpts[0].Addr != "u@ex.test" {
		t.Errorf("queue show %s: %+v", id, m.Env)
	}
}

// A client that neither authenticated nor connects from a trusted network
// gets 530 5.7.0 at MAIL, with or without TLS; a wrong password gets 535
// and MAIL is still refused. Nothing is queued and the MX hears nothing.
func TestE2ESubmitUnauthenticatedRefused(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := simpleDomain(w, "ex.test")
	r := startRelay(t, testConfig(t, w))

	for _, o := range []submitOpts{{noAuth: true}, {noAuth: true, noTLS: true}} {
		_, err := r.submit("s@client.test", []string{"u@ex.test"}, simpleMessage("noauth"), o)
		if code, enh := smtpCode(err); code != 530 || enh != "5.7.0" {
			t.Errorf("unauthenticated MAIL (TLS %v): %v, want 530 5.7.0", !o.noTLS, err)
		}
	}

	// Wrong password: 535, and the session cannot go on to relay.
	c, err := smtp.DialStartTLS(r.addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.Auth(sasl.NewPlainClient("", testUser, "wrong-secret"))
	if code, _ := smtpCode(err); code != 535 {
		t.Errorf("AUTH with a wrong password: %v, want 535", err)
	}
	err = c.Mail("s@client.test", nil)
	if code, enh := smtpCode(err); code != 530 || enh != "5.7.0" {
		t.Errorf("MAIL after a failed AUTH: %v, want 530 5.7.0", err)
	}
	if err == nil {
		if err := c.Rcpt("u@ex.test", nil); err == nil {
			if wc, err := c.Data(); err == nil {
				wc.Write(simpleMessage("sneaky"))
				wc.Close()
			}
		}
	}
	c.Close()
	// Unknown user: 535 as well.
	_, err = r.submit("s@client.test", []string{"u@ex.test"}, simpleMessage("nouser"), submitOpts{password: "x"})
	if code, _ := smtpCode(err); code != 535 {
		t.Errorf("AUTH with a wrong password via submit: %v, want 535", err)
	}

	// Give a delivery (retry every second) every chance to happen.
	time.Sleep(1500 * time.Millisecond)
	if msgs := queueList(t, r); len(msgs) != 0 {
		t.Errorf("queue holds %d message(s) from unauthenticated clients", len(msgs))
	}
	if n := len(r.logs("accepted", nil)); n != 0 {
		t.Errorf("%d accepted log lines", n)
	}
	if n := mx.Connections(); n != 0 {
		t.Errorf("MX got %d connection(s), want none", n)
	}
	if n := len(mx.Messages()); n != 0 {
		t.Errorf("MX received %d message(s)", n)
	}
	if n := len(r.logs("mail rejected", nil)); n < 3 {
		t.Errorf("%d \"mail rejected\" log lines, want at least 3", n)
	}
}

// trusted_networks: a client on 127.0.0.0/8 relays without AUTH (over
// STARTTLS and in plaintext), and the message is delivered.
func TestE2ESubmitTrustedNetwork(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := simpleDomain(w, "ex.test")
	cfg := testConfig(t, w)
	cfg.Submission.TrustedNetworks = []string{"127.0.0.0/8"}
	r := startRelay(t, cfg)

	b1, b2 := simpleMessage("trusted-tls"), simpleMessage("trusted-plain")
	id1, err := r.submit("s@client.test", []string{"a@ex.test"}, b1, submitOpts{noAuth: true})
	if err != nil {
		t.Fatalf("trusted client over STARTTLS without AUTH: %v", err)
	}
	id2, err := r.submit("s@client.test", []string{"b@ex.test"}, b2, submitOpts{noAuth: true, noTLS: true})
	if err != nil {
		t.Fatalf("trusted client in plaintext without AUTH: %v", err)
	}
	if id1 == id2 {
		t.Fatalf("two messages got one queue ID %s", id1)
	}
	got := mx.WaitMessages(t, 2, 15*time.Second)
	bodies := map[string]bool{}
	for _, m := range got {
		bodies[string(afterReceived(t, m.Data))] = true
	}
	if !bodies[string(b1)] || !bodies[string(b2)] {
		t.Errorf("delivered bodies differ from the submitted ones")
	}
	l := r.waitResult("a@ex.test", "delivered", 10*time.Second)
	if l["queue_id"] != id1 {
		t.Errorf("delivery queue_id %v, want %s", l["queue_id"], id1)
	}
	for _, a := range r.logs("accepted", nil) {
		if a["user"] != "" {
			t.Errorf("accepted without AUTH but user = %v", a["user"])
		}
	}
}

// The operator's tools on a deferred message: retry makes it due now (a
// second attempt follows at once, not an hour later), delete removes it
// without a DSN, bounce fails it with a DSN to the sender. An unknown ID
// exits 1, a malformed ID or bad usage exits 2.
func TestE2EQueueCLIActions(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	busyDomain(w, "ex.test")
	mb := w.Mailbox("client.test")
	cfg := testConfig(t, w)
	cfg.Queue.RetrySchedule[0].Duration = time.Hour
	r := startRelay(t, cfg)

	ids := map[string]string{}
	for _, rc := range []string{"retry", "delete", "bounce"} {
		ids[rc] = r.mustSubmit("s@client.test", []string{rc + "@ex.test"}, simpleMessage("cli-"+rc))
	}
	for _, id := range ids {
		waitQueued(t, r, id, 15*time.Second)
	}

	// retry
	if out, code := r.cli("queue", "retry", ids["retry"]); code != 0 {
		t.Fatalf("queue retry: exit %d: %s", code, out)
	}
	l := r.waitLog("delivery", 1, 10*time.Second, func(l map[string]any) bool {
		return l["rcpt"] == "retry@ex.test" && l["attempt"] == float64(2)
	})[0]
	if l["result"] != "deferred" {
		t.Errorf("retried attempt: %v", l)
	}
	if n := len(r.deliveries("delete@ex.test")); n != 1 {
		t.Errorf("message not retried got %d attempts, want 1 (schedule is 1h)", n)
	}

	// delete
	if out, code := r.cli("queue", "delete", ids["delete"], "-json"); code != 0 || !strings.Contains(out, `"ok"`) {
		t.Fatalf("queue delete -json: exit %d: %s", code, out)
	}
	if out, code := r.cli("queue", "show", ids["delete"]); code != 1 {
		t.Errorf("queue show of a deleted message: exit %d, want 1: %s", code, out)
	}

	// bounce
	if out, code := r.cli("queue", "bounce", ids["bounce"]); code != 0 {
		t.Fatalf("queue bounce: exit %d: %s", code, out)
	}
	d := waitDSN(t, mb, 1, 15*time.Second)
	if len(d.Rcpts) != 1 {
		t.Fatalf("bounce DSN has %d recipient blocks, want 1", len(d.Rcpts))
	}
	h, ok := d.rcpt("bounce@ex.test")
	if !ok || h.Get("Action") != "failed" || !strings.HasPrefix(h.Get("Status"), "5.") {
		t.Errorf("bounce DSN recipient block %v", d.Rcpts[0])
	}
	if !strings.Contains(string(d.Returned), "Subject: cli-bounce") {
		t.Errorf("bounce DSN does not return the original header:\n%s", d.Returned)
	}
	r.waitResult("bounce@ex.test", "bounced", 5*time.Second)

	// Only the retried message is left; the deleted one made no DSN.
	var left []string
	for _, m := range queueList(t, r) {
		if m.Env.Kind == queue.KindSubmitted {
			left = append(left, m.ID)
		}
	}
	if len(left) != 1 || left[0] != ids["retry"] {
		t.Errorf("queue holds %v, want only %s", left, ids["retry"])
	}
	time.Sleep(500 * time.Millisecond)
	if n := len(mb.Messages()); n != 1 {
		t.Errorf("sender got %d DSNs, want 1 (bounce only; delete sends none)", n)
	}

	// Exit codes.
	unknown := "00000000000000"
	for _, sub := range []string{"show", "retry", "delete", "bounce"} {
		if out, code := r.cli("queue", sub, unknown); code != 1 {
			t.Errorf("queue %s of an unknown ID: exit %d, want 1: %s", sub, code, out)
		}
		if out, code := r.cli("queue", sub, "not/an-id"); code != 2 {
			t.Errorf("queue %s of a malformed ID: exit %d, want 2: %s", sub, code, out)
		}
		if out, code := r.cli("queue", sub); code != 2 {
			t.Errorf("queue %s without an ID: exit %d, want 2: %s", sub, code, out)
		}
	}
	for _, args := range [][]string{{"queue"}, {"queue", "frob"}, {"queue", "list", "extra"}, {"queue", "list", "-nosuchflag"}} {
		if out, code := r.cli(args...); code != 2 {
			t.Errorf("%v: exit %d, want 2: %s", args, code, out)
		}
	}
}
