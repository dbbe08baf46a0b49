package relay

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/internal/message"
	"github.com/stsrelay/stsrelay/queue"
)

// Replies this package sends itself. Texts follow interface.md where it
// fixes them.
var (
	errShuttingDown = &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 3, 2}, Message: "shutting down"}
	// RFC 4954 §6: 530 5.7.0 when a command needs AUTH first.
	errAuthRequired = &smtp.SMTPError{Code: 530, EnhancedCode: smtp.EnhancedCode{5, 7, 0}, Message: "Authentication required"}
	// RFC 4954 §6: 538 5.7.11 when the mechanism needs encryption.
	errEncryptionRequired = &smtp.SMTPError{Code: 538, EnhancedCode: smtp.EnhancedCode{5, 7, 11}, Message: "Encryption required for requested authentication mechanism"}
	errAuthInvalid        = &smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 8}, Message: "Authentication credentials invalid"}
	// Too many failed AUTH on one connection: the reply, then close.
	errAuthTooMany = &smtp.SMTPError{Code: 421, EnhancedCode: smtp.EnhancedCode{4, 7, 0}, Message: "Too many authentication failures, closing connection"}
	// The client's throttle would make it wait longer than maxAuthWait.
	errAuthThrottled = &smtp.SMTPError{Code: 454, EnhancedCode: smtp.EnhancedCode{4, 7, 0}, Message: "Too many authentication failures from your address, try again later"}
	errAuthMalformed = &smtp.SMTPError{Code: 501, EnhancedCode: smtp.EnhancedCode{5, 5, 2}, Message: "Malformed authentication response"}
	errNoMechanism   = &smtp.SMTPError{Code: 504, EnhancedCode: smtp.EnhancedCode{5, 5, 4}, Message: "Unrecognized authentication mechanism"}
	// RFC 8689 §4.1: REQUIRETLS only over a TLS-protected session.
	errRequireTLSPlain  = &smtp.SMTPError{Code: 530, EnhancedCode: smtp.EnhancedCode{5, 7, 10}, Message: "REQUIRETLS needs a TLS connection"}
	errSenderNotAllowed = &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 7, 1}, Message: "Sender not allowed"}
	errBadSender        = &smtp.SMTPError{Code: 553, EnhancedCode: smtp.EnhancedCode{5, 1, 7}, Message: "Bad sender address syntax"}
	errBadRcpt          = &smtp.SMTPError{Code: 553, EnhancedCode: smtp.EnhancedCode{5, 1, 3}, Message: "Bad recipient address syntax"}
	// RFC 6531 §3.5: non-ASCII addresses only with SMTPUTF8.
	errNeedUTF8 = &smtp.SMTPError{Code: 553, EnhancedCode: smtp.EnhancedCode{5, 6, 7}, Message: "Non-ASCII address needs SMTPUTF8"}
	// errQueueFull: RFC 3463 X.3.1 "mail system full"; RFC 5321 §4.2.2
	// 452 "insufficient system storage".
	errQueueFull   = &smtp.SMTPError{Code: 452, EnhancedCode: smtp.EnhancedCode{4, 3, 1}, Message: "Mail system full, try again later"}
	errQueueWrite  = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 3, 0}, Message: "Local error writing the message, try again later"}
	errReadData    = &smtp.SMTPError{Code: 451, EnhancedCode: smtp.EnhancedCode{4, 4, 2}, Message: "Error reading message data"}
	errLineTooLong = &smtp.SMTPError{Code: 554, EnhancedCode: smtp.EnhancedCode{5, 6, 0}, Message: "Line too long"}
	// RFC 3461 §4: a malformed DSN parameter (here: one whose decoded
	// xtext holds control characters).
	errBadParam      = &smtp.SMTPError{Code: 501, EnhancedCode: smtp.EnhancedCode{5, 5, 4}, Message: "Invalid parameter value"}
	errNoTransaction = &smtp.SMTPError{Code: 503, EnhancedCode: smtp.EnhancedCode{5, 5, 1}, Message: "Bad sequence of commands"}
)

// session is one connection's state between EHLO and its end (go-smtp
// makes a fresh one after STARTTLS). go-smtp calls Mail, Rcpt, Data and
// Reset from the connection's goroutine — except that with BDAT, Data runs
// in a goroutine of its own and Reset may overlap it — and Logout from
// any goroutine; mu guards what they share.
type session struct {
	s      *Server
	conn   net.Conn // the connection as go-smtp sees it (TLS after STARTTLS)
	ip     netip.Addr
	ipStr  string
	helo   string
	tls    bool
	tlsVer string
	closed chan struct{} // closed by Logout
	lconn  *limitConn    // below conn; nil when the server did not accept it (tests)

	mu         sync.Mutex
	user       string // authenticated user, "" when none
	inTxn      bool   // MAIL accepted, not yet reset
	dataActive bool   // Data running
	byeSent    bool
	gone       bool
	env        queue.Envelope
}

func (s *Server) newSession(c *smtp.Conn) (smtp.Session, error) {
	conn := c.Conn()
	ss := &session{
		s:      s,
		conn:   conn,
		helo:   c.Hostname(),
		closed: make(chan struct{}),
		lconn:  limitConnOf(conn),
	}
	if ap, err := netip.ParseAddrPort(conn.RemoteAddr().String()); err == nil {
		ss.ip = ap.Addr().Unmap()
		ss.ipStr = ss.ip.String()
	} else {
		ss.ipStr = conn.RemoteAddr().String()
	}
	if st, ok := c.TLSConnectionState(); ok {
		ss.tls = true
		// Spelt as on the delivery line ("TLS1.3"), one name for one thing.
		ss.tlsVer = strings.ReplaceAll(tls.VersionName(st.Version), " ", "")
	}
	if !s.register(ss) {
		return nil, errShuttingDown
	}
	return ss, nil
}

// busy reports whether a transaction is in progress. ss.mu must be held.
func (ss *session) busy() bool { return ss.inTxn || ss.dataActive }

// update changes the session's state under its lock and keeps the
// server's count of busy sessions; if the server is shutting down and the
// session just became idle, it is told goodbye.
func (ss *session) update(f func()) {
	ss.mu.Lock()
	was := ss.busy()
	f()
	now := ss.busy()
	ss.mu.Unlock()
	switch {
	case !was && now:
		ss.s.addBusy(1)
	case was && !now:
		ss.s.addBusy(-1)
		if ss.s.isClosing() {
			ss.bye(false)
		}
	}
}

func (ss *session) byeIfIdle() {
	ss.mu.Lock()
	idle := !ss.busy()
	ss.mu.Unlock()
	if idle {
		ss.bye(false)
	}
}

// bye sends "421 4.3.2 shutting down" and closes the connection: at once
// when force is set, otherwise after the client closed its side or
// byeGrace passed. It runs at most once per session.
func (ss *session) bye(force bool) {
	ss.mu.Lock()
	if ss.byeSent || ss.gone {
		ss.mu.Unlock()
		if force {
			ss.conn.Close()
		}
		return
	}
	ss.byeSent = true
	ss.mu.Unlock()
	send := func() {
		// A Write on a net.Conn or tls.Conn is atomic with respect to
		// go-smtp's own replies, so the line arrives whole.
		_ = ss.conn.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = io.WriteString(ss.conn, "421 4.3.2 shutting down\r\n")
	}
	if force {
		send()
		ss.conn.Close()
		return
	}
	go func() {
		send()
		// Half-close so the client reads EOF after the 421 while we
		// still read (and answer) a QUIT it may already have sent;
		// closing with unread input would reset the connection.
		if cw, ok := ss.conn.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
		t := time.NewTimer(byeGrace)
		defer t.Stop()
		select {
		case <-ss.closed:
		case <-t.C:
		}
		ss.conn.Close()
	}()
}

// Reset ends the transaction (RSET, EHLO, after DATA).
func (ss *session) Reset() {
	ss.update(func() {
		ss.inTxn = false
		ss.env = queue.Envelope{}
	})
}

// Logout is called when the connection ends or STARTTLS replaces the
// session.
func (ss *session) Logout() error {
	ss.update(func() {
		if ss.gone {
			return
		}
		ss.gone = true
		ss.inTxn = false
		close(ss.closed)
	})
	ss.s.unregister(ss)
	return nil
}

// authAllowed says whether AUTH may be used on this connection: over TLS
// always; in the clear only from loopback and only when
// require_tls_for_auth is off.
func (ss *session) authAllowed() bool {
	if ss.tls {
		return true
	}
	return !ss.s.acc.Load().requireTLSForAuth && ss.ip.IsValid() && ss.s.loopback(ss.ip)
}

// AuthMechanisms lists what EHLO offers: nothing where AUTH is not allowed
// (RFC 4954 §4: no plaintext mechanisms over an unprotected channel).
func (ss *session) AuthMechanisms() []string {
	if len(ss.s.acc.Load().users) == 0 || !ss.authAllowed() {
		return nil
	}
	return []string{sasl.Plain, sasl.Login}
}

// Auth starts a SASL exchange for mech.
func (ss *session) Auth(mech string) (sasl.Server, error) {
	if len(ss.s.acc.Load().users) == 0 {
		return nil, smtp.ErrAuthUnsupported
	}
	if !ss.authAllowed() {
		ss.s.log.Info("auth refused before TLS", zap.String("client_ip", ss.ipStr), zap.String("mechanism", mech))
		return nil, errEncryptionRequired
	}
	if ss.lconn != nil && ss.lconn.authFailures.Load() >= maxAuthFailures {
		// The reply is written, then the connection closed.
		ss.s.log.Warn("auth refused: too many failures on this connection", zap.String("client_ip", ss.ipStr),
			zap.Int32("failures", ss.lconn.authFailures.Load()))
		ss.lconn.closeAfterWrite.Store(true)
		return nil, errAuthTooMany
	}
	var srv sasl.Server
	switch strings.ToUpper(mech) {
	case sasl.Plain:
		srv = sasl.NewPlainServer(func(identity, username, password string) error {
			// RFC 4616: an authorization identity other than the
			// user's own is not supported.
			return ss.authenticate(mech, username, password, identity == "" || identity == username)
		})
	case sasl.Login:
		srv = &loginServer{auth: func(username, password string) error {
			return ss.authenticate(mech, username, password, true)
		}}
	default:
		return nil, errNoMechanism
	}
	return saslErrors{srv}, nil
}

// authenticate checks the credentials and, on success, makes username the
// session's user. The cheap refusals come first: a password bcrypt would
// truncate, then the client's throttle (waited out before, not after, the
// comparison, so that a guesser pays in time and the server not in CPU),
// then a slot among bcryptSlots.
func (ss *session) authenticate(mech, username, password string, identityOK bool) error {
	s := ss.s
	fail := func(why string) error {
		n, _ := s.throttle.fail(ss.ip, time.Now())
		var onConn int32
		if ss.lconn != nil {
			onConn = ss.lconn.authFailures.Add(1)
		}
		s.log.Warn("auth failed", zap.String("client_ip", ss.ipStr), zap.String("user", username),
			zap.String("mechanism", mech), zap.String("reason", why), zap.Int("failures", n), zap.Int32("connection_failures", onConn))
		return errAuthInvalid
	}
	if len(password) > maxPasswordBytes {
		// bcrypt compares only the first 72 bytes: a longer password
		// would match any other with the same beginning.
		return fail("password longer than 72 bytes")
	}
	release, ok := s.throttle.acquire(ss.ip, s.done, ss.closed)
	if !ok {
		return errShuttingDown
	}
	defer release()
	wait := s.throttle.admit(ss.ip, time.Now())
	if wait > maxAuthWait {
		s.log.Warn("auth throttled", zap.String("client_ip", ss.ipStr), zap.String("user", username), zap.Duration("wait", wait))
		if ss.lconn != nil {
			ss.lconn.authFailures.Add(1)
		}
		if !ss.sleep(authTarpit) {
			return errShuttingDown
		}
		return errAuthThrottled
	}
	defer s.throttle.done(ss.ip)
	if wait > 0 && !ss.sleep(wait) {
		return errShuttingDown
	}
	select {
	case s.bcryptSlots <- struct{}{}:
	case <-s.done:
		return errShuttingDown
	case <-ss.closed:
		return errShuttingDown
	}
	ok = s.checkPassword(username, password)
	<-s.bcryptSlots
	if !ok || !identityOK {
		return fail("invalid credentials")
	}
	ss.mu.Lock()
	ss.user = username
	ss.mu.Unlock()
	s.log.Debug("auth ok", zap.String("client_ip", ss.ipStr), zap.String("user", username), zap.String("mechanism", mech))
	return nil
}

// sleep waits d; false when the server began shutting down or the
// connection ended first.
func (ss *session) sleep(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ss.s.done:
	case <-ss.closed:
	}
	return false
}

// Mail starts a transaction.
func (ss *session) Mail(from string, opts *smtp.MailOptions) error {
	if opts == nil {
		opts = &smtp.MailOptions{}
	}
	ss.mu.Lock()
	user := ss.user
	ss.mu.Unlock()
	reject := func(err *smtp.SMTPError, why string) error {
		ss.s.log.Info("mail rejected", zap.String("client_ip", ss.ipStr), zap.String("user", user),
			zap.String("from", from), zap.String("reason", why))
		return err
	}
	if ss.s.isClosing() {
		return errShuttingDown
	}
	if user == "" && !(ss.ip.IsValid() && ss.s.trusted(ss.ip)) {
		return reject(errAuthRequired, "not authenticated")
	}
	if opts.RequireTLS && !ss.tls {
		return reject(errRequireTLSPlain, "REQUIRETLS without TLS")
	}
	if from != "" {
		if !opts.UTF8 && !message.IsASCII(from) {
			return reject(errNeedUTF8, "non-ASCII sender without SMTPUTF8")
		}
		if err := checkAddress(from, errBadSender); err != nil {
			return reject(err, "bad sender syntax")
		}
	}
	if hasControl(opts.EnvelopeID) {
		// RFC 3461 ENVID travels into DSNs.
		return reject(errBadParam, "control character in ENVID")
	}
	if !ss.s.senderAllowed(from) {
		return reject(errSenderNotAllowed, "sender not in allowed_senders")
	}
	if err := ss.s.queue.CheckSpace(int64(opts.Size)); err != nil {
		return reject(errQueueFull, err.Error())
	}
	var closing bool
	ss.update(func() {
		// Checked again under the lock: Shutdown decides which
		// sessions are idle while holding it.
		if ss.s.isClosing() || ss.gone {
			closing = true
			return
		}
		ss.inTxn = true
		ss.env = queue.Envelope{
			From:       from,
			SMTPUTF8:   opts.UTF8,
			Body:       string(opts.Body),
			RequireTLS: opts.RequireTLS,
			Ret:        string(opts.Return),
			EnvID:      opts.EnvelopeID,
			User:       user,
			ClientIP:   ss.ipStr,
		}
	})
	if closing {
		return errShuttingDown
	}
	return nil
}

// Rcpt adds a recipient. go-smtp enforces max_recipients (452 4.5.3)
// before calling it.
func (ss *session) Rcpt(to string, opts *smtp.RcptOptions) error {
	if opts == nil {
		opts = &smtp.RcptOptions{}
	}
	ss.mu.Lock()
	defer ss.mu.Unlock()
	if !ss.inTxn {
		return errNoTransaction
	}
	if !ss.env.SMTPUTF8 && !message.IsASCII(to) {
		return errNeedUTF8
	}
	if err := checkAddress(to, errBadRcpt); err != nil {
		return err
	}
	if hasControl(opts.OriginalRecipient) {
		// RFC 3461 ORCPT travels into DSNs.
		return errBadParam
	}
	for _, r := range ss.env.Rcpts {
		if r.Addr == to {
			// A repeated RCPT is accepted but delivered once.
			return nil
		}
	}
	spec := queue.RcptSpec{Addr: to}
	for _, n := range opts.Notify {
		spec.Notify = append(spec.Notify, string(n))
	}
	if opts.OriginalRecipient != "" {
		// RFC 3461 §4.2 form, "addr-type;address" (decoded).
		spec.ORcpt = string(opts.OriginalRecipientType) + ";" + opts.OriginalRecipient
	}
	ss.env.Rcpts = append(ss.env.Rcpts, spec)
	return nil
}

// Data streams the message into the queue: a Received header first, then
// the client's bytes, dot-unstuffed (DATA, RFC 5321 §4.5.2) and with every
// line ended by CRLF (see bodyWriter: bare LF is normalised, bare CR
// refuses the message). The reply is 250 only after the queue committed
// the message durably.
func (ss *session) Data(r io.Reader) error {
	var env queue.Envelope
	var ok bool
	ss.update(func() {
		ok = ss.inTxn
		env = ss.env
		env.Rcpts = append([]queue.RcptSpec(nil), ss.env.Rcpts...)
		ss.dataActive = ok
	})
	if !ok {
		return errNoTransaction
	}
	defer ss.update(func() { ss.dataActive = false })

	s := ss.s
	// submission.data_timeout without progress, renewed by every read
	// that brings bytes (RFC 5321 §4.5.3.2.6 asks for a timeout per
	// chunk, not for the whole message).
	if ss.lconn != nil {
		ss.lconn.dataMode(s.sub.DataTimeout.Duration)
		defer ss.lconn.dataMode(0)
	}

	w := s.queue.NewWriter()
	defer w.Abort() // no-op after Commit

	if _, err := io.WriteString(w, ss.receivedHeader(env, time.Now())); err != nil {
		s.log.Error("queue write failed", zap.String("client_ip", ss.ipStr), zap.Error(err))
		ss.drain(r)
		return errQueueWrite
	}
	br, finish, dot := dotSource(r)
	b := newBodyWriter(w, dot || isGoSMTPDataReader(r), s.sub.MaxMessageBytes)
	var rerr error
	switch {
	case dot:
		rerr = readDot(br, b)
		if rerr == nil {
			finish()
		}
	case isGoSMTPDataReader(r):
		// go-smtp changed: its reader has already unstuffed the dots.
		s.log.Error("go-smtp DATA reader not recognised; using its end-of-data parsing")
		b.dot = false
		rerr = readAll(r, b)
	default: // BDAT
		rerr = readAll(r, b)
	}
	if rerr != nil {
		var serr *smtp.SMTPError
		switch {
		case errors.As(rerr, &serr):
			// go-smtp's ErrDataTooLarge (fallback path): 552 5.3.4.
			s.log.Info("message rejected", zap.String("client_ip", ss.ipStr), zap.String("user", env.User),
				zap.String("from", env.From), zap.String("reason", serr.Message))
			return serr
		case errors.Is(rerr, smtp.ErrTooLongLine):
			s.log.Info("message rejected", zap.String("client_ip", ss.ipStr), zap.String("reason", "line too long"))
			return errLineTooLong
		case errors.Is(rerr, smtp.ErrDataReset):
			return rerr
		default:
			// A timeout or a broken connection in the middle of the
			// message: what the client sends next is the rest of its
			// body, not commands; close after the reply.
			s.log.Info("message aborted", zap.String("client_ip", ss.ipStr), zap.Error(rerr))
			if dot && ss.lconn != nil {
				ss.lconn.closeAfterWrite.Store(true)
			}
			return errReadData
		}
	}
	reply, werr := b.finish()
	if werr != nil {
		s.log.Error("queue write failed", zap.String("client_ip", ss.ipStr), zap.Error(werr))
		return errQueueWrite
	}
	if reply != nil {
		reason := "bare CR"
		if reply == smtp.ErrDataTooLarge {
			reason = "too large"
		}
		s.log.Info("message rejected", zap.String("client_ip", ss.ipStr), zap.String("user", env.User),
			zap.String("from", env.From), zap.String("reason", reason))
		return reply
	}
	size := w.Size()
	id, err := w.Commit(env)
	if errors.Is(err, queue.ErrFull) {
		s.log.Warn("message rejected", zap.String("client_ip", ss.ipStr), zap.String("from", env.From), zap.String("reason", err.Error()))
		return errQueueFull
	}
	if err != nil {
		s.log.Error("queue commit failed", zap.String("client_ip", ss.ipStr), zap.String("from", env.From), zap.Error(err))
		return errQueueWrite
	}
	s.log.Info("accepted",
		zap.String("queue_id", id),
		zap.String("from", env.From),
		zap.Int("rcpt", len(env.Rcpts)),
		zap.Int64("size", size),
		zap.String("user", env.User),
		zap.String("client_ip", ss.ipStr),
		zap.String("tls", ss.tlsVer),
	)
	if s.accepted != nil {
		s.accepted.Inc()
	}
	return &smtp.SMTPError{Code: 250, EnhancedCode: smtp.EnhancedCode{2, 0, 0}, Message: "OK queued as " + id}
}

// drain reads the rest of the message and throws it away, so that the
// reply comes after it (DATA: up to the real end of data).
func (ss *session) drain(r io.Reader) {
	b := newBodyWriter(io.Discard, true, 0)
	if br, finish, ok := dotSource(r); ok {
		if readDot(br, b) == nil {
			finish()
		}
		return
	}
	_, _ = io.Copy(io.Discard, r)
}
