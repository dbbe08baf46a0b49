package delivery

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/smtpclient"
	"github.com/stsrelay/stsrelay/internal/testworld"
	"github.com/stsrelay/stsrelay/queue"
)

// newTestEngine wires an Engine to world w with a fresh queue; MTA-STS is
// off unless pol is set.
func newTestEngine(t *testing.T, w *testworld.World, pol PolicySource, tune func(*config.Config)) (*Engine, *queue.Store) {
	t.Helper()
	cfg := config.Default()
	cfg.Hostname = "relay.test"
	cfg.Delivery.Port = w.MXPort()
	cfg.Delivery.ConnectTimeout.Duration = 5 * time.Second
	cfg.Delivery.CommandTimeout.Duration = 10 * time.Second
	if tune != nil {
		tune(cfg)
	}
	st, err := queue.Open(queue.Options{Dir: t.TempDir(), Schedule: queue.Schedule{
		Retry: []time.Duration{time.Hour}, MaxQueueTime: cfg.Queue.MaxQueueTime.Duration}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	e := New(Options{Config: cfg, Store: st, Resolver: worldResolver(t, w), Policies: pol, Roots: w.CA.Pool()})
	return e, st
}

func enqueue(t *testing.T, st *queue.Store, env queue.Envelope) string {
	t.Helper()
	id, err := st.Enqueue(env, strings.NewReader("Subject: test\r\n\r\nhello\r\n"))
	if err != nil {
		t.Fatal(err)
	}
	return id
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// RFC 8689 §4.2.1: a REQUIRETLS message goes only to an MX validated by
// MTA-STS (or DANE). A session parked after an ordinary message to a
// domain without a policy must not carry it.
func TestReusedSessionHonoursREQUIRETLS(t *testing.T) {
	w := testworld.New(t)
	mx := w.NewMX(testworld.MXOptions{Hostname: "mx1.nopolicy.test",
		Cert: w.CA.Issue(testworld.CertValid, "mx1.nopolicy.test"), AdvertiseREQUIRETLS: true})
	w.DNS.SetMX("nopolicy.test", testworld.MX{Pref: 10, Host: "mx1.nopolicy.test"})
	w.DNS.SetA("mx1.nopolicy.test", mx.IP())
	e, st := newTestEngine(t, w, nil, nil)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { e.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	enqueue(t, st, queue.Envelope{From: "", Rcpts: []queue.RcptSpec{{Addr: "u@nopolicy.test"}}})
	mx.WaitMessages(t, 1, 15*time.Second)
	waitFor(t, "first message to leave the queue", func() bool { return st.Len() == 0 })
	e.mu.Lock()
	parked := len(e.idle["nopolicy.test"])
	e.mu.Unlock()
	if parked != 1 {
		t.Fatalf("%d parked sessions, want 1 (the test needs a session to reuse)", parked)
	}

	id := enqueue(t, st, queue.Envelope{From: "", RequireTLS: true, Rcpts: []queue.RcptSpec{{Addr: "v@nopolicy.test"}}})
	waitFor(t, "REQUIRETLS message to be decided", func() bool {
		m, err := st.Get(id)
		return errors.Is(err, queue.ErrNotFound) || (err == nil && m.Rcpts[0].Attempts > 0)
	})
	if n := len(mx.Messages()); n != 1 {
		t.Fatalf("MX received %d messages, want 1: the REQUIRETLS message went to an MX no policy validates", n)
	}
}

// At shutdown, a job that never started must not make the message forget
// what its other jobs did: a recipient delivered at one domain stays
// delivered (no duplicate after the restart).
func TestShutdownRecordsFinishedJobsOfAMessage(t *testing.T) {
	w := testworld.New(t)
	ctx, cancel := context.WithCancel(context.Background())
	var once sync.Once
	script := func(cmd testworld.Command) *testworld.Reply {
		if cmd.Verb == "DATA" {
			once.Do(cancel) // shut down while the first job is in flight
		}
		return nil
	}
	for _, d := range []string{"a.test", "b.test"} {
		mx := w.NewMX(testworld.MXOptions{Hostname: "mx." + d, Script: script})
		w.DNS.SetMX(d, testworld.MX{Pref: 10, Host: "mx." + d})
		w.DNS.SetA("mx."+d, mx.IP())
	}
	e, st := newTestEngine(t, w, nil, func(c *config.Config) { c.Queue.Workers = 1 })
	id := enqueue(t, st, queue.Envelope{From: "", Rcpts: []queue.RcptSpec{{Addr: "u@a.test"}, {Addr: "u@b.test"}}})
	done := make(chan struct{})
	go func() { e.Run(ctx); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return after shutdown")
	}
	// The states are handed to the group commit (UpdateAsync); Store.Close
	// would flush them.
	waitFor(t, "the message's lease to end", func() bool { return !st.Leased(id) })
	m, err := st.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	var statuses []queue.Status
	delivered := 0
	for _, r := range m.Rcpts {
		statuses = append(statuses, r.Status)
		if r.Status == queue.Delivered {
			delivered++
		}
	}
	if delivered != 1 {
		t.Fatalf("recipient states after shutdown %v, want one delivered", statuses)
	}
}

// A body that cannot be read completely must not be ended with the final
// dot: the MX would accept a truncated message.
func TestSendBodyReadErrorDeliversNothing(t *testing.T) {
	w := testworld.New(t)
	mx := w.NewMX(testworld.MXOptions{Hostname: "mx.trunc.test"})
	s, err := dial(context.Background(), "mx.trunc.test", mx.IP(), dialOptions{Hostname: "relay.test",
		Port: w.MXPort(), ConnectTimeout: 5 * time.Second, CommandTimeout: 10 * time.Second, Now: time.Now})
	if err != nil {
		t.Fatal(err)
	}
	defer s.close()
	body := io.MultiReader(strings.NewReader("Subject: half\r\n\r\nfirst half\r\n"), errReader{errors.New("disk gone")})
	res, serr := s.send(smtpclient.Transaction{From: "a@relay.test", Rcpts: []smtpclient.Rcpt{{Addr: "u@trunc.test"}}, Body: body})
	if serr == nil || res[0].Delivered {
		t.Fatalf("send = %+v, %v; want a failure", res, serr)
	}
	time.Sleep(300 * time.Millisecond)
	if n := len(mx.Messages()); n != 0 {
		t.Fatalf("MX accepted %d truncated message(s)", n)
	}
}

type errReader struct{ err error }

func (r errReader) Read([]byte) (int, error) { return 0, r.err }

// close is bounded even when the server never answers QUIT (go-smtp would
// otherwise wait CommandTimeout, and the janitor runs on the scheduler's
// goroutine).
func TestSessionCloseIsBounded(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		br := bufio.NewReader(c)
		c.Write([]byte("220 silent.test ESMTP\r\n"))
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				return
			}
			switch strings.ToUpper(strings.Fields(line)[0]) {
			case "EHLO":
				c.Write([]byte("250 silent.test\r\n"))
			case "NOOP":
				c.Write([]byte("250 OK\r\n"))
			default: // QUIT: say nothing, keep the connection open
			}
		}
	}()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	var p int
	for _, ch := range port {
		p = p*10 + int(ch-'0')
	}
	old := sessionCloseTimeout
	sessionCloseTimeout = 300 * time.Millisecond
	defer func() { sessionCloseTimeout = old }()
	s, err := dial(context.Background(), "silent.test", "127.0.0.1", dialOptions{Hostname: "relay.test",
		Port: p, ConnectTimeout: 5 * time.Second, CommandTimeout: time.Minute, Now: time.Now})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	s.close()
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("close took %v", d)
	}
}

// Adaptive per-destination concurrency (issue #10, like Postfix's slow
// start): a destination starts with initialConcurrency sessions, grows by
// one per window of successes as large as its limit, up to
// queue.per_domain_concurrency, and loses one per failure, down to one.
func TestDestinationConcurrencyAdapts(t *testing.T) {
	w := testworld.New(t)
	e, _ := newTestEngine(t, w, nil, func(c *config.Config) { c.Queue.PerDomainConcurrency = 8 })
	limit := func() int {
		e.mu.Lock()
		defer e.mu.Unlock()
		return e.limitLocked("ex.test")
	}
	if got := limit(); got != initialConcurrency {
		t.Fatalf("initial limit %d, want %d", got, initialConcurrency)
	}
	// Each success adds 1/limit: a little more than limit of them make
	// one more session.
	for range initialConcurrency {
		e.feedback("ex.test", true)
	}
	if got := limit(); got != initialConcurrency {
		t.Errorf("after %d successes: limit %d, want still %d", initialConcurrency, got, initialConcurrency)
	}
	e.feedback("ex.test", true)
	if got := limit(); got != initialConcurrency+1 {
		t.Errorf("after %d successes: limit %d, want %d", initialConcurrency+1, got, initialConcurrency+1)
	}
	for range 1000 {
		e.feedback("ex.test", true)
	}
	if got := limit(); got != 8 {
		t.Errorf("after many successes: limit %d, want the configured 8", got)
	}
	for range 3 {
		e.feedback("ex.test", false)
	}
	if got := limit(); got != 5 {
		t.Errorf("after 3 failures: limit %d, want 5", got)
	}
	for range 100 {
		e.feedback("ex.test", false)
	}
	if got := limit(); got != 1 {
		t.Errorf("after many failures: limit %d, want 1", got)
	}
	if got := func() int { e.mu.Lock(); defer e.mu.Unlock(); return e.limitLocked("other.test") }(); got != initialConcurrency {
		t.Errorf("another destination starts at %d, want %d", got, initialConcurrency)
	}
}
