package delivery

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	"github.com/stsrelay/stsrelay/delivery/policy"
	"github.com/stsrelay/stsrelay/internal/dane"
	"github.com/stsrelay/stsrelay/internal/smtpclient"
)

// session is one SMTP connection to one MX address, after greeting,
// EHLO and (when done) STARTTLS. It can carry several messages.
type session struct {
	host string // MX name (SNI, certificate name, policy match)
	ip   string
	helo string // the server's greeting name, for TLS-RPT
	c    *smtpclient.Client

	tls      bool
	version  uint16
	resumed  bool
	leaf     *x509.Certificate
	messages int
	lastUsed time.Time
	// state is what the set-up learnt about TLS, for policy.CheckConn.
	state policy.ConnState
	// dane is what TLSA discovery had found for the host when the
	// session was set up (RFC 7672 §2.2), for policy.CheckConn: reuse
	// judges the session under it.
	dane policy.DANE
	// policyID is the MTA-STS policy id in force when the session was
	// set up; reuse re-checks the policy.
	policyID string
	// route is the next_hop of the [[route]] the session was set up
	// for ("" for an MX): reuse needs the same route.
	route string
}

// sessionError is a failure to set a session up or to use it.
type sessionError struct {
	// Stage: "connect", "greeting", "ehlo", "starttls", "tls", "policy",
	// "mail", "rcpt", "data", "bdat".
	Stage     string
	Code      int
	Enhanced  string
	Msg       string
	Permanent bool
	// TLS is set when STARTTLS or the TLS handshake failed: what the
	// set-up learnt, for policy.CheckConn.
	TLS *policy.ConnState
}

func (e *sessionError) Error() string {
	if e.Code != 0 {
		return fmt.Sprintf("%s: %d %s %s", e.Stage, e.Code, e.Enhanced, e.Msg)
	}
	return fmt.Sprintf("%s: %s", e.Stage, e.Msg)
}

// clientErr turns an smtpclient error into a sessionError.
func clientErr(stage string, err error) *sessionError {
	var re *smtpclient.ReplyError
	if errors.As(err, &re) {
		if stage == "" {
			stage = re.Stage
		}
		return &sessionError{Stage: stage, Code: re.Code, Enhanced: re.Enhanced, Msg: re.Text, Permanent: re.Permanent()}
	}
	var ce *smtpclient.Error
	if stage == "" {
		stage = "connect"
		if errors.As(err, &ce) {
			stage = ce.Stage
		}
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
	DataTimeout    time.Duration
	Roots          *x509.CertPool
	Now            func() time.Time
	// TLSSessions caches TLS sessions per MX name for resumption (TLS
	// 1.3 tickets, 1.2 session IDs); nil: no resumption.
	TLSSessions tls.ClientSessionCache
	// Plaintext skips STARTTLS even if offered (the fallback after a
	// failed handshake when no policy demands TLS).
	Plaintext bool
	// DANE, when its Status is DANEUsable, authenticates the server by
	// its TLSA records instead of the Web PKI (RFC 7672 §3).
	DANE policy.DANE
	// Track, when set, wraps the new connection (the engine keeps it, to
	// close it at the shutdown deadline).
	Track func(net.Conn) net.Conn
}

// dial connects to ip, reads the greeting, says EHLO, and does STARTTLS
// when the server offers it (RFC 3207), checking the certificate against
// host (RFC 8461 §4.2), then says EHLO again (RFC 3207 §4.2). A refused
// STARTTLS or a failed handshake is returned as a sessionError with its
// TLS state; the caller decides (policy.CheckConn) whether to retry in
// plaintext.
//
// With usable DANE records (o.DANE), the handshake itself checks the
// chain against them (dane.Config, RFC 7672 §3) and fails when none
// matches; the Web PKI check still runs, for the log's tls_verified.
//
// A resumed TLS session is checked exactly as a full one: Go keeps the
// server's chain with the session, verifyCert runs on it, and a server
// that changed its certificate (and so its ticket keys) gets a full
// handshake.
func dial(ctx context.Context, host, ip string, o dialOptions) (*session, error) {
	d := net.Dialer{Timeout: o.ConnectTimeout}
	if o.LocalAddr != nil {
		d.LocalAddr = &net.TCPAddr{IP: o.LocalAddr}
	}
	conn, err := d.DialContext(ctx, "tcp", net.JoinHostPort(ip, strconv.Itoa(o.Port)))
	if err != nil {
		return nil, &sessionError{Stage: "connect", Msg: err.Error()}
	}
	if o.Track != nil {
		conn = o.Track(conn)
	}
	// The dial's context ends a set-up in progress (shutdown): closing
	// the connection wakes every wait on it.
	stop := context.AfterFunc(ctx, func() { conn.Close() })
	defer stop()
	c, err := smtpclient.New(conn, smtpclient.Options{
		LocalName:      o.Hostname,
		CommandTimeout: o.CommandTimeout,
		DataTimeout:    o.DataTimeout,
		// RFC 5321 §4.5.3.2.6: at least 10 minutes for the reply to
		// the final dot.
		FinalTimeout:     max(10*time.Minute, o.CommandTimeout),
		HandshakeTimeout: o.CommandTimeout,
	})
	if err != nil {
		return nil, clientErr("greeting", err)
	}
	s := &session{host: host, ip: ip, c: c}
	ok := false
	defer func() {
		if !ok {
			c.Close()
		}
	}()
	if g := c.Greeting(); len(g.Lines) > 0 {
		s.helo = firstWord(g.Lines[0])
	}
	if err := c.Hello(); err != nil {
		return nil, clientErr("ehlo", err)
	}
	_, offered := c.Ext("STARTTLS")
	s.state.STARTTLSOffered = offered
	if offered && !o.Plaintext {
		// SNI is the MX host name (RFC 8461 §7.1 MUST). Verification is
		// ours (verifyCert) so that failures can be classified and, when
		// no policy demands it, delivery can go on over unverified TLS.
		cfg := &tls.Config{ServerName: host, InsecureSkipVerify: true, MinVersion: tls.VersionTLS12,
			ClientSessionCache: o.TLSSessions}
		byDANE := o.DANE.Status == policy.DANEUsable
		if byDANE {
			// RFC 7672 §8.1: SNI is the TLSA base domain. A resumed
			// session is checked against the records too.
			cfg = dane.Config(cfg, o.DANE.Base, o.DANE.Records, daneNames(o.DANE.Base, host), o.Now)
		}
		st, err := c.StartTLS(cfg)
		if err != nil {
			var re *smtpclient.ReplyError
			var pe *smtpclient.ProtocolError
			var ce *smtpclient.Error
			switch {
			case errors.As(err, &re) && re.Stage == smtpclient.StageStartTLS:
				e := clientErr("starttls", err)
				e.TLS = &policy.ConnState{STARTTLSOffered: true, STARTTLSReply: re.Code}
				return nil, e
			case errors.As(err, &pe):
				// RFC 3207 §4.2, STARTTLS command injection.
				return nil, &sessionError{Stage: "starttls", Msg: err.Error(),
					TLS: &policy.ConnState{STARTTLSOffered: true, HandshakeError: policy.ErrSTARTTLSInjection}}
			case errors.As(err, &ce):
				// No reply to STARTTLS, or EHLO after it failed: the
				// host is unreachable rather than bad at TLS.
				return nil, clientErr("", err)
			}
			return nil, &sessionError{Stage: "tls", Msg: "TLS handshake failed: " + err.Error(),
				TLS: &policy.ConnState{STARTTLSOffered: true, HandshakeError: err}}
		}
		s.tls = true
		s.version = st.Version
		s.resumed = st.DidResume
		s.state.TLS = true
		s.state.DANE = byDANE
		s.state.CertError = verifyCert(st, host, o.Roots, o.Now())
		if len(st.PeerCertificates) > 0 {
			s.leaf = st.PeerCertificates[0]
		}
	}
	_, s.state.REQUIRETLSOffered = c.Ext("REQUIRETLS")
	ok = true
	return s, nil
}

func firstWord(s string) string {
	if f := strings.Fields(s); len(f) > 0 {
		return f[0]
	}
	return ""
}

// sessionCloseTimeout bounds QUIT when a session ends (a var for tests).
var sessionCloseTimeout = 5 * time.Second

// close ends the session politely, bounded in time.
func (s *session) close() {
	_ = s.c.QuitWithin(sessionCloseTimeout)
}

// rcptResult is the outcome for one recipient of one transaction.
type rcptResult struct {
	Code      int
	Enhanced  string
	Msg       string
	Delivered bool
	Permanent bool
}

// send runs one transaction (RFC 5321 §3.3) with the smtpclient: MAIL, a
// RCPT per recipient and DATA (or BDAT) pipelined when the server offers
// PIPELINING (RFC 2920), in one round trip with CHUNKING (RFC 3030). A
// failure at MAIL or DATA applies to every recipient; RCPT replies are
// per recipient (RFC 5321 §4.2, §4.5.4.1: one copy with many RCPTs). err
// is set when the session is unusable afterwards.
func (s *session) send(tx smtpclient.Transaction) ([]rcptResult, *sessionError) {
	res := make([]rcptResult, len(tx.Rcpts))
	r, err := s.c.Send(tx)
	if r.RcptReplies == nil && err != nil {
		// Refused before anything was sent (a bad parameter), or the
		// session was already broken.
		e := clientErr("mail", err)
		for i := range res {
			res[i] = rcptResult{Code: e.Code, Enhanced: e.Enhanced, Msg: e.Msg, Permanent: e.Permanent}
		}
		if !s.c.Usable() {
			return res, e
		}
		return res, nil
	}
	mailOK := r.MailReply.Code/100 == 2
	for i := range res {
		rep := r.RcptOutcome(i)
		if !mailOK && r.MailReply.Code != 0 {
			rep = r.MailReply
		}
		switch {
		case rep.Code/100 == 2:
			res[i] = rcptResult{Code: rep.Code, Enhanced: rep.Enhanced, Msg: rep.Text(), Delivered: true}
		default:
			res[i] = rcptResult{Code: rep.Code, Enhanced: rep.Enhanced, Msg: rep.Text(), Permanent: rep.Code/100 == 5}
			if rep.Code == 0 && err != nil {
				res[i].Msg = err.Error()
			}
		}
	}
	if r.DataReply.Code/100 == 2 {
		s.messages++
	}
	if !r.Usable {
		e := clientErr("", err)
		if err == nil {
			e = &sessionError{Stage: "data", Msg: "session no longer usable"}
		}
		return res, e
	}
	return res, nil
}
