package relay

import (
	"bufio"
	"errors"
	"io"
	"reflect"
	"unsafe"

	"github.com/emersion/go-smtp"
)

// The message body as it reaches the queue has CRLF line endings only
// (RFC 5321 §2.3.8, RFC 5322 §2.1): a bare LF is turned into CRLF, as
// Postfix does (smtpd_forbid_bare_newline = normalize), since many
// applications' mailers write bare LF; a bare CR — which no text message
// needs and which receivers disagree about, the stuff of SMTP smuggling —
// refuses the whole message with errBareCR once its end has been read.
//
// DATA is parsed here, not by go-smtp: go-smtp v0.25.1's end-of-data
// reader loses its place after "\r\r\n" (so "…\r\r\n.\r\n" does not end
// the data, and the commands after it become body) and drops ".\r" at the
// start of a line. Session.Data gets go-smtp's reader, whose type and
// fields are unexported; dotSource reaches the buffered reader inside it
// (the connection's input, positioned just after "354") and, when the real
// end of data has been read here, marks go-smtp's reader finished so that
// the io.Copy(io.Discard, r) go-smtp runs after Data reads nothing more.
// TestGoSMTPDataReaderLayout fails when an upgrade of go-smtp changes what
// this relies on; if it changes anyway, Data falls back to normalising
// go-smtp's own output (logged as an error).

// go-smtp's dataReader states (data.go); stateEOF means the ".\r\n" line
// was read.
const goSMTPDataStateEOF = 5

// errBareCR refuses a message with a CR not followed by LF.
var errBareCR = &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 6, 0},
	Message: "Message contains a bare CR (RFC 5321 §2.3.8); end lines with CRLF"}

// dotSource returns the buffered reader below go-smtp's DATA reader r and
// a function that marks r finished; ok is false when r is not go-smtp's
// DATA reader (BDAT hands a plain pipe) or its layout is not the expected
// one.
func dotSource(r io.Reader) (br *bufio.Reader, finish func(), ok bool) {
	v := reflect.ValueOf(r)
	if v.Kind() != reflect.Pointer || v.IsNil() {
		return nil, nil, false
	}
	t := v.Type().Elem()
	if t.PkgPath() != "github.com/emersion/go-smtp" || t.Name() != "dataReader" || t.Kind() != reflect.Struct {
		return nil, nil, false
	}
	e := v.Elem()
	fr, fs := e.FieldByName("r"), e.FieldByName("state")
	if !fr.IsValid() || fr.Type() != reflect.TypeOf((*bufio.Reader)(nil)) || fr.IsNil() ||
		!fs.IsValid() || fs.Kind() != reflect.Int {
		return nil, nil, false
	}
	br = (*bufio.Reader)(fr.UnsafePointer())
	state := (*int)(unsafe.Pointer(fs.UnsafeAddr()))
	return br, func() { *state = goSMTPDataStateEOF }, true
}

// isGoSMTPDataReader reports whether r is go-smtp's DATA reader at all
// (whatever its layout), to tell DATA from BDAT.
func isGoSMTPDataReader(r io.Reader) bool {
	t := reflect.TypeOf(r)
	return t != nil && t.Kind() == reflect.Pointer &&
		t.Elem().PkgPath() == "github.com/emersion/go-smtp" && t.Elem().Name() == "dataReader"
}

// bodyWriter turns the client's bytes into the stored body: lines ended
// with CRLF, dot-unstuffed when dot is set (DATA; not BDAT, RFC 3030 §2),
// at most max bytes. It keeps parsing after a bare CR or after max, so
// that the end of data is still found, but writes nothing more.
type bodyWriter struct {
	w   *bufio.Writer
	dot bool
	max int64

	state    int
	crlfLine bool // the current line began after CRLF (or at the start)
	end      bool // ".\r\n" after CRLF read (dot only)
	n        int64
	bareCR   bool
	tooLarge bool
	werr     error
}

const (
	bwLineStart = iota // start of a line
	bwDot              // "." at the start of a line (dot only)
	bwDotCR            // ".\r" at the start of a line (dot only)
	bwText             // within a line
	bwCR               // "\r" read, "\n" expected
)

func newBodyWriter(w io.Writer, dot bool, max int64) *bodyWriter {
	return &bodyWriter{w: bufio.NewWriterSize(w, 32<<10), dot: dot, max: max, crlfLine: true}
}

func (b *bodyWriter) out(p ...byte) {
	if b.bareCR || b.tooLarge || b.werr != nil {
		return
	}
	if b.n+int64(len(p)) > b.max {
		b.tooLarge = true
		return
	}
	b.n += int64(len(p))
	_, b.werr = b.w.Write(p)
}

// feed parses p and returns how many bytes of it belong to the message:
// len(p), or fewer when the end of data was found (dot only).
func (b *bodyWriter) feed(p []byte) int {
	for i := 0; i < len(p); i++ {
		c := p[i]
	again:
		switch b.state {
		case bwLineStart:
			switch {
			case c == '.' && b.dot:
				// RFC 5321 §4.5.2: the first dot of a line is
				// removed; ".\r\n" alone ends the data.
				b.state = bwDot
			case c == '\r':
				b.state = bwCR
			case c == '\n':
				b.out('\r', '\n') // bare LF: normalised
				b.crlfLine = false
			default:
				b.out(c)
				b.state = bwText
			}
		case bwDot:
			if c == '\r' {
				b.state = bwDotCR
				continue
			}
			b.state = bwText
			goto again
		case bwDotCR:
			if c == '\n' {
				if b.crlfLine {
					b.end = true
					b.state = bwLineStart
					return i + 1
				}
				// ".\r\n" after a bare LF: not the end
				// (only CRLF.CRLF is), an empty line.
				b.out('\r', '\n')
				b.state, b.crlfLine = bwLineStart, true
				continue
			}
			b.bareCR = true
			b.state = bwText
			goto again
		case bwText:
			switch c {
			case '\r':
				b.state = bwCR
			case '\n':
				b.out('\r', '\n')
				b.state, b.crlfLine = bwLineStart, false
			default:
				b.out(c)
			}
		case bwCR:
			if c == '\n' {
				b.out('\r', '\n')
				b.state, b.crlfLine = bwLineStart, true
				continue
			}
			// A CR not followed by LF. go-smtp's reader lost its
			// place here; this one goes on with c as text.
			b.bareCR = true
			b.state = bwText
			goto again
		}
	}
	return len(p)
}

// finish handles a BDAT body that ends in "\r" and flushes; it returns
// the reply to give when the body was refused.
func (b *bodyWriter) finish() (reply error, werr error) {
	if b.state == bwCR || b.state == bwDotCR {
		b.bareCR = true
	}
	if b.werr == nil && !b.bareCR && !b.tooLarge {
		b.werr = b.w.Flush()
	}
	switch {
	case b.werr != nil:
		return nil, b.werr
	case b.bareCR:
		return errBareCR, nil
	case b.tooLarge:
		return smtp.ErrDataTooLarge, nil
	}
	return nil, nil
}

// readDot reads DATA from br up to and including the ".\r\n" line into
// b. The error is the client's (a read error, a timeout, a line over
// go-smtp's limit); the end of data was reached when it is nil.
func readDot(br *bufio.Reader, b *bodyWriter) error {
	for !b.end {
		line, err := br.ReadSlice('\n')
		b.feed(line)
		if err != nil && !b.end {
			if errors.Is(err, bufio.ErrBufferFull) {
				continue
			}
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
	}
	return nil
}

// readAll reads r (a BDAT pipe, or go-smtp's reader in the fallback) to
// its end into b.
func readAll(r io.Reader, b *bodyWriter) error {
	buf := make([]byte, 32<<10)
	for {
		n, err := r.Read(buf)
		b.feed(buf[:n])
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
	}
}
