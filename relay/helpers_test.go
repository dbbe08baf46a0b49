package relay

import (
	"bufio"
	"context"
	"crypto/tls"
	"io"
	"net"
	"net/netip"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
	"golang.org/x/crypto/bcrypt"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/testworld"
	"github.com/stsrelay/stsrelay/queue"
)

const (
	testUser     = "app"
	testPassword = "correct horse battery staple"
	testHostname = "relay.test"
)

var queuedRe = regexp.MustCompile(`^OK queued as [0-9a-v]{14}$`)

var (
	hashOnce sync.Once
	testHash string
)

func passwordHash(t *testing.T) string {
	hashOnce.Do(func() {
		h, err := bcrypt.GenerateFromPassword([]byte(testPassword), bcrypt.MinCost)
		if err != nil {
			panic(err)
		}
		testHash = string(h)
	})
	return testHash
}

// writeCert issues a certificate for "localhost" from a fresh test CA of
// internal/testworld and returns the PEM file names and a client config
// trusting that CA only (so a second call's certificate does not verify
// against the first call's config).
func writeCert(t *testing.T) (certFile, keyFile string, client *tls.Config) {
	t.Helper()
	ca, err := testworld.NewCA(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	c, err := ca.IssueCert(testworld.CertValid, "localhost")
	if err != nil {
		t.Fatal(err)
	}
	return c.CertFile, c.KeyFile, &tls.Config{RootCAs: ca.Pool(), ServerName: "localhost"}
}

type countingCounter struct{ n atomic.Int64 }

func (c *countingCounter) Inc() { c.n.Add(1) }

// testEnv is a running server on loopback with a real queue.
type testEnv struct {
	t         *testing.T
	srv       *Server
	st        *queue.Store
	cfg       *config.Config
	logs      *observer.ObservedLogs
	accepted  *countingCounter
	clientTLS *tls.Config
	plainAddr string // listen: plain + STARTTLS
	tlsAddr   string // implicit TLS
}

type envOpts struct {
	cfg func(*config.Config)
	srv func(*Server) // before Start
}

func newEnv(t *testing.T, o envOpts) *testEnv {
	t.Helper()
	certFile, keyFile, clientTLS := writeCert(t)
	cfg := config.Default()
	cfg.Hostname = testHostname
	cfg.DataDir = t.TempDir()
	cfg.Submission.Listen = []string{"127.0.0.1:0"}
	cfg.Submission.ImplicitTLSListen = []string{"127.0.0.1:0"}
	cfg.Submission.TLSCertFile = certFile
	cfg.Submission.TLSKeyFile = keyFile
	cfg.Submission.Users = []config.User{{Username: testUser, PasswordHash: passwordHash(t)}}
	if o.cfg != nil {
		o.cfg(cfg)
	}
	st, err := queue.Open(queue.Options{Dir: filepath.Join(cfg.DataDir, "queue")})
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zapcore.DebugLevel)
	e := &testEnv{t: t, st: st, cfg: cfg, logs: logs, accepted: &countingCounter{}, clientTLS: clientTLS}
	srv, err := New(Options{Config: cfg, Queue: st, Logger: zap.New(core), Accepted: e.accepted})
	if err != nil {
		st.Close()
		t.Fatal(err)
	}
	if o.srv != nil {
		o.srv(srv)
	}
	if err := srv.Start(); err != nil {
		st.Close()
		t.Fatal(err)
	}
	e.srv = srv
	addrs := srv.Addrs()
	if len(addrs) != len(cfg.Submission.Listen)+len(cfg.Submission.ImplicitTLSListen) {
		t.Fatalf("Addrs() = %v", addrs)
	}
	if len(cfg.Submission.Listen) > 0 {
		e.plainAddr = addrs[0].String()
	}
	if len(cfg.Submission.ImplicitTLSListen) > 0 {
		e.tlsAddr = addrs[len(cfg.Submission.Listen)].String()
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		st.Close()
	})
	return e
}

func trustLoopback(c *config.Config) {
	c.Submission.TrustedPrefixes = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}
}

// client dials the plain listener and says EHLO.
func (e *testEnv) client() *smtp.Client {
	e.t.Helper()
	conn, err := net.DialTimeout("tcp", e.plainAddr, 5*time.Second)
	if err != nil {
		e.t.Fatal(err)
	}
	return e.wrapClient(conn)
}

// starttlsClient dials the plain listener, says STARTTLS and EHLO.
func (e *testEnv) starttlsClient() *smtp.Client {
	e.t.Helper()
	conn, err := net.DialTimeout("tcp", e.plainAddr, 5*time.Second)
	if err != nil {
		e.t.Fatal(err)
	}
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	c, err := smtp.NewClientStartTLS(conn, e.clientTLS)
	if err != nil {
		conn.Close()
		e.t.Fatal(err)
	}
	conn.SetDeadline(time.Time{})
	c.CommandTimeout = 10 * time.Second
	c.SubmissionTimeout = 20 * time.Second
	e.t.Cleanup(func() { c.Close() })
	if err := c.Hello("client.example"); err != nil {
		e.t.Fatal(err)
	}
	return c
}

// tlsClient dials the implicit TLS listener.
func (e *testEnv) tlsClient() *smtp.Client {
	e.t.Helper()
	d := &net.Dialer{Timeout: 5 * time.Second}
	conn, err := tls.DialWithDialer(d, "tcp", e.tlsAddr, e.clientTLS)
	if err != nil {
		e.t.Fatal(err)
	}
	return e.wrapClient(conn)
}

func (e *testEnv) wrapClient(conn net.Conn) *smtp.Client {
	e.t.Helper()
	c := smtp.NewClient(conn)
	c.CommandTimeout = 10 * time.Second
	c.SubmissionTimeout = 20 * time.Second
	e.t.Cleanup(func() { c.Close() })
	if err := c.Hello("client.example"); err != nil {
		e.t.Fatal(err)
	}
	return c
}

// send runs MAIL, RCPT… and DATA and returns the 250 text without the
// enhanced code.
func send(c *smtp.Client, from string, mopts *smtp.MailOptions, rcpts []string, body []byte) (string, error) {
	if err := c.Mail(from, mopts); err != nil {
		return "", err
	}
	for _, r := range rcpts {
		if err := c.Rcpt(r, nil); err != nil {
			return "", err
		}
	}
	w, err := c.Data()
	if err != nil {
		return "", err
	}
	if _, err := w.Write(body); err != nil {
		return "", err
	}
	resp, err := w.CloseWithResponse()
	if err != nil {
		return "", err
	}
	return strings.TrimPrefix(resp.StatusText, "2.0.0 "), nil
}

func queueID(t *testing.T, text string) string {
	t.Helper()
	if !queuedRe.MatchString(text) {
		t.Fatalf("250 text %q does not match %s", text, queuedRe)
	}
	return strings.TrimPrefix(text, "OK queued as ")
}

// stored returns the queued message and its body split into the Received
// header and the rest.
func (e *testEnv) stored(id string) (*queue.Message, string, []byte) {
	e.t.Helper()
	m, err := e.st.Get(id)
	if err != nil {
		e.t.Fatal(err)
	}
	r, err := e.st.Body(id)
	if err != nil {
		e.t.Fatal(err)
	}
	b, err := io.ReadAll(r)
	if err != nil {
		e.t.Fatal(err)
	}
	if !strings.HasPrefix(string(b), "Received: ") {
		e.t.Fatalf("body does not start with Received: %q", b[:min(len(b), 80)])
	}
	// The header ends at the first CRLF not followed by a continuation.
	i := 0
	for {
		j := strings.Index(string(b[i:]), "\r\n")
		if j < 0 {
			e.t.Fatalf("unterminated Received header")
		}
		i += j + 2
		if i >= len(b) || (b[i] != '\t' && b[i] != ' ') {
			break
		}
	}
	return m, string(b[:i]), b[i:]
}

// smtpCode returns the reply code and enhanced code of an error from the
// go-smtp client.
func smtpCode(t *testing.T, err error) (int, smtp.EnhancedCode, string) {
	t.Helper()
	se, ok := err.(*smtp.SMTPError)
	if !ok {
		t.Fatalf("want an SMTP error, got %T %v", err, err)
	}
	return se.Code, se.EnhancedCode, se.Message
}

// raw is a line-level SMTP connection for protocol edge cases.
type raw struct {
	t    *testing.T
	conn net.Conn
	r    *bufio.Reader
}

func dialRaw(t *testing.T, addr string, tlsCfg *tls.Config) *raw {
	t.Helper()
	var conn net.Conn
	var err error
	d := &net.Dialer{Timeout: 5 * time.Second}
	if tlsCfg != nil {
		conn, err = tls.DialWithDialer(d, "tcp", addr, tlsCfg)
	} else {
		conn, err = d.Dial("tcp", addr)
	}
	if err != nil {
		t.Fatal(err)
	}
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	t.Cleanup(func() { conn.Close() })
	r := &raw{t: t, conn: conn, r: bufio.NewReader(conn)}
	r.expect("220 ")
	return r
}

func (r *raw) write(s string) {
	r.t.Helper()
	if _, err := io.WriteString(r.conn, s); err != nil {
		r.t.Fatal(err)
	}
}

// reply reads one (possibly multi-line) reply and returns its lines.
func (r *raw) reply() []string {
	r.t.Helper()
	var lines []string
	for {
		l, err := r.r.ReadString('\n')
		if err != nil {
			r.t.Fatalf("reading reply after %q: %v", lines, err)
		}
		l = strings.TrimRight(l, "\r\n")
		lines = append(lines, l)
		if len(l) < 4 || l[3] != '-' {
			return lines
		}
	}
}

// expect reads one reply and checks that its last line starts with
// prefix; it returns the whole reply.
func (r *raw) expect(prefix string) []string {
	r.t.Helper()
	lines := r.reply()
	if last := lines[len(lines)-1]; !strings.HasPrefix(last, prefix) {
		r.t.Fatalf("reply %q, want prefix %q", lines, prefix)
	}
	return lines
}

func (r *raw) cmd(line, prefix string) []string {
	r.t.Helper()
	r.write(line + "\r\n")
	return r.expect(prefix)
}

func (e *testEnv) acceptedLogs() []observer.LoggedEntry {
	return e.logs.FilterMessage("accepted").All()
}
