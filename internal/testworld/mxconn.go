package testworld

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// handshakeTimeout bounds a STARTTLS handshake on the MX side.
const handshakeTimeout = 10 * time.Second

// maxLine bounds how much mxConn buffers while looking for a line end; a
// longer "line" is passed on in pieces (go-smtp then rejects it as too long
// in command mode, or takes it as message data).
const maxLine = 64 << 10

var errHandshakeFail = errors.New("testworld: handshake broken on purpose (MXOptions.HandshakeFail)")

// mxConn sits between the TCP connection and go-smtp. It hands go-smtp one
// command line per Read, so that when it looks at a line every earlier
// command has been answered; that lets it answer STARTTLS itself (and run
// the TLS handshake), and edit the EHLO reply go-smtp writes. Message data
// (after a 354, or a BDAT chunk) passes through untouched.
//
// Read, Write and the session run on go-smtp's goroutine for the
// connection; only Close may come from elsewhere (Server.Close).
type mxConn struct {
	net.Conn // the TCP connection, for addresses and deadlines
	raw      net.Conn
	mx       *MXServer
	id       int

	cur             net.Conn // raw, or the TLS connection after STARTTLS
	in              []byte   // read from cur, not yet looked at
	out             []byte   // looked at, not yet returned to go-smtp
	rawLeft         int64    // BDAT chunk bytes still to pass through
	dataMode        bool     // between a 354 reply and the next reply
	lastVerb        string
	needHelo        bool // TLS started, no EHLO/HELO since
	greeted         bool
	closeAfterReply bool
	tlsState        *tls.ConnectionState
	sni             string
	fatal           error

	closed    atomic.Bool
	closeOnce sync.Once
}

func (c *mxConn) info() ConnInfo {
	ci := ConnInfo{ID: c.id, RemoteAddr: c.raw.RemoteAddr().String(), SNI: c.sni}
	if c.tlsState != nil {
		ci.TLS = true
		ci.TLSVersion = c.tlsState.Version
		ci.DidResume = c.tlsState.DidResume
	}
	return ci
}

// Close closes the TCP connection (without a TLS close_notify, which could
// block on a peer that stopped reading).
func (c *mxConn) Close() error {
	c.closeOnce.Do(func() {
		c.closed.Store(true)
		c.raw.Close()
	})
	return nil
}

// readErr turns errors after Close into io.EOF, which go-smtp takes as a
// normal end of the connection.
func (c *mxConn) readErr(err error) error {
	if c.closed.Load() || errors.Is(err, net.ErrClosed) {
		return io.EOF
	}
	return err
}

func (c *mxConn) fill() error {
	var buf [4096]byte
	n, err := c.cur.Read(buf[:])
	c.in = append(c.in, buf[:n]...)
	if n > 0 {
		return nil
	}
	if err == nil {
		err = io.ErrNoProgress
	}
	return c.readErr(err)
}

// nextLine returns the next line from the client, with its line end, or
// what is left at the end of the stream.
func (c *mxConn) nextLine() ([]byte, error) {
	for {
		if i := bytes.IndexByte(c.in, '\n'); i >= 0 {
			line := c.in[: i+1 : i+1]
			c.in = c.in[i+1:]
			return line, nil
		}
		if len(c.in) >= maxLine {
			line := c.in[:maxLine:maxLine]
			c.in = c.in[maxLine:]
			return line, nil
		}
		if err := c.fill(); err != nil {
			if len(c.in) > 0 {
				line := c.in
				c.in = nil
				return line, nil
			}
			return nil, err
		}
	}
}

func (c *mxConn) Read(p []byte) (int, error) {
	for len(c.out) == 0 {
		if c.fatal != nil {
			return 0, io.EOF
		}
		if c.rawLeft > 0 {
			if len(c.in) == 0 {
				if err := c.fill(); err != nil {
					return 0, err
				}
			}
			n := min(int64(len(c.in)), c.rawLeft)
			c.out, c.in = c.in[:n:n], c.in[n:]
			c.rawLeft -= n
			break
		}
		line, err := c.nextLine()
		if err != nil {
			return 0, err
		}
		if c.dataMode || c.command(line) {
			c.out = line
		}
	}
	n := copy(p, c.out)
	c.out = c.out[n:]
	return n, nil
}

// command looks at one command line before go-smtp sees it. It reports
// false when it has answered the command itself.
func (c *mxConn) command(line []byte) bool {
	verb, arg, _ := strings.Cut(strings.TrimRight(string(line), "\r\n"), " ")
	verb = strings.ToUpper(verb)
	switch {
	case verb == "STARTTLS" && c.mx.offersTLS():
		c.lastVerb = verb
		if c.tlsState != nil {
			c.reply("503 5.5.1 TLS already active")
			return false
		}
		if err := c.startTLS(); err != nil {
			c.fatal = err
		}
		return false
	case c.needHelo && verb != "EHLO" && verb != "HELO" && verb != "QUIT" && verb != "NOOP" && verb != "RSET":
		// RFC 3207 §4.2: after TLS the client starts over with EHLO.
		c.reply("503 5.5.1 Send EHLO first after STARTTLS")
		return false
	}
	if verb == "EHLO" || verb == "HELO" {
		c.needHelo = false
	}
	if verb == "BDAT" {
		if n, ok := parseBDATSize(arg); ok {
			c.rawLeft = n
		}
	}
	c.lastVerb = verb
	return true
}

// reply writes one reply line straight to the client.
func (c *mxConn) reply(s string) {
	c.cur.Write([]byte(s + "\r\n"))
}

// startTLS answers STARTTLS as MXOptions say and runs the handshake.
func (c *mxConn) startTLS() error {
	opts := c.mx.opts
	if code := opts.STARTTLSReply; code != 0 {
		io.WriteString(c.cur, (&Reply{Code: code}).line("TLS not available"))
		return nil
	}
	// RFC 3207 §4.2 (and CVE-2011-0411): anything the client sent before
	// our 220 is not carried into the TLS session.
	c.in = nil
	c.reply("220 2.0.0 Ready to start TLS")

	cfg := &tls.Config{
		MinVersion: opts.MinTLS,
		MaxVersion: opts.MaxTLS,
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			c.sni = hello.ServerName
			c.mx.mu.Lock()
			c.mx.snis = append(c.mx.snis, hello.ServerName)
			c.mx.mu.Unlock()
			if opts.HandshakeFail {
				return nil, errHandshakeFail
			}
			return nil, nil
		},
	}
	c.mx.mu.Lock()
	if cert := c.mx.cert; cert != nil {
		cfg.Certificates = []tls.Certificate{cert.TLS}
	}
	cfg.SetSessionTicketKeys([][32]byte{c.mx.ticketKey})
	c.mx.mu.Unlock()
	tc := tls.Server(c.raw, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), handshakeTimeout)
	defer cancel()
	go func() {
		select {
		case <-c.mx.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	if err := tc.HandshakeContext(ctx); err != nil {
		return fmt.Errorf("STARTTLS handshake: %w", err)
	}
	st := tc.ConnectionState()
	c.tlsState = &st
	if st.DidResume {
		c.mx.mu.Lock()
		c.mx.resumed++
		c.mx.mu.Unlock()
	}
	c.cur = tc
	c.needHelo = true
	return nil
}

func (c *mxConn) Write(p []byte) (int, error) {
	if !c.greeted {
		c.greeted = true
		if !sleepOrDone(c.mx.opts.GreetingDelay, c.mx.done) {
			return 0, net.ErrClosed
		}
		if handled, err := c.scriptedGreeting(); handled {
			return len(p), err
		}
	}
	line := string(p)
	c.dataMode = strings.HasPrefix(line, "354") // any other reply ends message data
	out := p
	if c.lastVerb == "EHLO" && strings.HasPrefix(line, "250") {
		out = c.editEHLO(line)
	}
	if len(out) > 0 {
		if _, err := c.cur.Write(out); err != nil {
			return 0, err
		}
	}
	if c.closeAfterReply && len(line) > 3 && line[3] == ' ' {
		c.closeAfterReply = false
		c.Close()
	}
	return len(p), nil
}

// scriptedGreeting logs the connection and asks the script about it; a
// reply replaces go-smtp's greeting. It reports whether it did.
func (c *mxConn) scriptedGreeting() (bool, error) {
	cmd := Command{Verb: "CONNECT", Conn: c.info()}
	var r *Reply
	if c.mx.opts.Script != nil {
		r = c.mx.opts.Script(cmd)
	}
	cmd.Code = 220
	if r != nil {
		sleepOrDone(r.Delay, c.mx.done)
		if r.Code != 0 {
			cmd.Code = r.Code
		}
	}
	c.mx.mu.Lock()
	c.mx.commands = append(c.mx.commands, cmd)
	c.mx.mu.Unlock()
	if r == nil || (r.Code == 0 && !r.Close) {
		return false, nil
	}
	if r.Code != 0 {
		if _, err := io.WriteString(c.cur, r.line(c.mx.opts.Hostname+" ESMTP")); err != nil {
			return true, err
		}
	}
	if r.Close {
		c.Close()
	}
	return r.Code != 0 || r.Close, nil
}

// editEHLO rewrites one line of go-smtp's EHLO reply: STARTTLS and
// REQUIRETLS are added after the first line when they apply, and 8BITMIME
// is dropped when MXOptions.No8BITMIME says so.
func (c *mxConn) editEHLO(line string) []byte {
	ext := strings.TrimRight(line[min(4, len(line)):], "\r\n")
	if len(line) > 3 && line[3] == '-' && strings.HasPrefix(ext, "Hello ") {
		out := line
		if c.tlsState == nil && c.mx.offersTLS() {
			out += "250-STARTTLS\r\n"
		}
		if c.tlsState != nil && c.mx.opts.AdvertiseREQUIRETLS {
			out += "250-REQUIRETLS\r\n"
		}
		return []byte(out)
	}
	if c.mx.opts.No8BITMIME && strings.EqualFold(ext, "8BITMIME") && line[3] == '-' {
		return nil
	}
	return []byte(line)
}
