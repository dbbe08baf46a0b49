package relay

import (
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// Reasons a connection is refused at accept, the label values of
// stsrelay_submission_connections_rejected_total{reason}.
const (
	RejectMaxConnections      = "max_connections"
	RejectMaxConnectionsPerIP = "max_connections_per_ip"
	RejectAcceptError         = "accept_error"
)

// RejectReasons lists every reason, so that a metric can start each
// series at zero.
var RejectReasons = []string{RejectMaxConnections, RejectMaxConnectionsPerIP, RejectAcceptError}

const (
	// capGrace is how long a connection over a cap waits for a slot
	// before it is refused: a client that got 221 and reconnects at
	// once can be faster than the server closing its previous
	// connection.
	capGrace = 250 * time.Millisecond
	// maxCapWaiters bounds the connections waiting out capGrace (and
	// those being told 421); beyond it an over-cap connection is closed
	// at once, without a reply.
	maxCapWaiters = 64
	// rejectTimeout bounds writing the 421 (and, on an implicit TLS
	// listener, the handshake before it).
	rejectTimeout = 3 * time.Second
	// sessionLifetime caps one connection, however busy: its reads fail
	// after it, which go-smtp answers with 421 4.4.2.
	sessionLifetime = 30 * time.Minute
)

// connLimiter counts open connections, in all and per client (an IPv6
// client's /64, as the AUTH throttle counts them).
type connLimiter struct {
	max, perIP int

	mu      sync.Mutex
	total   int
	byIP    map[netip.Addr]int
	changed chan struct{} // closed and replaced when a slot frees
	waiters int
}

func newConnLimiter(max, perIP int) *connLimiter {
	return &connLimiter{max: max, perIP: perIP, byIP: map[netip.Addr]int{}, changed: make(chan struct{})}
}

// acquire takes a slot for key, or says which cap is full.
func (l *connLimiter) acquire(key netip.Addr) (ok bool, reason string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	switch {
	case l.total >= l.max:
		return false, RejectMaxConnections
	case l.byIP[key] >= l.perIP:
		return false, RejectMaxConnectionsPerIP
	}
	l.total++
	l.byIP[key]++
	return true, ""
}

func (l *connLimiter) release(key netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.total--
	if n := l.byIP[key] - 1; n > 0 {
		l.byIP[key] = n
	} else {
		delete(l.byIP, key)
	}
	close(l.changed)
	l.changed = make(chan struct{})
}

// wait returns a channel closed when a slot frees.
func (l *connLimiter) wait() <-chan struct{} {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.changed
}

func (l *connLimiter) addWaiter(d int) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if d > 0 && l.waiters >= maxCapWaiters {
		return false
	}
	l.waiters += d
	return true
}

// capListener applies submission.max_connections and
// max_connections_per_ip below go-smtp's accept loop: a connection over a
// cap gets "421 4.7.0" and is closed without go-smtp ever seeing it.
// Accept errors (EMFILE and the like) are logged at warn and counted
// here, and retried with a backoff, instead of reaching go-smtp (which
// would log them at debug only).
type capListener struct {
	inner  net.Listener
	lim    *connLimiter
	tlsCfg *tls.Config // set on implicit TLS listeners: the 421 goes over TLS
	s      *Server

	conns     chan net.Conn
	done      chan struct{} // closed when the accept loop ends
	err       error         // why it ended; read after done
	closed    chan struct{} // closed by Close
	closeOnce sync.Once
}

func (s *Server) newCapListener(inner net.Listener, tlsCfg *tls.Config) *capListener {
	l := &capListener{inner: inner, lim: s.limiter, tlsCfg: tlsCfg, s: s,
		conns: make(chan net.Conn), done: make(chan struct{}), closed: make(chan struct{})}
	go l.loop()
	return l
}

func (l *capListener) Addr() net.Addr { return l.inner.Addr() }

func (l *capListener) Close() error {
	l.closeOnce.Do(func() { close(l.closed) })
	return l.inner.Close()
}

func (l *capListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	case <-l.done:
		return nil, l.err
	}
}

func (l *capListener) loop() {
	var backoff time.Duration
	for {
		c, err := l.inner.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || isTemporaryAccept(err) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				l.s.log.Warn("submission accept failed", zap.String("listen", l.inner.Addr().String()),
					zap.Error(err), zap.Duration("retry_in", backoff))
				l.s.rejected(RejectAcceptError)
				time.Sleep(backoff)
				continue
			}
			l.err = err
			close(l.done)
			return
		}
		backoff = 0
		l.admit(c)
	}
}

// isTemporaryAccept reports an accept error worth retrying: running out of
// descriptors or buffers, a connection reset before it was accepted.
func isTemporaryAccept(err error) bool {
	var te interface{ Temporary() bool }
	return errors.As(err, &te) && te.Temporary()
}

// admit hands c to go-smtp when there is room, waits capGrace for room in
// a goroutine of its own otherwise, and then refuses it.
func (l *capListener) admit(c net.Conn) {
	key := clientKey(c.RemoteAddr())
	ok, reason := l.lim.acquire(key)
	if ok {
		l.hand(l.s.newLimitConn(c, key))
		return
	}
	if !l.lim.addWaiter(1) {
		l.s.rejected(reason)
		c.Close()
		return
	}
	go func() {
		defer l.lim.addWaiter(-1)
		t := time.NewTimer(capGrace)
		defer t.Stop()
		for {
			ch := l.lim.wait()
			ok, reason = l.lim.acquire(key)
			if ok {
				l.hand(l.s.newLimitConn(c, key))
				return
			}
			select {
			case <-ch:
				continue
			case <-t.C:
			case <-l.closed:
			}
			l.refuse(c, reason)
			return
		}
	}()
}

// hand passes an admitted connection to go-smtp's accept loop.
func (l *capListener) hand(c *limitConn) {
	select {
	case l.conns <- c:
	case <-l.closed:
		c.Close()
	}
}

// refuse tells c "421 4.7.0" and closes it.
func (l *capListener) refuse(c net.Conn, reason string) {
	l.s.rejected(reason)
	l.s.log.Info("submission connection refused", zap.String("client_ip", clientKey(c.RemoteAddr()).String()), zap.String("reason", reason))
	_ = c.SetDeadline(time.Now().Add(rejectTimeout))
	var w io.Writer = c
	if l.tlsCfg != nil {
		tc := tls.Server(c, l.tlsCfg)
		if tc.Handshake() != nil {
			c.Close()
			return
		}
		w = tc
	}
	msg := "421 4.7.0 Too many connections, try again later\r\n"
	if reason == RejectMaxConnectionsPerIP {
		msg = "421 4.7.0 Too many connections from your address, try again later\r\n"
	}
	_, _ = io.WriteString(w, msg)
	// Half-close, then drain briefly: closing with unread input (a
	// client that sent EHLO at once) would reset the connection and
	// could destroy the 421 on its way.
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		_ = cw.CloseWrite()
		_ = c.SetReadDeadline(time.Now().Add(time.Second))
		_, _ = io.Copy(io.Discard, io.LimitReader(c, 4096))
	}
	c.Close()
}

// clientKey is the address a connection is counted under: the unmapped
// IP, or an IPv6 client's /64.
func clientKey(a net.Addr) netip.Addr {
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.Addr{}
	}
	return throttleKey(ap.Addr().Unmap())
}

// limitConn is one accepted connection as go-smtp (or the tls.Conn in
// between) sees it. It gives its slot back when closed, caps every read
// deadline at the session's end of life, lets DATA and BDAT renew the
// read deadline on every read that brings bytes (submission.data_timeout
// without progress, instead of go-smtp's one deadline for the whole
// message), and can close itself after the next reply it writes.
type limitConn struct {
	net.Conn
	release func()
	end     time.Time // sessionLifetime after accept

	progress        atomic.Int64 // data timeout in ns while DATA/BDAT run, else 0
	closeAfterWrite atomic.Bool
	authFailures    atomic.Int32 // across STARTTLS, which makes a new session
	closeOnce       sync.Once
}

func (s *Server) newLimitConn(c net.Conn, key netip.Addr) *limitConn {
	return &limitConn{
		Conn:    c,
		release: func() { s.limiter.release(key) },
		end:     time.Now().Add(s.lifetime),
	}
}

func (c *limitConn) clamp(t time.Time) time.Time {
	if t.IsZero() || t.After(c.end) {
		return c.end
	}
	return t
}

func (c *limitConn) Read(b []byte) (int, error) {
	if d := c.progress.Load(); d > 0 {
		_ = c.Conn.SetReadDeadline(c.clamp(time.Now().Add(time.Duration(d))))
	}
	return c.Conn.Read(b)
}

func (c *limitConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	if c.closeAfterWrite.Load() {
		c.Close()
	}
	return n, err
}

func (c *limitConn) SetReadDeadline(t time.Time) error {
	return c.Conn.SetReadDeadline(c.clamp(t))
}

func (c *limitConn) SetDeadline(t time.Time) error {
	if err := c.Conn.SetWriteDeadline(t); err != nil {
		return err
	}
	return c.Conn.SetReadDeadline(c.clamp(t))
}

func (c *limitConn) Close() error {
	err := c.Conn.Close()
	c.closeOnce.Do(c.release)
	return err
}

// CloseWrite is there for bye's half-close.
func (c *limitConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

// dataMode turns progress-following read deadlines on (d > 0) or off.
func (c *limitConn) dataMode(d time.Duration) {
	c.progress.Store(int64(d))
	if d > 0 {
		_ = c.Conn.SetReadDeadline(c.clamp(time.Now().Add(d)))
	}
}

// limitConnOf finds the limitConn below what go-smtp hands the session (a
// tls.Conn after STARTTLS or on an implicit TLS listener).
func limitConnOf(c net.Conn) *limitConn {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	lc, _ := c.(*limitConn)
	return lc
}
