package main

import (
	"bytes"
	"io"
	"mime/quotedprintable"
	"net/mail"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/internal/testworld"
)

// What a message needs of the next hop is decided by its content, not by
// the MAIL parameters the client sent (RFC 6531 §3.2, RFC 6152 §3).

// sevenBitMX is an MX offering neither SMTPUTF8 nor 8BITMIME, as many
// receiving servers still are.
func sevenBitMX(w *testworld.World, domain string) *testworld.MXServer {
	host := "mx1." + domain
	mx := w.NewMX(testworld.MXOptions{Hostname: host, Cert: w.CA.Issue(testworld.CertValid, host), NoSMTPUTF8: true, No8BITMIME: true})
	w.DNS.SetMX(domain, testworld.MX{Pref: 10, Host: host})
	w.DNS.SetA(host, mx.IP())
	return mx
}

func has8Bit(b []byte) bool { return bytes.IndexFunc(b, func(r rune) bool { return r >= 0x80 }) >= 0 }

// Go's net/smtp (and other libraries) add SMTPUTF8 to MAIL whenever the
// server offers it. A plain ASCII message sent that way must still reach a
// server without SMTPUTF8, unchanged and without the parameter.
func TestE2EASCIIWithSMTPUTF8FlagReachesSevenBitMX(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := sevenBitMX(w, "old.test")
	r := startRelay(t, testConfig(t, w))

	msg := []byte("From: <app@client.test>\r\nTo: <u@old.test>\r\nSubject: =?UTF-8?Q?gr=C3=BC=C3=9Fe?=\r\n\r\nPlain ASCII.\r\n")
	id, err := r.submit("app@client.test", []string{"u@old.test"}, msg,
		submitOpts{mail: &smtp.MailOptions{UTF8: true, Body: smtp.Body8BitMIME}})
	if err != nil {
		t.Fatal(err)
	}
	l := r.waitResult("u@old.test", "delivered", 15*time.Second)
	if l["queue_id"] != id {
		t.Errorf("delivery line %v", l)
	}
	got := mx.WaitMessages(t, 1, 5*time.Second)[0]
	if got.MailOptions.UTF8 || got.MailOptions.Body != "" {
		t.Errorf("MAIL carried SMTPUTF8=%v BODY=%q to a server that offered neither", got.MailOptions.UTF8, got.MailOptions.Body)
	}
	if b := afterReceived(t, got.Data); !bytes.Equal(b, msg) {
		t.Errorf("message changed:\n%q\nwant\n%q", b, msg)
	}
}

// An 8-bit body goes as is, with BODY=8BITMIME, to a server that offers
// 8BITMIME, and converted to quoted-printable to one that does not
// (RFC 6152 §3); SMTPUTF8 is not asked of either.
func TestE2EEightBitBodyConvertedForSevenBitMX(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	oldMX := sevenBitMX(w, "old.test")
	newMX := simpleDomain(w, "new.test")
	r := startRelay(t, testConfig(t, w))

	text := "Grüße aus Köln — ünïcödé body.\r\nZweite Zeile.\r\n"
	msg := []byte("From: <app@client.test>\r\nTo: <u@old.test>\r\nSubject: utf-8 body\r\n" +
		"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + text)
	// The client declares nothing: the content decides.
	if _, err := r.submit("app@client.test", []string{"u@old.test", "v@new.test"}, msg); err != nil {
		t.Fatal(err)
	}
	r.waitResult("u@old.test", "delivered", 15*time.Second)
	r.waitResult("v@new.test", "delivered", 15*time.Second)

	got := newMX.WaitMessages(t, 1, 5*time.Second)[0]
	if got.MailOptions.Body != smtp.Body8BitMIME || got.MailOptions.UTF8 {
		t.Errorf("8BITMIME server: BODY=%q SMTPUTF8=%v, want BODY=8BITMIME only", got.MailOptions.Body, got.MailOptions.UTF8)
	}
	if b := afterReceived(t, got.Data); !bytes.Equal(b, msg) {
		t.Errorf("8BITMIME server got a changed message:\n%q", b)
	}

	conv := oldMX.WaitMessages(t, 1, 5*time.Second)[0]
	if conv.MailOptions.Body != "" || conv.MailOptions.UTF8 {
		t.Errorf("7-bit server: BODY=%q SMTPUTF8=%v", conv.MailOptions.Body, conv.MailOptions.UTF8)
	}
	if has8Bit(conv.Data) {
		t.Fatalf("8-bit data sent to a server without 8BITMIME:\n%s", conv.Data)
	}
	m, err := mail.ReadMessage(bytes.NewReader(conv.Data))
	if err != nil {
		t.Fatal(err)
	}
	if cte := m.Header.Get("Content-Transfer-Encoding"); cte != "quoted-printable" {
		t.Errorf("Content-Transfer-Encoding %q, want quoted-printable", cte)
	}
	if m.Header.Get("Subject") != "utf-8 body" || m.Header.Get("Content-Type") != "text/plain; charset=utf-8" {
		t.Errorf("header fields changed: %v", m.Header)
	}
	dec, err := io.ReadAll(quotedprintable.NewReader(m.Body))
	if err != nil || string(dec) != text {
		t.Errorf("decoded body %q (%v), want %q", dec, err, text)
	}
}

// A UTF-8 header field needs SMTPUTF8 whatever the client declared; a
// server without it gets nothing and the sender a 5.6.7 bounce
// (RFC 6531 §3.4: no downgrade).
func TestE2EUTF8HeaderNeedsSMTPUTF8(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	oldMX := sevenBitMX(w, "old.test")
	newMX := simpleDomain(w, "new.test")
	r := startRelay(t, testConfig(t, w))

	msg := []byte("From: <app@client.test>\r\nTo: <u@old.test>\r\nSubject: Grüße\r\n\r\nASCII body.\r\n")
	if _, err := r.submit("app@client.test", []string{"u@old.test", "v@new.test"}, msg,
		submitOpts{mail: &smtp.MailOptions{UTF8: true}}); err != nil {
		t.Fatal(err)
	}
	l := r.waitResult("u@old.test", "bounced", 15*time.Second)
	if l["enhanced_code"] != "5.6.7" {
		t.Errorf("bounce line %v, want 5.6.7", l)
	}
	r.waitResult("v@new.test", "delivered", 15*time.Second)
	if got := newMX.WaitMessages(t, 1, 5*time.Second)[0]; !got.MailOptions.UTF8 {
		t.Errorf("SMTPUTF8 server was not asked for SMTPUTF8")
	}
	if v := countVerbs(oldMX.Commands()); v["MAIL"] != 0 {
		t.Errorf("server without SMTPUTF8 got MAIL: %v", v)
	}
}

// 8-bit data that no MIME encoding can carry (here inside a part already
// declared base64) is returned to the sender, never sent as 8-bit.
func TestE2EUnconvertibleEightBitBounces(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	oldMX := sevenBitMX(w, "old.test")
	mb := w.Mailbox("client.test")
	r := startRelay(t, testConfig(t, w))

	msg := []byte("From: <app@client.test>\r\nSubject: broken\r\nMIME-Version: 1.0\r\nContent-Type: application/octet-stream\r\n" +
		"Content-Transfer-Encoding: base64\r\n\r\nAAAA\xff\xfe\r\n")
	if _, err := r.submit("app@client.test", []string{"u@old.test"}, msg); err != nil {
		t.Fatal(err)
	}
	l := r.waitResult("u@old.test", "bounced", 15*time.Second)
	if l["enhanced_code"] != "5.6.3" || !strings.Contains(l["reason"].(string), "8BITMIME") {
		t.Errorf("bounce line %v, want 5.6.3 naming 8BITMIME", l)
	}
	d := waitDSN(t, mb, 1, 15*time.Second)
	if len(d.Rcpts) != 1 || d.Rcpts[0].Get("Status") != "5.6.3" {
		t.Errorf("DSN %v", d.Rcpts)
	}
	if v := countVerbs(oldMX.Commands()); v["DATA"] != 0 {
		t.Errorf("7-bit server got DATA: %v", v)
	}
}
