// Package message holds what the relay needs to know about a message's
// bytes, apart from SMTP: whether it needs SMTPUTF8 at the next hop, whether
// its body carries 8-bit data, and how to turn an 8-bit MIME message into a
// 7-bit one for a server that did not offer 8BITMIME.
//
// Everything here is pure: readers and writers in, no files, no network.
package message

import "bytes"

// Content is what a scan of a message found.
type Content struct {
	// HeaderUTF8 is set when the top-level header section holds an octet
	// above 127: a UTF-8 header field (RFC 6532 §3), which only an
	// SMTPUTF8 session may carry (RFC 6531 §3.2).
	HeaderUTF8 bool
	// Body8Bit is set when the body holds an octet above 127, which only
	// an 8BITMIME session may carry (RFC 6152 §3).
	Body8Bit bool
}

// Scanner is an io.Writer that watches a message stream past (header
// section, empty line, body) and records what its Content needs. It never
// fails and holds no more than a few bytes of state, so it can sit beside
// the queue writer on the submission path.
type Scanner struct {
	c      Content
	inBody bool
	// tail holds the last bytes of the header section seen so far (at
	// most 3), so an empty line split across writes is still found.
	tail    [3]byte
	tailLen int
	// atStart: no byte seen yet; an empty first line ends a header
	// section that has no fields.
	atStart bool
}

// NewScanner returns a scanner at the start of a message.
func NewScanner() *Scanner { return &Scanner{atStart: true} }

// Write implements io.Writer.
func (s *Scanner) Write(p []byte) (int, error) {
	n := len(p)
	if !s.inBody {
		end := s.headerEnd(p)
		hdr := p
		if end >= 0 {
			hdr = p[:end]
		}
		if !s.c.HeaderUTF8 && has8Bit(hdr) {
			s.c.HeaderUTF8 = true
		}
		if end < 0 {
			s.keepTail(p)
			return n, nil
		}
		s.inBody = true
		p = p[end:]
	}
	if !s.c.Body8Bit && has8Bit(p) {
		s.c.Body8Bit = true
	}
	return n, nil
}

// Content returns what the bytes written so far need.
func (s *Scanner) Content() Content { return s.c }

// headerEnd returns the offset in p just past the empty line that ends the
// header section (RFC 5322 §2.1), or -1. Bare LF line ends count too, as
// mail readers treat them so.
func (s *Scanner) headerEnd(p []byte) int {
	if len(p) == 0 {
		return -1
	}
	if s.atStart {
		s.atStart = false
		switch {
		case p[0] == '\n':
			return 1
		case len(p) >= 2 && p[0] == '\r' && p[1] == '\n':
			return 2
		case len(p) == 1 && p[0] == '\r':
			s.atStart = true // decided by the next write
			s.keepTail(p)
			return -1
		}
	}
	// Join the kept tail with the head of p to find a boundary that
	// straddles two writes.
	if s.tailLen > 0 {
		var join [6]byte
		k := copy(join[:], s.tail[:s.tailLen])
		k += copy(join[k:], p[:min(len(p), 3)])
		if i := emptyLine(join[:k]); i >= 0 && i > s.tailLen {
			return i - s.tailLen
		}
	}
	return emptyLine(p)
}

// emptyLine finds "\n\r\n" or "\n\n" and returns the offset after it.
func emptyLine(b []byte) int {
	for i := 0; i < len(b); {
		j := bytes.IndexByte(b[i:], '\n')
		if j < 0 {
			return -1
		}
		k := i + j + 1
		if k < len(b) && b[k] == '\n' {
			return k + 1
		}
		if k+1 < len(b) && b[k] == '\r' && b[k+1] == '\n' {
			return k + 2
		}
		i = k
	}
	return -1
}

func (s *Scanner) keepTail(p []byte) {
	if len(p) >= 3 {
		s.tailLen = copy(s.tail[:], p[len(p)-3:])
		return
	}
	var t [6]byte
	k := copy(t[:], s.tail[:s.tailLen])
	k += copy(t[k:], p)
	if k > 3 {
		copy(s.tail[:], t[k-3:k])
		s.tailLen = 3
	} else {
		copy(s.tail[:], t[:k])
		s.tailLen = k
	}
}

// has8Bit reports whether b holds an octet above 127. It looks at eight
// bytes at a time: the submission path runs every body byte through it.
func has8Bit(b []byte) bool {
	for len(b) >= 8 {
		v := uint64(b[0]) | uint64(b[1])<<8 | uint64(b[2])<<16 | uint64(b[3])<<24 |
			uint64(b[4])<<32 | uint64(b[5])<<40 | uint64(b[6])<<48 | uint64(b[7])<<56
		if v&0x8080808080808080 != 0 {
			return true
		}
		b = b[8:]
	}
	for _, c := range b {
		if c >= 0x80 {
			return true
		}
	}
	return false
}

// IsASCII reports whether s is plain ASCII (an address that needs no
// SMTPUTF8, RFC 6531 §3.3).
func IsASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}
