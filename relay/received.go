package relay

import (
	"net/netip"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/internal/message"
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
	if len(env.Rcpts) == 1 && (env.SMTPUTF8 || message.IsASCII(env.Rcpts[0].Addr)) {
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

// Address problems that interface.md fixes as 501 5.1.3: control
// characters (they would reach the Received header, DSNs and logs) and
// domain literals that are not IP addresses.
var (
	errAddrControl = &smtp.SMTPError{Code: 501, EnhancedCode: smtp.EnhancedCode{5, 1, 3}, Message: "Control character in address"}
	errAddrLiteral = &smtp.SMTPError{Code: 501, EnhancedCode: smtp.EnhancedCode{5, 1, 3}, Message: "Address literal must be an IPv4 address or IPv6:address (RFC 5321 §4.1.3)"}
)

// hasControl reports C0 and C1 control characters and DEL, and bytes that
// are not UTF-8.
func hasControl(s string) bool {
	for _, r := range s {
		if r == utf8.RuneError || unicode.IsControl(r) {
			return true
		}
	}
	return false
}

// checkAddress checks a mailbox go-smtp has already parsed as
// local@domain. Control characters anywhere, and a domain literal that is
// not an IP address, give errAddrControl and errAddrLiteral; other syntax
// problems give bad (553 5.1.x). The domain must be a host name of
// dot-separated labels (letters, digits, hyphens, or UTF-8 for
// internationalized names) or an address literal (RFC 5321 §4.1.3):
//
//	address-literal       = "[" ( IPv4-address-literal / IPv6-address-literal /
//	                              General-address-literal ) "]"
//	IPv4-address-literal  = Snum 3("." Snum)
//	IPv6-address-literal  = "IPv6:" IPv6-addr
//
// General-address-literal (a registered tag and free text) is refused: no
// tag is registered, and the text would travel on into headers.
func checkAddress(addr string, bad *smtp.SMTPError) *smtp.SMTPError {
	if hasControl(addr) {
		return errAddrControl
	}
	i := strings.LastIndexByte(addr, '@')
	if i <= 0 || i == len(addr)-1 {
		return bad
	}
	if len(addr) > 320 {
		return bad
	}
	// go-smtp has already removed the quotes of a quoted-string local
	// part; one that needed them cannot be passed on faithfully.
	for _, r := range addr[:i] {
		if r <= ' ' || r == 0x7f || strings.ContainsRune("\"\\()<>[]:;,@", r) {
			return bad
		}
	}
	d := addr[i+1:]
	if d[0] == '[' {
		if !validLiteral(d) {
			return errAddrLiteral
		}
		return nil
	}
	if len(d) > 255 || !utf8.ValidString(d) {
		return bad
	}
	for _, label := range strings.Split(d, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return bad
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r >= 0x80) {
				return bad
			}
		}
	}
	return nil
}

// validLiteral checks "[…]" per RFC 5321 §4.1.3: a dotted-quad IPv4
// address, or "IPv6:" and an IPv6 address without a zone.
func validLiteral(d string) bool {
	if len(d) < 3 || d[0] != '[' || d[len(d)-1] != ']' {
		return false
	}
	in := d[1 : len(d)-1]
	if len(in) > 5 && strings.EqualFold(in[:5], "IPv6:") {
		a, err := netip.ParseAddr(in[5:])
		return err == nil && a.Is6() && a.Zone() == ""
	}
	a, err := netip.ParseAddr(in)
	return err == nil && a.Is4()
}
