package delivery

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/textproto"
	"strconv"
	"strings"
	"time"

	"github.com/emersion/go-smtp"
)

// session is one SMTP connection to one MX address, after greeting,
// EHLO and (when done) STARTTLS. It can carry several messages.
type session struct {
	host string // MX name (SNI, certificate name, policy match)
	ip   string
	helo string // the server's greeting/EHLO name, for TLS-RPT
	c    *smtp.Client
	raw  net.Conn

	tls      bool
	version  uint16
	cert     certCheck
	leaf     *x509.Certificate
	messages int
	lastUsed time.Time
	// policyID is the MTA-STS policy id in force when the session was
	// set up; reuse re-checks the policy.
	policyID string
}

// sessionError is a failure to set a session up or to use it.
type sessionError struct {
	// Stage: "connect", "greeting", "ehlo", "starttls", "tls", "mail",
	// "rcpt", "data".
	Stage     string
	Code      int
	Enhanced  string
	Msg       string
	Permanent bool
	// ResultType is set when this is a TLS failure TLS-RPT counts.
	ResultType string
}

func (e *sessionError) Error() string {
	if e.Code != 0 {
		return fmt.Sprintf("%s: %d %s %s", e.Stage, e.Code, e.Enhanced, e.Msg)
	}
	return fmt.Sprintf("%s: %s", e.Stage, e.Msg)
}

// smtpErr turns a go-smtp client error into a sessionError.
func smtpErr(stage string, err error) *sessionError {
	var se *smtp.SMTPError
	if errors.As(err, &se) {
		enh := ""
		if se.EnhancedCode != smtp.NoEnhancedCode && se.EnhancedCode != (smtp.EnhancedCode{}) {
			enh = fmt.Sprintf("%d.%d.%d", se.EnhancedCode[0], se.EnhancedCode[1], se.EnhancedCode[2])
		}
		return &sessionError{Stage: stage, Code: se.Code, Enhanced: enh, Msg: se.Message, Permanent: se.Code >= 500}
	}
	return &sessionError{Stage: stage, Msg: err.Error()}
}

// dialOptions are the settings of a session set-up.
type dialOptions struct {
	Hostname       string
	Port           int
	LocalAddr      net.IP
	ConnectTimeout time.Duration
	CommandTimeout time.Duration
	Roots          *x509.CertPool
	Now            func() time.Time
	// Plaintext skips STARTTLS even if offered (the fallback after a
	// failed handshake when no policy demands TLS).
	Plaintext bool
}

// greetingConn feeds go-smtp's client a synthetic greeting: the real
// greeting and EHLO were read by dial, and after STARTTLS a server sends
// none.
type greetingConn struct {
	net.Conn
	pre []byte
	r   io.Reader
}

func (g *greetingConn) Read(p []byte) (int, error) {
	if len(g.pre) > 0 {
		n := copy(p, g.pre)
		g.pre = g.pre[n:]
		return n, nil
	}
	return g.r.Read(p)
}

// dial connects to ip, reads the greeting, says EHLO, and does STARTTLS
// when the server offers it (RFC 3207), verifying the certificate against
// host (RFC 8461 §4.2). It returns a session in which go-smtp's client has
// said EHLO again (over TLS: RFC 3207 §4.2 discards what was learnt
// before). A TLS handshake failure is returned as a sessionError with a
// ResultType; the caller decides whether to retry in plaintext.
func dial(ctx context.Context, host, ip string, o dialOptions) (*session, error) {
	d := net.Dialer{Timeout: o.ConnectTimeout}
	if o.LocalAddr != nil {
		d.LocalAddr = &net.TCPAddr{IP: o.LocalAddr}
	}
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(ip, strconv.Itoa(o.Port)))
	if err != nil {
		return nil, &sessionError{Stage: "connect", Msg: err.Error()}
	}
	s := &session{host: host, ip: ip, raw: conn}
	ok := false
	defer func() {
		if !ok {
			conn.Close()
		}
	}()
	br := bufio.NewReader(conn)
	tp := textproto.NewConn(struct {
		io.Reader
		io.WriteCloser
	}{br, conn})
	_ = conn.SetDeadline(time.Now().Add(o.CommandTimeout))
	_, msg, err := tp.ReadResponse(220)
	if err != nil {
		return nil, protoErr("greeting", err)
	}
	s.helo = firstWord(msg)
	ext, err := ehlo(tp, o.Hostname)
	if err != nil {
		return nil, err
	}
	var r io.Reader = br
	var c net.Conn = conn
	if _, offered := ext["STARTTLS"]; offered && !o.Plaintext {
		if err := tp.PrintfLine("STARTTLS"); err != nil {
			return nil, &sessionError{Stage: "starttls", Msg: err.Error()}
		}
		if _, _, err := tp.ReadResponse(220); err != nil {
			e := protoErr("starttls", err)
			e.ResultType = ResultValidationFailure
			return nil, e
		}
		// RFC 3207 §4.2 / STARTTLS command injection: nothing may follow
		// the 220 in plaintext.
		if br.Buffered() > 0 {
			return nil, &sessionError{Stage: "starttls", Msg: "server sent data after its STARTTLS reply (possible injection)", ResultType: ResultValidationFailure}
		}
		// SNI is the MX host name (RFC 8461 §7.1 MUST). Verification is
		// ours (verifyCert) so that failures can be classified and, when
		// no policy demands it, delivery can go on over unverified TLS.
		tc := tls.Client(conn, &tls.Config{ServerName: host, InsecureSkipVerify: true, MinVersion: tls.VersionTLS12})
		hctx, cancel := context.WithTimeout(ctx, o.CommandTimeout)
		err = tc.HandshakeContext(hctx)
		cancel()
		if err != nil {
			return nil, &sessionError{Stage: "tls", Msg: "TLS handshake failed: " + err.Error(), ResultType: ResultValidationFailure}
		}
		st := tc.ConnectionState()
		s.tls = true
		s.version = st.Version
		s.cert = verifyCert(st, host, o.Roots, o.Now())
		if len(st.PeerCertificates) > 0 {
			s.leaf = st.PeerCertificates[0]
		}
		c, r = tc, tc
	}
	_ = conn.SetDeadline(time.Time{})
	gc := &greetingConn{Conn: c, pre: []byte("220 " + host + " ESMTP\r\n"), r: r}
	s.c = smtp.NewClient(gc)
	s.c.CommandTimeout = o.CommandTimeout
	// RFC 5321 §4.5.3.2.6: at least 10 minutes for the reply to the
	// final dot.
	s.c.SubmissionTimeout = max(10*time.Minute, o.CommandTimeout)
	if err := s.c.Hello(o.Hostname); err != nil {
		return nil, smtpErr("ehlo", err)
	}
	if err := s.c.Noop(); err != nil {
		// Noop forces the (second) EHLO now, so its failure is a set-up
		// failure rather than a MAIL failure.
		return nil, smtpErr("ehlo", err)
	}
	ok = true
	return s, nil
}

func protoErr(stage string, err error) *sessionError {
	var pe *textproto.Error
	if errors.As(err, &pe) {
		e := &sessionError{Stage: stage, Code: pe.Code, Msg: pe.Msg, Permanent: pe.Code >= 500}
		if m := strings.Fields(pe.Msg); len(m) > 0 && isEnhanced(m[0]) {
			e.Enhanced, e.Msg = m[0], strings.TrimSpace(strings.TrimPrefix(pe.Msg, m[0]))
		}
		return e
	}
	return &sessionError{Stage: stage, Msg: err.Error()}
}

func isEnhanced(s string) bool {
	parts := strings.Split(s, ".")
	if len(parts) != 3 || (parts[0] != "2" && parts[0] != "4" && parts[0] != "5") {
		return false
	}
	for _, p := range parts[1:] {
		if _, err := strconv.Atoi(p); err != nil {
			return false
		}
	}
	return true
}

// ehlo says EHLO and returns the extensions offered; a server that
// refuses EHLO gets HELO (no extensions).
func ehlo(tp *textproto.Conn, name string) (map[string]string, error) {
	if err := tp.PrintfLine("EHLO %s", name); err != nil {
		return nil, &sessionError{Stage: "ehlo", Msg: err.Error()}
	}
	code, msg, err := tp.ReadResponse(250)
	if err != nil {
		if code == 500 || code == 502 {
			if err := tp.PrintfLine("HELO %s", name); err != nil {
				return nil, &sessionError{Stage: "helo", Msg: err.Error()}
			}
			if _, _, err := tp.ReadResponse(250); err != nil {
				return nil, protoErr("helo", err)
			}
			return map[string]string{}, nil
		}
		return nil, protoErr("ehlo", err)
	}
	ext := map[string]string{}
	lines := strings.Split(msg, "\n")
	for _, l := range lines[1:] {
		k, v, _ := strings.Cut(l, " ")
		ext[strings.ToUpper(k)] = v
	}
	return ext, nil
}

func firstWord(s string) string {
	if f := strings.Fields(s); len(f) > 0 {
		return f[0]
	}
	return ""
}

// sessionCloseTimeout bounds QUIT when a session ends (a var for tests).
var sessionCloseTimeout = 5 * time.Second

// close ends the session politely, bounded in time. go-smtp sets its own
// deadline (CommandTimeout) around QUIT, so the bound goes there: a deadline
// on the raw connection would be overwritten.
func (s *session) close() {
	s.c.CommandTimeout = sessionCloseTimeout
	_ = s.c.Quit()
	_ = s.raw.Close()
}

// rcptResult is the outcome for one recipient of one transaction.
type rcptResult struct {
	Code      int
	Enhanced  string
	Msg       string
	Delivered bool
	Permanent bool
}

// send runs one transaction: MAIL, a RCPT per recipient, DATA. A failure
// at MAIL or DATA applies to every recipient; RCPT replies are per
// recipient (RFC 5321 §4.2, §4.5.4.1: one copy with many RCPTs). err is
// set when the session is unusable afterwards.
func (s *session) send(from string, rcpts []string, mopts *smtp.MailOptions, ropts []*smtp.RcptOptions, body io.Reader) ([]rcptResult, *sessionError) {
	res := make([]rcptResult, len(rcpts))
	fail := func(e *sessionError) ([]rcptResult, *sessionError) {
		for i := range res {
			if res[i].Code == 0 || res[i].Code/100 == 2 {
				res[i] = rcptResult{Code: e.Code, Enhanced: e.Enhanced, Msg: e.Msg, Permanent: e.Permanent}
			}
		}
		return res, e
	}
	if err := s.c.Mail(from, mopts); err != nil {
		e := smtpErr("mail", err)
		return fail(e)
	}
	accepted := 0
	for i, r := range rcpts {
		var ro *smtp.RcptOptions
		if i < len(ropts) {
			ro = ropts[i]
		}
		if err := s.c.Rcpt(r, ro); err != nil {
			e := smtpErr("rcpt", err)
			if e.Code == 0 {
				return fail(e)
			}
			res[i] = rcptResult{Code: e.Code, Enhanced: e.Enhanced, Msg: e.Msg, Permanent: e.Permanent}
			continue
		}
		res[i] = rcptResult{Code: 250}
		accepted++
	}
	if accepted == 0 {
		// Nothing to send: reset the transaction for the next message.
		if err := s.c.Reset(); err != nil {
			return res, smtpErr("rset", err)
		}
		return res, nil
	}
	w, err := s.c.Data()
	if err != nil {
		return fail(smtpErr("data", err))
	}
	if _, err := io.Copy(w, body); err != nil {
		// Never w.Close here: it sends the final dot, and the server
		// would take a truncated message (a body read failing, say).
		// Dropping the connection aborts the transaction (RFC 5321
		// §4.1.1.4: no dot, no message).
		_ = s.raw.Close()
		return fail(&sessionError{Stage: "data", Msg: "sending body: " + err.Error()})
	}
	if err := w.Close(); err != nil {
		return fail(smtpErr("data", err))
	}
	for i := range res {
		if res[i].Code == 250 {
			res[i] = rcptResult{Code: 250, Delivered: true, Msg: "OK"}
		}
	}
	s.messages++
	return res, nil
}

// reset prepares a reused session for the next message.
func (s *session) reset() error {
	_ = s.raw.SetDeadline(time.Time{})
	return s.c.Reset()
}
