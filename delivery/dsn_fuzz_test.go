package delivery

import (
	"bytes"
	"io"
	"mime"
	"mime/multipart"
	"net/mail"
	"strings"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/queue"
)

// FuzzBuildDSN: a DSN carries text from peers (an MX's reply, its host
// name) and from the submitted message (its header). Whatever they hold,
// the DSN must be well-formed mail: CRLF line endings only, lines within
// RFC 5322's 998 bytes (outside the returned message), a multipart/report
// whose parts all read, and exactly one Final-Recipient per recipient:
// a reply text cannot add a recipient or a header.
//
// The envelope fields and the MX name hold what submission lets through (no control
// characters, addresses within RFC 5321's 256 bytes); the original
// message is CRLF-normalised as the queue stores it.
func FuzzBuildDSN(f *testing.F) {
	f.Add("app@client.test", "gone@ex.test", "rfc822;gone@ex.test", "env-1", 550, "5.1.1", "no such user", "mx1.ex.test", "From: <app@client.test>\r\nSubject: x\r\n\r\nbody\r\n", false, false)
	f.Add("a@b", "c@d", "", "", 451, "", "try again\r\nFinal-Recipient: rfc822; evil@x\r\n", "mx\r\nX-Injected: 1", "Subject: \xff\xfe\r\n\tfolded\r\n", true, true)
	f.Add("a@b", "c@d", "utf-8;c@d", "", 0, "9.9", strings.Repeat("long ", 400), "", "X: "+strings.Repeat("y", 2000)+"\r\n\r\n", false, true)
	f.Add("", "c@d", "", "", 421, "4.7.0", "\x00\x1b[2J", "mx.\x00", "\r\n", true, false)
	f.Fuzz(func(t *testing.T, from, rcpt, orcpt, envID string, code int, enhanced, reply, mx, original string, delayed, full bool) {
		for _, s := range []string{from, rcpt, orcpt, envID} {
			if len(s) > 256 || strings.ContainsFunc(s, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
				return // submission refuses it (relay.checkAddress, xtext checks)
			}
		}
		if len(mx) > 255 || strings.ContainsFunc(mx, func(r rune) bool { return r < 0x20 || r == 0x7f }) {
			return // a DNS name in presentation format (miekg/dns escapes the rest)
		}
		original = strings.ReplaceAll(strings.ReplaceAll(original, "\r", ""), "\n", "\r\n")
		ret := ""
		if full {
			ret = "FULL"
		}
		m := &queue.Message{ID: "1k84rb8270t7fd", Env: queue.Envelope{From: from, EnvID: envID, Ret: ret},
			Received: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC), Size: int64(len(original)),
			Rcpts: []queue.Recipient{
				{RcptSpec: queue.RcptSpec{Addr: rcpt, ORcpt: orcpt}, Status: queue.Bounced, LastCode: code % 1000,
					LastEnhanced: enhanced, LastError: reply, LastMX: mx, LastAttempt: time.Date(2026, 1, 2, 3, 5, 0, 0, time.UTC)},
				{RcptSpec: queue.RcptSpec{Addr: "second@ex.test"}, Status: queue.Bounced, LastError: reply},
			}}
		action := actionFailed
		if delayed {
			action = actionDelayed
		}
		msg := BuildDSN(DSNInput{ReportingMTA: "relay.test", Message: m, Rcpts: []*queue.Recipient{&m.Rcpts[0], &m.Rcpts[1]},
			Action: action, Now: time.Date(2026, 1, 2, 4, 0, 0, 0, time.UTC), Original: strings.NewReader(original),
			WillRetryTil: time.Date(2026, 1, 7, 3, 4, 5, 0, time.UTC)})

		if i := bytes.IndexAny(bytes.ReplaceAll(msg, []byte("\r\n"), nil), "\r\n"); i >= 0 {
			t.Fatalf("bare CR or LF in the DSN:\n%q", msg)
		}
		head := msg
		if i := bytes.Index(msg, []byte("Content-Description: Undelivered message\r\n")); i >= 0 {
			head = msg[:i]
		}
		for _, l := range bytes.Split(head, []byte("\r\n")) {
			if len(l) > 998 {
				t.Fatalf("line of %d bytes in the DSN: %.80q…", len(l), l)
			}
		}
		parsed, err := mail.ReadMessage(bytes.NewReader(msg))
		if err != nil {
			t.Fatalf("DSN does not parse: %v", err)
		}
		mt, params, err := mime.ParseMediaType(parsed.Header.Get("Content-Type"))
		if err != nil || mt != "multipart/report" || params["boundary"] == "" {
			t.Fatalf("Content-Type %q (%v)", parsed.Header.Get("Content-Type"), err)
		}
		mr := multipart.NewReader(parsed.Body, params["boundary"])
		finals := 0
		parts := 0
		for {
			p, err := mr.NextPart()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Fatalf("part %d: %v", parts+1, err)
			}
			parts++
			body, err := io.ReadAll(p)
			if err != nil {
				t.Fatalf("part %d: %v", parts, err)
			}
			if p.Header.Get("Content-Type") == "message/delivery-status" {
				for _, l := range strings.Split(string(body), "\r\n") {
					if strings.HasPrefix(l, "Final-Recipient:") {
						finals++
					}
				}
			}
		}
		if parts != 3 || finals != 2 {
			t.Fatalf("%d parts and %d Final-Recipient fields, want 3 and 2:\n%s", parts, finals, msg)
		}
	})
}
