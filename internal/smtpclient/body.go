package smtpclient

import (
	"bytes"
	"io"
)

// The body is sent in a canonical form, whatever the queue holds:
//
//   - every line ends in CRLF: a bare CR and a bare LF each become CRLF
//     (RFC 5321 §2.3.8: CR and LF only as CRLF), so that no byte sequence
//     can be read as an end of data by a server with a lenient parser
//     (the "SMTP smuggling" class of attacks: <LF>.<LF>, <CR>.<CR>,
//     <LF>.<CR><LF>, ...);
//   - a body that does not end in CRLF gets one (RFC 5321 §4.1.1.4: "MUST
//     either reject the message as invalid or add <CRLF>");
//   - for DATA only, a line starting with "." gets a second "." (RFC 5321
//     §4.5.2 transparency); BDAT carries the bytes as they are (RFC 3030
//     §2).
//
// An empty body stays empty.

var (
	crlf = []byte("\r\n")
	dot  = []byte(".")
)

// normReader produces the canonical form of src as a stream, holding no
// more than one read buffer of it.
type normReader struct {
	src  io.Reader
	dots bool // dot-stuff (DATA)

	buf  []byte
	in   []byte // unconsumed source bytes
	pend []byte // output decided but not yet returned (CRLF or ".")
	eof  bool
	err  error // sticky source error

	cr  bool // last source byte was a CR whose line end is not yet written
	bol bool // at the beginning of an output line
}

func newNormReader(src io.Reader, dotStuff bool) *normReader {
	return &normReader{src: src, dots: dotStuff, buf: make([]byte, 32<<10), bol: true}
}

func (z *normReader) Read(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		if len(z.pend) > 0 {
			c := copy(p[n:], z.pend)
			z.pend = z.pend[c:]
			n += c
			continue
		}
		if len(z.in) == 0 {
			if z.err != nil {
				if n > 0 {
					return n, nil
				}
				return 0, z.err
			}
			if z.eof {
				switch {
				case z.cr:
					z.cr, z.bol, z.pend = false, true, crlf
					continue
				case !z.bol:
					z.bol, z.pend = true, crlf
					continue
				}
				if n > 0 {
					return n, nil
				}
				return 0, io.EOF
			}
			if n > 0 {
				// Return what we have rather than block on the source.
				return n, nil
			}
			m, err := z.src.Read(z.buf)
			z.in = z.buf[:m]
			if err == io.EOF {
				z.eof = true
			} else if err != nil {
				z.err = &BodyError{Err: err}
			}
			continue
		}
		if z.cr {
			// A CR ends the line whether or not an LF follows it.
			z.cr, z.bol, z.pend = false, true, crlf
			if z.in[0] == '\n' {
				z.in = z.in[1:]
			}
			continue
		}
		if z.bol && z.dots && z.in[0] == '.' {
			z.bol, z.pend = false, dot
			continue
		}
		run := z.in
		if i := indexCRLF(run); i >= 0 {
			run = run[:i]
		}
		if len(run) > 0 {
			c := copy(p[n:], run)
			n += c
			z.in = z.in[c:]
			z.bol = false
			continue
		}
		if z.in[0] == '\n' {
			z.bol, z.pend = true, crlf
		} else {
			z.cr = true
		}
		z.in = z.in[1:]
	}
	return n, nil
}

func indexCRLF(b []byte) int {
	i := bytes.IndexByte(b, '\n')
	if i < 0 {
		return bytes.IndexByte(b, '\r')
	}
	if j := bytes.IndexByte(b[:i], '\r'); j >= 0 {
		return j
	}
	return i
}

// Normalize returns r in the form BDAT sends it: bare CR and bare LF
// turned into CRLF and a final CRLF added when missing, without
// dot-stuffing. Its length is what NormalizedSize returns. Read errors of
// r come back as *BodyError.
func Normalize(r io.Reader) io.Reader { return newNormReader(r, false) }

// NormalizedSize reads r to its end and returns the length of
// Normalize(r). It is the value Transaction.Size must carry for BDAT:
// compute it once, when the message is queued, from the same bytes Send
// will read.
func NormalizedSize(r io.Reader) (int64, error) {
	n, err := io.Copy(io.Discard, Normalize(r))
	return n, err
}
