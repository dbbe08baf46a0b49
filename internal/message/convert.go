package message

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/quotedprintable"
	"strings"
	"unicode/utf8"
)

// ErrUnconvertible is wrapped by the error To7Bit returns when the
// message holds 8-bit data that no MIME encoding can carry: in a header
// field, in a multipart preamble or epilogue, inside a part that is already
// encoded, or in a structure deeper or larger than the converter follows.
var ErrUnconvertible = errors.New("8-bit data that cannot be converted to 7 bit")

// Limits of the converter. A message beyond them is unconvertible rather
// than a cause of unbounded memory or recursion.
const (
	maxHeaderBytes = 1 << 20
	maxDepth       = 32
	lineBuf        = 64 << 10
)

// ConvertOptions tunes To7Bit.
type ConvertOptions struct {
	// UTF8Headers allows UTF-8 header fields to pass unchanged: the next
	// hop offered SMTPUTF8 (RFC 6531 §3.2) but not 8BITMIME.
	UTF8Headers bool
}

// To7Bit writes the message that open returns as 7-bit MIME to dst, as
// RFC 6152 §3 asks of a relay whose next hop did not offer 8BITMIME:
// each leaf part whose body holds 8-bit data is re-encoded, text as
// quoted-printable and everything else as base64 (RFC 2045 §6), with its
// Content-Transfer-Encoding field replaced; parts without 8-bit data,
// header fields and the MIME structure pass unchanged. A message without
// MIME-Version is treated as text/plain (RFC 2045 §5.2) and gains the
// MIME fields that describe the encoding; a text part without a charset
// is labelled utf-8, or unknown-8bit when its bytes are not UTF-8
// (RFC 1428).
//
// open is called twice: a first pass finds the parts to convert, the
// second writes. Memory stays bounded whatever the message holds: lines
// are read in pieces and header sections are capped.
func To7Bit(dst io.Writer, open func() (io.Reader, error), opts ConvertOptions) error {
	r, err := open()
	if err != nil {
		return err
	}
	plan := &walker{lr: newLineReader(r), opts: opts}
	if _, err := plan.entity(nil, "text/plain", 0, true); err != nil {
		return err
	}
	if plan.err != nil {
		return plan.err
	}
	r, err = open()
	if err != nil {
		return err
	}
	bw := bufio.NewWriterSize(dst, 32<<10)
	out := &walker{lr: newLineReader(r), opts: opts, out: bw, plan: plan.leaves}
	if _, err := out.entity(nil, "text/plain", 0, true); err != nil {
		return err
	}
	if out.err != nil {
		return out.err
	}
	return bw.Flush()
}

// leafInfo is what the first pass learns of a leaf part.
type leafInfo struct {
	eightBit bool
	badUTF8  bool
}

// walker runs over a message once. In the first pass out is nil and
// leaves is filled; in the second, plan says which leaves to encode.
type walker struct {
	lr     *lineReader
	opts   ConvertOptions
	out    *bufio.Writer
	leaves []leafInfo
	plan   []leafInfo
	leaf   int
	err    error // the first write error
}

func unconvertible(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrUnconvertible, fmt.Sprintf(format, args...))
}

func (w *walker) write(b []byte) {
	if w.out != nil && w.err == nil {
		_, w.err = w.out.Write(b)
	}
}

func (w *walker) writeString(s string) {
	if w.out != nil && w.err == nil {
		_, w.err = w.out.WriteString(s)
	}
}

// entity walks one entity: header section, empty line, body. The body
// ends at a delimiter line of one of bounds (returned, not written; the
// multipart that owns it writes it) or at the end of input (nil).
func (w *walker) entity(bounds []string, defType string, depth int, top bool) ([]byte, error) {
	if depth > maxDepth {
		return nil, unconvertible("MIME nesting deeper than %d", maxDepth)
	}
	h, delim, err := w.readHeader(bounds)
	if err != nil {
		return nil, err
	}
	if h.eightBit && !w.opts.UTF8Headers {
		return nil, unconvertible("a header field holds 8-bit data")
	}
	if delim != nil || h.eof {
		// No body at all: nothing to convert.
		w.write(h.raw)
		return delim, nil
	}
	mt, params := h.mediaType(defType)
	switch {
	case strings.HasPrefix(mt, "multipart/") && params["boundary"] != "":
		w.writeHeader(h, "", "", top)
		child := "text/plain"
		if mt == "multipart/digest" {
			child = "message/rfc822" // RFC 2046 §5.1.5
		}
		return w.multipart(append(bounds, params["boundary"]), child, depth)
	case mt == "message/rfc822":
		// RFC 2046 §5.2.1: no encoding but 7bit, 8bit or binary, so
		// the enclosed message is converted part by part instead.
		w.writeHeader(h, "", "", top)
		return w.entity(bounds, "text/plain", depth+1, false)
	}
	return w.leafBody(h, bounds, mt, params, top)
}

// multipart walks the body of a multipart entity whose own boundary is
// the last of bounds (RFC 2046 §5.1.1).
func (w *walker) multipart(bounds []string, child string, depth int) ([]byte, error) {
	own := bounds[len(bounds)-1]
	inEpilogue := false
	for {
		line, err := w.lr.line()
		if err == io.EOF {
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		if line.start && line.full {
			if b, closing := matchDelim(line.b, bounds); b != "" {
				if b != own {
					return line.b, nil // an enclosing multipart's delimiter
				}
				w.write(line.b)
				if closing {
					inEpilogue = true
					continue
				}
				delim, err := w.entity(bounds, child, depth+1, false)
				if err != nil {
					return nil, err
				}
				for delim != nil {
					b, closing := matchDelim(delim, bounds)
					if b != own {
						return delim, nil
					}
					w.write(delim)
					if closing {
						inEpilogue = true
						break
					}
					if delim, err = w.entity(bounds, child, depth+1, false); err != nil {
						return nil, err
					}
				}
				if delim == nil && !inEpilogue {
					return nil, nil // input ended inside a part
				}
				continue
			}
		}
		if has8Bit(line.b) {
			where := "preamble"
			if inEpilogue {
				where = "epilogue"
			}
			return nil, unconvertible("a multipart %s holds 8-bit data", where)
		}
		w.write(line.b)
	}
}

// leafBody walks the body of a leaf part: in the first pass it notes 8-bit
// data, in the second it copies or encodes it.
func (w *walker) leafBody(h *header, bounds []string, mt string, params map[string]string, top bool) ([]byte, error) {
	idx := w.leaf
	w.leaf++
	if w.out == nil {
		info := leafInfo{}
		for {
			line, err := w.lr.line()
			if err == io.EOF {
				break
			}
			if err != nil {
				return nil, err
			}
			if line.start && line.full {
				if b, _ := matchDelim(line.b, bounds); b != "" {
					w.leaves = append(w.leaves, info)
					return line.b, nil
				}
			}
			if has8Bit(line.b) {
				info.eightBit = true
				if line.full && !utf8.Valid(line.b) {
					info.badUTF8 = true
				}
			}
		}
		w.leaves = append(w.leaves, info)
		if info.eightBit {
			switch h.cte {
			case "quoted-printable", "base64":
				return nil, unconvertible("a %s part holds 8-bit data", h.cte)
			}
			if mt == "message/partial" || mt == "message/external-body" {
				return nil, unconvertible("a %s part holds 8-bit data", mt) // RFC 2046 §5.2.2, §5.2.3: 7bit only
			}
		}
		return nil, nil
	}

	if idx >= len(w.plan) || !w.plan[idx].eightBit {
		w.writeHeader(h, "", "", top)
		for {
			line, err := w.lr.line()
			if err == io.EOF {
				return nil, nil
			}
			if err != nil {
				return nil, err
			}
			if line.start && line.full {
				if b, _ := matchDelim(line.b, bounds); b != "" {
					return line.b, nil
				}
			}
			w.write(line.b)
		}
	}

	// RFC 2045 §6.4: text in quoted-printable keeps it readable; any
	// other type is base64.
	text := strings.HasPrefix(mt, "text/")
	enc := "base64"
	if text {
		enc = "quoted-printable"
	}
	var ct map[string]string
	if text && params["charset"] == "" {
		cs := "utf-8"
		if w.plan[idx].badUTF8 {
			cs = "unknown-8bit" // RFC 1428
		}
		ct = map[string]string{"charset": cs}
		for k, v := range params {
			ct[k] = v
		}
		ct["charset"] = cs
	}
	w.writeHeader(h, enc, ctWith(mt, ct), top)

	var body io.WriteCloser
	var lw *lineWrapper
	if text {
		body = quotedprintable.NewWriter(&walkerWriter{w})
	} else {
		lw = &lineWrapper{w: &walkerWriter{w}}
		body = base64.NewEncoder(base64.StdEncoding, lw)
	}
	// The line end before a delimiter belongs to the delimiter (RFC 2046
	// §5.1.1), so each line's end is held back until the next line shows
	// it is content.
	var held []byte
	finish := func(atEOF bool) {
		if atEOF {
			_, _ = body.Write(held)
		}
		if err := body.Close(); err != nil && w.err == nil {
			w.err = err
		}
		switch {
		case lw != nil:
			// base64 lines end themselves; only a short last one is open.
			if lw.col > 0 {
				w.writeString("\r\n")
			}
		case atEOF && len(held) > 0:
			// quoted-printable turned the final line end into one.
		default:
			// The line end before the delimiter (or a final one).
			w.writeString("\r\n")
		}
	}
	for {
		line, err := w.lr.line()
		if err == io.EOF {
			finish(true)
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		if line.start && line.full {
			if b, _ := matchDelim(line.b, bounds); b != "" {
				finish(false)
				return line.b, nil
			}
		}
		if len(held) > 0 {
			_, _ = body.Write(held)
			held = held[:0]
		}
		content, eol := splitEOL(line.b)
		_, _ = body.Write(content)
		held = append(held, eol...)
	}
}

// walkerWriter lets encoders write through the walker's error tracking.
type walkerWriter struct{ w *walker }

func (ww *walkerWriter) Write(p []byte) (int, error) {
	ww.w.write(p)
	if ww.w.err != nil {
		return 0, ww.w.err
	}
	return len(p), nil
}

// lineWrapper breaks base64 output into lines of 76 characters (RFC 2045
// §6.8).
type lineWrapper struct {
	w   io.Writer
	col int
}

func (l *lineWrapper) Write(p []byte) (int, error) {
	n := len(p)
	for len(p) > 0 {
		k := min(76-l.col, len(p))
		if _, err := l.w.Write(p[:k]); err != nil {
			return 0, err
		}
		l.col += k
		p = p[k:]
		if l.col == 76 {
			if _, err := l.w.Write([]byte("\r\n")); err != nil {
				return 0, err
			}
			l.col = 0
		}
	}
	return n, nil
}

func splitEOL(b []byte) (content, eol []byte) {
	n := len(b)
	if n > 0 && b[n-1] == '\n' {
		if n > 1 && b[n-2] == '\r' {
			return b[:n-2], b[n-2:]
		}
		return b[:n-1], b[n-1:]
	}
	return b, nil
}

// matchDelim reports which of bounds the line is a delimiter of, and
// whether it is the closing one (RFC 2046 §5.1.1: "--" boundary, "--"
// again to close, then optional white space). The innermost boundary is
// tried first.
func matchDelim(line []byte, bounds []string) (string, bool) {
	if len(line) < 3 || line[0] != '-' || line[1] != '-' {
		return "", false
	}
	l := bytes.TrimRight(line[2:], " \t\r\n")
	for i := len(bounds) - 1; i >= 0; i-- {
		b := bounds[i]
		if !bytes.HasPrefix(l, []byte(b)) {
			continue
		}
		switch rest := l[len(b):]; {
		case len(rest) == 0:
			return b, false
		case string(rest) == "--":
			return b, true
		}
	}
	return "", false
}

// header is one entity's header section as read.
type header struct {
	raw      []byte   // every byte, the empty line included
	fields   [][]byte // raw fields, continuation lines joined
	end      []byte   // the empty line ("" when the section ran into EOF)
	eightBit bool
	eof      bool
	ct, cte  string
	mime     bool // MIME-Version present
	ctIdx    int  // index of the Content-Type field, or -1
}

// readHeader reads a header section up to and including the empty line.
// A delimiter line before it ends the entity with no body (returned).
func (w *walker) readHeader(bounds []string) (*header, []byte, error) {
	h := &header{ctIdx: -1}
	var cur []byte
	flush := func() {
		if cur != nil {
			h.fields = append(h.fields, cur)
			cur = nil
		}
	}
	for {
		line, err := w.lr.line()
		if err == io.EOF {
			flush()
			h.eof = true
			break
		}
		if err != nil {
			return nil, nil, err
		}
		if line.start && line.full {
			if b, _ := matchDelim(line.b, bounds); b != "" && len(bounds) > 0 {
				flush()
				h.parse()
				return h, line.b, nil
			}
			if c, _ := splitEOL(line.b); len(c) == 0 {
				flush()
				h.end = append([]byte(nil), line.b...)
				h.raw = append(h.raw, line.b...)
				break
			}
		}
		h.raw = append(h.raw, line.b...)
		if len(h.raw) > maxHeaderBytes {
			return nil, nil, unconvertible("a header section is larger than %d bytes", maxHeaderBytes)
		}
		if line.start && line.b[0] != ' ' && line.b[0] != '\t' {
			flush()
		}
		cur = append(cur, line.b...)
	}
	h.parse()
	return h, nil, nil
}

func (h *header) parse() {
	h.eightBit = has8Bit(h.raw)
	for i, f := range h.fields {
		name, value, ok := bytes.Cut(f, []byte(":"))
		if !ok {
			continue
		}
		v := unfold(value)
		switch strings.ToLower(strings.TrimSpace(string(name))) {
		case "content-type":
			h.ct, h.ctIdx = v, i
		case "content-transfer-encoding":
			h.cte = strings.ToLower(v)
		case "mime-version":
			h.mime = true
		}
	}
}

func unfold(v []byte) string {
	s := strings.NewReplacer("\r\n", "", "\n", "", "\r", "").Replace(string(v))
	return strings.TrimSpace(s)
}

// mediaType is the entity's type and parameters, defType when it has no
// valid Content-Type (RFC 2045 §5.2).
func (h *header) mediaType(defType string) (string, map[string]string) {
	if h.ct == "" {
		return defType, map[string]string{}
	}
	mt, params, err := mime.ParseMediaType(h.ct)
	if err != nil {
		return "text/plain", map[string]string{} // RFC 2045 §5.2
	}
	return mt, params
}

func ctWith(mt string, params map[string]string) string {
	if params == nil {
		return ""
	}
	return mime.FormatMediaType(mt, params)
}

// writeHeader writes h, in the second pass. With enc set it replaces the
// Content-Transfer-Encoding field (and with ct the Content-Type field);
// otherwise an "8bit" or "binary" label on a composite entity becomes
// "7bit", since everything written below it is now 7-bit. The top-level
// entity gains MIME-Version when it is converted without one.
func (w *walker) writeHeader(h *header, enc, ct string, top bool) {
	if w.out == nil {
		return
	}
	if enc == "" && (h.cte != "8bit" && h.cte != "binary") {
		w.write(h.raw)
		return
	}
	if enc == "" {
		enc = "7bit"
	}
	for i, f := range h.fields {
		name, _, _ := bytes.Cut(f, []byte(":"))
		switch strings.ToLower(strings.TrimSpace(string(name))) {
		case "content-transfer-encoding":
			continue
		case "content-type":
			if ct != "" && i == h.ctIdx {
				continue
			}
		}
		w.write(f)
	}
	if top && !h.mime {
		w.writeString("MIME-Version: 1.0\r\n")
	}
	if ct != "" {
		w.writeString("Content-Type: " + ct + "\r\n")
	}
	w.writeString("Content-Transfer-Encoding: " + enc + "\r\n")
	if h.end != nil {
		w.write(h.end)
	} else {
		w.writeString("\r\n")
	}
}

// lineReader hands out a message line by line, in pieces of at most
// lineBuf bytes: a longer line comes as several pieces, only the first of
// which has start set.
type lineReader struct {
	r    *bufio.Reader
	mid  bool // the last piece did not end its line
	copy []byte
}

type piece struct {
	b     []byte
	start bool // the piece begins a line
	full  bool // the piece ends its line (or the input)
}

func newLineReader(r io.Reader) *lineReader {
	return &lineReader{r: bufio.NewReaderSize(r, lineBuf)}
}

// line returns the next piece. Its bytes are valid until the next call.
func (lr *lineReader) line() (piece, error) {
	b, err := lr.r.ReadSlice('\n')
	p := piece{b: b, start: !lr.mid}
	switch {
	case err == nil:
		p.full = true
		lr.mid = false
	case errors.Is(err, bufio.ErrBufferFull):
		lr.mid = true
		err = nil
	case err == io.EOF && len(b) > 0:
		p.full = true
		lr.mid = false
		err = nil
	}
	if err != nil {
		return piece{}, err
	}
	// Callers keep pieces across a ReadSlice only through copies; hand
	// out a stable copy so no caller is surprised.
	lr.copy = append(lr.copy[:0], b...)
	p.b = lr.copy
	return p, nil
}
