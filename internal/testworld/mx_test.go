package testworld

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/textproto"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/miekg/dns"
)

// dialMX opens a go-smtp client session to mx and sends EHLO.
func dialMX(t *testing.T, mx *MXServer) *smtp.Client {
	t.Helper()
	c, err := smtp.Dial(mx.Addr())
	if err != nil {
		t.Fatalf("dial %s: %v", mx.Addr(), err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.Hello("client.test"); err != nil {
		t.Fatalf("EHLO: %v", err)
	}
	return c
}

// dialMXTLS opens a session to mx, runs STARTTLS with cfg and sends EHLO
// again over TLS (which is when go-smtp's client runs the handshake).
func dialMXTLS(t *testing.T, mx *MXServer, cfg *tls.Config) (*smtp.Client, error) {
	t.Helper()
	conn, err := net.Dial("tcp", mx.Addr())
	if err != nil {
		t.Fatalf("dial %s: %v", mx.Addr(), err)
	}
	c, err := smtp.NewClientStartTLS(conn, cfg)
	if err != nil {
		return nil, err
	}
	t.Cleanup(func() { c.Close() })
	return c, c.Hello("client.test")
}

// rawConn opens a TCP connection to mx and reads the greeting.
func rawConn(t *testing.T, mx *MXServer) (net.Conn, *textproto.Conn) {
	t.Helper()
	raw, err := net.Dial("tcp", mx.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	raw.SetDeadline(time.Now().Add(5 * time.Second))
	tp := textproto.NewConn(raw)
	if _, _, err := tp.ReadResponse(220); err != nil {
		t.Fatalf("greeting: %v", err)
	}
	return raw, tp
}

// rawSession is rawConn plus EHLO.
func rawSession(t *testing.T, mx *MXServer) *textproto.Conn {
	t.Helper()
	_, tp := rawConn(t, mx)
	tp.PrintfLine("EHLO client.test")
	if _, _, err := tp.ReadResponse(250); err != nil {
		t.Fatalf("EHLO: %v", err)
	}
	return tp
}

func sendData(t *testing.T, c *smtp.Client, msg string) error {
	t.Helper()
	wc, err := c.Data()
	if err != nil {
		return err
	}
	if _, err := io.WriteString(wc, msg); err != nil {
		return err
	}
	return wc.Close()
}

func smtpCode(err error) int {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		return se.Code
	}
	return 0
}

// A message with a leading-dot line, an empty line and 8-bit bytes.
const testMessage = "From: a@sender.test\r\nTo: u@ex.test\r\nSubject: hi\r\n\r\n.leading dot\r\n..two dots\r\n\r\nnon-ASCII: h\xc3\xa9\r\nlast line\r\n"

func TestMXSTARTTLSDelivery(t *testing.T) {
	t.Parallel()
	w := New(t)
	mx := w.NewMX(MXOptions{Hostname: "mx1.ex.test", Cert: w.CA.Issue(CertValid, "mx1.ex.test")})
	if !strings.HasSuffix(mx.Addr(), ":"+strconv.Itoa(w.MXPort())) || !strings.HasPrefix(mx.Addr(), mx.IP()+":") {
		t.Fatalf("MX address %s, IP %s, port %d", mx.Addr(), mx.IP(), w.MXPort())
	}
	plain := dialMX(t, mx)
	if ok, _ := plain.Extension("STARTTLS"); !ok {
		t.Fatalf("STARTTLS not advertised")
	}
	if ok, _ := plain.Extension("8BITMIME"); !ok {
		t.Errorf("8BITMIME not advertised by default")
	}
	plain.Quit()

	c, err := dialMXTLS(t, mx, &tls.Config{ServerName: "mx1.ex.test", RootCAs: w.CA.Pool()})
	if err != nil {
		t.Fatalf("STARTTLS: %v", err)
	}
	if ok, _ := c.Extension("STARTTLS"); ok {
		t.Errorf("STARTTLS advertised again after TLS")
	}
	if ok, _ := c.Extension("REQUIRETLS"); ok {
		t.Errorf("REQUIRETLS advertised without AdvertiseREQUIRETLS")
	}
	if err := c.Mail("a@sender.test", &smtp.MailOptions{Body: smtp.Body8BitMIME}); err != nil {
		t.Fatalf("MAIL: %v", err)
	}
	for _, r := range []string{"u@ex.test", "v@ex.test"} {
		if err := c.Rcpt(r, nil); err != nil {
			t.Fatalf("RCPT %s: %v", r, err)
		}
	}
	if err := sendData(t, c, testMessage); err != nil {
		t.Fatalf("DATA: %v", err)
	}
	c.Quit()

	msgs := mx.WaitMessages(t, 1, 5*time.Second)
	m := msgs[0]
	if string(m.Data) != testMessage {
		t.Errorf("data\n%q\nwant\n%q", m.Data, testMessage)
	}
	if m.From != "a@sender.test" || !slices.Equal(m.Rcpts, []string{"u@ex.test", "v@ex.test"}) {
		t.Errorf("envelope %q → %q", m.From, m.Rcpts)
	}
	if !m.TLS || m.TLSVersion != tls.VersionTLS13 || m.SNI != "mx1.ex.test" || m.Helo != "client.test" {
		t.Errorf("TLS %v version %x SNI %q HELO %q", m.TLS, m.TLSVersion, m.SNI, m.Helo)
	}
	if m.MailOptions.Body != smtp.Body8BitMIME {
		t.Errorf("BODY %q not recorded", m.MailOptions.Body)
	}
	if got := mx.SNIs(); !slices.Equal(got, []string{"mx1.ex.test"}) {
		t.Errorf("SNIs %q", got)
	}
	if mx.Connections() != 2 {
		t.Errorf("Connections %d, want 2", mx.Connections())
	}
}

func TestMXScriptedRcptReply(t *testing.T) {
	t.Parallel()
	w := New(t)
	mx := w.NewMX(MXOptions{Script: func(cmd Command) *Reply {
		switch {
		case cmd.Verb == "RCPT" && cmd.Arg == "r2@ex.test":
			return &Reply{Code: 450, Enhanced: "4.2.0", Text: "mailbox busy"}
		case cmd.Verb == "RCPT" && cmd.Arg == "r3@ex.test":
			return &Reply{Code: 550, Enhanced: "5.1.1", Text: "no such user"}
		}
		return nil
	}})
	c := dialMX(t, mx)
	if err := c.Mail("a@sender.test", nil); err != nil {
		t.Fatal(err)
	}
	codes := map[string]int{}
	for _, r := range []string{"r1@ex.test", "r2@ex.test", "r3@ex.test", "r4@ex.test"} {
		codes[r] = smtpCode(c.Rcpt(r, nil))
	}
	if codes["r1@ex.test"] != 0 || codes["r2@ex.test"] != 450 || codes["r3@ex.test"] != 550 || codes["r4@ex.test"] != 0 {
		t.Errorf("RCPT replies %v", codes)
	}
	var se *smtp.SMTPError
	if err := c.Rcpt("r2@ex.test", nil); !errors.As(err, &se) || se.EnhancedCode != (smtp.EnhancedCode{4, 2, 0}) || se.Message != "mailbox busy" {
		t.Errorf("RCPT r2: %v, want 450 4.2.0 mailbox busy", err)
	}
	if err := sendData(t, c, "Subject: x\r\n\r\nbody\r\n"); err != nil {
		t.Fatalf("DATA after a rejected recipient: %v", err)
	}
	m := mx.WaitMessages(t, 1, 5*time.Second)[0]
	if !slices.Equal(m.Rcpts, []string{"r1@ex.test", "r4@ex.test"}) {
		t.Errorf("recipients %q, want r1 and r4", m.Rcpts)
	}
	var log []string
	for _, cmd := range mx.Commands() {
		log = append(log, cmd.Verb+" "+cmd.Arg+" "+strconv.Itoa(cmd.Code))
	}
	want := []string{"CONNECT  220", "MAIL a@sender.test 250", "RCPT r1@ex.test 250", "RCPT r2@ex.test 450", "RCPT r3@ex.test 550", "RCPT r4@ex.test 250", "RCPT r2@ex.test 450", "DATA  250"}
	if !slices.Equal(log, want) {
		t.Errorf("command log\n%q\nwant\n%q", log, want)
	}
}

func TestMXScriptedDataReplyAndClose(t *testing.T) {
	t.Parallel()
	w := New(t)
	mx := w.NewMX(MXOptions{Script: func(cmd Command) *Reply {
		if cmd.Verb == "DATA" {
			return &Reply{Code: 451, Text: "try later", Delay: 100 * time.Millisecond, Close: true}
		}
		return nil
	}})
	c := dialMX(t, mx)
	c.Mail("a@sender.test", nil)
	c.Rcpt("u@ex.test", nil)
	start := time.Now()
	if err := sendData(t, c, "x\r\n"); smtpCode(err) != 451 {
		t.Errorf("DATA: %v, want 451", err)
	}
	if time.Since(start) < 100*time.Millisecond {
		t.Errorf("reply came before the scripted delay")
	}
	if err := c.Noop(); err == nil {
		t.Errorf("connection still open after a Close reply")
	}
	if n := len(mx.Messages()); n != 0 {
		t.Errorf("%d messages recorded after 451", n)
	}
}

func TestMXGreetingScriptAndDelay(t *testing.T) {
	t.Parallel()
	w := New(t)
	busy := w.NewMX(MXOptions{Script: func(cmd Command) *Reply {
		if cmd.Verb == "CONNECT" {
			return &Reply{Code: 421, Enhanced: "4.3.2", Text: "busy", Close: true}
		}
		return nil
	}})
	bc, err := smtp.Dial(busy.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer bc.Close()
	if err := bc.Hello("client.test"); smtpCode(err) != 421 {
		t.Errorf("greeting of a 421 greeter: %v", err)
	}

	slow := w.NewMX(MXOptions{GreetingDelay: 300 * time.Millisecond})
	start := time.Now()
	c, err := smtp.Dial(slow.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.Hello("client.test"); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Errorf("greeting after %v, want ≥300ms", d)
	}
}

func TestMXWithoutTLS(t *testing.T) {
	t.Parallel()
	w := New(t)
	mx := w.NewMX(MXOptions{No8BITMIME: true, NoSMTPUTF8: true, MaxSize: 100})
	c := dialMX(t, mx)
	for _, ext := range []string{"STARTTLS", "8BITMIME", "SMTPUTF8"} {
		if ok, _ := c.Extension(ext); ok {
			t.Errorf("%s advertised", ext)
		}
	}
	if size, ok := c.MaxMessageSize(); !ok || size != 100 {
		t.Errorf("SIZE %d %v, want 100", size, ok)
	}
	if err := c.Mail("a@sender.test", nil); err != nil {
		t.Fatal(err)
	}
	c.Rcpt("u@ex.test", nil)
	if err := sendData(t, c, strings.Repeat("x", 200)+"\r\n"); smtpCode(err) != 552 {
		t.Errorf("oversized DATA: %v, want 552", err)
	}
	if err := c.Mail("a@sender.test", nil); err != nil {
		t.Fatal(err)
	}
	c.Rcpt("u@ex.test", nil)
	if err := sendData(t, c, "small\r\n"); err != nil {
		t.Fatal(err)
	}
	if m := mx.WaitMessages(t, 1, 5*time.Second)[0]; m.TLS || m.SNI != "" {
		t.Errorf("plaintext message recorded with TLS %v SNI %q", m.TLS, m.SNI)
	}
}

func TestMXSTARTTLSRefusedAndBroken(t *testing.T) {
	t.Parallel()
	w := New(t)
	t.Run("refused with 454", func(t *testing.T) {
		mx := w.NewMX(MXOptions{STARTTLSReply: 454})
		if _, err := dialMXTLS(t, mx, &tls.Config{ServerName: "mx.test"}); smtpCode(err) != 454 {
			t.Fatalf("STARTTLS: %v, want 454", err)
		}
		// The session carries on in plaintext.
		tp := rawSession(t, mx)
		tp.PrintfLine("STARTTLS")
		if code, msg, err := tp.ReadResponse(454); err != nil {
			t.Fatalf("STARTTLS: %d %q %v", code, msg, err)
		}
		tp.PrintfLine("MAIL FROM:<a@sender.test>")
		if code, msg, err := tp.ReadResponse(250); err != nil {
			t.Fatalf("MAIL after 454: %d %q %v", code, msg, err)
		}
		if len(mx.SNIs()) != 0 {
			t.Errorf("SNIs %q without a handshake", mx.SNIs())
		}
	})
	t.Run("handshake broken", func(t *testing.T) {
		mx := w.NewMX(MXOptions{HandshakeFail: true, Cert: w.CA.Issue(CertValid, "mx.test")})
		_, err := dialMXTLS(t, mx, &tls.Config{ServerName: "mx.test", RootCAs: w.CA.Pool()})
		if err == nil {
			t.Fatalf("STARTTLS succeeded")
		}
		if smtpCode(err) != 0 {
			t.Errorf("STARTTLS: %v, want a TLS failure, not an SMTP reply", err)
		}
		if got := mx.SNIs(); !slices.Equal(got, []string{"mx.test"}) {
			t.Errorf("SNIs %q", got)
		}
	})
	t.Run("RequireTLS answers 530 before STARTTLS", func(t *testing.T) {
		mx := w.NewMX(MXOptions{RequireTLS: true, Cert: w.CA.Issue(CertValid, "mx.test")})
		c := dialMX(t, mx)
		if err := c.Mail("a@sender.test", nil); smtpCode(err) != 530 {
			t.Errorf("MAIL in plaintext: %v, want 530", err)
		}
		c, err := dialMXTLS(t, mx, &tls.Config{ServerName: "mx.test", RootCAs: w.CA.Pool()})
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Mail("a@sender.test", nil); err != nil {
			t.Errorf("MAIL over TLS: %v", err)
		}
	})
}

func TestMXTLSVersionsAndREQUIRETLS(t *testing.T) {
	t.Parallel()
	w := New(t)
	mx := w.NewMX(MXOptions{Cert: w.CA.Issue(CertValid, "mx.test"), MaxTLS: tls.VersionTLS12, AdvertiseREQUIRETLS: true, No8BITMIME: true})
	if ok, _ := dialMX(t, mx).Extension("REQUIRETLS"); ok {
		t.Errorf("REQUIRETLS advertised before TLS")
	}
	c, err := dialMXTLS(t, mx, &tls.Config{ServerName: "mx.test", RootCAs: w.CA.Pool()})
	if err != nil {
		t.Fatal(err)
	}
	if st, _ := c.TLSConnectionState(); st.Version != tls.VersionTLS12 {
		t.Errorf("TLS version %x, want 1.2", st.Version)
	}
	if ok, _ := c.Extension("REQUIRETLS"); !ok {
		t.Errorf("REQUIRETLS not advertised after TLS")
	}
	if ok, _ := c.Extension("8BITMIME"); ok {
		t.Errorf("8BITMIME advertised after TLS with No8BITMIME")
	}
	if err := c.Mail("a@sender.test", &smtp.MailOptions{RequireTLS: true}); err != nil {
		t.Fatalf("MAIL REQUIRETLS: %v", err)
	}
	c.Rcpt("u@ex.test", nil)
	if err := sendData(t, c, "x\r\n"); err != nil {
		t.Fatal(err)
	}
	if m := mx.WaitMessages(t, 1, 5*time.Second)[0]; !m.MailOptions.RequireTLS || m.TLSVersion != tls.VersionTLS12 {
		t.Errorf("RequireTLS %v, version %x", m.MailOptions.RequireTLS, m.TLSVersion)
	}

	only13 := w.NewMX(MXOptions{Cert: w.CA.Issue(CertValid, "mx.test"), MinTLS: tls.VersionTLS13})
	if _, err := dialMXTLS(t, only13, &tls.Config{ServerName: "mx.test", RootCAs: w.CA.Pool(), MaxVersion: tls.VersionTLS12}); err == nil {
		t.Errorf("a TLS 1.2 client got through a TLS 1.3-only server")
	}
}

// TestMXDiscardsPlaintextBeforeTLS checks RFC 3207 §4.2 on the server side:
// a command pipelined after STARTTLS is dropped, and after TLS the client
// must start over with EHLO.
func TestMXDiscardsPlaintextBeforeTLS(t *testing.T) {
	t.Parallel()
	w := New(t)
	mx := w.NewMX(MXOptions{Cert: w.CA.Issue(CertValid, "mx.test")})
	raw, tp := rawConn(t, mx)
	tp.PrintfLine("EHLO client.test")
	if _, _, err := tp.ReadResponse(250); err != nil {
		t.Fatal(err)
	}
	io.WriteString(raw, "STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
	if _, _, err := tp.ReadResponse(220); err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(raw, &tls.Config{ServerName: "mx.test", RootCAs: w.CA.Pool()})
	if err := tc.Handshake(); err != nil {
		t.Fatal(err)
	}
	tt := textproto.NewConn(tc)
	tt.PrintfLine("MAIL FROM:<a@sender.test>")
	if code, msg, err := tt.ReadResponse(503); err != nil {
		t.Errorf("MAIL without EHLO after TLS: %d %s %v, want 503", code, msg, err)
	}
	tt.PrintfLine("EHLO client.test")
	if _, msg, err := tt.ReadResponse(250); err != nil || !strings.HasPrefix(msg, "Hello client.test") {
		t.Errorf("first reply after EHLO: %q %v (the injected MAIL must not be answered)", msg, err)
	}
	tt.PrintfLine("RCPT TO:<u@ex.test>")
	if code, _, _ := tt.ReadResponse(250); code/100 != 5 {
		t.Errorf("RCPT without MAIL after TLS: %d, want 5xx (no state kept from before TLS)", code)
	}
}

// TestMXBDATPassesThrough sends a BDAT chunk whose bytes look like
// commands: they must reach the message untouched.
func TestMXBDATPassesThrough(t *testing.T) {
	t.Parallel()
	w := New(t)
	mx := w.NewMX(MXOptions{Cert: w.CA.Issue(CertValid, "mx.test")})
	raw, tp := rawConn(t, mx)
	chunk := "STARTTLS\r\nDATA\r\n"
	io.WriteString(raw, "EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@ex.test>\r\nBDAT "+strconv.Itoa(len(chunk))+" LAST\r\n"+chunk)
	for _, want := range []int{250, 250, 250, 250} {
		if code, msg, err := tp.ReadResponse(want); err != nil {
			t.Fatalf("reply %d %q: %v", code, msg, err)
		}
	}
	if m := mx.WaitMessages(t, 1, 5*time.Second)[0]; string(m.Data) != chunk {
		t.Errorf("BDAT data %q, want %q", m.Data, chunk)
	}
}

func TestMXSharedPortAndClose(t *testing.T) {
	t.Parallel()
	w := New(t)
	a := w.NewMX(MXOptions{})
	b := w.NewMX(MXOptions{})
	if a.IP() == b.IP() {
		t.Fatalf("two MX servers on one IP")
	}
	_, pa, _ := net.SplitHostPort(a.Addr())
	_, pb, _ := net.SplitHostPort(b.Addr())
	if pa != pb || pa != strconv.Itoa(w.MXPort()) {
		t.Errorf("ports %s and %s, want both %d", pa, pb, w.MXPort())
	}
	c := dialMX(t, a)
	done := make(chan struct{})
	go func() { a.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		t.Fatalf("Close with an open session took too long")
	}
	if err := c.Noop(); err == nil {
		t.Errorf("session survived Close")
	}
	if _, err := net.DialTimeout("tcp", a.Addr(), time.Second); err == nil {
		t.Errorf("closed MX still accepts connections")
	}
	if err := dialMX(t, b).Noop(); err != nil {
		t.Errorf("other MX: %v", err)
	}
}

func TestMXCloseCutsScriptedDelays(t *testing.T) {
	t.Parallel()
	w := New(t)
	mx := w.NewMX(MXOptions{Script: func(cmd Command) *Reply {
		if cmd.Verb == "MAIL" {
			return &Reply{Delay: time.Hour}
		}
		return nil
	}})
	c := dialMX(t, mx)
	errc := make(chan error, 1)
	go func() { errc <- c.Mail("a@sender.test", nil) }()
	time.Sleep(100 * time.Millisecond)
	start := time.Now()
	mx.Close()
	select {
	case <-errc:
	case <-time.After(3 * time.Second):
		t.Fatalf("client still waiting after Close")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Close took %v", d)
	}
}

func TestMailboxCollectsMail(t *testing.T) {
	t.Parallel()
	w := New(t)
	box := w.Mailbox("sender.test")
	r := ask(t, w, "udp", "sender.test.", dns.TypeMX)
	if len(r.Answer) != 1 || r.Answer[0].(*dns.MX).Mx != "mx.sender.test." {
		t.Fatalf("MX answer %v", r.Answer)
	}
	a := ask(t, w, "udp", "mx.sender.test.", dns.TypeA)
	if len(a.Answer) != 1 || a.Answer[0].(*dns.A).A.String() != box.IP() {
		t.Fatalf("A answer %v, want %s", a.Answer, box.IP())
	}
	c, err := dialMXTLS(t, box, &tls.Config{ServerName: "mx.sender.test", RootCAs: w.CA.Pool()})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Mail("", nil); err != nil {
		t.Fatalf("MAIL FROM:<>: %v", err)
	}
	c.Rcpt("a@sender.test", nil)
	if err := sendData(t, c, "Subject: Undelivered Mail\r\n\r\nDSN\r\n"); err != nil {
		t.Fatal(err)
	}
	if m := box.WaitMessages(t, 1, 5*time.Second)[0]; m.From != "" || m.Rcpts[0] != "a@sender.test" || !m.TLS {
		t.Errorf("bounce recorded as %+v", m)
	}
}
