package testworld

import (
	"crypto/rand"
	"fmt"
	"io"
	"log"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	domainpkg "github.com/stsrelay/stsrelay/internal/domain"
)

// MXOptions configures an MX server. The zero value is a plain SMTP server
// without STARTTLS that accepts everything.
type MXOptions struct {
	// IP to listen on; "" takes World.NextIP. The port is World.MXPort.
	IP string
	// Hostname is the name in the greeting. Default "mx.testworld.invalid".
	Hostname string
	// Cert is the certificate offered after STARTTLS. Nil means STARTTLS is
	// not advertised (unless STARTTLSReply or HandshakeFail is set).
	Cert *Cert
	// STARTTLSReply, when not 0, advertises STARTTLS but answers the
	// command with this code (454, say) and stays in plaintext.
	STARTTLSReply int
	// HandshakeFail advertises STARTTLS, answers 220, then aborts the TLS
	// handshake with an alert (after reading the ClientHello, so the SNI is
	// still recorded).
	HandshakeFail bool
	// MinTLS and MaxTLS bound the TLS versions offered (tls.VersionTLS12,
	// tls.VersionTLS13); 0 leaves Go's default.
	MinTLS, MaxTLS uint16
	// RequireTLS answers 530 5.7.0 to MAIL before STARTTLS, like a server
	// that insists on encryption.
	RequireTLS bool
	// AdvertiseREQUIRETLS advertises the RFC 8689 REQUIRETLS extension in
	// the EHLO reply after STARTTLS and accepts the MAIL parameter.
	AdvertiseREQUIRETLS bool
	// DSN advertises RFC 3461 DSN and accepts its parameters.
	DSN bool
	// NoSMTPUTF8 and No8BITMIME leave those extensions out of the EHLO
	// reply (both are advertised by default). A MAIL with SMTPUTF8 is then
	// refused; BODY=8BITMIME is still accepted, as many servers do, so tests
	// look at what the client sent.
	NoSMTPUTF8, No8BITMIME bool
	// MaxSize, when not 0, is advertised as SIZE and enforced with 552.
	MaxSize int64
	// GreetingDelay holds the 220 greeting back.
	GreetingDelay time.Duration
	// AuthUsers, when set, advertises AUTH PLAIN after STARTTLS (never
	// before) and accepts these username/password pairs (a wrong one
	// gets 535 5.7.8); MAIL without a successful AUTH gets 530 5.7.0.
	AuthUsers map[string]string
	// Script decides the reply to each command: it is called with Verb
	// "CONNECT" before the greeting (a reply replaces the greeting), and with
	// "MAIL", "RCPT" and "DATA" (after the final dot, with the message in
	// Data). It returns nil for the default behaviour. It runs on the
	// connection's goroutine; several connections may call it at once.
	Script func(cmd Command) *Reply
}

// Command is what the client asked, as shown to MXOptions.Script and kept
// in MXServer.Commands.
type Command struct {
	Verb string // "CONNECT", "MAIL", "RCPT" or "DATA"
	Arg  string // the address for MAIL and RCPT ("" for the null reverse path)
	Data []byte // the message, for DATA
	Conn ConnInfo
	// Code is the reply code that was sent; it is set only in
	// MXServer.Commands.
	Code int
}

// ConnInfo describes the connection a command arrived on.
type ConnInfo struct {
	ID         int    // 1 for the server's first connection, and so on
	RemoteAddr string // client "ip:port"
	Helo       string // the EHLO/HELO argument in force
	TLS        bool   // STARTTLS completed
	TLSVersion uint16
	DidResume  bool   // the TLS handshake resumed an earlier session
	SNI        string // server name the client sent in its ClientHello
}

// Reply is a scripted answer. A zero Code keeps the default (250, or the
// greeting for CONNECT). For 2xx codes go-smtp writes its own text, so Text
// and Enhanced matter only for other codes.
type Reply struct {
	Code     int
	Enhanced string // like "4.2.0"; "" derives X.0.0 from Code
	Text     string
	Delay    time.Duration // wait this long before replying
	Close    bool          // close the connection right after the reply
}

// Received is one message the MX accepted.
type Received struct {
	From        string
	Rcpts       []string // accepted recipients only
	Data        []byte   // the exact bytes after dot-unstuffing, CRLF line ends kept
	TLS         bool
	TLSVersion  uint16
	DidResume   bool
	SNI         string
	Helo        string
	Time        time.Time
	ConnID      int
	MailOptions smtp.MailOptions
	RcptOptions []smtp.RcptOptions
	// AuthUser is the user the session authenticated as (AuthUsers).
	AuthUser string
}

// MXServer is a go-smtp server on ip:World.MXPort() playing one MX host. It
// records connections, TLS server names, commands and accepted messages.
//
// It also serves as the mailbox of a sender's domain: to collect the DSNs
// the relay sends back, point that domain's MX at an MXServer and read
// Messages (or WaitMessages).
//
// go-smtp's server has no hooks to refuse STARTTLS with a chosen code, break
// the handshake, or edit the EHLO reply after TLS, so the MX runs STARTTLS in
// a connection layer below go-smtp (mxConn) and go-smtp itself sees a plain
// stream. That layer keeps RFC 3207 §4.2: plaintext sent before the handshake
// is discarded, and after TLS the client must send EHLO again, which makes
// go-smtp drop any earlier state.
type MXServer struct {
	w      *World
	opts   MXOptions
	ip     string
	addr   string
	srv    *smtp.Server
	done   chan struct{}
	served chan struct{}
	once   sync.Once

	mu       sync.Mutex
	conns    int
	snis     []string
	msgs     []Received
	commands []Command
	// cert and ticketKey are the STARTTLS certificate and session ticket
	// key in force: one key for the server's life (so clients can resume
	// TLS sessions, RFC 8446 §2.2) until SetCert changes both.
	cert      *Cert
	ticketKey [32]byte
	resumed   int
}

// SetCert makes c the certificate of later STARTTLS handshakes and
// changes the session ticket key, as a server restarted with a new
// certificate does: no session from before resumes.
func (mx *MXServer) SetCert(c *Cert) {
	mx.mu.Lock()
	defer mx.mu.Unlock()
	mx.cert = c
	_, _ = rand.Read(mx.ticketKey[:])
}

// Resumed returns how many STARTTLS handshakes resumed an earlier TLS
// session.
func (mx *MXServer) Resumed() int {
	mx.mu.Lock()
	defer mx.mu.Unlock()
	return mx.resumed
}

// NewMX starts an MX server as opts says; it stops when the test ends.
func (w *World) NewMX(opts MXOptions) *MXServer {
	if w.t != nil {
		w.t.Helper()
	}
	mx, err := w.StartMX(opts)
	if err != nil {
		w.fatalf("%v", err)
	}
	return mx
}

// StartMX is NewMX returning its error.
func (w *World) StartMX(opts MXOptions) (*MXServer, error) {
	if opts.Hostname == "" {
		opts.Hostname = "mx.testworld.invalid"
	}
	ip, auto := opts.IP, opts.IP == ""
	if auto {
		var err error
		if ip, err = w.nextIP(); err != nil {
			return nil, err
		}
	}
	port, err := w.port(&w.mxPort)
	if err != nil {
		return nil, err
	}
	l, ip, err := w.listenShared(ip, auto, port)
	if err != nil {
		return nil, err
	}
	mx := &MXServer{
		w:      w,
		opts:   opts,
		ip:     ip,
		addr:   l.Addr().String(),
		done:   make(chan struct{}),
		served: make(chan struct{}),
		cert:   opts.Cert,
	}
	_, _ = rand.Read(mx.ticketKey[:])
	srv := smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		mc, _ := c.Conn().(*mxConn)
		return &mxSession{mx: mx, c: c, conn: mc}, nil
	}))
	srv.Domain = opts.Hostname
	srv.EnableSMTPUTF8 = !opts.NoSMTPUTF8
	srv.EnableREQUIRETLS = opts.AdvertiseREQUIRETLS
	srv.EnableDSN = opts.DSN
	srv.MaxMessageBytes = opts.MaxSize
	srv.ErrorLog = log.New(io.Discard, "", 0)
	// TLS runs below go-smtp (mxConn), so go-smtp cannot see it: the
	// session offers AUTH only once STARTTLS is done (AuthMechanisms).
	srv.AllowInsecureAuth = opts.AuthUsers != nil
	mx.srv = srv
	go func() {
		defer close(mx.served)
		srv.Serve(&mxListener{Listener: l, mx: mx})
	}()
	w.onClose(mx.Close)
	return mx, nil
}

// Mailbox starts an MX for domain that accepts everything (STARTTLS with a
// valid certificate for mx.<domain>) and publishes "MX 10 mx.<domain>" and
// its A record: the place where DSNs and mailto TLS reports addressed to
// domain arrive. Read them with Messages or WaitMessages.
func (w *World) Mailbox(domain string) *MXServer {
	if w.t != nil {
		w.t.Helper()
	}
	host := "mx." + domainpkg.Key(domain)
	mx := w.NewMX(MXOptions{Hostname: host, Cert: w.CA.Issue(CertValid, host)})
	w.DNS.SetMX(domain, MX{Pref: 10, Host: host})
	w.DNS.SetA(host, mx.IP())
	return mx
}

// Addr is the server's "ip:port".
func (mx *MXServer) Addr() string { return mx.addr }

// IP is the server's address.
func (mx *MXServer) IP() string { return mx.ip }

// Close stops the server and drops its connections. It is called
// automatically when the test ends; calling it earlier simulates a host that
// went away.
func (mx *MXServer) Close() {
	mx.once.Do(func() {
		close(mx.done) // cut scripted delays short
		mx.srv.Close()
		select {
		case <-mx.served:
		case <-time.After(shutdownTimeout):
		}
	})
}

// Messages returns the messages accepted so far, oldest first.
func (mx *MXServer) Messages() []Received {
	mx.mu.Lock()
	defer mx.mu.Unlock()
	return append([]Received(nil), mx.msgs...)
}

// WaitMessages waits until at least n messages have been accepted and
// returns them; it fails the test if that takes longer than timeout.
func (mx *MXServer) WaitMessages(t testing.TB, n int, timeout time.Duration) []Received {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		msgs := mx.Messages()
		if len(msgs) >= n {
			return msgs
		}
		if time.Now().After(deadline) {
			t.Fatalf("testworld: MX %s: %d messages after %v, want %d", mx.addr, len(msgs), timeout, n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Connections is the number of TCP connections accepted so far.
func (mx *MXServer) Connections() int {
	mx.mu.Lock()
	defer mx.mu.Unlock()
	return mx.conns
}

// SNIs lists the server name of every TLS handshake attempt, in order ("" when
// the client sent none).
func (mx *MXServer) SNIs() []string {
	mx.mu.Lock()
	defer mx.mu.Unlock()
	return append([]string(nil), mx.snis...)
}

// Commands is the log of connections (Verb "CONNECT") and MAIL, RCPT and
// DATA commands, with the reply code each got.
func (mx *MXServer) Commands() []Command {
	mx.mu.Lock()
	defer mx.mu.Unlock()
	return append([]Command(nil), mx.commands...)
}

// run asks the script about cmd, logs it and turns the answer into what a
// go-smtp session method returns. closeAfter is set when the connection is
// to be closed after the reply.
func (mx *MXServer) run(cmd Command, defaultCode int) (closeAfter bool, err error) {
	var r *Reply
	if mx.opts.Script != nil {
		r = mx.opts.Script(cmd)
	}
	code := defaultCode
	if r != nil {
		sleepOrDone(r.Delay, mx.done)
		if r.Code != 0 {
			code = r.Code
		}
		closeAfter = r.Close
	}
	cmd.Code = code
	mx.mu.Lock()
	mx.commands = append(mx.commands, cmd)
	mx.mu.Unlock()
	if code/100 == 2 || code/100 == 3 {
		return closeAfter, nil
	}
	return closeAfter, r.smtpError()
}

func (r *Reply) smtpError() *smtp.SMTPError {
	e := &smtp.SMTPError{Code: r.Code, EnhancedCode: smtp.EnhancedCodeNotSet, Message: r.Text}
	if r.Enhanced != "" {
		var a, b, c int
		if _, err := fmt.Sscanf(r.Enhanced, "%d.%d.%d", &a, &b, &c); err == nil {
			e.EnhancedCode = smtp.EnhancedCode{a, b, c}
		}
	}
	if e.Message == "" {
		e.Message = "scripted reply"
	}
	return e
}

// line formats r as one reply line.
func (r *Reply) line(defaultText string) string {
	enh := r.Enhanced
	if enh == "" && r.Code >= 200 && r.Code < 600 && r.Code/100 != 3 {
		enh = fmt.Sprintf("%d.0.0", r.Code/100)
	}
	text := r.Text
	if text == "" {
		text = defaultText
	}
	if enh != "" {
		return fmt.Sprintf("%d %s %s\r\n", r.Code, enh, text)
	}
	return fmt.Sprintf("%d %s\r\n", r.Code, text)
}

func (mx *MXServer) offersTLS() bool {
	return mx.opts.Cert != nil || mx.opts.STARTTLSReply != 0 || mx.opts.HandshakeFail
}

// mxSession is the go-smtp session of one connection.
type mxSession struct {
	mx   *MXServer
	c    *smtp.Conn
	conn *mxConn

	from     string
	mailOpts smtp.MailOptions
	rcpts    []string
	rcptOpts []smtp.RcptOptions
	authUser string
}

// AuthMechanisms offers PLAIN after STARTTLS when MXOptions.AuthUsers is
// set.
func (s *mxSession) AuthMechanisms() []string {
	if s.mx.opts.AuthUsers == nil || s.conn.tlsState == nil {
		return nil
	}
	return []string{sasl.Plain}
}

// Auth checks PLAIN credentials against MXOptions.AuthUsers.
func (s *mxSession) Auth(mech string) (sasl.Server, error) {
	if s.mx.opts.AuthUsers == nil || s.conn.tlsState == nil || mech != sasl.Plain {
		return nil, smtp.ErrAuthUnknownMechanism
	}
	return sasl.NewPlainServer(func(identity, username, password string) error {
		if want, ok := s.mx.opts.AuthUsers[username]; !ok || want != password || (identity != "" && identity != username) {
			return &smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 8}, Message: "Authentication credentials invalid"}
		}
		s.authUser = username
		return nil
	}), nil
}

func (s *mxSession) info() ConnInfo {
	ci := s.conn.info()
	ci.Helo = s.c.Hostname()
	return ci
}

func (s *mxSession) Mail(from string, opts *smtp.MailOptions) error {
	if s.mx.opts.RequireTLS && s.conn.tlsState == nil {
		return &smtp.SMTPError{Code: 530, EnhancedCode: smtp.EnhancedCode{5, 7, 0}, Message: "Must issue a STARTTLS command first"}
	}
	if s.mx.opts.AuthUsers != nil && s.authUser == "" {
		return &smtp.SMTPError{Code: 530, EnhancedCode: smtp.EnhancedCode{5, 7, 0}, Message: "Authentication required"}
	}
	closeAfter, err := s.mx.run(Command{Verb: "MAIL", Arg: from, Conn: s.info()}, 250)
	s.conn.closeAfterReply = closeAfter
	if err != nil {
		return err
	}
	s.from, s.mailOpts = from, *opts
	return nil
}

func (s *mxSession) Rcpt(to string, opts *smtp.RcptOptions) error {
	closeAfter, err := s.mx.run(Command{Verb: "RCPT", Arg: to, Conn: s.info()}, 250)
	s.conn.closeAfterReply = closeAfter
	if err != nil {
		return err
	}
	s.rcpts = append(s.rcpts, to)
	s.rcptOpts = append(s.rcptOpts, *opts)
	return nil
}

func (s *mxSession) Data(r io.Reader) error {
	data, err := io.ReadAll(r)
	if err != nil {
		return err // go-smtp's ErrDataTooLarge becomes 552
	}
	ci := s.info()
	closeAfter, err := s.mx.run(Command{Verb: "DATA", Data: data, Conn: ci}, 250)
	s.conn.closeAfterReply = closeAfter
	if err != nil {
		return err
	}
	s.mx.mu.Lock()
	s.mx.msgs = append(s.mx.msgs, Received{
		From:        s.from,
		Rcpts:       append([]string(nil), s.rcpts...),
		Data:        data,
		TLS:         ci.TLS,
		TLSVersion:  ci.TLSVersion,
		DidResume:   ci.DidResume,
		SNI:         ci.SNI,
		Helo:        ci.Helo,
		Time:        time.Now(),
		ConnID:      ci.ID,
		MailOptions: s.mailOpts,
		RcptOptions: append([]smtp.RcptOptions(nil), s.rcptOpts...),
		AuthUser:    s.authUser,
	})
	s.mx.mu.Unlock()
	return nil
}

func (s *mxSession) Reset() {
	s.from, s.mailOpts, s.rcpts, s.rcptOpts = "", smtp.MailOptions{}, nil, nil
}

func (s *mxSession) Logout() error { return nil }

// mxListener hands go-smtp connections wrapped in mxConn.
type mxListener struct {
	net.Listener
	mx *MXServer
}

func (l *mxListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.mx.mu.Lock()
	l.mx.conns++
	id := l.mx.conns
	l.mx.mu.Unlock()
	return &mxConn{Conn: c, raw: c, cur: c, mx: l.mx, id: id}, nil
}

// parseBDATSize returns the chunk size of a BDAT command argument.
func parseBDATSize(arg string) (int64, bool) {
	f := strings.Fields(arg)
	if len(f) == 0 {
		return 0, false
	}
	n, err := strconv.ParseInt(f[0], 10, 64)
	return n, err == nil && n >= 0
}
