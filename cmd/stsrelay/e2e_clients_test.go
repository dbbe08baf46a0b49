package main

// Issue #18: real submission clients against the real binary. Each client
// (Go's net/smtp, Python's smtplib, msmtp, swaks, curl, Postfix as a
// smarthost client, Nodemailer) submits three messages — plain ASCII, a
// UTF-8 Subject as an RFC 2047 encoded-word, a UTF-8 body — over STARTTLS
// and over implicit TLS (RFC 8314), each to one recipient at an MX that
// offers SMTPUTF8 and 8BITMIME and one at an MX that offers neither.
//
// What must hold, whatever the client put on MAIL FROM:
//   - every message is delivered to both, nothing bounces;
//   - the full MX gets the client's bytes unchanged behind the relay's
//     Received header;
//   - the 7-bit MX sees no SMTPUTF8 and no BODY=8BITMIME on MAIL and no byte
//     >= 0x80 in DATA (RFC 6531 §3.4, RFC 6152 §3: the relay converts an
//     8-bit body to quoted-printable or base64 instead), and the decoded
//     Subject and text are the original ones.
//
// The results are also kept as a table in README.md ("Submission clients
// tested"): STSRELAY_UPDATE_CLIENTS_TABLE=1 rewrites it from this run,
// otherwise the run must agree with every row the table has.
//
// A client that is not installed is skipped, unless CI is set: .ci/run
// installs them all, so there a missing client is a failure.

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"net"
	"net/mail"
	netsmtp "net/smtp"
	"net/textproto"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/internal/testworld"
)

const (
	clFullDomain  = "full.test"     // MX with SMTPUTF8 and 8BITMIME
	clSevenDomain = "sevenbit.test" // MX with neither
	clSender      = "sender@client.test"
	clTLSName     = "relay.stsrelay.test" // the name in the relay's certificate

	clModeSTARTTLS = "STARTTLS"
	clModeImplicit = "implicit TLS"

	clTableBegin = "<!-- clients:begin -->"
	clTableEnd   = "<!-- clients:end -->"

	clDelivered = "delivered"
)

// clMessage is one of the three messages every client sends.
type clMessage struct {
	key     string // in the recipient's local part
	subject string
	text    string // the body text, LF line ends
}

var clMessages = []clMessage{
	{"ascii", "Plain ASCII message", "Hello from the client matrix.\nSecond line.\n"},
	{"utf8-subject", "Grüße aus Köln — naïve café ✓", "The subject is UTF-8, the body is ASCII.\n"},
	{"utf8-body", "UTF-8 body", "Grüße aus Köln.\nПривет, мир.\n日本語のテキスト — naïve café ✓\n"},
}

// clEnv is what every client needs to reach the relay.
type clEnv struct {
	starttlsAddr string // "127.0.0.1:port" of submission.listen
	implicitAddr string // "127.0.0.1:port" of submission.implicit_tls_listen
	caFile       string
	caPEM        []byte
	pool         *x509.CertPool
}

func (e *clEnv) addr(mode string) string {
	if mode == clModeImplicit {
		return e.implicitAddr
	}
	return e.starttlsAddr
}

// clSubmission is one message of one client in one mode.
type clSubmission struct {
	msg       clMessage
	from      string
	to        []string // one at clFullDomain, one at clSevenDomain
	messageID string
	dir       string // scratch directory

	// submitted is what the client sent as DATA, when known; exact says
	// that it is the client's own byte stream (not a message the client
	// rewrote on the way, as Postfix adds its headers).
	submitted []byte
	exact     bool
	err       error
}

// raw is the message as the test builds it for clients that take a ready
// message (msmtp, swaks, curl, Go, Postfix's sendmail): the Subject as an
// RFC 2047 Q encoded-word, the UTF-8 body as Content-Transfer-Encoding 8bit.
func (s *clSubmission) raw() []byte {
	var b strings.Builder
	cte := "7bit"
	if !clIsASCII(s.msg.text) {
		cte = "8bit"
	}
	fmt.Fprintf(&b, "From: <%s>\r\n", s.from)
	fmt.Fprintf(&b, "To: <%s>, <%s>\r\n", s.to[0], s.to[1])
	fmt.Fprintf(&b, "Subject: %s\r\n", mime.QEncoding.Encode("utf-8", s.msg.subject))
	fmt.Fprintf(&b, "Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n")
	fmt.Fprintf(&b, "Message-ID: %s\r\n", s.messageID)
	fmt.Fprintf(&b, "MIME-Version: 1.0\r\n")
	fmt.Fprintf(&b, "Content-Type: text/plain; charset=utf-8\r\n")
	fmt.Fprintf(&b, "Content-Transfer-Encoding: %s\r\n\r\n", cte)
	b.WriteString(strings.ReplaceAll(s.msg.text, "\n", "\r\n"))
	return []byte(b.String())
}

// rawFile writes raw to the scratch directory and returns its path.
func (s *clSubmission) rawFile() (string, error) {
	p := filepath.Join(s.dir, "message.eml")
	return p, os.WriteFile(p, s.raw(), 0o644)
}

// scriptRequest is the JSON the Python and Node scripts read on stdin.
func (s *clSubmission) scriptRequest(e *clEnv, mode string) map[string]any {
	host, port, _ := net.SplitHostPort(e.addr(mode))
	p, _ := strconv.Atoi(port)
	return map[string]any{
		"host": host, "port": p, "tls_name": clTLSName, "cafile": e.caFile,
		"user": testUser, "password": testPassword,
		"from": s.from, "to": s.to, "subject": s.msg.subject, "text": s.msg.text,
		"message_id": s.messageID, "date": "Mon, 01 Jan 2024 10:00:00 +0000",
		"out": filepath.Join(s.dir, "submitted.eml"),
	}
}

// clClient is one submission client.
type clClient struct {
	name  string // as in the README table
	slug  string // in recipients' local parts
	modes []string
	// find reports the client's version, or an error saying what is
	// missing.
	find func() (version string, err error)
	// submit sends all of subs in mode, filling their submitted, exact and
	// err fields.
	submit func(t *testing.T, e *clEnv, mode string, subs []*clSubmission)
}

// clRow is one row of the README table.
type clRow struct {
	client, version, mode string
	full, seven           string // result per destination
	ran                   bool
}

func TestClients(t *testing.T) {
	w := testworld.New(t)
	fullMX := w.NewMX(testworld.MXOptions{Hostname: "mx1." + clFullDomain, Cert: w.CA.Issue(testworld.CertValid, "mx1."+clFullDomain)})
	w.DNS.SetMX(clFullDomain, testworld.MX{Pref: 10, Host: "mx1." + clFullDomain})
	w.DNS.SetA("mx1."+clFullDomain, fullMX.IP())
	sevenMX := w.NewMX(testworld.MXOptions{Hostname: "mx1." + clSevenDomain, Cert: w.CA.Issue(testworld.CertValid, "mx1."+clSevenDomain),
		NoSMTPUTF8: true, No8BITMIME: true})
	w.DNS.SetMX(clSevenDomain, testworld.MX{Pref: 10, Host: "mx1." + clSevenDomain})
	w.DNS.SetA("mx1."+clSevenDomain, sevenMX.IP())
	w.Mailbox("client.test") // where bounces would go

	cfg := testConfig(t, w)
	cfg.Submission.ImplicitTLSListen = []string{"127.0.0.1:0"}
	r := startRelay(t, cfg)
	started := r.logs("started", nil)
	listen, _ := started[0]["listen"].([]any)
	if len(listen) != 2 {
		t.Fatalf("started line lists %v, want the STARTTLS and the implicit TLS listener", listen)
	}
	caPEM := w.CA.RootPEM()
	e := &clEnv{starttlsAddr: listen[0].(string), implicitAddr: listen[1].(string), caFile: w.CAFile(), caPEM: caPEM, pool: w.CA.Pool()}

	var rows []*clRow
	for _, c := range clClients() {
		version, findErr := c.find()
		for _, mode := range c.modes {
			row := &clRow{client: c.name, version: version, mode: mode, full: "not run", seven: "not run"}
			rows = append(rows, row)
			t.Run(c.slug+"/"+strings.ReplaceAll(mode, " ", "_"), func(t *testing.T) {
				if findErr != nil {
					clMissing(t, fmt.Sprintf("%s: %v", c.name, findErr))
				}
				row.ran = true
				clRun(t, r, e, c, mode, row, fullMX, sevenMX)
			})
		}
	}
	clTable(t, rows)
}

// clMissing skips a subtest whose client is not installed, or fails it
// when CI is set.
func clMissing(t *testing.T, what string) {
	t.Helper()
	if os.Getenv("CI") == "" {
		t.Skipf("%s (skipped because CI is unset; with CI set this fails)", what)
	}
	t.Fatalf("%s, and CI is set: .ci/run installs every client", what)
}

// clRun submits the three messages with c in mode, waits for their
// deliveries and checks them.
func clRun(t *testing.T, r *relayProc, e *clEnv, c clClient, mode string, row *clRow, fullMX, sevenMX *testworld.MXServer) {
	modeSlug := "starttls"
	if mode == clModeImplicit {
		modeSlug = "tls"
	}
	var subs []*clSubmission
	for _, m := range clMessages {
		local := c.slug + "-" + modeSlug + "-" + m.key
		subs = append(subs, &clSubmission{
			msg:       m,
			from:      clSender,
			to:        []string{local + "@" + clFullDomain, local + "@" + clSevenDomain},
			messageID: "<" + local + "@client.test>",
			dir:       t.TempDir(),
		})
	}
	c.submit(t, e, mode, subs)

	var rcpts []string
	for _, s := range subs {
		if s.err != nil {
			t.Errorf("%s: submitting %q: %v", c.name, s.msg.key, s.err)
			continue
		}
		rcpts = append(rcpts, s.to...)
	}
	final := clWaitFinal(r, rcpts, 30*time.Second)

	full, seven := &clOutcome{}, &clOutcome{}
	for _, s := range subs {
		if s.err != nil {
			full.add("submission failed")
			seven.add("submission failed")
			continue
		}
		clCheck(t, r, fullMX, s, s.to[0], final[s.to[0]], false, full)
		clCheck(t, r, sevenMX, s, s.to[1], final[s.to[1]], true, seven)
	}
	row.full, row.seven = full.cell(len(subs)), seven.cell(len(subs))
	if t.Failed() {
		// The relay's own account of these messages.
		prefix := c.slug + "-" + modeSlug + "-"
		ids := map[string]bool{}
		for _, l := range r.logs("delivery", func(l map[string]any) bool { return strings.HasPrefix(fmt.Sprint(l["rcpt"]), prefix) }) {
			ids[fmt.Sprint(l["queue_id"])] = true
		}
		var lines []string
		for _, l := range strings.Split(r.logText(), "\n") {
			var m map[string]any
			_ = json.Unmarshal([]byte(l), &m)
			if strings.Contains(l, prefix) || (m != nil && ids[fmt.Sprint(m["queue_id"])]) {
				lines = append(lines, l)
			}
		}
		t.Logf("relay log lines about %s*:\n%s", prefix, strings.Join(lines, "\n"))
	}
	t.Logf("%s %s %s: to %s: %s; to %s: %s", c.name, row.version, mode, clFullDomain, row.full, clSevenDomain, row.seven)
}

// clWaitFinal waits until every recipient has a delivery line that is
// delivered or bounced, or until timeout, and returns each recipient's
// final line (or its last one, or nil).
func clWaitFinal(r *relayProc, rcpts []string, timeout time.Duration) map[string]map[string]any {
	deadline := time.Now().Add(timeout)
	for {
		out := map[string]map[string]any{}
		done := true
		for _, rc := range rcpts {
			lines := r.deliveries(rc)
			var last map[string]any
			for _, l := range lines {
				last = l
				if l["result"] == "delivered" || l["result"] == "bounced" {
					break
				}
			}
			out[rc] = last
			if last == nil || (last["result"] != "delivered" && last["result"] != "bounced") {
				done = false
			}
		}
		if done || time.Now().After(deadline) {
			return out
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// clOutcome collects what went wrong with the messages to one destination.
type clOutcome struct {
	order  []string
	counts map[string]int
}

func (o *clOutcome) add(problem string) {
	if o.counts == nil {
		o.counts = map[string]int{}
	}
	if o.counts[problem] == 0 {
		o.order = append(o.order, problem)
	}
	o.counts[problem]++
}

// cell is the table cell: "delivered", or each problem with how many of
// the n messages had it.
func (o *clOutcome) cell(n int) string {
	if len(o.order) == 0 {
		return clDelivered
	}
	var parts []string
	for _, p := range o.order {
		parts = append(parts, fmt.Sprintf("%s (%d/%d)", p, o.counts[p], n))
	}
	return strings.Join(parts, "; ")
}

// clCheck checks the delivery of s to rcpt at mx and records the problems
// in out. sevenBit is set for the MX without SMTPUTF8 and 8BITMIME.
func clCheck(t *testing.T, r *relayProc, mx *testworld.MXServer, s *clSubmission, rcpt string, line map[string]any, sevenBit bool, out *clOutcome) {
	t.Helper()
	switch {
	case line == nil:
		t.Errorf("%s: no delivery line", rcpt)
		out.add("not delivered")
		return
	case line["result"] == "bounced":
		t.Errorf("%s: bounced: %v %v %v", rcpt, line["code"], line["enhanced_code"], line["reason"])
		out.add(fmt.Sprintf("bounced %v %v", line["code"], line["enhanced_code"]))
		return
	case line["result"] != "delivered":
		t.Errorf("%s: not delivered; last delivery line: %v", rcpt, line)
		out.add("not delivered")
		return
	}
	var rcv *testworld.Received
	for _, m := range mx.Messages() {
		for _, to := range m.Rcpts {
			if to == rcpt {
				rcv = &m
			}
		}
	}
	if rcv == nil {
		t.Errorf("%s: delivery line says delivered, MX %s has no message for it", rcpt, mx.IP())
		out.add("not at MX")
		return
	}
	if sevenBit {
		if rcv.MailOptions.UTF8 {
			t.Errorf("%s: MAIL FROM with SMTPUTF8 to a server that does not offer it", rcpt)
			out.add("SMTPUTF8 on MAIL")
		}
		if rcv.MailOptions.Body == smtp.Body8BitMIME {
			t.Errorf("%s: MAIL FROM with BODY=8BITMIME to a server that does not offer it", rcpt)
			out.add("BODY=8BITMIME on MAIL")
		}
		if i := clFirst8Bit(rcv.Data); i >= 0 {
			t.Errorf("%s: 8-bit data sent to a server without 8BITMIME, at byte %d: %s", rcpt, i, clContext(rcv.Data, i))
			out.add("8-bit data sent")
		}
	}
	got, ok := clStripReceived(rcv.Data)
	if !ok {
		t.Errorf("%s: delivered message does not start with the relay's Received header:\n%.300q", rcpt, rcv.Data)
		out.add("no Received header")
		return
	}
	if !sevenBit && s.submitted != nil {
		want := clCRLF(s.submitted)
		if s.exact {
			if !bytes.Equal(got, want) {
				i := clFirstDiff(got, want)
				t.Errorf("%s: the MX got other bytes than %s submitted (%d vs %d bytes), first difference at %d:\n got  %s\n sent %s",
					rcpt, "the client", len(got), len(want), i, clContext(got, i), clContext(want, i))
				out.add("bytes changed")
			}
		} else {
			// Postfix adds its own header fields; the Subject line and the
			// body must still be the submitted bytes.
			gh, gb := clSplit(got)
			wh, wb := clSplit(want)
			if !bytes.Equal(gb, wb) {
				i := clFirstDiff(gb, wb)
				t.Errorf("%s: body changed at byte %d:\n got  %s\n sent %s", rcpt, i, clContext(gb, i), clContext(wb, i))
				out.add("body changed")
			}
			if gs, ws := clHeaderLine(gh, "Subject"), clHeaderLine(wh, "Subject"); gs != ws {
				t.Errorf("%s: Subject field changed:\n got  %q\n sent %q", rcpt, gs, ws)
				out.add("Subject changed")
			}
		}
	}
	subject, text, err := clDecode(got)
	if err != nil {
		t.Errorf("%s: decoding the delivered message: %v\n%s", rcpt, err, got)
		out.add("undecodable")
		return
	}
	if subject != s.msg.subject {
		t.Errorf("%s: decoded Subject %q, want %q", rcpt, subject, s.msg.subject)
		out.add("Subject changed")
	}
	if clNormText(text) != clNormText(s.msg.text) {
		t.Errorf("%s: decoded text %q, want %q; delivered:\n%s", rcpt, text, s.msg.text, got)
		out.add("text changed")
	}
}

func clIsASCII(s string) bool { return clFirst8Bit([]byte(s)) < 0 }

// clFirst8Bit is the index of the first byte >= 0x80 in b, or -1.
func clFirst8Bit(b []byte) int {
	for i, c := range b {
		if c >= 0x80 {
			return i
		}
	}
	return -1
}

// clCRLF gives b CRLF line ends and a final CRLF, as SMTP DATA carries it.
func clCRLF(b []byte) []byte {
	b = bytes.ReplaceAll(b, []byte("\r\n"), []byte("\n"))
	b = bytes.ReplaceAll(b, []byte("\n"), []byte("\r\n"))
	if !bytes.HasSuffix(b, []byte("\r\n")) {
		b = append(b, "\r\n"...)
	}
	return b
}

func clNormText(s string) string {
	return strings.TrimRight(strings.ReplaceAll(s, "\r\n", "\n"), "\n")
}

// clStripReceived removes the first header field, which must be the
// relay's Received (afterReceived without failing the test).
func clStripReceived(data []byte) ([]byte, bool) {
	if !bytes.HasPrefix(data, []byte("Received: ")) {
		return nil, false
	}
	i := 0
	for {
		j := bytes.Index(data[i:], []byte("\r\n"))
		if j < 0 {
			return nil, false
		}
		i += j + 2
		if i >= len(data) || (data[i] != ' ' && data[i] != '\t') {
			return data[i:], true
		}
	}
}

// clSplit splits a message into its header section and body.
func clSplit(b []byte) (header, body []byte) {
	if i := bytes.Index(b, []byte("\r\n\r\n")); i >= 0 {
		return b[:i+2], b[i+4:]
	}
	return b, nil
}

// clHeaderLine returns the named field of header, unfolded lines included.
func clHeaderLine(header []byte, name string) string {
	lines := strings.SplitAfter(string(header), "\r\n")
	for i, l := range lines {
		if k, _, ok := strings.Cut(l, ":"); ok && strings.EqualFold(k, name) {
			f := l
			for _, c := range lines[i+1:] {
				if c == "" || (c[0] != ' ' && c[0] != '\t') {
					break
				}
				f += c
			}
			return f
		}
	}
	return ""
}

func clFirstDiff(a, b []byte) int {
	n := min(len(a), len(b))
	for i := 0; i < n; i++ {
		if a[i] != b[i] {
			return i
		}
	}
	return n
}

func clContext(b []byte, i int) string {
	if i < 0 {
		return ""
	}
	lo, hi := max(0, i-40), min(len(b), i+40)
	return fmt.Sprintf("%q", b[lo:hi])
}

// clDecode returns the decoded Subject of a message and the decoded text
// of its first text/plain part (quoted-printable and base64 undone, in
// multipart messages too).
func clDecode(raw []byte) (subject, text string, err error) {
	m, err := mail.ReadMessage(bytes.NewReader(raw))
	if err != nil {
		return "", "", err
	}
	subject, err = new(mime.WordDecoder).DecodeHeader(m.Header.Get("Subject"))
	if err != nil {
		return "", "", fmt.Errorf("Subject: %w", err)
	}
	text, err = clPartText(textproto.MIMEHeader(m.Header), m.Body, 0)
	return subject, text, err
}

func clPartText(h textproto.MIMEHeader, body io.Reader, depth int) (string, error) {
	ct := h.Get("Content-Type")
	if ct == "" {
		ct = "text/plain"
	}
	mt, params, err := mime.ParseMediaType(ct)
	if err != nil {
		return "", fmt.Errorf("Content-Type %q: %w", ct, err)
	}
	if strings.HasPrefix(mt, "multipart/") {
		if depth > 5 {
			return "", errors.New("multipart nested too deep")
		}
		mr := multipart.NewReader(body, params["boundary"])
		for {
			p, err := mr.NextRawPart()
			if err == io.EOF {
				return "", errors.New("no text/plain part")
			}
			if err != nil {
				return "", err
			}
			if text, err := clPartText(p.Header, p, depth+1); err == nil {
				return text, nil
			}
		}
	}
	if mt != "text/plain" {
		return "", fmt.Errorf("part is %s, not text/plain", mt)
	}
	switch cs := strings.ToLower(params["charset"]); cs {
	case "", "utf-8", "us-ascii":
	default:
		return "", fmt.Errorf("charset %q", cs)
	}
	r := body
	switch cte := strings.ToLower(strings.TrimSpace(h.Get("Content-Transfer-Encoding"))); cte {
	case "quoted-printable":
		r = quotedprintable.NewReader(body)
	case "base64":
		r = base64.NewDecoder(base64.StdEncoding, body)
	case "", "7bit", "8bit", "binary":
	default:
		return "", fmt.Errorf("Content-Transfer-Encoding %q", cte)
	}
	b, err := io.ReadAll(r)
	if err != nil {
		return "", fmt.Errorf("decoding the body: %w", err)
	}
	if !utf8.Valid(b) {
		return "", fmt.Errorf("decoded text is not UTF-8: %q", b)
	}
	return string(b), nil
}

// ---- the clients ----

func clClients() []clClient {
	both := []string{clModeSTARTTLS, clModeImplicit}
	return []clClient{
		{name: "Go net/smtp", slug: "go", modes: both, find: func() (string, error) { return runtime.Version(), nil }, submit: clGoSubmit},
		{name: "Python smtplib", slug: "python", modes: both, find: clPythonVersion, submit: clPythonSubmit},
		{name: "msmtp", slug: "msmtp", modes: both, find: clVersionOf("msmtp", `msmtp version (\S+)`, "--version"), submit: clMsmtpSubmit},
		{name: "swaks", slug: "swaks", modes: both, find: clVersionOf("swaks", `swaks version (\S+)`, "--version"), submit: clSwaksSubmit},
		{name: "curl", slug: "curl", modes: both, find: clVersionOf("curl", `^curl (\S+)`, "--version"), submit: clCurlSubmit},
		{name: "Postfix (relayhost with SASL)", slug: "postfix", modes: both, find: clPostfixVersion, submit: clPostfixSubmit},
		{name: "Nodemailer", slug: "nodemailer", modes: both, find: clNodemailerVersion, submit: clNodemailerSubmit},
	}
}

// clVersionOf finds bin on PATH and runs it with args; re matches the
// version in its output.
func clVersionOf(bin, re string, args ...string) func() (string, error) {
	return func() (string, error) {
		p, err := exec.LookPath(bin)
		if err != nil {
			return "", fmt.Errorf("%s not installed", bin)
		}
		out, err := clCommand(10*time.Second, nil, p, args...)
		if err != nil {
			return "", fmt.Errorf("%s %v: %v\n%s", bin, args, err, out)
		}
		m := regexp.MustCompile("(?m)" + re).FindSubmatch(out)
		if m == nil {
			return "unknown", nil
		}
		return string(m[1]), nil
	}
}

// clCommand runs a command with a deadline and returns its combined output.
func clCommand(timeout time.Duration, stdin []byte, name string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	cmd.WaitDelay = 5 * time.Second
	return cmd.CombinedOutput()
}

// clEach runs send for every submission and records what it submitted.
func clEach(subs []*clSubmission, send func(s *clSubmission) error) {
	for _, s := range subs {
		s.err = send(s)
	}
}

// Go's net/smtp, the way smtp.SendMail drives it (EHLO, STARTTLS when
// offered, AUTH PLAIN, MAIL, RCPT, DATA), but with the test CA as root:
// SendMail itself only knows the system roots. For implicit TLS the
// connection is a tls.Conn handed to smtp.NewClient.
func clGoSubmit(t *testing.T, e *clEnv, mode string, subs []*clSubmission) {
	clEach(subs, func(s *clSubmission) error {
		s.submitted, s.exact = s.raw(), true
		host, _, _ := net.SplitHostPort(e.addr(mode))
		tcfg := &tls.Config{ServerName: clTLSName, RootCAs: e.pool}
		conn, err := net.DialTimeout("tcp", e.addr(mode), 10*time.Second)
		if err != nil {
			return err
		}
		defer conn.Close()
		_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
		if mode == clModeImplicit {
			conn = tls.Client(conn, tcfg)
		}
		c, err := netsmtp.NewClient(conn, host)
		if err != nil {
			return err
		}
		if mode == clModeSTARTTLS {
			if ok, _ := c.Extension("STARTTLS"); !ok {
				return errors.New("no STARTTLS offered")
			}
			if err := c.StartTLS(tcfg); err != nil {
				return err
			}
		}
		if err := c.Auth(netsmtp.PlainAuth("", testUser, testPassword, host)); err != nil {
			return err
		}
		if err := c.Mail(s.from); err != nil {
			return err
		}
		for _, to := range s.to {
			if err := c.Rcpt(to); err != nil {
				return err
			}
		}
		wc, err := c.Data()
		if err != nil {
			return err
		}
		if _, err := wc.Write(s.submitted); err != nil {
			return err
		}
		if err := wc.Close(); err != nil {
			return err
		}
		return c.Quit()
	})
}

// clPython is Debian's python3 (the one CI installs), else python3 on PATH.
func clPython() (string, error) {
	if _, err := os.Stat("/usr/bin/python3"); err == nil {
		return "/usr/bin/python3", nil
	}
	p, err := exec.LookPath("python3")
	if err != nil {
		return "", errors.New("python3 not installed")
	}
	return p, nil
}

func clPythonVersion() (string, error) {
	p, err := clPython()
	if err != nil {
		return "", err
	}
	out, err := clCommand(10*time.Second, nil, p, "--version")
	if err != nil {
		return "", fmt.Errorf("python3 --version: %v", err)
	}
	return strings.TrimPrefix(strings.TrimSpace(string(out)), "Python "), nil
}

// Python's smtplib: EmailMessage + send_message, over SMTP + starttls()
// or SMTP_SSL (testdata/clients/smtplib_send.py).
func clPythonSubmit(t *testing.T, e *clEnv, mode string, subs []*clSubmission) {
	py, _ := clPython()
	script, _ := filepath.Abs("testdata/clients/smtplib_send.py")
	clEach(subs, func(s *clSubmission) error {
		req := s.scriptRequest(e, mode)
		req["mode"] = "starttls"
		if mode == clModeImplicit {
			req["mode"] = "ssl"
		}
		return clScript(s, req, py, script)
	})
}

// clScript runs a client script with req on stdin and reads back the
// message it submitted.
func clScript(s *clSubmission, req map[string]any, name string, args ...string) error {
	in, _ := json.Marshal(req)
	out, err := clCommand(40*time.Second, in, name, args...)
	if err != nil {
		return fmt.Errorf("%s: %v\n%s", filepath.Base(args[len(args)-1]), err, out)
	}
	b, err := os.ReadFile(req["out"].(string))
	if err != nil {
		return err
	}
	s.submitted, s.exact = b, true
	return nil
}

// msmtp with command-line settings only (--host): --tls-starttls on for
// STARTTLS, off (with --tls on) for implicit TLS; it picks the AUTH
// mechanism itself.
func clMsmtpSubmit(t *testing.T, e *clEnv, mode string, subs []*clSubmission) {
	host, port, _ := net.SplitHostPort(e.addr(mode))
	starttls := "on"
	if mode == clModeImplicit {
		starttls = "off"
	}
	clEach(subs, func(s *clSubmission) error {
		s.submitted, s.exact = s.raw(), true
		args := []string{"--host=" + host, "--port=" + port, "--domain=client.test",
			"--auth=on", "--user=" + testUser, "--passwordeval=echo " + testPassword,
			"--tls=on", "--tls-starttls=" + starttls, "--tls-trust-file=" + e.caFile,
			"--tls-host-override=" + clTLSName, "--timeout=20", "--from=" + s.from, "--"}
		args = append(args, s.to...)
		out, err := clCommand(40*time.Second, s.submitted, "msmtp", args...)
		if err != nil {
			return fmt.Errorf("msmtp: %v\n%s", err, out)
		}
		return nil
	})
}

// swaks -tls (STARTTLS required) or -tlsc (TLS on connect), any AUTH
// type, the message as DATA from stdin; --tls-verify checks the chain
// (swaks checks no host name).
func clSwaksSubmit(t *testing.T, e *clEnv, mode string, subs []*clSubmission) {
	tlsFlag := "-tls"
	if mode == clModeImplicit {
		tlsFlag = "-tlsc"
	}
	clEach(subs, func(s *clSubmission) error {
		// swaks ends the data it is given with a line break of its own
		// before the final dot: hand it the message without the last one.
		s.submitted, s.exact = s.raw(), true
		out, err := clCommand(40*time.Second, bytes.TrimSuffix(s.submitted, []byte("\r\n")), "swaks", "--server", e.addr(mode), tlsFlag,
			"--tls-verify", "--tls-ca-path", e.caFile, "--tls-sni", clTLSName,
			"--auth", "--auth-user", testUser, "--auth-password", testPassword,
			"--helo", "client.test", "--from", s.from, "--to", strings.Join(s.to, ","),
			"--data", "-", "--timeout", "20")
		if err != nil {
			return fmt.Errorf("swaks: %v\n%s", err, out)
		}
		return nil
	})
}

// curl with smtp:// and --ssl-reqd (STARTTLS required) or smtps://, the
// relay's name resolved to its address with --resolve so the certificate
// is checked against it.
func clCurlSubmit(t *testing.T, e *clEnv, mode string, subs []*clSubmission) {
	host, port, _ := net.SplitHostPort(e.addr(mode))
	clEach(subs, func(s *clSubmission) error {
		s.submitted, s.exact = s.raw(), true
		file, err := s.rawFile()
		if err != nil {
			return err
		}
		args := []string{"-sS", "--max-time", "30", "--resolve", clTLSName + ":" + port + ":" + host,
			"--cacert", e.caFile, "--user", testUser + ":" + testPassword,
			"--mail-from", s.from, "--upload-file", file}
		if mode == clModeImplicit {
			args = append(args, "--url", "smtps://"+clTLSName+":"+port+"/client.test")
		} else {
			args = append(args, "--ssl-reqd", "--url", "smtp://"+clTLSName+":"+port+"/client.test")
		}
		for _, to := range s.to {
			args = append(args, "--mail-rcpt", to)
		}
		out, err := clCommand(40*time.Second, nil, "curl", args...)
		if err != nil {
			return fmt.Errorf("curl: %v\n%s", err, out)
		}
		return nil
	})
}

// clNodeModules is the node_modules directory holding nodemailer:
// $STSRELAY_NODE_MODULES, else .cache/node/node_modules at the top of the
// repository, where .ci/run installs it.
func clNodeModules() string {
	if d := os.Getenv("STSRELAY_NODE_MODULES"); d != "" {
		return d
	}
	d, _ := filepath.Abs(filepath.Join("..", "..", ".cache", "node", "node_modules"))
	return d
}

func clNodemailerVersion() (string, error) {
	node, err := exec.LookPath("node")
	if err != nil {
		return "", errors.New("node not installed")
	}
	b, err := os.ReadFile(filepath.Join(clNodeModules(), "nodemailer", "package.json"))
	if err != nil {
		return "", fmt.Errorf("nodemailer not installed in %s (.ci/run: npm install --prefix .cache/node nodemailer)", clNodeModules())
	}
	var pkg struct{ Version string }
	if err := json.Unmarshal(b, &pkg); err != nil {
		return "", fmt.Errorf("nodemailer package.json: %v", err)
	}
	out, err := clCommand(10*time.Second, nil, node, "--version")
	if err != nil {
		return "", fmt.Errorf("node --version: %v", err)
	}
	return pkg.Version + " (Node " + strings.TrimSpace(string(out)) + ")", nil
}

// Nodemailer's SMTP transport: secure (implicit TLS) or requireTLS
// (STARTTLS), its own MIME encoding of the text
// (testdata/clients/nodemailer_send.js).
func clNodemailerSubmit(t *testing.T, e *clEnv, mode string, subs []*clSubmission) {
	script, _ := filepath.Abs("testdata/clients/nodemailer_send.js")
	clEach(subs, func(s *clSubmission) error {
		req := s.scriptRequest(e, mode)
		req["secure"] = mode == clModeImplicit
		in, _ := json.Marshal(req)
		ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, "node", script)
		cmd.Env = append(os.Environ(), "NODE_PATH="+clNodeModules())
		cmd.Stdin = bytes.NewReader(in)
		cmd.WaitDelay = 5 * time.Second
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("nodemailer_send.js: %v\n%s", err, out)
		}
		b, err := os.ReadFile(req["out"].(string))
		if err != nil {
			return err
		}
		s.submitted, s.exact = b, true
		return nil
	})
}

// ---- Postfix ----

func clPostfixVersion() (string, error) {
	if _, err := exec.LookPath("postfix"); err != nil {
		return "", errors.New("postfix not installed")
	}
	if os.Geteuid() != 0 {
		return "", errors.New("a private Postfix instance needs root")
	}
	out, err := clCommand(10*time.Second, nil, "postconf", "-d", "-h", "mail_version")
	if err != nil {
		return "", fmt.Errorf("postconf -d mail_version: %v\n%s", err, out)
	}
	return strings.TrimSpace(string(out)), nil
}

// Postfix as an application's local MTA: a private instance (its own
// config_directory and queue_directory) whose relayhost is the relay,
// with SASL and TLS verified against the test CA (smtp_tls_wrappermode
// for implicit TLS). Messages go in through its sendmail command.
func clPostfixSubmit(t *testing.T, e *clEnv, mode string, subs []*clSubmission) {
	pf, err := clStartPostfix(t, e, mode)
	if err != nil {
		for _, s := range subs {
			s.err = err
		}
		return
	}
	clEach(subs, func(s *clSubmission) error {
		// Postfix writes its own Received (and keeps the rest); the
		// Subject and the body must come through.
		s.submitted, s.exact = s.raw(), false
		args := append([]string{"-C", pf.etc, "-i", "-f", s.from, "--"}, s.to...)
		out, err := clCommand(30*time.Second, bytes.ReplaceAll(s.submitted, []byte("\r\n"), []byte("\n")), pf.sendmail, args...)
		if err != nil {
			return fmt.Errorf("postfix sendmail: %v\n%s", err, out)
		}
		return nil
	})
	t.Cleanup(func() {
		if t.Failed() {
			log, _ := os.ReadFile(filepath.Join(pf.dir, "postfix.log"))
			t.Logf("postfix.log:\n%s", tail(string(log), 40))
		}
	})
}

type clPostfix struct {
	dir, etc, sendmail string
}

func clStartPostfix(t *testing.T, e *clEnv, mode string) (*clPostfix, error) {
	// Postfix's unprivileged daemons must reach the queue: not under
	// t.TempDir, which is private to root.
	dir, err := os.MkdirTemp("", "stsrelay-postfix-")
	if err != nil {
		return nil, err
	}
	pf := &clPostfix{dir: dir, etc: filepath.Join(dir, "etc")}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		return nil, err
	}
	for _, d := range []string{"etc", "queue", "data"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return nil, err
		}
	}
	u, err := user.Lookup("postfix")
	if err != nil {
		return nil, fmt.Errorf("postfix user: %w", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	if err := os.Chown(filepath.Join(dir, "data"), uid, gid); err != nil {
		return nil, err
	}
	out, err := clCommand(10*time.Second, nil, "postconf", "-d", "-h", "sendmail_path")
	if err != nil {
		return nil, fmt.Errorf("postconf sendmail_path: %v", err)
	}
	pf.sendmail = strings.TrimSpace(string(out))

	host, port, _ := net.SplitHostPort(e.addr(mode))
	nexthop := "[" + host + "]:" + port
	files := map[string]string{
		"ca.pem":      string(e.caPEM),
		"sasl_passwd": nexthop + " " + testUser + ":" + testPassword + "\n",
		// The nexthop is an IP literal: name the certificate to match.
		"tls_policy": nexthop + " secure match=" + clTLSName + "\n",
		"main.cf": `# Private instance for cmd/stsrelay/e2e_clients_test.go.
compatibility_level = 3.6
queue_directory = ` + dir + `/queue
data_directory = ` + dir + `/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.client.test
mydomain = client.test
myorigin = $mydomain
mydestination =
relay_domains =
mynetworks = 127.0.0.0/8
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
relayhost = ` + nexthop + `
smtp_host_lookup = native
smtp_dns_support_level = disabled
smtp_sasl_auth_enable = yes
smtp_sasl_password_maps = texthash:` + pf.etc + `/sasl_passwd
smtp_sasl_security_options = noanonymous
smtp_sasl_tls_security_options = noanonymous
smtp_tls_security_level = secure
smtp_tls_CAfile = ` + pf.etc + `/ca.pem
smtp_tls_policy_maps = texthash:` + pf.etc + `/tls_policy
smtp_tls_wrappermode = ` + map[bool]string{true: "yes", false: "no"}[mode == clModeImplicit] + `
smtp_tls_loglevel = 1
alias_maps =
alias_database =
local_recipient_maps =
biff = no
append_dot_mydomain = no
maillog_file = ` + dir + `/postfix.log
maillog_file_prefixes = ` + dir + `
`,
		// Debian's master.cf services, none chrooted, no smtpd: mail
		// comes in through sendmail only.
		"master.cf": `pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
`,
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(pf.etc, name), []byte(content), 0o644); err != nil {
			return nil, err
		}
	}
	if out, err := clCommand(60*time.Second, nil, "postfix", "-c", pf.etc, "start"); err != nil {
		return nil, fmt.Errorf("postfix -c %s start: %v\n%s", pf.etc, err, out)
	}
	pidFile := filepath.Join(dir, "queue", "pid", "master.pid")
	t.Cleanup(func() { clStopPostfix(t, pf, pidFile) })
	return pf, nil
}

// clStopPostfix stops the instance with "postfix stop" and makes sure its
// master process (by the PID in its own pid file) is gone.
func clStopPostfix(t *testing.T, pf *clPostfix, pidFile string) {
	b, _ := os.ReadFile(pidFile)
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if out, err := clCommand(30*time.Second, nil, "postfix", "-c", pf.etc, "stop"); err != nil {
		t.Logf("postfix -c %s stop: %v\n%s", pf.etc, err, out)
	}
	if pid <= 0 {
		return
	}
	deadline := time.Now().Add(15 * time.Second)
	for syscall.Kill(pid, 0) == nil {
		if time.Now().After(deadline) {
			t.Errorf("postfix master %d still running 15s after postfix stop; killing it", pid)
			_ = syscall.Kill(pid, syscall.SIGKILL)
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ---- the README table ----

// clTable writes the results into README.md (STSRELAY_UPDATE_CLIENTS_TABLE=1)
// or checks that every row of the README's table agrees with this run: the
// version may drift, the results may not.
func clTable(t *testing.T, rows []*clRow) {
	t.Helper()
	const readme = "../../README.md"
	b, err := os.ReadFile(readme)
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	i, j := strings.Index(text, clTableBegin), strings.Index(text, clTableEnd)
	if i < 0 || j < i {
		t.Fatalf("README.md has no %s ... %s section", clTableBegin, clTableEnd)
	}
	old := clParseTable(text[i+len(clTableBegin) : j])

	if os.Getenv("STSRELAY_UPDATE_CLIENTS_TABLE") != "" {
		var sb strings.Builder
		sb.WriteString("\n| client | version | submission | to an MX with SMTPUTF8 and 8BITMIME | to an MX with neither |\n|---|---|---|---|---|\n")
		for _, r := range rows {
			if !r.ran {
				if o, ok := old[r.client+"|"+r.mode]; ok {
					r = o // not installed here: keep what the table said
				}
			}
			fmt.Fprintf(&sb, "| %s | %s | %s | %s | %s |\n", r.client, r.version, r.mode, r.full, r.seven)
		}
		text = text[:i+len(clTableBegin)] + sb.String() + text[j:]
		if err := os.WriteFile(readme, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("README.md: client table rewritten")
		return
	}
	for _, r := range rows {
		if !r.ran {
			continue
		}
		o, ok := old[r.client+"|"+r.mode]
		if !ok {
			t.Errorf("README.md's client table has no row for %s, %s (STSRELAY_UPDATE_CLIENTS_TABLE=1 rewrites it)", r.client, r.mode)
			continue
		}
		for _, c := range []struct{ dest, was, now string }{{clFullDomain, o.full, r.full}, {clSevenDomain, o.seven, r.seven}} {
			switch {
			case c.was == c.now:
			case c.was == clDelivered:
				t.Errorf("README.md says %s, %s delivers to the %s MX; this run: %s", r.client, r.mode, c.dest, c.now)
			default:
				t.Errorf("README.md's client table is out of date for %s, %s to the %s MX: it says %q, this run: %q (STSRELAY_UPDATE_CLIENTS_TABLE=1 rewrites it)",
					r.client, r.mode, c.dest, c.was, c.now)
			}
		}
	}
}

// clParseTable reads the rows of the table, keyed by client|mode.
func clParseTable(s string) map[string]*clRow {
	rows := map[string]*clRow{}
	for _, l := range strings.Split(s, "\n") {
		l = strings.TrimSpace(l)
		if !strings.HasPrefix(l, "|") || strings.HasPrefix(l, "|---") {
			continue
		}
		cells := strings.Split(strings.Trim(l, "|"), "|")
		if len(cells) != 5 {
			continue
		}
		for k := range cells {
			cells[k] = strings.TrimSpace(cells[k])
		}
		if cells[0] == "client" {
			continue
		}
		r := &clRow{client: cells[0], version: cells[1], mode: cells[2], full: cells[3], seven: cells[4]}
		rows[r.client+"|"+r.mode] = r
	}
	return rows
}
