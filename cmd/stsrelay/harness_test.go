package main

// The end-to-end harness: the relay, in process (server.Run) or as the
// real stsrelay binary (built once, for the CLI and for the tests that
// need a process), run on a temporary configuration against a testworld
// (DNS, CA, MX and HTTPS hosts on loopback), driven over SMTP and through
// its CLI, observed through its JSON log lines.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"github.com/pelletier/go-toml/v2"
	"go.uber.org/zap"
	"golang.org/x/crypto/bcrypt"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/logging"
	"github.com/stsrelay/stsrelay/internal/server"
	"github.com/stsrelay/stsrelay/internal/testworld"
)

var binPath string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "stsrelay-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	binPath = filepath.Join(dir, "stsrelay")
	cmd := exec.Command("go", "build", "-race", "-o", binPath, ".")
	if os.Getenv("STSRELAY_E2E_NORACE") != "" {
		cmd = exec.Command("go", "build", "-o", binPath, ".")
	}
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building stsrelay:", err)
		os.Exit(2)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// raceBuild reports whether the binary under test was built with -race.
func raceBuild() bool { return os.Getenv("STSRELAY_E2E_NORACE") == "" }

const (
	testUser     = "app"
	testPassword = "app-secret"
)

var (
	testHashOnce sync.Once
	testHash     string
)

func passwordHash() string {
	testHashOnce.Do(func() {
		h, _ := bcrypt.GenerateFromPassword([]byte(testPassword), bcrypt.MinCost)
		testHash = string(h)
	})
	return testHash
}

// testConfig returns a configuration for a relay in world w: resolver,
// ports and roots of the world, fast retries, a submission listener on a
// kernel-chosen loopback port with STARTTLS, one user.
func testConfig(t testing.TB, w *testworld.World) *config.Config {
	cfg := config.Default()
	cfg.Hostname = "relay.stsrelay.test"
	cfg.DataDir = filepath.Join(t.TempDir(), "data")
	cert := w.CA.Issue(testworld.CertValid, "relay.stsrelay.test")
	cfg.Submission.Listen = []string{"127.0.0.1:0"}
	cfg.Submission.TLSCertFile, cfg.Submission.TLSKeyFile = cert.CertFile, cert.KeyFile
	cfg.Submission.Users = []config.User{{Username: testUser, PasswordHash: passwordHash()}}
	// Tests submit many messages at once from 127.0.0.1; the per-address
	// cap has tests of its own.
	cfg.Submission.MaxConnectionsPerIP = 200
	cfg.Queue.RetrySchedule = []config.Duration{{Duration: time.Second}}
	cfg.Queue.MaxQueueTime = config.Duration{Duration: time.Hour}
	cfg.Queue.DelayNoticeAfter = config.Duration{}
	cfg.DNS.Servers = []string{w.DNS.Addr()}
	cfg.DNS.Timeout = config.Duration{Duration: 2 * time.Second}
	// The DNS cache is on, as in production, but short: tests change
	// records as they go.
	cfg.DNS.CacheMaxTTL = config.Duration{Duration: time.Second}
	cfg.Delivery.Port = w.MXPort()
	cfg.Delivery.ConnectTimeout = config.Duration{Duration: 3 * time.Second}
	cfg.Delivery.CommandTimeout = config.Duration{Duration: 20 * time.Second}
	cfg.TLS.ExtraRootCAFile = w.CAFile()
	cfg.MTASTS.HTTPSPort = w.HTTPSPort()
	cfg.MTASTS.FetchTimeout = config.Duration{Duration: 3 * time.Second}
	cfg.TLSRPT.Enabled = false
	// The test world's report hosts live on loopback.
	cfg.TLSRPT.AllowPrivateRUA = true
	cfg.Log.Level = "debug"
	return cfg
}

// relayProc is a running relay: in process (startRelay: server.Run in a
// goroutine, its JSON log lines read through a pipe), or the binary
// (startRelayProcess: for kill -9, signals, exit codes and the process's
// own resources).
type relayProc struct {
	t       testing.TB
	cfg     *config.Config
	cfgPath string
	process bool      // the binary, not in process
	cmd     *exec.Cmd // the binary's; nil in process
	addr    string
	done    chan struct{}

	// In process: cancel stops the run, reload delivers reloads, runErr
	// is Run's error once done is closed.
	cancel context.CancelFunc
	reload chan os.Signal
	runErr error

	mu    sync.Mutex
	lines []map[string]any
	raw   []string
}

// startRelay writes cfg and runs the relay on it in process until the
// test ends.
func startRelay(t testing.TB, cfg *config.Config) *relayProc {
	t.Helper()
	return newRelay(t, cfg, false)
}

// startRelayProcess is startRelay with the binary, for tests that need a
// process: kill -9, signals, exit codes, systemd notify, /proc.
func startRelayProcess(t testing.TB, cfg *config.Config) *relayProc {
	t.Helper()
	return newRelay(t, cfg, true)
}

func newRelay(t testing.TB, cfg *config.Config, process bool) *relayProc {
	t.Helper()
	data, err := toml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "stsrelay.toml")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	r := &relayProc{t: t, cfg: cfg, cfgPath: path, process: process}
	r.start()
	t.Cleanup(r.stop)
	return r
}

func (r *relayProc) start() {
	r.t.Helper()
	if !r.process {
		r.startInProcess()
		return
	}
	cmd := exec.Command(binPath, "serve", "-config", r.cfgPath)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		r.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		r.t.Fatal(err)
	}
	r.cmd = cmd
	r.done = make(chan struct{})
	started := make(chan string, 1)
	go func() {
		r.readLog(stderr, started)
		_ = cmd.Wait()
		close(r.done)
	}()
	r.waitStarted(started)
}

// startInProcess loads the configuration file as `serve` does and runs
// server.Run on it, logging JSON lines into a pipe that readLog reads.
func (r *relayProc) startInProcess() {
	r.t.Helper()
	cfg, err := config.Load(r.cfgPath)
	if err != nil {
		r.t.Fatal(err)
	}
	pr, pw := io.Pipe()
	lw := &logWriter{w: pw}
	log, level, err := logging.NewWriter(cfg.Log, lw)
	if err != nil {
		r.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r.cancel = cancel
	r.reload = make(chan os.Signal, 1)
	r.done = make(chan struct{})
	r.runErr = nil
	started := make(chan string, 1)
	logged := make(chan struct{})
	go func() {
		r.readLog(pr, started)
		// A line too long for the scanner: keep the writers unblocked.
		_, _ = io.Copy(io.Discard, pr)
		close(logged)
	}()
	go func() {
		err := server.Run(ctx, server.Options{Config: cfg, Logger: log, Reload: r.reload, Level: &level, Version: version})
		if err != nil {
			log.Error("stopped with error", zap.Error(err))
		}
		_ = log.Sync()
		lw.close()
		<-logged
		r.runErr = err
		close(r.done)
	}()
	r.waitStarted(started)
}

// logWriter writes the in-process relay's log into the pipe until Run
// returns; a line logged after that (by a goroutine Run left behind) goes
// to the test binary's stderr, marked.
type logWriter struct {
	mu     sync.Mutex
	w      *io.PipeWriter
	closed bool
}

func (lw *logWriter) Write(p []byte) (int, error) {
	lw.mu.Lock()
	defer lw.mu.Unlock()
	if lw.closed {
		fmt.Fprintf(os.Stderr, "stsrelay logged after server.Run returned: %s", p)
		return len(p), nil
	}
	return lw.w.Write(p)
}

func (lw *logWriter) close() {
	lw.mu.Lock()
	defer lw.mu.Unlock()
	lw.closed = true
	lw.w.Close()
}

// readLog reads the relay's log lines from rd into r.lines and r.raw,
// and sends the first listen address of the "started" line on started.
func (r *relayProc) readLog(rd io.Reader, started chan<- string) {
	sc := bufio.NewScanner(rd)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		var m map[string]any
		_ = json.Unmarshal([]byte(line), &m)
		r.mu.Lock()
		r.raw = append(r.raw, line)
		if m != nil {
			r.lines = append(r.lines, m)
		}
		r.mu.Unlock()
		if m != nil && m["msg"] == "started" {
			if l, ok := m["listen"].([]any); ok && len(l) > 0 {
				select {
				case started <- l[0].(string):
				default:
				}
			}
		}
	}
}

func (r *relayProc) waitStarted(started <-chan string) {
	r.t.Helper()
	select {
	case r.addr = <-started:
	case <-r.done:
		r.t.Fatalf("stsrelay exited at start:\n%s", r.logText())
	case <-time.After(20 * time.Second):
		r.t.Fatalf("stsrelay did not start:\n%s", r.logText())
	}
}

// stop stops the relay (SIGTERM for the binary, the end of the context
// in process) and waits (bounded) for a clean exit.
func (r *relayProc) stop() {
	select {
	case <-r.done:
		return
	default:
	}
	if !r.process {
		r.cancel()
		select {
		case <-r.done:
			if r.runErr != nil {
				r.t.Errorf("stsrelay stopped with error: %v", r.runErr)
			}
		case <-time.After(40 * time.Second):
			r.t.Errorf("stsrelay did not stop within 40s of the end of its context")
		}
		return
	}
	_ = r.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-r.done:
	case <-time.After(40 * time.Second):
		_ = r.cmd.Process.Kill()
		<-r.done
		r.t.Errorf("stsrelay did not stop within 40s of SIGTERM")
	}
}

// kill9 kills the relay without warning.
func (r *relayProc) kill9() {
	r.t.Helper()
	if !r.process {
		r.t.Fatal("kill9 needs the binary: start the relay with startRelayProcess")
	}
	_ = r.cmd.Process.Kill()
	<-r.done
}

// restart stops (cleanly) and starts the relay again on the same config.
func (r *relayProc) restart() {
	r.stop()
	r.start()
}

func (r *relayProc) logText() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return strings.Join(r.raw, "\n")
}

// logs returns the log lines with msg, for which match (if set) is true.
func (r *relayProc) logs(msg string, match func(map[string]any) bool) []map[string]any {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []map[string]any
	for _, l := range r.lines {
		if l["msg"] == msg && (match == nil || match(l)) {
			out = append(out, l)
		}
	}
	return out
}

// waitLog waits until n lines with msg match.
func (r *relayProc) waitLog(msg string, n int, timeout time.Duration, match func(map[string]any) bool) []map[string]any {
	r.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		got := r.logs(msg, match)
		if len(got) >= n {
			return got
		}
		if time.Now().After(deadline) {
			r.t.Fatalf("waited %v for %d %q log lines, have %d; log:\n%s", timeout, n, msg, len(got), tail(r.logText(), 60))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// deliveries returns the "delivery" lines for rcpt.
func (r *relayProc) deliveries(rcpt string) []map[string]any {
	return r.logs("delivery", func(l map[string]any) bool { return l["rcpt"] == rcpt })
}

// waitResult waits for a delivery line for rcpt with the given result.
func (r *relayProc) waitResult(rcpt, result string, timeout time.Duration) map[string]any {
	r.t.Helper()
	got := r.waitLog("delivery", 1, timeout, func(l map[string]any) bool { return l["rcpt"] == rcpt && l["result"] == result })
	return got[0]
}

// cli runs a stsrelay subcommand on the relay's config.
func (r *relayProc) cli(args ...string) (string, int) {
	r.t.Helper()
	args = append(args, "-config", r.cfgPath)
	cmd := exec.Command(binPath, args...)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &out
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		r.t.Fatal(err)
	}
	return out.String(), code
}

// submitOpts tune a submission.
type submitOpts struct {
	noAuth   bool
	password string
	noTLS    bool
	// mail are the MAIL FROM parameters (SMTPUTF8, BODY, ...).
	mail *smtp.MailOptions
}

// submit sends one message over STARTTLS with AUTH PLAIN and returns the
// queue ID from the 250 reply.
func (r *relayProc) submit(from string, to []string, body []byte, o ...submitOpts) (string, error) {
	var opt submitOpts
	if len(o) > 0 {
		opt = o[0]
	}
	c, err := smtp.Dial(r.addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if err := c.Hello("client.test"); err != nil {
		return "", err
	}
	if !opt.noTLS {
		c.Close()
		c, err = smtp.DialStartTLS(r.addr, &tls.Config{InsecureSkipVerify: true})
		if err != nil {
			return "", err
		}
		defer c.Close()
	}
	if !opt.noAuth {
		pw := testPassword
		if opt.password != "" {
			pw = opt.password
		}
		if err := c.Auth(sasl.NewPlainClient("", testUser, pw)); err != nil {
			return "", err
		}
	}
	if err := c.Mail(from, opt.mail); err != nil {
		return "", err
	}
	for _, rc := range to {
		if err := c.Rcpt(rc, nil); err != nil {
			return "", err
		}
	}
	id, err := dataQueued(c, bytes.NewReader(body))
	if err != nil {
		return "", err
	}
	_ = c.Quit()
	return id, nil
}

// mustSubmit is submit that fails the test on error.
func (r *relayProc) mustSubmit(from string, to []string, body []byte) string {
	r.t.Helper()
	id, err := r.submit(from, to, body)
	if err != nil {
		r.t.Fatalf("submit: %v", err)
	}
	return id
}

// simpleMessage is a small RFC 5322 message.
func simpleMessage(subject string) []byte {
	return []byte("From: <sender@client.test>\r\nTo: <rcpt@ex.test>\r\nSubject: " + subject +
		"\r\nMessage-ID: <" + subject + "@client.test>\r\n\r\nHello.\r\n")
}

// afterReceived strips the relay's Received header from a delivered
// message, leaving the bytes the client sent.
func afterReceived(t testing.TB, data []byte) []byte {
	t.Helper()
	if !bytes.HasPrefix(data, []byte("Received: ")) {
		t.Fatalf("delivered message does not start with Received:\n%.300s", data)
	}
	i := 0
	for {
		j := bytes.Index(data[i:], []byte("\r\n"))
		if j < 0 {
			t.Fatalf("no end of Received header")
		}
		i += j + 2
		if i >= len(data) || (data[i] != ' ' && data[i] != '\t') {
			return data[i:]
		}
	}
}

// simpleDomain sets up domain with one MX host with a valid certificate.
func simpleDomain(w *testworld.World, domain string) *testworld.MXServer {
	host := "mx1." + domain
	mx := w.NewMX(testworld.MXOptions{Hostname: host, Cert: w.CA.Issue(testworld.CertValid, host)})
	w.DNS.SetMX(domain, testworld.MX{Pref: 10, Host: host})
	w.DNS.SetA(host, mx.IP())
	return mx
}
