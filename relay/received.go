package relay

import (
	"strings"
	"time"
	"unicode/utf8"

	"github.com/stsrelay/stsrelay/queue"
)

// receivedHeader is the trace field this relay prepends (RFC 5321 §4.4):
//
//	Received: from <helo> ([<ip>])
//		by <hostname> (stsrelay) with <protocol>
//		for <rcpt>; <date>
//
// The TCP-info is the address literal only: the relay does no reverse DNS
// lookups at submission. The "for" clause is there for single-recipient
// messages only, so that one recipient does not learn of the others. There
// is no "id" clause: the queue ID is assigned at commit, after the header
// is written.
func (ss *session) receivedHeader(env queue.Envelope, now time.Time) string {
	var b strings.Builder
	b.WriteString("Received: from ")
	b.WriteString(sanitizeHelo(ss.helo))
	b.WriteString(" (")
	b.WriteString(addressLiteral(ss))
	b.WriteString(")\r\n\tby ")
	b.WriteString(ss.s.hostname)
	b.WriteString(" (stsrelay) with ")
	b.WriteString(protocolName(ss.tls, env.User != "", env.SMTPUTF8))
	if len(env.Rcpts) == 1 && (env.SMTPUTF8 || isASCII(env.Rcpts[0].Addr)) {
		b.WriteString("\r\n\tfor <")
		b.WriteString(env.Rcpts[0].Addr)
		b.WriteString(">")
	}
	b.WriteString("; ")
	b.WriteString(now.Format(time.RFC1123Z))
	b.WriteString("\r\n")
	return b.String()
}

// protocolName is the "with" keyword: RFC 3848 (ESMTP, ESMTPA, ESMTPS,
// ESMTPSA) and RFC 6531 §3.7.3 (UTF8SMTP…). go-smtp does not tell HELO
// from EHLO, so the ESMTP family is always used.
func protocolName(tls, auth, utf8 bool) string {
	p := "ESMTP"
	if utf8 {
		p = "UTF8SMTP"
	}
	if tls {
		p += "S"
	}
	if auth {
		p += "A"
	}
	return p
}

// addressLiteral is the client's address as RFC 5321 §4.1.3 writes it.
func addressLiteral(ss *session) string {
	switch {
	case !ss.ip.IsValid():
		return "[" + ss.ipStr + "]"
	case ss.ip.Is4():
		return "[" + ss.ip.String() + "]"
	default:
		return "[IPv6:" + ss.ip.String() + "]"
	}
}

// sanitizeHelo keeps the client's EHLO argument from breaking the header:
// anything but printable ASCII and the characters that would end the
// clause becomes '_'.
func sanitizeHelo(h string) string {
	if h == "" {
		return "unknown"
	}
	if len(h) > 255 {
		h = h[:255]
	}
	b := []byte(h)
	for i, c := range b {
		if c <= ' ' || c >= 0x7f || c == '(' || c == ')' || c == ';' || c == '\\' || c == '"' {
			b[i] = '_'
		}
	}
	return string(b)
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

// validAddress checks a mailbox go-smtp has already parsed as
// local@domain: the domain must be a host name of dot-separated labels
// (letters, digits, hyphens, or UTF-8 for internationalized names) or an
// address literal in brackets, which is allowed.
func validAddress(addr string) bool {
	i := strings.LastIndexByte(addr, '@')
	if i <= 0 || i == len(addr)-1 {
		return false
	}
	if len(addr) > 320 {
		return false
	}
	// go-smtp has already removed the quotes of a quoted-string local
	// part; one that needed them cannot be passed on faithfully.
	for _, r := range addr[:i] {
		if r <= ' ' || r == 0x7f || strings.ContainsRune("\"\\()<>[]:;,@", r) {
			return false
		}
	}
	d := addr[i+1:]
	if d[0] == '[' {
		return len(d) > 2 && d[len(d)-1] == ']' && !strings.ContainsAny(d[1:len(d)-1], "[]\\ ")
	}
	if len(d) > 255 || !utf8.ValidString(d) {
		return false
	}
	for _, label := range strings.Split(d, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r >= 0x80) {
				return false
			}
		}
	}
	return true
}
