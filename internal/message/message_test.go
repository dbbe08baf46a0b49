package message

import (
	"bytes"
	"encoding/base64"
	"errors"
	"io"
	"mime"
	"mime/multipart"
	"mime/quotedprintable"
	"net/mail"
	"strings"
	"testing"
)

func TestScannerContent(t *testing.T) {
	cases := []struct {
		name string
		msg  string
		want Content
	}{
		{"ascii", "Subject: hi\r\n\r\nbody\r\n", Content{}},
		{"rfc2047 subject is ascii (RFC 2047 §2)", "Subject: =?UTF-8?Q?gr=C3=BC=C3=9Fe?=\r\n\r\nbody\r\n", Content{}},
		{"utf-8 subject needs SMTPUTF8 (RFC 6532 §3)", "Subject: grüße\r\n\r\nbody\r\n", Content{HeaderUTF8: true}},
		{"utf-8 body is 8-bit (RFC 6152)", "Subject: hi\r\n\r\ngrüße\r\n", Content{Body8Bit: true}},
		{"both", "To: bücher\r\n\r\nü\r\n", Content{HeaderUTF8: true, Body8Bit: true}},
		{"bare LF ends the header too", "Subject: hi\n\nü\n", Content{Body8Bit: true}},
		{"no header section", "\r\nü", Content{Body8Bit: true}},
		{"header only", "Subject: ü", Content{HeaderUTF8: true}},
		{"8-bit after a long ascii run", "A: b\r\n\r\n" + strings.Repeat("x", 1000) + "\xff", Content{Body8Bit: true}},
		{"folded header with utf-8", "Subject: a\r\n  ü\r\n\r\nx", Content{HeaderUTF8: true}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := NewScanner()
			s.Write([]byte(c.msg))
			if got := s.Content(); got != c.want {
				t.Errorf("whole: got %+v, want %+v", got, c.want)
			}
			// Byte by byte and in pairs: a split anywhere changes nothing.
			for _, step := range []int{1, 2, 3, 5} {
				s := NewScanner()
				for i := 0; i < len(c.msg); i += step {
					s.Write([]byte(c.msg[i:min(i+step, len(c.msg))]))
				}
				if got := s.Content(); got != c.want {
					t.Errorf("in pieces of %d: got %+v, want %+v", step, got, c.want)
				}
			}
		})
	}
}

func convert(t *testing.T, msg string, opts ConvertOptions) (string, error) {
	t.Helper()
	var out bytes.Buffer
	err := To7Bit(&out, func() (io.Reader, error) { return strings.NewReader(msg), nil }, opts)
	if err == nil {
		if i := bytes.IndexFunc(out.Bytes(), func(r rune) bool { return r >= 0x80 }); i >= 0 && !opts.UTF8Headers {
			t.Fatalf("output holds 8-bit data at %d:\n%s", i, out.String())
		}
	}
	return out.String(), err
}

// decodedText parses a single-part message and returns its decoded body.
func decodedText(t *testing.T, msg string) (mail.Header, string) {
	t.Helper()
	m, err := mail.ReadMessage(strings.NewReader(msg))
	if err != nil {
		t.Fatalf("output is not a message: %v\n%s", err, msg)
	}
	return m.Header, decodePart(t, m.Header.Get("Content-Transfer-Encoding"), m.Body)
}

func decodePart(t *testing.T, cte string, r io.Reader) string {
	t.Helper()
	switch strings.ToLower(cte) {
	case "quoted-printable":
		r = quotedprintable.NewReader(r)
	case "base64":
		r = newBase64Reader(r)
	}
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("decoding %s: %v", cte, err)
	}
	return string(b)
}

func TestTo7BitPlainMessage(t *testing.T) {
	// RFC 2045 §5.2: no MIME-Version means text/plain; the converted
	// message says what it now is.
	body := "Grüße aus Köln\r\nzweite Zeile ü\r\n"
	msg := "From: a@example.org\r\nSubject: hi\r\n\r\n" + body
	out, err := convert(t, msg, ConvertOptions{})
	if err != nil {
		t.Fatal(err)
	}
	h, text := decodedText(t, out)
	if h.Get("MIME-Version") != "1.0" {
		t.Errorf("MIME-Version = %q", h.Get("MIME-Version"))
	}
	if mt, p, _ := mime.ParseMediaType(h.Get("Content-Type")); mt != "text/plain" || p["charset"] != "utf-8" {
		t.Errorf("Content-Type = %q", h.Get("Content-Type"))
	}
	if h.Get("Subject") != "hi" || h.Get("From") != "a@example.org" {
		t.Errorf("header fields changed: %v", h)
	}
	if text != body {
		t.Errorf("decoded body %q, want %q", text, body)
	}
}

func TestTo7BitNotUTF8IsUnknown8bit(t *testing.T) {
	out, err := convert(t, "Subject: x\r\n\r\ncaf\xe9\r\n", ConvertOptions{})
	if err != nil {
		t.Fatal(err)
	}
	h, text := decodedText(t, out)
	if _, p, _ := mime.ParseMediaType(h.Get("Content-Type")); p["charset"] != "unknown-8bit" {
		t.Errorf("Content-Type = %q, want charset unknown-8bit (RFC 1428)", h.Get("Content-Type"))
	}
	if text != "caf\xe9\r\n" {
		t.Errorf("decoded %q", text)
	}
}

func TestTo7BitMultipart(t *testing.T) {
	ascii := "plain ascii part\r\nline two"
	utf := "UTF-8 Text: Grüße\r\n" + strings.Repeat("ä", 100) + "\r\nend"
	bin := "\x00\x01\xff\xfe binary \x80\r\n"
	msg := "From: a@example.org\r\n" +
		"MIME-Version: 1.0\r\n" +
		"Content-Type: multipart/mixed; boundary=\"b1\"\r\n" +
		"Content-Transfer-Encoding: 8bit\r\n" +
		"\r\n" +
		"preamble\r\n" +
		"--b1\r\n" +
		"Content-Type: text/plain; charset=us-ascii\r\n" +
		"\r\n" +
		ascii + "\r\n" +
		"--b1\r\n" +
		"Content-Type: text/plain; charset=utf-8\r\n" +
		"Content-Transfer-Encoding: 8bit\r\n" +
		"\r\n" +
		utf + "\r\n" +
		"--b1\r\n" +
		"Content-Type: application/octet-stream\r\n" +
		"Content-Transfer-Encoding: binary\r\n" +
		"\r\n" +
		bin + "\r\n" +
		"--b1--\r\n" +
		"epilogue\r\n"
	out, err := convert(t, msg, ConvertOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "--b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"+ascii+"\r\n--b1\r\n") {
		t.Errorf("the 7-bit part did not pass unchanged:\n%s", out)
	}
	m, err := mail.ReadMessage(strings.NewReader(out))
	if err != nil {
		t.Fatal(err)
	}
	if got := m.Header.Get("Content-Transfer-Encoding"); got != "7bit" {
		t.Errorf("multipart's 8bit label became %q, want 7bit", got)
	}
	mr := multipart.NewReader(m.Body, "b1")
	want := []struct{ cte, text string }{{"", ascii}, {"quoted-printable", utf}, {"base64", bin}}
	for i, w := range want {
		p, err := mr.NextRawPart()
		if err != nil {
			t.Fatalf("part %d: %v", i, err)
		}
		cte := p.Header.Get("Content-Transfer-Encoding")
		if cte != w.cte {
			t.Errorf("part %d: CTE %q, want %q", i, cte, w.cte)
		}
		if got := decodePart(t, cte, p); got != w.text {
			t.Errorf("part %d decoded %q, want %q", i, got, w.text)
		}
	}
	if !strings.HasSuffix(out, "--b1--\r\nepilogue\r\n") {
		t.Errorf("epilogue lost: %q", out[max(0, len(out)-40):])
	}
}

func TestTo7BitNestedMessage(t *testing.T) {
	// RFC 2046 §5.2.1: a message/rfc822 part cannot be encoded as a
	// whole; its own 8-bit leaf is.
	inner := "Subject: inner\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nInnen: ö\r\n"
	msg := "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n" +
		"--x\r\nContent-Type: message/rfc822\r\n\r\n" + inner + "--x--\r\n"
	out, err := convert(t, msg, ConvertOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n") {
		t.Errorf("enclosed header not kept:\n%s", out)
	}
	if !strings.Contains(out, "Innen: =C3=B6") {
		t.Errorf("enclosed body not quoted-printable:\n%s", out)
	}
}

func TestTo7BitUnconvertible(t *testing.T) {
	cases := []struct{ name, msg string }{
		{"8-bit header field", "Subject: ü\r\n\r\nü\r\n"},
		{"8-bit preamble", "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\nü\r\n--x\r\n\r\na\r\n--x--\r\n"},
		{"8-bit inside base64", "MIME-Version: 1.0\r\nContent-Transfer-Encoding: base64\r\n\r\nü\r\n"},
		{"8-bit header of an enclosed message", "MIME-Version: 1.0\r\nContent-Type: message/rfc822\r\n\r\nSubject: ü\r\n\r\nx\r\n"},
		{"nesting bomb", strings.Repeat("Content-Type: message/rfc822\r\n\r\n", 100) + "ü\r\n"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := convert(t, c.msg, ConvertOptions{})
			if !errors.Is(err, ErrUnconvertible) {
				t.Fatalf("err = %v, want ErrUnconvertible", err)
			}
		})
	}
}

func TestTo7BitUTF8HeadersAllowed(t *testing.T) {
	// An SMTPUTF8 session without 8BITMIME: the header stays UTF-8, the
	// body is still encoded.
	out, err := convert(t, "Subject: Grüße\r\n\r\nGrüße\r\n", ConvertOptions{UTF8Headers: true})
	if err != nil {
		t.Fatal(err)
	}
	h, text := decodedText(t, out)
	if h.Get("Subject") != "Grüße" || text != "Grüße\r\n" {
		t.Errorf("subject %q, body %q", h.Get("Subject"), text)
	}
	if _, body, _ := strings.Cut(out, "\r\n\r\n"); has8Bit([]byte(body)) {
		t.Errorf("body still 8-bit: %q", body)
	}
}

func TestTo7BitLongLine(t *testing.T) {
	// A line longer than the reader's buffer comes in pieces; all of it
	// is encoded and nothing is lost.
	line := strings.Repeat("äbc", 50000)
	out, err := convert(t, "Subject: x\r\n\r\n"+line+"\r\n", ConvertOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, text := decodedText(t, out); text != line+"\r\n" {
		t.Errorf("decoded %d bytes, want %d", len(text), len(line)+2)
	}
	for _, l := range strings.Split(out, "\r\n") {
		if len(l) > 998 {
			t.Fatalf("output line of %d octets (RFC 5322 §2.1.1 limit 998)", len(l))
		}
	}
}

func TestTo7BitBase64WithoutFinalNewline(t *testing.T) {
	data := strings.Repeat("\xff", 57*3) // exactly three full base64 lines
	out, err := convert(t, "Content-Type: image/png\r\nMIME-Version: 1.0\r\n\r\n"+data, ConvertOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out, "\r\n\r\n\r\n") || !strings.HasSuffix(out, "\r\n") {
		t.Errorf("bad line structure: %q", out)
	}
	if _, text := decodedText(t, out); text != data {
		t.Errorf("decoded %q", text)
	}
}

func FuzzTo7Bit(f *testing.F) {
	f.Add("Subject: x\r\n\r\nü\r\n")
	f.Add("MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\n\r\nä\r\n--x--\r\n")
	f.Add("Content-Type: message/rfc822\r\n\r\nA: b\r\n\r\n\xff")
	f.Fuzz(func(t *testing.T, msg string) {
		var out bytes.Buffer
		err := To7Bit(&out, func() (io.Reader, error) { return strings.NewReader(msg), nil }, ConvertOptions{})
		if err != nil {
			if !errors.Is(err, ErrUnconvertible) {
				t.Fatalf("unexpected error kind: %v", err)
			}
			return
		}
		// Whatever came in, nothing 8-bit goes out.
		if has8Bit(out.Bytes()) {
			t.Fatalf("8-bit output for %q:\n%q", msg, out.String())
		}
	})
}

// newBase64Reader decodes base64 lines (encoding/base64 skips CR and LF).
func newBase64Reader(r io.Reader) io.Reader { return base64.NewDecoder(base64.StdEncoding, r) }
