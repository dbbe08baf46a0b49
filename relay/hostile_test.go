package relay

// Hostile clients at submission (issue #11): body smuggling sequences,
// connection floods, AUTH floods, slow senders, control characters.

import (
	"bufio"
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zapcore"
	"golang.org/x/crypto/bcrypt"

	"github.com/stsrelay/stsrelay/internal/config"
)

func TestBodyWriter(t *testing.T) {
	for _, tc := range []struct {
		name  string
		dot   bool
		in    string
		out   string // stored body; "" with a reply
		reply error
		rest  string // what follows the end of data (dot only)
	}{
		{"CRLF kept", true, "a\r\nb\r\n.\r\n", "a\r\nb\r\n", nil, ""},
		{"dot unstuffed", true, "..a\r\n..\r\n.\r\n", ".a\r\n.\r\n", nil, ""},
		{"empty message", true, ".\r\n", "", nil, ""},
		{"bare LF normalised", true, "a\nb\r\n.\r\n", "a\r\nb\r\n", nil, ""},
		{"only bare LF lines", true, "a\nb\n\r\n.\r\n", "a\r\nb\r\n\r\n", nil, ""},
		{"LF.CRLF is not the end", true, "a\n.\r\nb\r\n.\r\n", "a\r\n\r\nb\r\n", nil, ""},
		{"LF.LF is not the end", true, "a\n.\nb\r\n.\r\n", "a\r\n\r\nb\r\n", nil, ""},
		// Issue #11 finding 6: go-smtp never ended here.
		{"CR CRLF dot CRLF ends the data", true, "a\r\r\n.\r\nRSET\r\n", "", errBareCR, "RSET\r\n"},
		// Issue #11 finding 6: go-smtp dropped ".\r" silently.
		{"dot CR at line start", true, "a\r\n.\rX-Injected: yes\r\n.\r\nQUIT\r\n", "", errBareCR, "QUIT\r\n"},
		{"bare CR mid-line", true, "a\rb\r\n.\r\n", "", errBareCR, ""},
		{"CR at line start", true, "\rX\r\n.\r\n", "", errBareCR, ""},
		{"CR dot CR LF", true, "a\r.\r\n.\r\n", "", errBareCR, ""},
		{"end then more commands", true, "a\r\n.\r\nMAIL FROM:<x@y>\r\n", "a\r\n", nil, "MAIL FROM:<x@y>\r\n"},
		{"too large", true, strings.Repeat("x", 100) + "\r\n.\r\n", "", errors.New("552"), ""},
		{"BDAT kept", false, "a\r\n.\r\n", "a\r\n.\r\n", nil, ""},
		{"BDAT bare LF", false, "a\nb", "a\r\nb", nil, ""},
		{"BDAT bare CR", false, "a\rb\r\n", "", errBareCR, ""},
		{"BDAT trailing CR", false, "a\r", "", errBareCR, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var out bytes.Buffer
			b := newBodyWriter(&out, tc.dot, 50)
			br := bufio.NewReader(strings.NewReader(tc.in))
			var err error
			if tc.dot {
				err = readDot(br, b)
			} else {
				err = readAll(br, b)
			}
			if err != nil {
				t.Fatalf("read: %v", err)
			}
			reply, werr := b.finish()
			if werr != nil {
				t.Fatal(werr)
			}
			switch {
			case tc.reply == nil && reply != nil:
				t.Fatalf("reply %v, want none", reply)
			case tc.reply != nil && reply == nil:
				t.Fatalf("no reply, want %v (stored %q)", tc.reply, out.String())
			case tc.reply != nil && !strings.Contains(reply.Error(), strings.TrimPrefix(tc.reply.Error(), "SMTP error ")):
				t.Fatalf("reply %v, want %v", reply, tc.reply)
			}
			if tc.reply == nil && out.String() != tc.out {
				t.Errorf("stored %q, want %q", out.String(), tc.out)
			}
			rest, _ := br.Peek(br.Buffered())
			if string(rest) != tc.rest {
				t.Errorf("left %q after the data, want %q", rest, tc.rest)
			}
		})
	}
}

// The DATA reader is reached inside go-smtp (dotSource); when an upgrade
// changes go-smtp's dataReader, this fails rather than the relay silently
// falling back to go-smtp's parsing.
func TestGoSMTPDataReaderLayout(t *testing.T) {
	e := newEnv(t, envOpts{cfg: trustLoopback})
	r := dialRaw(t, e.plainAddr, nil)
	r.cmd("EHLO client.example", "250 ")
	r.cmd("MAIL FROM:<app@example.org>", "250 ")
	r.cmd("RCPT TO:<rcpt@example.com>", "250 ")
	r.cmd("DATA", "354 ")
	r.write("Subject: x\r\n\r\nhi\r\n.\r\n")
	r.expect("250 2.0.0 OK queued as ")
	if n := e.logs.FilterMessage("go-smtp DATA reader not recognised; using its end-of-data parsing").Len(); n != 0 {
		t.Fatal("dotSource did not recognise go-smtp's DATA reader")
	}
}

// Each sequence of issue #11 finding 6 over a real connection: a reply
// comes, and the commands after the data are commands.
func TestDataSmugglingSequences(t *testing.T) {
	e := newEnv(t, envOpts{cfg: trustLoopback})
	for _, tc := range []struct {
		name, body, reply string
	}{
		{"CR CRLF dot CRLF", "Subject: x\r\n\r\nhi\r\r\n.\r\n", "550 5.6.0 "},
		{"dot CR at line start", "Subject: x\r\n\r\nhi\r\n.\rMAIL FROM:<evil@example.org>\r\n.\r\n", "550 5.6.0 "},
		{"bare CR", "Subject: x\r\n\r\nhi\rthere\r\n.\r\n", "550 5.6.0 "},
		{"bare LF normalised", "Subject: x\n\nhi\n.\nthere\r\n.\r\n", "250 2.0.0 "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := dialRaw(t, e.plainAddr, nil)
			r.cmd("EHLO client.example", "250 ")
			r.cmd("MAIL FROM:<app@example.org>", "250 ")
			r.cmd("RCPT TO:<rcpt@example.com>", "250 ")
			r.cmd("DATA", "354 ")
			// The body and the commands after it in one write, as a
			// smuggler sends them.
			r.write(tc.body + "RSET\r\nNOOP\r\n")
			text := r.expect(tc.reply)[0]
			r.expect("250 ") // RSET
			r.expect("250 ") // NOOP
			r.cmd("QUIT", "221 ")
			if strings.HasPrefix(text, "250 ") {
				_, _, body := e.stored(strings.TrimPrefix(text, "250 2.0.0 OK queued as "))
				if want := "Subject: x\r\n\r\nhi\r\n\r\nthere\r\n"; string(body) != want {
					t.Errorf("stored %q, want %q", body, want)
				}
			}
		})
	}
}

func TestBDATBareCR(t *testing.T) {
	e := newEnv(t, envOpts{cfg: trustLoopback})
	r := dialRaw(t, e.plainAddr, nil)
	r.cmd("EHLO client.example", "250 ")
	r.cmd("MAIL FROM:<app@example.org>", "250 ")
	r.cmd("RCPT TO:<rcpt@example.com>", "250 ")
	body := "Subject: x\r\n\r\nhi\rthere\r\n"
	r.write(fmt.Sprintf("BDAT %d LAST\r\n%s", len(body), body))
	r.expect("550 5.6.0 ")
	r.cmd("MAIL FROM:<app@example.org>", "250 ")
	r.cmd("RCPT TO:<rcpt@example.com>", "250 ")
	body = "Subject: x\n\nhi\n"
	r.write(fmt.Sprintf("BDAT %d LAST\r\n%s", len(body), body))
	text := r.expect("250 2.0.0 OK queued as ")[0]
	_, _, got := e.stored(strings.TrimPrefix(text, "250 2.0.0 OK queued as "))
	if want := "Subject: x\r\n\r\nhi\r\n"; string(got) != want {
		t.Errorf("stored %q, want %q", got, want)
	}
}

func TestAddressControlCharacters(t *testing.T) {
	e := newEnv(t, envOpts{cfg: trustLoopback})
	r := dialRaw(t, e.plainAddr, nil)
	r.cmd("EHLO client.example", "250 ")
	r.cmd("MAIL FROM:<app@example.org>", "250 ")
	r.cmd("RCPT TO:<x@[1.2.3.4\x01\x1bP\rX-Injected:yes/../../etc]>", "501 5.1.3 ")
	r.cmd("RCPT TO:<x@[example.com]>", "501 5.1.3 ")
	r.cmd("RCPT TO:<x@[IPv6:2001:db8::1]>", "250 ")
	r.cmd("RCPT TO:<y@example.com> ORCPT=rfc822;y+0D+0AX-Injected:+20yes@example.com", "501 5.5.4 ")
	r.cmd("RSET", "250 ")
	r.cmd("MAIL FROM:<a\x1bb\x07@example.org>", "501 5.1.3 ")
	r.cmd("MAIL FROM:<app@example.org> ENVID=a+0Db", "501 5.5.4 ")
}

func TestConnectionCaps(t *testing.T) {
	var mu sync.Mutex
	rejected := map[string]int{}
	e := newEnv(t, envOpts{
		cfg: func(c *config.Config) {
			trustLoopback(c)
			c.Submission.MaxConnections = 4
			c.Submission.MaxConnectionsPerIP = 2
		},
		srv: func(s *Server) {
			s.onRejected = func(reason string) {
				mu.Lock()
				rejected[reason]++
				mu.Unlock()
			}
		},
	})
	dial := func(src string) net.Conn {
		t.Helper()
		d := &net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}}
		c, err := d.Dial("tcp", e.plainAddr)
		if err != nil {
			t.Fatal(err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		t.Cleanup(func() { c.Close() })
		return c
	}
	greeting := func(c net.Conn) string {
		t.Helper()
		l, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			t.Fatalf("no greeting: %v", err)
		}
		return l
	}
	a1, a2 := dial("127.0.0.1"), dial("127.0.0.1")
	for _, c := range []net.Conn{a1, a2} {
		if g := greeting(c); !strings.HasPrefix(g, "220 ") {
			t.Fatalf("greeting %q", g)
		}
	}
	if g := greeting(dial("127.0.0.1")); !strings.HasPrefix(g, "421 4.7.0 ") {
		t.Fatalf("third connection from one address: %q, want 421 4.7.0", g)
	}
	b1, b2 := dial("127.0.0.2"), dial("127.0.0.2")
	for _, c := range []net.Conn{b1, b2} {
		if g := greeting(c); !strings.HasPrefix(g, "220 ") {
			t.Fatalf("greeting %q", g)
		}
	}
	if g := greeting(dial("127.0.0.3")); !strings.HasPrefix(g, "421 4.7.0 ") {
		t.Fatalf("fifth connection: %q, want 421 4.7.0", g)
	}
	// A closed connection frees its slot.
	a1.Close()
	if g := greeting(dial("127.0.0.3")); !strings.HasPrefix(g, "220 ") {
		t.Fatalf("after a close: %q, want 220", g)
	}
	mu.Lock()
	defer mu.Unlock()
	if rejected[RejectMaxConnectionsPerIP] != 1 || rejected[RejectMaxConnections] != 1 {
		t.Errorf("rejections %v", rejected)
	}
}

// A temporary accept error (EMFILE) is logged at warn and counted, and
// the listener goes on.
func TestAcceptErrorLogged(t *testing.T) {
	var mu sync.Mutex
	rejected := map[string]int{}
	e := newEnv(t, envOpts{srv: func(s *Server) {
		s.onRejected = func(reason string) { mu.Lock(); rejected[reason]++; mu.Unlock() }
	}})
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	fl := &flakyListener{Listener: inner, fails: 2}
	l := e.srv.newCapListener(fl, nil)
	defer l.Close()
	go func() {
		c, err := net.Dial("tcp", inner.Addr().String())
		if err == nil {
			defer c.Close()
			time.Sleep(time.Second)
		}
	}()
	c, err := l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if n := e.logs.FilterMessage("submission accept failed").FilterLevelExact(zapcore.WarnLevel).Len(); n != 2 {
		t.Errorf("%d warn lines for accept errors, want 2", n)
	}
	mu.Lock()
	defer mu.Unlock()
	if rejected[RejectAcceptError] != 2 {
		t.Errorf("rejections %v", rejected)
	}
}

type flakyListener struct {
	net.Listener
	mu    sync.Mutex
	fails int
}

type tempErr struct{}

func (tempErr) Error() string   { return "accept4: too many open files" }
func (tempErr) Timeout() bool   { return false }
func (tempErr) Temporary() bool { return true }

func (l *flakyListener) Accept() (net.Conn, error) {
	l.mu.Lock()
	if l.fails > 0 {
		l.fails--
		l.mu.Unlock()
		return nil, tempErr{}
	}
	l.mu.Unlock()
	return l.Listener.Accept()
}

func TestAuthFailuresPerConnection(t *testing.T) {
	e := newEnv(t, envOpts{srv: func(s *Server) {
		s.throttle.step = time.Millisecond
		s.throttle.max = time.Millisecond
	}})
	r := dialRaw(t, e.tlsAddr, e.clientTLS)
	r.cmd("EHLO client.example", "250 ")
	bad := "AUTH PLAIN " + base64.StdEncoding.EncodeToString([]byte("\x00"+testUser+"\x00wrong"))
	for i := 0; i < 3; i++ {
		r.cmd(bad, "535 5.7.8 ")
	}
	r.cmd(bad, "421 4.7.0 ")
	if l, err := r.r.ReadString('\n'); err == nil {
		t.Fatalf("connection still open after 421, read %q", l)
	}
}

func TestLongPasswordRefused(t *testing.T) {
	pw72 := strings.Repeat("p", 72)
	h, err := bcrypt.GenerateFromPassword([]byte(pw72), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	e := newEnv(t, envOpts{cfg: func(c *config.Config) {
		c.Submission.Users = []config.User{{Username: testUser, PasswordHash: string(h)}}
	}})
	plain := func(pw string) string {
		return "AUTH PLAIN " + base64.StdEncoding.EncodeToString([]byte("\x00"+testUser+"\x00"+pw))
	}
	r := dialRaw(t, e.tlsAddr, e.clientTLS)
	r.cmd("EHLO client.example", "250 ")
	// bcrypt would accept this one: it compares 72 bytes only.
	if err := bcrypt.CompareHashAndPassword(h, []byte(pw72+"anything")); err != nil {
		t.Fatalf("bcrypt no longer truncates (%v): this test is moot", err)
	}
	r.cmd(plain(pw72+"anything"), "535 5.7.8 ")
	r.cmd(plain(pw72), "235 ")
}

func TestDataTimeoutFollowsProgress(t *testing.T) {
	e := newEnv(t, envOpts{cfg: func(c *config.Config) {
		trustLoopback(c)
		c.Submission.DataTimeout = config.Duration{Duration: 300 * time.Millisecond}
	}})
	r := dialRaw(t, e.plainAddr, nil)
	r.cmd("EHLO client.example", "250 ")
	r.cmd("MAIL FROM:<app@example.org>", "250 ")
	r.cmd("RCPT TO:<rcpt@example.com>", "250 ")
	r.cmd("DATA", "354 ")
	// 1.5 s in all, far over data_timeout, but never 300 ms without a byte.
	r.write("Subject: slow\r\n\r\n")
	for i := 0; i < 15; i++ {
		time.Sleep(100 * time.Millisecond)
		r.write(fmt.Sprintf("line %d\r\n", i))
	}
	r.write(".\r\n")
	r.expect("250 2.0.0 OK queued as ")

	// A stall longer than data_timeout: 451, and the connection closes.
	r.cmd("MAIL FROM:<app@example.org>", "250 ")
	r.cmd("RCPT TO:<rcpt@example.com>", "250 ")
	r.cmd("DATA", "354 ")
	r.write("Subject: stalled\r\n")
	start := time.Now()
	r.expect("451 4.4.2 ")
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("451 after %v", d)
	}
	if l, err := r.r.ReadString('\n'); err == nil {
		t.Fatalf("connection still open after the data timeout, read %q", l)
	}
}

func TestSessionLifetime(t *testing.T) {
	e := newEnv(t, envOpts{srv: func(s *Server) { s.lifetime = 500 * time.Millisecond }})
	r := dialRaw(t, e.plainAddr, nil)
	start := time.Now()
	for time.Since(start) < 3*time.Second {
		r.write("NOOP\r\n")
		lines := r.reply()
		if strings.HasPrefix(lines[0], "421 ") {
			if d := time.Since(start); d < 400*time.Millisecond {
				t.Fatalf("421 after %v", d)
			}
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatal("a busy session outlived its lifetime")
}
