// Package smtpclient is the SMTP client delivery uses to hand messages to
// MX hosts: RFC 5321 with PIPELINING (RFC 2920), CHUNKING (RFC 3030),
// STARTTLS (RFC 3207) and ENHANCEDSTATUSCODES (RFC 2034, RFC 3463).
//
// Everything the peer sends is bounded (line length, lines per reply,
// extensions) and every network wait has a deadline; a write that makes
// progress moves its deadline forward, so a large body on a slow link is
// fine while a peer that stops reading is not.
//
// The caller dials (it owns source addresses, connect timeouts and the
// choice of address) and hands the connection to New. A Client is not
// safe for concurrent use.
package smtpclient

import (
	"bufio"
	"crypto/tls"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

// Options tune a Client. Zero values take the defaults shown.
type Options struct {
	// LocalName is the EHLO/HELO argument (RFC 5321 §4.1.1.1): this
	// host's name. Default "localhost".
	LocalName string
	// CommandTimeout bounds each wait for a reply, and each command
	// write. Default 5 minutes (RFC 5321 §4.5.3.2.1-4, .7).
	CommandTimeout time.Duration
	// DataTimeout bounds each body write that makes no progress: every
	// chunk written resets it. Default 3 minutes (RFC 5321 §4.5.3.2.5).
	DataTimeout time.Duration
	// FinalTimeout bounds the wait for the reply to the final dot or to
	// BDAT LAST. Default 10 minutes (RFC 5321 §4.5.3.2.6).
	FinalTimeout time.Duration
	// HandshakeTimeout bounds the TLS handshake. Default CommandTimeout.
	HandshakeTimeout time.Duration
	// MaxLineBytes bounds one reply line, CRLF not counted. Longer is a
	// protocol error. Default 4096 (RFC 5321 §4.5.3.1.5 allows 512; real
	// servers send more).
	MaxLineBytes int
	// MaxReplyLines bounds the lines of one reply. Default 100.
	MaxReplyLines int
	// ChunkBytes is the BDAT chunk size towards servers that offer
	// CHUNKING without PIPELINING, where each chunk costs a round trip.
	// With PIPELINING the body goes as one "BDAT <size> LAST" chunk.
	// Default 1 MiB.
	ChunkBytes int64
	// DisableChunking makes Send use DATA even when CHUNKING is offered.
	DisableChunking bool
}

func (o Options) withDefaults() Options {
	if o.LocalName == "" {
		o.LocalName = "localhost"
	}
	if o.CommandTimeout <= 0 {
		o.CommandTimeout = 5 * time.Minute
	}
	if o.DataTimeout <= 0 {
		o.DataTimeout = 3 * time.Minute
	}
	if o.FinalTimeout <= 0 {
		o.FinalTimeout = 10 * time.Minute
	}
	if o.HandshakeTimeout <= 0 {
		o.HandshakeTimeout = o.CommandTimeout
	}
	if o.MaxLineBytes <= 0 {
		o.MaxLineBytes = 4096
	}
	if o.MaxReplyLines <= 0 {
		o.MaxReplyLines = 100
	}
	if o.ChunkBytes <= 0 {
		o.ChunkBytes = 1 << 20
	}
	return o
}

// Bounds on what an EHLO reply may make us remember.
const (
	maxExtensions = 100
	maxKeywordLen = 64
	maxParamLen   = 512
)

// writeChunk is the largest single write to the connection: each one gets
// a fresh write deadline (the "per chunk of progress" rule).
const writeChunk = 32 << 10

// Client is one SMTP session on a connection the caller dialled.
type Client struct {
	opts Options
	conn net.Conn // the raw connection, or the *tls.Conn after StartTLS
	tls  *tls.Conn
	br   *bufio.Reader
	bw   *bufio.Writer
	rr   replyReader

	greeting   Reply
	helloReply Reply
	helloDone  bool
	ext        map[string]string
	maxSize    int64

	// writeTimeout is the deadline given to each chunk written:
	// CommandTimeout for commands, DataTimeout for bodies.
	writeTimeout time.Duration
	// extendRead makes each write chunk also push the read deadline
	// forward, while replies are awaited concurrently with a body.
	extendRead bool

	// needReset: the last transaction failed before its end, so the next
	// one starts with RSET (RFC 5321 §4.1.1.5).
	needReset bool
	// err is sticky: once set the session is unusable.
	err    error
	closed bool

	roundTrips atomic.Int64
}

// New reads the server greeting on conn (RFC 5321 §3.1, §4.5.3.2.1) and
// returns a Client ready for Hello. Anything but a 220 greeting is a
// *ReplyError with Stage "connect". On error conn is closed.
func New(conn net.Conn, opts Options) (*Client, error) {
	opts = opts.withDefaults()
	if strings.ContainsAny(opts.LocalName, " \t\r\n<>") {
		conn.Close()
		return nil, fmt.Errorf("smtpclient: invalid LocalName %q", opts.LocalName)
	}
	c := &Client{opts: opts, writeTimeout: opts.CommandTimeout}
	c.setConn(conn)
	r, err := c.readReply(StageConnect, opts.CommandTimeout)
	if err != nil {
		return nil, err
	}
	c.greeting = r
	if r.Code != 220 {
		c.Close()
		return nil, replyError(StageConnect, r)
	}
	return c, nil
}

func (c *Client) setConn(conn net.Conn) {
	c.conn = conn
	c.br = bufio.NewReaderSize(conn, 4096)
	c.bw = bufio.NewWriterSize(deadlineWriter{c}, writeChunk)
	c.rr = replyReader{br: c.br, maxLine: c.opts.MaxLineBytes, maxLines: c.opts.MaxReplyLines}
}

// deadlineWriter gives every chunk written its own write deadline, so a
// deadline bounds a lack of progress rather than a whole transfer.
type deadlineWriter struct{ c *Client }

func (d deadlineWriter) Write(p []byte) (int, error) {
	c := d.c
	n := 0
	for len(p) > 0 {
		chunk := p[:min(len(p), writeChunk)]
		now := time.Now()
		_ = c.conn.SetWriteDeadline(now.Add(c.writeTimeout))
		if c.extendRead {
			_ = c.conn.SetReadDeadline(now.Add(c.opts.CommandTimeout))
		}
		m, err := c.conn.Write(chunk)
		n += m
		if err != nil {
			return n, err
		}
		p = p[m:]
	}
	return n, nil
}

// Greeting is the server's 220 greeting.
func (c *Client) Greeting() Reply { return c.greeting }

// HelloReply is the server's reply to the last EHLO (or HELO).
func (c *Client) HelloReply() Reply { return c.helloReply }

// RoundTrips counts the flushes after which the client waited for a
// reply: the number of network round trips the session has cost so far
// (the greeting not counted).
func (c *Client) RoundTrips() int64 { return c.roundTrips.Load() }

// Ext reports whether the server advertised the extension name (case
// insensitive) in its last EHLO reply, and its parameters.
func (c *Client) Ext(name string) (string, bool) {
	p, ok := c.ext[strings.ToUpper(name)]
	return p, ok
}

// MaxSize is the message size limit the server declared with SIZE (RFC
// 1870 §4), or 0 when it declared none.
func (c *Client) MaxSize() int64 { return c.maxSize }

// ConnectionState returns the TLS state after StartTLS, including
// DidResume; ok is false on a plaintext session.
func (c *Client) ConnectionState() (state tls.ConnectionState, ok bool) {
	if c.tls == nil {
		return tls.ConnectionState{}, false
	}
	return c.tls.ConnectionState(), true
}

// Usable reports whether the session can carry another command: no
// network or protocol failure and no 421 so far.
func (c *Client) Usable() bool { return c.err == nil }

// Hello says EHLO and records the extensions; a server that refuses EHLO
// with a 5xx gets HELO instead (RFC 5321 §4.1.4, §3.2). Send calls it when
// it was not called. Refusals are *ReplyError with Stage "ehlo".
func (c *Client) Hello() error {
	if c.err != nil {
		return c.err
	}
	c.ext, c.maxSize, c.helloDone = nil, 0, false
	r, err := c.cmd(StageEHLO, "EHLO "+c.opts.LocalName)
	if err != nil {
		return err
	}
	if r.Code/100 == 5 {
		r, err = c.cmd(StageEHLO, "HELO "+c.opts.LocalName)
		if err != nil {
			return err
		}
		if r.Code == 250 {
			c.helloReply, c.helloDone, c.ext = r, true, map[string]string{}
			return nil
		}
	}
	if r.Code != 250 {
		return c.refused(StageEHLO, r)
	}
	c.helloReply, c.helloDone = r, true
	c.ext, c.maxSize = parseExtensions(r.Lines)
	return nil
}

// parseExtensions reads the lines after the first of an EHLO reply (RFC
// 5321 §4.1.1.1):
//
//	ehlo-line    = ehlo-keyword *( SP ehlo-param )
//	ehlo-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-")
//
// Keywords are case-insensitive (stored upper case). Malformed lines,
// over-long keywords or parameters, repeats and lines past the first
// maxExtensions are ignored.
func parseExtensions(lines []string) (map[string]string, int64) {
	ext := make(map[string]string)
	var maxSize int64
	for i, l := range lines {
		if i == 0 {
			continue // the server's name and greeting text
		}
		if len(ext) == maxExtensions {
			break
		}
		kw, param, _ := strings.Cut(l, " ")
		if !validKeyword(kw) || len(param) > maxParamLen {
			continue
		}
		kw = strings.ToUpper(kw)
		if _, dup := ext[kw]; dup {
			continue
		}
		ext[kw] = param
		if kw == "SIZE" {
			// RFC 1870 §4: "SIZE" [SP number]; 0 or absent: no limit.
			if n, err := strconv.ParseInt(param, 10, 64); err == nil && n > 0 {
				maxSize = n
			}
		}
	}
	return ext, maxSize
}

func validKeyword(kw string) bool {
	if kw == "" || len(kw) > maxKeywordLen || kw[0] == '-' {
		return false
	}
	for i := 0; i < len(kw); i++ {
		b := kw[i]
		if !(b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b >= '0' && b <= '9' || b == '-') {
			return false
		}
	}
	return true
}

// StartTLS says STARTTLS, performs the TLS handshake as a client with cfg
// (within HandshakeTimeout), then says EHLO again, because RFC 3207 §4.2
// requires the client to discard what it learnt before TLS.
//
// A refusal of STARTTLS is a *ReplyError with Stage "starttls" and leaves
// the plaintext session usable. A handshake failure is returned untouched
// (x509 errors, tls.AlertError, net.Error timeouts...) so the caller can
// classify it; the session is then unusable and its connection closed.
// For session resumption set cfg.ClientSessionCache and use the same
// cfg.ServerName on each connection; ConnectionState().DidResume tells
// whether it happened.
func (c *Client) StartTLS(cfg *tls.Config) (tls.ConnectionState, error) {
	if c.err != nil {
		return tls.ConnectionState{}, c.err
	}
	if c.tls != nil {
		return tls.ConnectionState{}, errors.New("smtpclient: StartTLS on a TLS session")
	}
	if cfg == nil {
		return tls.ConnectionState{}, errors.New("smtpclient: StartTLS needs a tls.Config")
	}
	r, err := c.cmd(StageStartTLS, "STARTTLS")
	if err != nil {
		return tls.ConnectionState{}, err
	}
	if r.Code != 220 {
		return tls.ConnectionState{}, c.refused(StageStartTLS, r)
	}
	// Anything buffered after the 220 arrived in plaintext; reading it as
	// part of the TLS session is the STARTTLS response injection flaw
	// (CVE-2011-0411), and RFC 3207 §4.2 has the client discard all
	// knowledge from before TLS anyway.
	if c.br.Buffered() > 0 {
		return tls.ConnectionState{}, c.fail(StageStartTLS, protocolErrorf("server sent data after its STARTTLS reply"))
	}
	tc := tls.Client(c.conn, cfg)
	_ = c.conn.SetDeadline(time.Now().Add(c.opts.HandshakeTimeout))
	if err := tc.Handshake(); err != nil {
		c.fail(StageStartTLS, err)
		return tls.ConnectionState{}, err
	}
	_ = c.conn.SetDeadline(time.Time{})
	c.tls = tc
	c.setConn(tc)
	c.ext, c.maxSize, c.helloDone, c.helloReply = nil, 0, false, Reply{}
	st := tc.ConnectionState()
	return st, c.Hello()
}

// ErrAuthWithoutTLS is returned by AuthPlain on a plaintext session: the
// password is never sent in the clear.
var ErrAuthWithoutTLS = errors.New("smtpclient: AUTH refused on a session without TLS")

// AuthPlain authenticates with the PLAIN mechanism (RFC 4954 §4, RFC
// 4616), the credentials in the initial response. It works only after
// StartTLS (RFC 4954 §4: PLAIN without encryption exposes the password);
// the caller checks the certificate before. A refusal (535 5.7.8, say) is
// a *ReplyError with Stage "auth"; the session stays usable.
func (c *Client) AuthPlain(username, password string) error {
	if c.err != nil {
		return c.err
	}
	if c.tls == nil {
		return ErrAuthWithoutTLS
	}
	if _, ok := c.Ext("AUTH"); !ok {
		return &ReplyError{Stage: StageAuth, Code: 502, Enhanced: "5.5.1", Text: "server does not offer AUTH"}
	}
	if strings.ContainsAny(username+password, "\x00\r\n") {
		return errors.New("smtpclient: AUTH credentials contain NUL or line breaks")
	}
	ir := base64.StdEncoding.EncodeToString([]byte("\x00" + username + "\x00" + password))
	r, err := c.cmd(StageAuth, "AUTH PLAIN "+ir)
	if err != nil {
		return err
	}
	if r.Code == 334 {
		// A server that ignored the initial response asks for it.
		if r, err = c.cmd(StageAuth, ir); err != nil {
			return err
		}
	}
	if r.Code != 235 {
		if r.Code == 334 {
			// Never a third round: cancel (RFC 4954 §4).
			if r, err = c.cmd(StageAuth, "*"); err != nil {
				return err
			}
		}
		return c.refused(StageAuth, r)
	}
	return nil
}

// Reset says RSET (RFC 5321 §4.1.1.5), abandoning any transaction.
func (c *Client) Reset() error {
	if c.err != nil {
		return c.err
	}
	r, err := c.cmd(StageRset, "RSET")
	if err != nil {
		return err
	}
	if r.Code != 250 {
		// §4.1.1.5: "MUST send a 250 OK reply to a RSET command with no
		// arguments" — anything else leaves the state unknown.
		return c.fail(StageRset, replyError(StageRset, r))
	}
	c.needReset = false
	return nil
}

// Noop says NOOP (RFC 5321 §4.1.1.9): a cheap check that a parked session
// still works.
func (c *Client) Noop() error {
	if c.err != nil {
		return c.err
	}
	r, err := c.cmd(StageNoop, "NOOP")
	if err != nil {
		return err
	}
	if r.Code != 250 {
		return c.refused(StageNoop, r)
	}
	return nil
}

// Quit says QUIT (RFC 5321 §4.1.1.10), waits for the reply and closes
// the connection.
func (c *Client) Quit() error {
	if c.err != nil {
		c.Close()
		return c.err
	}
	r, err := c.cmd(StageQuit, "QUIT")
	c.Close()
	if err != nil {
		return err
	}
	if r.Code != 221 {
		return replyError(StageQuit, r)
	}
	return nil
}

// Close closes the connection without QUIT.
func (c *Client) Close() error {
	if c.closed {
		return nil
	}
	c.closed = true
	if c.err == nil {
		c.err = &Error{Stage: StageQuit, Err: net.ErrClosed}
	}
	return c.conn.Close()
}

// fail makes err the session's sticky error, closes the connection and
// returns the error wrapped with its stage (a *ReplyError is kept as is).
func (c *Client) fail(stage string, err error) error {
	var re *ReplyError
	if !errors.As(err, &re) {
		var e *Error
		if !errors.As(err, &e) {
			err = &Error{Stage: stage, Err: err}
		}
	}
	if c.err == nil {
		c.err = err
	}
	if !c.closed {
		c.closed = true
		c.conn.Close()
	}
	return err
}

// refused turns a negative reply into a *ReplyError; a 421 also ends the
// session (RFC 5321 §3.8: the server is closing the channel).
func (c *Client) refused(stage string, r Reply) error {
	err := replyError(stage, r)
	if r.Code == 421 {
		return c.fail(stage, err)
	}
	return err
}

// cmd writes one command, flushes, and reads its reply.
func (c *Client) cmd(stage, line string) (Reply, error) {
	c.bw.WriteString(line)
	c.bw.WriteString("\r\n")
	if err := c.flush(stage); err != nil {
		return Reply{}, err
	}
	return c.readReply(stage, c.opts.CommandTimeout)
}

// flush sends what is buffered and counts a round trip: every flush is
// followed by a wait for a reply.
func (c *Client) flush(stage string) error {
	c.roundTrips.Add(1)
	if err := c.bw.Flush(); err != nil {
		return c.fail(stage, err)
	}
	return nil
}

// read reads one reply within timeout. It touches no session state, so
// it can run beside a writer.
func (c *Client) read(timeout time.Duration) (Reply, error) {
	_ = c.conn.SetReadDeadline(time.Now().Add(timeout))
	_, enhanced := c.ext["ENHANCEDSTATUSCODES"]
	return c.rr.readReply(enhanced)
}

// readReply reads one reply; a failure to read one ends the session.
func (c *Client) readReply(stage string, timeout time.Duration) (Reply, error) {
	if c.err != nil {
		return Reply{}, c.err
	}
	r, err := c.read(timeout)
	if err != nil {
		return Reply{}, c.fail(stage, err)
	}
	if r.Code == 421 {
		// Keep the reply for the caller; nothing more will be read.
		c.fail(stage, replyError(stage, r))
	}
	return r, nil
}

// QuitWithin is Quit with every wait bounded by d instead of
// CommandTimeout: a session being let go should not hold its owner for
// minutes.
func (c *Client) QuitWithin(d time.Duration) error {
	c.opts.CommandTimeout, c.writeTimeout = d, d
	return c.Quit()
}
