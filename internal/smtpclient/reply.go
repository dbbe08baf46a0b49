package smtpclient

import (
	"bufio"
	"fmt"
	"strings"
	"unicode/utf8"
)

// Reply is one server reply (RFC 5321 §4.2).
type Reply struct {
	// Code is the three-digit reply code; 0 means no reply was read
	// (the command was never sent, or the session broke first).
	Code int
	// Enhanced is the RFC 3463 status code ("5.1.1") when the server
	// advertised ENHANCEDSTATUSCODES (RFC 2034) and sent one, else "".
	Enhanced string
	// Lines is the text of each line without the code, the separator and
	// the enhanced code. Control characters are replaced by '?' and
	// invalid UTF-8 by U+FFFD, so the text is safe for logs and reports.
	Lines []string
}

// Text is the reply text, lines joined by "\n".
func (r Reply) Text() string { return strings.Join(r.Lines, "\n") }

// Positive reports a 2xx or 3xx reply.
func (r Reply) Positive() bool { return r.Code >= 200 && r.Code < 400 }

// Temporary reports a 4xx reply (RFC 5321 §4.2.1: transient negative
// completion; the same command may succeed later).
func (r Reply) Temporary() bool { return r.Code/100 == 4 }

// Permanent reports a 5xx reply (RFC 5321 §4.2.1: permanent negative
// completion).
func (r Reply) Permanent() bool { return r.Code/100 == 5 }

func (r Reply) String() string {
	if r.Code == 0 {
		return "(no reply)"
	}
	s := fmt.Sprintf("%d", r.Code)
	if r.Enhanced != "" {
		s += " " + r.Enhanced
	}
	if t := r.Text(); t != "" {
		s += " " + t
	}
	return s
}

// replyReader reads replies with bounded memory: it never holds more than
// maxLine bytes of one line (plus the bufio buffer), and never more than
// maxLines lines of one reply, whatever the peer sends.
type replyReader struct {
	br       *bufio.Reader
	maxLine  int
	maxLines int
	scratch  []byte
}

// readLine returns one line without its CRLF (or bare LF: servers that
// end reply lines with LF alone are tolerated, since nothing ambiguous can
// follow from it on the reply side). The slice is valid until the next
// call. A line longer than maxLine is a protocol error, detected after
// reading at most maxLine+1 bytes of it beyond the bufio buffer.
func (r *replyReader) readLine() ([]byte, error) {
	line := r.scratch[:0]
	for {
		frag, err := r.br.ReadSlice('\n')
		// Allow for the CR that may precede the LF.
		if len(line)+len(frag) > r.maxLine+2 {
			return nil, protocolErrorf("reply line longer than %d bytes", r.maxLine)
		}
		line = append(line, frag...)
		if err == nil {
			break
		}
		if err != bufio.ErrBufferFull {
			r.scratch = line[:0]
			return nil, err
		}
	}
	r.scratch = line[:0]
	line = line[:len(line)-1] // LF
	if n := len(line); n > 0 && line[n-1] == '\r' {
		line = line[:n-1]
	}
	if len(line) > r.maxLine {
		return nil, protocolErrorf("reply line longer than %d bytes", r.maxLine)
	}
	return line, nil
}

// readReply reads one complete reply. RFC 5321 §4.2:
//
//	Reply-line = *( Reply-code "-" [ textstring ] CRLF )
//	             Reply-code [ SP textstring ] CRLF
//	Reply-code = %x32-35 %x30-35 %x30-39
//
// and §4.2.1: every line of a multiline reply carries the same code.
// When enhanced is set, an RFC 3463 code at the start of the text is
// split off (RFC 2034 §4).
func (r *replyReader) readReply(enhanced bool) (Reply, error) {
	var rep Reply
	for {
		line, err := r.readLine()
		if err != nil {
			return Reply{}, err
		}
		if len(rep.Lines) == r.maxLines {
			return Reply{}, protocolErrorf("reply longer than %d lines", r.maxLines)
		}
		code, ok := parseCode(line)
		if !ok {
			return Reply{}, protocolErrorf("malformed reply line %q", sanitize(line[:min(len(line), 32)]))
		}
		if rep.Code != 0 && code != rep.Code {
			return Reply{}, protocolErrorf("reply code changed from %d to %d within a multiline reply", rep.Code, code)
		}
		rep.Code = code
		last := true
		text := ""
		if len(line) > 3 {
			switch line[3] {
			case ' ':
			case '-':
				last = false
			default:
				return Reply{}, protocolErrorf("malformed reply line %q", sanitize(line[:min(len(line), 32)]))
			}
			text = sanitize(line[4:])
		}
		rep.Lines = append(rep.Lines, text)
		if last {
			break
		}
	}
	if enhanced {
		splitEnhanced(&rep)
	}
	return rep, nil
}

func parseCode(line []byte) (int, bool) {
	if len(line) < 3 {
		return 0, false
	}
	a, b, c := line[0], line[1], line[2]
	if a < '2' || a > '5' || b < '0' || b > '5' || c < '0' || c > '9' {
		return 0, false
	}
	return int(a-'0')*100 + int(b-'0')*10 + int(c-'0'), true
}

// splitEnhanced moves an RFC 3463 status code from the reply text into
// rep.Enhanced. RFC 2034 §4 puts the code at the start of the text of each
// line; some servers (go-smtp among them) put it on the last line only, so
// the first line carrying one is used and the same code is stripped from
// every line that repeats it. RFC 3463 §3.1: the class must agree with the
// reply code's first digit; a mismatching code is left in the text.
func splitEnhanced(rep *Reply) {
	for _, l := range rep.Lines {
		if ec, _, ok := cutEnhanced(l); ok && int(ec[0]-'0') == rep.Code/100 {
			rep.Enhanced = ec
			break
		}
	}
	if rep.Enhanced == "" {
		return
	}
	for i, l := range rep.Lines {
		if ec, rest, ok := cutEnhanced(l); ok && ec == rep.Enhanced {
			rep.Lines[i] = rest
		}
	}
}

// cutEnhanced splits "x.y.z text" into its status code and text.
// RFC 3463 §2:
//
//	status-code = class "." subject "." detail
//	class       = "2" / "4" / "5"
//	subject     = 1*3digit
//	detail      = 1*3digit
func cutEnhanced(s string) (code, rest string, ok bool) {
	if len(s) < 5 || (s[0] != '2' && s[0] != '4' && s[0] != '5') || s[1] != '.' {
		return "", "", false
	}
	i := 2
	for part := 0; part < 2; part++ {
		n := 0
		for i < len(s) && s[i] >= '0' && s[i] <= '9' {
			i++
			n++
		}
		if n < 1 || n > 3 {
			return "", "", false
		}
		if part == 0 {
			if i >= len(s) || s[i] != '.' {
				return "", "", false
			}
			i++
		}
	}
	switch {
	case i == len(s):
		return s, "", true
	case s[i] == ' ':
		return s[:i], s[i+1:], true
	}
	return "", "", false
}

// sanitize makes peer text safe to log: invalid UTF-8 becomes U+FFFD and
// control characters other than HT become '?'.
func sanitize(b []byte) string {
	clean := true
	for _, c := range b {
		if (c < 0x20 && c != '\t') || c >= 0x7f {
			clean = false
			break
		}
	}
	if clean {
		return string(b)
	}
	var sb strings.Builder
	sb.Grow(len(b))
	for len(b) > 0 {
		r, n := utf8.DecodeRune(b)
		b = b[n:]
		switch {
		case r == utf8.RuneError && n == 1:
			sb.WriteRune(utf8.RuneError)
		case (r < 0x20 && r != '\t') || (r >= 0x7f && r < 0xa0):
			sb.WriteByte('?')
		default:
			sb.WriteRune(r)
		}
	}
	return sb.String()
}
