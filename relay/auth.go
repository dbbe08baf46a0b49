package relay

import (
	"errors"
	"net/netip"
	"sync"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"golang.org/x/crypto/bcrypt"
)

const (
	// maxAuthFailures is how many failed AUTH a connection may have;
	// the next AUTH gets 421 4.7.0 and the connection is closed.
	maxAuthFailures = 3
	// maxPasswordBytes is what bcrypt compares; longer passwords are
	// refused without comparing.
	maxPasswordBytes = 72
	// maxAuthWait bounds the wait the throttle imposes on one attempt;
	// beyond it the attempt is refused (454 4.7.0) after authTarpit, so
	// that a refused guesser does not come back at once with a new TLS
	// handshake.
	maxAuthWait = 30 * time.Second
	authTarpit  = 2 * time.Second
	// perClientChecks bounds the password checks one client (address,
	// IPv6 /64) has running at once; more wait their turn. A guesser's
	// parallel connections then fail a few at a time, each failure
	// lengthening the next wait, while an application that logs in on
	// many connections at once only queues for a moment.
	perClientChecks = 2
)

// checkPassword compares password with the user's bcrypt hash. An unknown
// user is compared against a dummy hash of the same cost, so the reply
// takes as long as for a known user with a wrong password. No lock is held
// during the (deliberately slow) comparison.
func (s *Server) checkPassword(username, password string) bool {
	a := s.acc.Load()
	hash, known := a.users[username]
	if !known {
		hash = a.dummyHash
	}
	if hash == nil {
		return false
	}
	err := bcrypt.CompareHashAndPassword(hash, []byte(password))
	return known && err == nil
}

// loginServer is the server side of the LOGIN mechanism
// (draft-murchison-sasl-login): "Username:" and "Password:" challenges,
// with the username optionally sent as the initial response. go-sasl no
// longer ships one; LOGIN is obsolete but what many applications still
// use.
type loginServer struct {
	state    int
	username string
	auth     func(username, password string) error
}

func (l *loginServer) Next(response []byte) (challenge []byte, done bool, err error) {
	switch l.state {
	case 0:
		if response == nil {
			l.state = 1
			return []byte("Username:"), false, nil
		}
		l.username = string(response)
		l.state = 2
		return []byte("Password:"), false, nil
	case 1:
		l.username = string(response)
		l.state = 2
		return []byte("Password:"), false, nil
	case 2:
		l.state = 3
		return nil, true, l.auth(l.username, string(response))
	}
	return nil, true, sasl.ErrUnexpectedClientResponse
}

// saslErrors turns errors that are not SMTP replies (a malformed PLAIN
// response) into 501 5.5.2 instead of go-smtp's 454 "try again".
type saslErrors struct{ sasl.Server }

func (s saslErrors) Next(response []byte) ([]byte, bool, error) {
	ch, done, err := s.Server.Next(response)
	if err != nil {
		var serr *smtp.SMTPError
		if !errors.As(err, &serr) {
			err = errAuthMalformed
		}
	}
	return ch, done, err
}

// authThrottle slows down password guessing: after free failures from a
// client, each further failure is answered only after step, 2·step, 4·step
// … up to max. A client's count is forgotten after quiet without failures.
// IPv6 clients are counted per /64, since one host usually owns a whole
// /64. The table holds at most maxEntries clients.
type authThrottle struct {
	free       int
	step, max  time.Duration
	quiet      time.Duration
	maxEntries int

	mu      sync.Mutex
	clients map[netip.Addr]*authFailures
	gates   map[netip.Addr]*authGate
}

// authGate holds a client's password-check slots.
type authGate struct {
	slots chan struct{}
	refs  int
}

// acquire waits for one of the client's perClientChecks slots and returns
// the function that gives it back; ok is false when stop closed first.
func (t *authThrottle) acquire(ip netip.Addr, stop1, stop2 <-chan struct{}) (release func(), ok bool) {
	key := throttleKey(ip)
	t.mu.Lock()
	g := t.gates[key]
	if g == nil {
		g = &authGate{slots: make(chan struct{}, perClientChecks)}
		t.gates[key] = g
	}
	g.refs++
	t.mu.Unlock()
	unref := func() {
		t.mu.Lock()
		if g.refs--; g.refs == 0 {
			delete(t.gates, key)
		}
		t.mu.Unlock()
	}
	select {
	case g.slots <- struct{}{}:
		return func() { <-g.slots; unref() }, true
	case <-stop1:
	case <-stop2:
	}
	unref()
	return nil, false
}

type authFailures struct {
	n       int
	last    time.Time
	next    time.Time // end of the last booked wait (admit)
	pending int       // admitted attempts not yet done
}

func newAuthThrottle() *authThrottle {
	return &authThrottle{
		free:       2,
		step:       time.Second,
		max:        10 * time.Second,
		quiet:      15 * time.Minute,
		maxEntries: 10000,
		clients:    map[netip.Addr]*authFailures{},
		gates:      map[netip.Addr]*authGate{},
	}
}

func throttleKey(ip netip.Addr) netip.Addr {
	if ip.Is6() {
		p, err := ip.Prefix(64)
		if err == nil {
			return p.Addr()
		}
	}
	return ip
}

// fail records a failed attempt from ip and returns the client's failure
// count and how long to wait before answering.
func (t *authThrottle) fail(ip netip.Addr, now time.Time) (int, time.Duration) {
	key := throttleKey(ip)
	t.mu.Lock()
	defer t.mu.Unlock()
	f := t.clients[key]
	if f != nil && now.Sub(f.last) > t.quiet {
		f.n = 0
	}
	if f == nil {
		if len(t.clients) >= t.maxEntries {
			t.evict(now)
		}
		f = &authFailures{}
		t.clients[key] = f
	}
	f.n++
	f.last = now
	return f.n, t.delay(f.n)
}

// admit is asked before a password is checked (holding one of the
// client's acquire slots), and returns how long the attempt must wait
// first: the delay a failure would earn (delay(n+1) after n failures),
// counted from the end of the client's previous wait. The slot is booked,
// so attempts made in parallel over several connections queue up behind
// each other rather than all running after the same wait. A wait over
// maxAuthWait is returned without booking: the attempt is refused.
func (t *authThrottle) admit(ip netip.Addr, now time.Time) time.Duration {
	key := throttleKey(ip)
	t.mu.Lock()
	defer t.mu.Unlock()
	f := t.clients[key]
	if f != nil && f.pending == 0 && now.Sub(f.last) > t.quiet {
		f.n = 0
	}
	if f == nil {
		if len(t.clients) >= t.maxEntries {
			t.evict(now)
		}
		f = &authFailures{last: now}
		t.clients[key] = f
	}
	// Parallel attempts are bounded by acquire, and each of their
	// failures counts before the next is admitted.
	d := t.delay(f.n + 1)
	slot := f.next
	if slot.Before(now) {
		slot = now
	}
	slot = slot.Add(d)
	wait := slot.Sub(now)
	if wait > maxAuthWait {
		return wait
	}
	f.next = slot
	f.pending++
	return wait
}

// done ends an attempt admit let through (before fail, when it failed).
func (t *authThrottle) done(ip netip.Addr) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if f := t.clients[throttleKey(ip)]; f != nil && f.pending > 0 {
		f.pending--
	}
}

func (t *authThrottle) delay(n int) time.Duration {
	k := n - t.free - 1
	if k < 0 {
		return 0
	}
	d := t.step
	for i := 0; i < k && d < t.max; i++ {
		d *= 2
	}
	return min(d, t.max)
}

// evict makes room: first the clients that have been quiet long enough,
// then, if that freed nothing, the one whose last failure is oldest.
// t.mu must be held.
func (t *authThrottle) evict(now time.Time) {
	var oldest netip.Addr
	var oldestT time.Time
	for k, f := range t.clients {
		if now.Sub(f.last) > t.quiet {
			delete(t.clients, k)
			continue
		}
		if oldestT.IsZero() || f.last.Before(oldestT) {
			oldest, oldestT = k, f.last
		}
	}
	if len(t.clients) >= t.maxEntries {
		delete(t.clients, oldest)
	}
}
