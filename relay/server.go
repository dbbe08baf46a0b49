// Package relay is stsrelay's submission server: the SMTP listener
// applications hand mail to (RFC 6409). It authenticates clients (AUTH
// PLAIN and LOGIN against bcrypt hashes, only over TLS unless configured
// otherwise for loopback), enforces the submission limits, and streams each
// message into the durable queue; the 250 reply is sent only after the
// queue has fsync'd the message and its envelope.
//
// The protocol engine is github.com/emersion/go-smtp; this package supplies
// its Backend and Session and owns the listeners, so that Shutdown can let
// transactions in progress finish while refusing new ones.
package relay

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/emersion/go-smtp"
	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/queue"
)

// Counter is the part of prometheus.Counter the server uses; a
// prometheus.Counter satisfies it. (It is an interface of its own so that
// this package does not import client_golang.)
type Counter interface{ Inc() }

// Options are what New needs.
type Options struct {
	// Config supplies Hostname (EHLO name, Received header) and the
	// [submission] section.
	Config *config.Config
	// Queue is where accepted messages go.
	Queue queue.Queue
	// Logger gets one "accepted" line per message; nil means no logs.
	Logger *zap.Logger
	// Accepted, when set, is incremented per accepted message
	// (stsrelay_messages_accepted_total).
	Accepted Counter
	// ConnectionsRejected, when set, is called per connection refused
	// at accept, with one of RejectReasons
	// (stsrelay_submission_connections_rejected_total{reason}).
	ConnectionsRejected func(reason string)
}

// Timeouts for one SMTP command or reply. RFC 5321 §4.5.3.2.7 asks a server
// to wait at least 5 minutes for the next command.
const (
	readTimeout  = 5 * time.Minute
	writeTimeout = 5 * time.Minute
)

// byeGrace is how long a connection told "421 shutting down" is given to
// close by itself before the server closes it.
const byeGrace = 2 * time.Second

// Server is the submission server. Create it with New, then Start it; stop
// it with Shutdown. A Server is not restartable.
type Server struct {
	hostname string
	sub      config.Submission
	queue    queue.Queue
	log      *zap.Logger
	accepted Counter

	// tlsConfig is nil when no certificate was configured at New; its
	// GetCertificate reads acc, so a reload changes the certificate.
	tlsConfig *tls.Config
	// acc holds what Reload replaces: users, trusted networks, allowed
	// senders, the certificate.
	acc atomic.Pointer[access]

	throttle *authThrottle
	// bcryptSlots bounds the password checks running at once, so that
	// a flood of AUTH attempts cannot take every core.
	bcryptSlots chan struct{}
	limiter     *connLimiter
	onRejected  func(reason string)
	// lifetime caps one connection (sessionLifetime; tests shorten it).
	lifetime time.Duration
	// loopback decides whether a client may AUTH before TLS (when
	// require_tls_for_auth is false). Tests replace it.
	loopback func(netip.Addr) bool

	smtp *smtp.Server

	mu        sync.Mutex
	started   bool
	closing   bool
	done      chan struct{} // closed when Shutdown begins
	listeners []net.Listener
	sessions  map[*session]struct{}
	busy      int           // sessions with a transaction in progress
	changed   chan struct{} // closed and replaced when sessions or busy change
	serveWG   sync.WaitGroup
}

// New checks the configuration, loads the TLS certificate (when one is
// configured) and prepares the server. It does not listen yet.
func New(opts Options) (*Server, error) {
	if opts.Config == nil {
		return nil, errors.New("relay: no configuration")
	}
	if opts.Queue == nil {
		return nil, errors.New("relay: no queue")
	}
	cfg := opts.Config
	sub := cfg.Submission
	if cfg.Hostname == "" {
		return nil, errors.New("relay: hostname is empty")
	}
	if len(sub.Listen) == 0 && len(sub.ImplicitTLSListen) == 0 {
		return nil, errors.New("relay: no listener configured (submission.listen, submission.implicit_tls_listen)")
	}
	if sub.MaxMessageBytes <= 0 || sub.MaxRecipients <= 0 {
		return nil, errors.New("relay: submission.max_message_bytes and max_recipients must be positive")
	}
	if sub.MaxConnections <= 0 || sub.MaxConnectionsPerIP <= 0 || sub.DataTimeout.Duration <= 0 {
		return nil, errors.New("relay: submission.max_connections, max_connections_per_ip and data_timeout must be positive")
	}
	log := opts.Logger
	if log == nil {
		log = zap.NewNop()
	}
	s := &Server{
		hostname:    cfg.Hostname,
		sub:         sub,
		queue:       opts.Queue,
		log:         log,
		accepted:    opts.Accepted,
		throttle:    newAuthThrottle(),
		bcryptSlots: make(chan struct{}, max(1, runtime.GOMAXPROCS(0)/2)),
		limiter:     newConnLimiter(sub.MaxConnections, sub.MaxConnectionsPerIP),
		onRejected:  opts.ConnectionsRejected,
		lifetime:    sessionLifetime,
		loopback:    netip.Addr.IsLoopback,
		done:        make(chan struct{}),
		sessions:    map[*session]struct{}{},
		changed:     make(chan struct{}),
	}

	acc, err := newAccess(sub)
	if err != nil {
		return nil, err
	}
	s.acc.Store(acc)
	if acc.cert != nil {
		s.tlsConfig = &tls.Config{
			GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
				return s.acc.Load().cert, nil
			},
			MinVersion: tls.VersionTLS12,
		}
	}
	if len(sub.ImplicitTLSListen) > 0 && s.tlsConfig == nil {
		return nil, errors.New("relay: submission.implicit_tls_listen needs tls_cert_file and tls_key_file")
	}
	if len(acc.users) > 0 && s.tlsConfig == nil && sub.RequireTLSForAuth {
		log.Warn("submission users configured but AUTH is impossible: no TLS certificate and require_tls_for_auth is set")
	}

	srv := smtp.NewServer(backend{s})
	srv.Domain = cfg.Hostname
	srv.TLSConfig = s.tlsConfig
	srv.MaxMessageBytes = sub.MaxMessageBytes
	srv.MaxRecipients = sub.MaxRecipients
	srv.ReadTimeout = readTimeout
	srv.WriteTimeout = writeTimeout
	srv.EnableSMTPUTF8 = true
	srv.EnableREQUIRETLS = true
	srv.EnableDSN = true
	// go-smtp's own check is per server; the per-connection decision
	// (TLS, or loopback when allowed) is made in the session, which
	// offers no mechanism and refuses AUTH where it is not allowed.
	srv.AllowInsecureAuth = true
	srv.ErrorLog = errorLog{log}
	s.smtp = srv
	return s, nil
}

// Start binds every configured listener — plain with STARTTLS on
// submission.listen, implicit TLS (RFC 8314) on
// submission.implicit_tls_listen — and serves each in a goroutine. When one
// address cannot be bound, none stays bound.
func (s *Server) Start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return errors.New("relay: server is shut down")
	}
	if s.started {
		return errors.New("relay: already started")
	}
	var ls []net.Listener
	fail := func(err error) error {
		for _, l := range ls {
			l.Close()
		}
		return err
	}
	for _, addr := range s.sub.Listen {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return fail(fmt.Errorf("relay: submission.listen: %w", err))
		}
		ls = append(ls, s.newCapListener(l, nil))
	}
	for _, addr := range s.sub.ImplicitTLSListen {
		l, err := net.Listen("tcp", addr)
		if err != nil {
			return fail(fmt.Errorf("relay: submission.implicit_tls_listen: %w", err))
		}
		ls = append(ls, tls.NewListener(s.newCapListener(l, s.tlsConfig), s.tlsConfig))
	}
	s.started = true
	s.listeners = ls
	for _, l := range ls {
		s.serveWG.Add(1)
		go func() {
			defer s.serveWG.Done()
			err := s.smtp.Serve(l)
			if err != nil && !s.isClosing() {
				s.log.Error("submission listener failed", zap.String("listen", l.Addr().String()), zap.Error(err))
			}
		}()
		s.log.Info("submission listening", zap.String("listen", l.Addr().String()))
	}
	return nil
}

// Addrs returns the bound addresses: those of submission.listen first, in
// order, then those of submission.implicit_tls_listen.
func (s *Server) Addrs() []net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]net.Addr, len(s.listeners))
	for i, l := range s.listeners {
		out[i] = l.Addr()
	}
	return out
}

// Shutdown stops accepting connections at once. Connections without a
// transaction in progress are told "421 4.3.2 shutting down" and closed;
// transactions in progress (MAIL given, through DATA) may finish, after
// which their connections get the same 421. When ctx ends first, the
// remaining connections get the 421 and are closed, and ctx.Err() is
// returned. A message is in the queue exactly when its client got 250.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	if s.closing {
		s.mu.Unlock()
		return errors.New("relay: already shut down")
	}
	s.closing = true
	close(s.done)
	ls := s.listeners
	sessions := s.sessionsLocked()
	s.mu.Unlock()

	for _, l := range ls {
		l.Close()
	}
	for _, ss := range sessions {
		ss.byeIfIdle()
	}

	err := s.waitIdle(ctx)
	if err != nil {
		s.mu.Lock()
		sessions = s.sessionsLocked()
		s.mu.Unlock()
		for _, ss := range sessions {
			ss.bye(true)
		}
	}
	// Closes what is left: connections that never said EHLO, or are
	// between STARTTLS and EHLO.
	_ = s.smtp.Close()
	if err != nil {
		// Transactions cut off by the close end at their next read;
		// give them a moment so none still writes to the queue when
		// the caller closes it.
		wctx, cancel := context.WithTimeout(context.Background(), byeGrace)
		_ = s.waitIdle(wctx)
		cancel()
	}
	s.serveWG.Wait()
	return err
}

func (s *Server) isClosing() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closing
}

func (s *Server) sessionsLocked() []*session {
	out := make([]*session, 0, len(s.sessions))
	for ss := range s.sessions {
		out = append(out, ss)
	}
	return out
}

// waitIdle waits until no session is left, or ctx ends.
func (s *Server) waitIdle(ctx context.Context) error {
	for {
		s.mu.Lock()
		idle := len(s.sessions) == 0 && s.busy == 0
		ch := s.changed
		s.mu.Unlock()
		if idle {
			return nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// notifyLocked wakes waitIdle. s.mu must be held.
func (s *Server) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

func (s *Server) register(ss *session) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return false
	}
	s.sessions[ss] = struct{}{}
	return true
}

func (s *Server) unregister(ss *session) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.sessions[ss]; ok {
		delete(s.sessions, ss)
		s.notifyLocked()
	}
}

// addBusy counts transactions in progress (d is +1 or -1).
func (s *Server) addBusy(d int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.busy += d
	s.notifyLocked()
}

// rejected counts a connection refused at accept.
func (s *Server) rejected(reason string) {
	if s.onRejected != nil {
		s.onRejected(reason)
	}
}

// trusted reports whether ip is in submission.trusted_networks.
func (s *Server) trusted(ip netip.Addr) bool {
	for _, p := range s.acc.Load().trusted {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// senderAllowed applies submission.allowed_senders: an entry with '@' is
// an address (compared case-insensitively), one without (or starting with
// '@') is a domain, matched exactly (no subdomains). The null sender is
// always allowed: applications send bounces and notifications with it, and
// it cannot be used to impersonate anyone.
func (s *Server) senderAllowed(from string) bool {
	a := s.acc.Load()
	if len(a.allowedAddrs) == 0 && len(a.allowedDomains) == 0 || from == "" {
		return true
	}
	if a.allowedAddrs[strings.ToLower(from)] {
		return true
	}
	return a.allowedDomains[queue.AddrDomain(from)]
}

// backend is go-smtp's Backend: one session per connection (and a new one
// after STARTTLS).
type backend struct{ s *Server }

func (b backend) NewSession(c *smtp.Conn) (smtp.Session, error) {
	return b.s.newSession(c)
}

// errorLog routes go-smtp's internal messages (failed handshakes, broken
// connections, recovered panics) to zap.
type errorLog struct{ log *zap.Logger }

func (e errorLog) Printf(format string, v ...any) { e.write(fmt.Sprintf(format, v...)) }
func (e errorLog) Println(v ...any)               { e.write(strings.TrimSuffix(fmt.Sprintln(v...), "\n")) }

func (e errorLog) write(msg string) {
	if strings.HasPrefix(msg, "panic") {
		e.log.Error("smtp server", zap.String("error", msg))
		return
	}
	e.log.Debug("smtp server", zap.String("error", msg))
}
