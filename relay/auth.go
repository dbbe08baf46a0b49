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

// checkPassword compares password with the user's bcrypt hash. An unknown
// user is compared against a dummy hash of the same cost, so the reply
// takes as long as for a known user with a wrong password. No lock is held
// during the (deliberately slow) comparison.
func (s *Server) checkPassword(username, password string) bool {
	hash, known := s.users[username]
	if !known {
		hash = s.dummyHash
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
}

type authFailures struct {
	n    int
	last time.Time
}

func newAuthThrottle() *authThrottle {
	return &authThrottle{
		free:       2,
		step:       time.Second,
		max:        10 * time.Second,
		quiet:      15 * time.Minute,
		maxEntries: 10000,
		clients:    map[netip.Addr]*authFailures{},
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
