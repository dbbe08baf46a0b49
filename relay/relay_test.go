package relay

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/queue"
)

const testBody = "From: app@example.org\r\nTo: rcpt@example.com\r\nSubject: hello\r\n\r\nHello,\r\nworld.\r\n"

func TestSubmitAuthOverSTARTTLS(t *testing.T) {
	for _, tc := range []struct {
		name string
		auth sasl.Client
	}{
		{"PLAIN", sasl.NewPlainClient("", testUser, testPassword)},
		{"PLAIN with own authzid", sasl.NewPlainClient(testUser, testUser, testPassword)},
		{"LOGIN", sasl.NewLoginClient(testUser, testPassword)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, envOpts{})
			if ok, _ := e.client().Extension("AUTH"); ok {
				t.Fatal("AUTH offered before STARTTLS")
			}
			c := e.starttlsClient()
			if !c.SupportsAuth("PLAIN") || !c.SupportsAuth("LOGIN") {
				t.Fatal("AUTH PLAIN LOGIN not offered after STARTTLS")
			}
			for _, ext := range []string{"SIZE", "8BITMIME", "SMTPUTF8", "PIPELINING", "REQUIRETLS", "DSN"} {
				if ok, _ := c.Extension(ext); !ok {
					t.Errorf("%s not advertised", ext)
				}
			}
			if _, p := c.Extension("SIZE"); p != fmt.Sprint(e.cfg.Submission.MaxMessageBytes) {
				t.Errorf("SIZE %q, want %d", p, e.cfg.Submission.MaxMessageBytes)
			}
			if err := c.Auth(tc.auth); err != nil {
				t.Fatal(err)
			}
			if err := c.Mail("app@example.org", &smtp.MailOptions{Return: smtp.DSNReturnHeaders, EnvelopeID: "env-42", UTF8: true}); err != nil {
				t.Fatal(err)
			}
			err := c.Rcpt("rcpt@example.com", &smtp.RcptOptions{
				Notify:                []smtp.DSNNotify{smtp.DSNNotifyFailure, smtp.DSNNotifyDelayed},
				OriginalRecipientType: smtp.DSNAddressTypeRFC822,
				OriginalRecipient:     "orig@example.com",
			})
			if err != nil {
				t.Fatal(err)
			}
			w, err := c.Data()
			if err != nil {
				t.Fatal(err)
			}
			w.Write([]byte(testBody))
			resp, err := w.CloseWithResponse()
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasPrefix(resp.StatusText, "2.0.0 ") {
				t.Fatalf("reply %q lacks 2.0.0", resp.StatusText)
			}
			id := queueID(t, strings.TrimPrefix(resp.StatusText, "2.0.0 "))

			m, hdr, body := e.stored(id)
			if string(body) != testBody {
				t.Errorf("body %q, want %q", body, testBody)
			}
			if !strings.HasPrefix(hdr, "Received: from client.example ([127.0.0.1])\r\n\tby relay.test (stsrelay) with UTF8SMTPSA\r\n\tfor <rcpt@example.com>; ") {
				t.Errorf("Received header %q", hdr)
			}
			want := queue.Envelope{
				From: "app@example.org", SMTPUTF8: true, Body: "8BITMIME", Ret: "HDRS", EnvID: "env-42",
				// Decided by content: the ASCII message needs neither
				// SMTPUTF8 nor 8BITMIME, whatever MAIL said.
				Scanned: true, NeedsSMTPUTF8: false, EightBit: false,
				User: testUser, ClientIP: "127.0.0.1",
				Rcpts: []queue.RcptSpec{{Addr: "rcpt@example.com", Notify: []string{"FAILURE", "DELAY"}, ORcpt: "RFC822;orig@example.com"}},
			}
			if !reflect.DeepEqual(m.Env, want) {
				t.Errorf("envelope\n got %+v\nwant %+v", m.Env, want)
			}
			if m.Size != int64(len(hdr)+len(body)) {
				t.Errorf("size %d, want %d", m.Size, len(hdr)+len(body))
			}
			logs := e.acceptedLogs()
			if len(logs) != 1 {
				t.Fatalf("%d accepted log lines, want 1", len(logs))
			}
			f := logs[0].ContextMap()
			if f["queue_id"] != id || f["from"] != "app@example.org" || f["rcpt"] != int64(1) ||
				f["user"] != testUser || f["client_ip"] != "127.0.0.1" || f["size"] != m.Size {
				t.Errorf("accepted log fields %v", f)
			}
			if e.accepted.n.Load() != 1 {
				t.Errorf("accepted counter %d, want 1", e.accepted.n.Load())
			}
			if err := c.Quit(); err != nil {
				t.Error(err)
			}
		})
	}
}

func TestImplicitTLS(t *testing.T) {
	e := newEnv(t, envOpts{})
	c := e.tlsClient()
	if ok, _ := c.Extension("STARTTLS"); ok {
		t.Error("STARTTLS offered on an implicit TLS connection")
	}
	if _, ok := c.TLSConnectionState(); !ok {
		t.Fatal("not TLS")
	}
	if err := c.Auth(sasl.NewPlainClient("", testUser, testPassword)); err != nil {
		t.Fatal(err)
	}
	text, err := send(c, "app@example.org", nil, []string{"a@example.com", "b@example.net"}, []byte(testBody))
	if err != nil {
		t.Fatal(err)
	}
	m, hdr, body := e.stored(queueID(t, text))
	if string(body) != testBody {
		t.Errorf("body %q", body)
	}
	if !strings.Contains(hdr, "with ESMTPSA;") || strings.Contains(hdr, "for <") {
		t.Errorf("Received header %q: want ESMTPSA and no 'for' with two recipients", hdr)
	}
	if len(m.Env.Rcpts) != 2 || m.Env.Rcpts[0].Addr != "a@example.com" || m.Env.Rcpts[1].Addr != "b@example.net" {
		t.Errorf("recipients %+v", m.Env.Rcpts)
	}
}

// LOGIN without an initial response: both challenges are sent.
func TestAuthLoginChallenges(t *testing.T) {
	e := newEnv(t, envOpts{})
	r := dialRaw(t, e.tlsAddr, e.clientTLS)
	r.cmd("EHLO client.example", "250 ")
	r.cmd("AUTH LOGIN", "334 "+base64.StdEncoding.EncodeToString([]byte("Username:")))
	r.cmd(base64.StdEncoding.EncodeToString([]byte(testUser)), "334 "+base64.StdEncoding.EncodeToString([]byte("Password:")))
	r.cmd(base64.StdEncoding.EncodeToString([]byte(testPassword)), "235 ")
	r.cmd("MAIL FROM:<app@example.org>", "250 ")
}

func TestAuthMalformed(t *testing.T) {
	e := newEnv(t, envOpts{})
	r := dialRaw(t, e.tlsAddr, e.clientTLS)
	r.cmd("EHLO client.example", "250 ")
	r.cmd("AUTH PLAIN "+base64.StdEncoding.EncodeToString([]byte("no-nul-separators")), "501 5.5.2 ")
	r.cmd("AUTH CRAM-MD5", "504 5.5.4 ")
	r.cmd("AUTH PLAIN", "334 ")
	r.cmd("*", "501 ")
	r.cmd("AUTH PLAIN "+base64.StdEncoding.EncodeToString([]byte("\x00"+testUser+"\x00"+testPassword)), "235 ")
	r.cmd("AUTH PLAIN "+base64.StdEncoding.EncodeToString([]byte("\x00"+testUser+"\x00"+testPassword)), "503 ")
}

func TestBadCredentials(t *testing.T) {
	const step = 150 * time.Millisecond
	e := newEnv(t, envOpts{srv: func(s *Server) {
		s.throttle.step = step
		s.throttle.max = 4 * step
	}})
	attempt := func(user, pass string) time.Duration {
		t.Helper()
		c := e.tlsClient()
		start := time.Now()
		err := c.Auth(sasl.NewPlainClient("", user, pass))
		d := time.Since(start)
		if err == nil {
			t.Fatal("AUTH with bad credentials succeeded")
		}
		code, ec, msg := smtpCode(t, err)
		if code != 535 || ec != (smtp.EnhancedCode{5, 7, 8}) || msg != "Authentication credentials invalid" {
			t.Fatalf("reply %d %v %q, want 535 5.7.8 Authentication credentials invalid", code, ec, msg)
		}
		// Nothing may be relayed for this client.
		err = c.Mail("app@example.org", nil)
		if code, _, _ := smtpCode(t, err); code != 530 {
			t.Fatalf("MAIL after failed AUTH: %v", err)
		}
		return d
	}
	// The first two failures are answered at once, then step, 2·step.
	if d := attempt(testUser, "wrong"); d >= step {
		t.Errorf("first failure took %v", d)
	}
	if d := attempt("nosuchuser", testPassword); d >= step {
		t.Errorf("second failure took %v", d)
	}
	if d := attempt(testUser, ""); d < step {
		t.Errorf("third failure took %v, want ≥ %v", d, step)
	}
	if d := attempt(testUser, "wrong"); d < 2*step {
		t.Errorf("fourth failure took %v, want ≥ %v", d, 2*step)
	}
	if n := e.st.Len(); n != 0 {
		t.Errorf("%d messages queued", n)
	}
	if n := e.logs.FilterMessage("auth failed").Len(); n != 4 {
		t.Errorf("%d 'auth failed' log lines, want 4", n)
	}
	// A correct password still works. It waits like any attempt from
	// this address: the throttle runs before the (costly) comparison,
	// so it cannot know the password is right.
	c := e.tlsClient()
	start := time.Now()
	if err := c.Auth(sasl.NewPlainClient("", testUser, testPassword)); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d < 4*step {
		t.Errorf("successful AUTH after 4 failures took %v, want the throttle's %v", d, 4*step)
	}
}

func TestAuthBeforeTLS(t *testing.T) {
	plainAuth := "AUTH PLAIN " + base64.StdEncoding.EncodeToString([]byte("\x00"+testUser+"\x00"+testPassword))
	for _, tc := range []struct {
		name       string
		requireTLS bool
		loopback   bool
		allowed    bool
	}{
		{"require_tls_for_auth on loopback", true, true, false},
		{"require_tls_for_auth off, not loopback", false, false, false},
		{"require_tls_for_auth on, not loopback", true, false, false},
		{"require_tls_for_auth off on loopback", false, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, envOpts{
				cfg: func(c *config.Config) { c.Submission.RequireTLSForAuth = tc.requireTLS },
				srv: func(s *Server) {
					s.loopback = func(netip.Addr) bool { return tc.loopback }
				},
			})
			r := dialRaw(t, e.plainAddr, nil)
			ehlo := strings.Join(r.cmd("EHLO client.example", "250 "), "\n")
			if got := strings.Contains(ehlo, "AUTH PLAIN LOGIN"); got != tc.allowed {
				t.Errorf("AUTH offered = %v, want %v; EHLO reply:\n%s", got, tc.allowed, ehlo)
			}
			if !tc.allowed {
				r.cmd(plainAuth, "538 5.7.11 Encryption required for requested authentication mechanism")
				r.cmd("MAIL FROM:<app@example.org>", "530 5.7.0 Authentication required")
				return
			}
			r.cmd(plainAuth, "235 ")
			r.cmd("MAIL FROM:<app@example.org>", "250 ")
			r.cmd("RCPT TO:<rcpt@example.com>", "250 ")
			r.cmd("DATA", "354 ")
			text := r.cmd(testBody+".", "250 2.0.0 OK queued as ")[0]
			_, hdr, _ := e.stored(strings.TrimPrefix(text, "250 2.0.0 OK queued as "))
			if !strings.Contains(hdr, "with ESMTPA\r\n") {
				t.Errorf("Received header %q, want ESMTPA", hdr)
			}
		})
	}
}

func TestMailWithoutAuth(t *testing.T) {
	t.Run("untrusted network", func(t *testing.T) {
		e := newEnv(t, envOpts{})
		r := dialRaw(t, e.plainAddr, nil)
		r.cmd("EHLO client.example", "250 ")
		r.cmd("MAIL FROM:<app@example.org>", "530 5.7.0 Authentication required")
		r.cmd("RCPT TO:<rcpt@example.com>", "502 ")
		r.cmd("DATA", "502 ")
		// Also after STARTTLS, without AUTH.
		c := e.starttlsClient()
		_, err := send(c, "app@example.org", nil, []string{"rcpt@example.com"}, []byte(testBody))
		if code, ec, _ := smtpCode(t, err); code != 530 || ec != (smtp.EnhancedCode{5, 7, 0}) {
			t.Errorf("got %v, want 530 5.7.0", err)
		}
		if n := e.st.Len(); n != 0 {
			t.Errorf("%d messages queued", n)
		}
	})
	t.Run("trusted network", func(t *testing.T) {
		e := newEnv(t, envOpts{cfg: trustLoopback})
		c := e.client()
		text, err := send(c, "app@example.org", nil, []string{"rcpt@example.com"}, []byte(testBody))
		if err != nil {
			t.Fatal(err)
		}
		m, hdr, body := e.stored(queueID(t, text))
		if m.Env.User != "" || m.Env.ClientIP != "127.0.0.1" || string(body) != testBody {
			t.Errorf("envelope %+v body %q", m.Env, body)
		}
		if !strings.Contains(hdr, "with ESMTP\r\n") {
			t.Errorf("Received header %q, want plain ESMTP", hdr)
		}
	})
}

func TestAllowedSenders(t *testing.T) {
	e := newEnv(t, envOpts{cfg: func(c *config.Config) {
		trustLoopback(c)
		c.Submission.AllowedSenders = []string{"app@example.org", "example.net", "@example.com"}
	}})
	r := dialRaw(t, e.plainAddr, nil)
	r.cmd("EHLO client.example", "250 ")
	for _, tc := range []struct{ from, reply string }{
		{"app@example.org", "250 "},
		{"APP@Example.ORG", "250 "},
		{"other@example.org", "550 5.7.1 Sender not allowed"},
		{"anyone@example.net", "250 "},
		{"anyone@example.com", "250 "},
		{"anyone@sub.example.net", "550 5.7.1 Sender not allowed"},
		{"", "250 "}, // null sender
	} {
		r.cmd("MAIL FROM:<"+tc.from+">", tc.reply)
		r.cmd("RSET", "250 ")
	}
}

func TestLimits(t *testing.T) {
	e := newEnv(t, envOpts{cfg: func(c *config.Config) {
		trustLoopback(c)
		c.Submission.MaxRecipients = 2
		c.Submission.MaxMessageBytes = 4096
	}})

	t.Run("max_recipients", func(t *testing.T) {
		r := dialRaw(t, e.plainAddr, nil)
		r.cmd("EHLO client.example", "250 ")
		r.cmd("MAIL FROM:<app@example.org>", "250 ")
		r.cmd("RCPT TO:<a@example.com>", "250 ")
		r.cmd("RCPT TO:<b@example.com>", "250 ")
		r.cmd("RCPT TO:<c@example.com>", "452 4.5.3 ")
		r.cmd("DATA", "354 ")
		text := r.cmd(testBody+".", "250 2.0.0 OK queued as ")[0]
		m, _, _ := e.stored(strings.TrimPrefix(text, "250 2.0.0 OK queued as "))
		if len(m.Env.Rcpts) != 2 {
			t.Errorf("recipients %+v", m.Env.Rcpts)
		}
	})

	t.Run("message too big", func(t *testing.T) {
		before := e.st.Len()
		c := e.client()
		big := bytes.Repeat([]byte("0123456789012345678901234567890123456789\r\n"), 200)
		_, err := send(c, "app@example.org", nil, []string{"a@example.com"}, big)
		if code, ec, _ := smtpCode(t, err); code != 552 || ec != (smtp.EnhancedCode{5, 3, 4}) {
			t.Errorf("got %v, want 552 5.3.4", err)
		}
		if n := e.st.Len(); n != before {
			t.Errorf("queue grew from %d to %d", before, n)
		}
		// The connection is still usable.
		if _, err := send(c, "app@example.org", nil, []string{"a@example.com"}, []byte(testBody)); err != nil {
			t.Errorf("after oversize message: %v", err)
		}
	})

	t.Run("SIZE at MAIL", func(t *testing.T) {
		r := dialRaw(t, e.plainAddr, nil)
		r.cmd("EHLO client.example", "250 ")
		r.cmd("MAIL FROM:<app@example.org> SIZE=4097", "552 5.3.4 ")
		r.cmd("MAIL FROM:<app@example.org> SIZE=4000", "250 ")
	})
}

func TestAddressSyntax(t *testing.T) {
	e := newEnv(t, envOpts{cfg: trustLoopback})
	r := dialRaw(t, e.plainAddr, nil)
	r.cmd("EHLO client.example", "250 ")
	r.cmd("MAIL FROM:<app@bad..example>", "553 5.1.7 ")
	r.cmd("MAIL FROM:<app@example.org>", "250 ")
	for _, tc := range []struct{ rcpt, reply string }{
		{"user@-bad-.example", "553 5.1.3 "},
		{"user@exa mple.com", "501 "},
		{"user", "501 "},
		{"user@[192.0.2.1]", "250 "},
		{"üser@example.com", "553 5.6.7 "},
		{"user@example.com", "250 "},
		{"user@example.com", "250 "}, // repeated: accepted, queued once
	} {
		r.cmd("RCPT TO:<"+tc.rcpt+">", tc.reply)
	}
	r.cmd("DATA", "354 ")
	text := r.cmd(testBody+".", "250 2.0.0 OK queued as ")[0]
	m, _, _ := e.stored(strings.TrimPrefix(text, "250 2.0.0 OK queued as "))
	if got := []string{m.Env.Rcpts[0].Addr, m.Env.Rcpts[1].Addr}; len(m.Env.Rcpts) != 2 || got[0] != "user@[192.0.2.1]" || got[1] != "user@example.com" {
		t.Errorf("recipients %+v", m.Env.Rcpts)
	}
	// With SMTPUTF8, a UTF-8 address is fine.
	r.cmd("MAIL FROM:<app@example.org> SMTPUTF8", "250 ")
	r.cmd("RCPT TO:<üser@bücher.example>", "250 ")
}

func TestRequireTLSParameter(t *testing.T) {
	e := newEnv(t, envOpts{cfg: trustLoopback})
	r := dialRaw(t, e.plainAddr, nil)
	if ehlo := strings.Join(r.cmd("EHLO client.example", "250 "), "\n"); strings.Contains(ehlo, "REQUIRETLS") {
		t.Errorf("REQUIRETLS advertised in the clear:\n%s", ehlo)
	}
	r.cmd("MAIL FROM:<app@example.org> REQUIRETLS", "530 5.7.10 ")

	c := e.starttlsClient()
	text, err := send(c, "app@example.org", &smtp.MailOptions{RequireTLS: true}, []string{"rcpt@example.com"}, []byte(testBody))
	if err != nil {
		t.Fatal(err)
	}
	m, hdr, _ := e.stored(queueID(t, text))
	if !m.Env.RequireTLS {
		t.Error("RequireTLS not recorded")
	}
	if !strings.Contains(hdr, "with ESMTPS\r\n") {
		t.Errorf("Received header %q, want ESMTPS", hdr)
	}
}

// A large message spills to disk in the queue and must come back byte for
// byte, with dot-stuffing undone and 8-bit bytes intact.
func TestLargeMessageByteExact(t *testing.T) {
	e := newEnv(t, envOpts{cfg: trustLoopback})
	var b bytes.Buffer
	b.WriteString("Subject: big\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n")
	lines := []string{
		".starts with a dot",
		"..two dots",
		".",
		"grüße aus Köln — ✓",
		"\xff\xfe\x80 raw 8-bit bytes \x00 and a NUL",
		"bare LF in the\nmiddle",
		strings.Repeat("x", 990),
		"",
	}
	for i := 0; b.Len() < 10<<20; i++ {
		fmt.Fprintf(&b, "%08d %s\r\n", i, lines[i%len(lines)])
		b.WriteString(lines[i%len(lines)] + "\r\n")
	}
	body := b.Bytes()
	// A bare LF is stored as CRLF; every other byte as sent.
	want := bytes.ReplaceAll(body, []byte("the\nmiddle"), []byte("the\r\nmiddle"))

	// The go-smtp client dot-stuffs; it would also turn a bare LF into
	// CRLF, so write the DATA ourselves.
	r := dialRaw(t, e.plainAddr, nil)
	r.conn.SetDeadline(time.Now().Add(60 * time.Second))
	r.cmd("EHLO client.example", "250 ")
	r.cmd("MAIL FROM:<app@example.org> BODY=8BITMIME", "250 ")
	r.cmd("RCPT TO:<rcpt@example.com>", "250 ")
	r.cmd("DATA", "354 ")
	stuffed := bytes.ReplaceAll(body, []byte("\r\n."), []byte("\r\n.."))
	go func() {
		r.conn.Write(stuffed)
		r.conn.Write([]byte(".\r\n"))
	}()
	text := r.expect("250 2.0.0 OK queued as ")[0]
	m, _, got := e.stored(strings.TrimPrefix(text, "250 2.0.0 OK queued as "))
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && i < len(want) && got[i] == want[i] {
			i++
		}
		t.Fatalf("body differs at byte %d (got %d bytes, want %d): got %q want %q", i, len(got), len(want),
			got[i:min(i+40, len(got))], want[i:min(i+40, len(want))])
	}
	if m.Env.Body != "8BITMIME" {
		t.Errorf("BODY %q", m.Env.Body)
	}
}

func TestPipelining(t *testing.T) {
	e := newEnv(t, envOpts{cfg: trustLoopback})
	r := dialRaw(t, e.plainAddr, nil)
	if ehlo := strings.Join(r.cmd("EHLO client.example", "250 "), "\n"); !strings.Contains(ehlo, "PIPELINING") {
		t.Fatalf("PIPELINING not advertised:\n%s", ehlo)
	}
	// RFC 2920: everything up to DATA in one write, then the message, the
	// next transaction and QUIT in another.
	r.write("MAIL FROM:<app@example.org>\r\nRCPT TO:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
	r.expect("250 ")
	r.expect("250 ")
	r.expect("250 ")
	r.expect("354 ")
	r.write(testBody + ".\r\nRSET\r\nMAIL FROM:<app@example.org>\r\nRCPT TO:<c@example.com>\r\nNOOP\r\nQUIT\r\n")
	id := strings.TrimPrefix(r.expect("250 2.0.0 OK queued as ")[0], "250 2.0.0 OK queued as ")
	r.expect("250 ")
	r.expect("250 ")
	r.expect("250 ")
	r.expect("250 ")
	r.expect("221 ")
	m, _, body := e.stored(id)
	if len(m.Env.Rcpts) != 2 || string(body) != testBody {
		t.Errorf("recipients %+v body %q", m.Env.Rcpts, body)
	}
	if n := e.st.Len(); n != 1 {
		t.Errorf("%d messages queued, want 1", n)
	}
}

// BDAT (CHUNKING, which go-smtp always offers) goes the same way as DATA.
func TestBDAT(t *testing.T) {
	e := newEnv(t, envOpts{cfg: trustLoopback})
	r := dialRaw(t, e.plainAddr, nil)
	r.cmd("EHLO client.example", "250 ")
	r.cmd("MAIL FROM:<app@example.org>", "250 ")
	r.cmd("RCPT TO:<a@example.com>", "250 ")
	half := len(testBody) / 2
	r.write(fmt.Sprintf("BDAT %d\r\n%s", half, testBody[:half]))
	r.expect("250 ")
	r.write(fmt.Sprintf("BDAT %d LAST\r\n%s", len(testBody)-half, testBody[half:]))
	id := strings.TrimPrefix(r.expect("250 2.0.0 OK queued as ")[0], "250 2.0.0 OK queued as ")
	if _, _, body := e.stored(id); string(body) != testBody {
		t.Errorf("body %q", body)
	}
}

func TestQueueWriteFailure(t *testing.T) {
	e := newEnv(t, envOpts{cfg: trustLoopback})
	r := dialRaw(t, e.plainAddr, nil)
	r.cmd("EHLO client.example", "250 ")
	r.cmd("MAIL FROM:<app@example.org>", "250 ")
	r.cmd("RCPT TO:<a@example.com>", "250 ")
	r.cmd("DATA", "354 ")
	if err := e.st.Close(); err != nil { // every Commit now fails with ErrClosed
		t.Fatal(err)
	}
	r.cmd(testBody+".", "451 4.3.0 ")
	if n := e.st.Len(); n != 0 {
		t.Errorf("%d messages queued", n)
	}
	if len(e.acceptedLogs()) != 0 || e.accepted.n.Load() != 0 {
		t.Error("a failed commit was logged or counted as accepted")
	}
	if e.logs.FilterMessage("queue commit failed").Len() != 1 {
		t.Error("commit failure not logged")
	}
}

func TestShutdownLetsTransactionFinish(t *testing.T) {
	e := newEnv(t, envOpts{cfg: trustLoopback})

	idle := dialRaw(t, e.plainAddr, nil)
	idle.cmd("EHLO idle.example", "250 ")

	busy := dialRaw(t, e.plainAddr, nil)
	busy.cmd("EHLO busy.example", "250 ")
	busy.cmd("MAIL FROM:<app@example.org>", "250 ")
	busy.cmd("RCPT TO:<a@example.com>", "250 ")
	busy.cmd("DATA", "354 ")
	busy.write(testBody[:20])

	done := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		done <- e.srv.Shutdown(ctx)
	}()

	// The idle connection is told at once.
	idle.expect("421 4.3.2 shutting down")
	if _, err := idle.r.ReadByte(); err == nil {
		t.Error("idle connection not closed after 421")
	}
	idle.conn.Close()
	// New connections are refused.
	deadline := time.Now().Add(5 * time.Second)
	for {
		conn, err := net.DialTimeout("tcp", e.plainAddr, time.Second)
		if err != nil {
			break
		}
		conn.Close()
		if time.Now().After(deadline) {
			t.Fatal("still accepting connections after Shutdown began")
		}
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case err := <-done:
		t.Fatalf("Shutdown returned %v while a transaction was in progress", err)
	default:
	}

	busy.write(testBody[20:] + ".\r\n")
	id := strings.TrimPrefix(busy.expect("250 2.0.0 OK queued as ")[0], "250 2.0.0 OK queued as ")
	busy.expect("421 4.3.2 shutting down")
	busy.conn.Close()
	if _, _, body := e.stored(id); string(body) != testBody {
		t.Errorf("body %q", body)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Shutdown: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Shutdown did not return after the transaction finished")
	}
}

func TestShutdownDeadline(t *testing.T) {
	e := newEnv(t, envOpts{cfg: trustLoopback})
	busy := dialRaw(t, e.plainAddr, nil)
	busy.cmd("EHLO busy.example", "250 ")
	busy.cmd("MAIL FROM:<app@example.org>", "250 ")
	busy.cmd("RCPT TO:<a@example.com>", "250 ")
	busy.cmd("DATA", "354 ")
	busy.write(testBody[:20])

	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	start := time.Now()
	err := e.srv.Shutdown(ctx)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Shutdown = %v, want DeadlineExceeded", err)
	}
	if d := time.Since(start); d > 4*time.Second {
		t.Errorf("Shutdown took %v", d)
	}
	busy.expect("421 4.3.2 shutting down")
	if _, err := busy.r.ReadByte(); err == nil {
		t.Error("connection still open after forced shutdown")
	}
	if n := e.st.Len(); n != 0 {
		t.Errorf("%d messages queued from a cut-off transaction", n)
	}
}

func TestNewErrors(t *testing.T) {
	st, err := queue.Open(queue.Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	base := func() *config.Config {
		c := config.Default()
		c.Submission.Listen = []string{"127.0.0.1:0"}
		return c
	}
	for _, tc := range []struct {
		name string
		cfg  func(*config.Config)
		want string
	}{
		{"missing cert file", func(c *config.Config) {
			c.Submission.TLSCertFile, c.Submission.TLSKeyFile = "/nonexistent/cert.pem", "/nonexistent/key.pem"
		}, "tls_cert_file"},
		{"implicit TLS without cert", func(c *config.Config) { c.Submission.ImplicitTLSListen = []string{"127.0.0.1:0"} }, "implicit_tls_listen"},
		{"bad hash", func(c *config.Config) {
			c.Submission.Users = []config.User{{Username: "u", PasswordHash: "$2a$nonsense"}}
		}, `"u"`},
		{"no listener", func(c *config.Config) { c.Submission.Listen = nil }, "no listener"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := base()
			tc.cfg(c)
			_, err := New(Options{Config: c, Queue: st})
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("New: %v, want an error mentioning %s", err, tc.want)
			}
		})
	}
	// A busy address fails Start and leaves nothing bound.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c := base()
	c.Submission.Listen = []string{"127.0.0.1:0", l.Addr().String()}
	s, err := New(Options{Config: c, Queue: st})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err == nil {
		t.Error("Start on a busy address succeeded")
	}
	if len(s.Addrs()) != 0 {
		t.Errorf("Addrs after failed Start: %v", s.Addrs())
	}
}
