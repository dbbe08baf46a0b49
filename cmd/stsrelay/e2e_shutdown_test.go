package main

// Shutdown with stalled MX hosts (issue #11, finding 1): a delivery stuck
// on a peer that stopped reading, or that never answers the final dot,
// gets delivery.shutdown_timeout after SIGTERM; then its connection is cut
// and its message stays queued with no attempt counted. A second signal
// exits at once.

import (
	"bufio"
	"bytes"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/testworld"
)

// bodyStallMX listens as host (A record set) on the world's MX port:
// it greets, offers PIPELINING (no CHUNKING, no STARTTLS), answers MAIL,
// RCPT and DATA (354), then reads nothing more and answers nothing, until
// the test ends. inData is signalled when a client got the 354.
func bodyStallMX(t *testing.T, w *testworld.World, host string) (inData <-chan struct{}) {
	t.Helper()
	ip := w.NextIP()
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(w.MXPort())))
	if err != nil {
		t.Fatal(err)
	}
	w.DNS.SetA(host, ip)
	stalled := make(chan struct{}, 16)
	quit := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		close(quit)
		ln.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				br := bufio.NewReader(c)
				say := func(s string) { _, _ = c.Write([]byte(s + "\r\n")) }
				say("220 " + host + " ESMTP")
				for {
					line, err := br.ReadString('\n')
					if err != nil {
						return
					}
					verb, _, _ := strings.Cut(strings.ToUpper(strings.TrimSpace(line)), " ")
					switch verb {
					case "EHLO":
						say("250-" + host)
						say("250 PIPELINING")
					case "MAIL", "RCPT", "RSET", "NOOP":
						say("250 2.0.0 OK")
					case "QUIT":
						say("221 2.0.0 bye")
						return
					case "DATA":
						say("354 go ahead")
						select {
						case stalled <- struct{}{}:
						default:
						}
						<-quit
						return
					default:
						say("500 5.5.1 what")
					}
				}
			}()
		}
	}()
	return stalled
}

// largeMessage is a message of about size bytes: more than loopback
// socket buffers hold, so a peer that stops reading stalls its writer.
func largeMessage(subject string, size int) []byte {
	var b bytes.Buffer
	b.Write(simpleMessage(subject))
	line := strings.Repeat("y", 76) + "\r\n"
	for b.Len() < size {
		b.WriteString(line)
	}
	return b.Bytes()
}

// SIGTERM with a delivery stuck on a stalled MX: the relay exits within
// about shutdown_timeout (1s), cleanly; the message is still queued with
// no attempt counted, and after a restart with a working MX it is
// delivered exactly once.
func TestE2EShutdownStalledMX(t *testing.T) {
	for _, tc := range []struct {
		name string
		// setup makes ex.test's MX stall and returns what signals that a
		// delivery is stuck, and a function that makes the MX work.
		setup func(t *testing.T, w *testworld.World) (stuck <-chan struct{}, heal func() *testworld.MXServer)
		size  int
	}{
		{"MX stops reading after 354", func(t *testing.T, w *testworld.World) (<-chan struct{}, func() *testworld.MXServer) {
			w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
			stuck := bodyStallMX(t, w, "mx1.ex.test")
			return stuck, func() *testworld.MXServer {
				mx := w.NewMX(testworld.MXOptions{Hostname: "mx1.ex.test"})
				w.DNS.SetA("mx1.ex.test", mx.IP())
				return mx
			}
		}, 16 << 20},
		{"MX withholds the reply to the final dot or BDAT LAST", func(t *testing.T, w *testworld.World) (<-chan struct{}, func() *testworld.MXServer) {
			var stall atomic.Bool
			stall.Store(true)
			stuck := make(chan struct{}, 16)
			mx := w.NewMX(testworld.MXOptions{Hostname: "mx1.ex.test", Script: func(cmd testworld.Command) *testworld.Reply {
				if cmd.Verb == "DATA" && stall.Load() {
					select {
					case stuck <- struct{}{}:
					default:
					}
					// Far beyond the test; a 451 in the end, so that
					// the MX does not count the cut message as received.
					return &testworld.Reply{Code: 451, Delay: 10 * time.Minute}
				}
				return nil
			}})
			w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
			w.DNS.SetA("mx1.ex.test", mx.IP())
			return stuck, func() *testworld.MXServer { stall.Store(false); return mx }
		}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := testworld.New(t)
			stuck, heal := tc.setup(t, w)
			cfg := testConfig(t, w)
			cfg.Delivery.ShutdownTimeout = config.Duration{Duration: time.Second}
			cfg.Delivery.CommandTimeout = config.Duration{Duration: time.Minute}
			cfg.Delivery.DataTimeout = config.Duration{Duration: time.Minute}
			r := startRelayProcess(t, cfg)
			body := simpleMessage("stalled")
			if tc.size > 0 {
				body = largeMessage("stalled", tc.size)
			}
			id := r.mustSubmit("sender@client.test", []string{"u@ex.test"}, body)
			select {
			case <-stuck:
			case <-time.After(20 * time.Second):
				t.Fatalf("the delivery never reached the stall; log:\n%s", tail(r.logText(), 40))
			}
			time.Sleep(200 * time.Millisecond)

			start := time.Now()
			if err := r.cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			select {
			case <-r.done:
			case <-time.After(15 * time.Second):
				t.Fatalf("the relay did not exit within 15s of SIGTERM (shutdown_timeout 1s); log:\n%s", tail(r.logText(), 40))
			}
			took := time.Since(start)
			t.Logf("exited %v after SIGTERM, status %d", took.Round(time.Millisecond), r.cmd.ProcessState.ExitCode())
			if took > 3500*time.Millisecond {
				t.Errorf("the relay took %v to exit after SIGTERM with shutdown_timeout 1s", took.Round(time.Millisecond))
			}
			if code := r.cmd.ProcessState.ExitCode(); code != 0 {
				t.Errorf("exit status %d after SIGTERM, want 0 (a clean stop)", code)
			}
			if len(r.logs("shutdown timeout: deliveries in flight cut, their messages stay queued", nil)) != 1 {
				t.Errorf("no shutdown timeout line; log:\n%s", tail(r.logText(), 30))
			}
			if ls := r.deliveries("u@ex.test"); len(ls) != 0 {
				t.Errorf("the cut attempt was logged as a delivery: %v", ls)
			}
			m := queueShow(t, r, id)
			if rc := m.Rcpts[0]; rc.Attempts != 0 || rc.Status.Final() {
				t.Errorf("queue show after the cut: %+v, want queued with 0 attempts", rc)
			}

			mx := heal()
			r.start()
			l := r.waitResult("u@ex.test", "delivered", 30*time.Second)
			if l["attempt"] != float64(1) {
				t.Errorf("delivery after the restart: attempt %v, want 1", l["attempt"])
			}
			msgs := mx.WaitMessages(t, 1, 10*time.Second)
			time.Sleep(500 * time.Millisecond)
			if n := len(mx.Messages()); n != 1 || len(r.deliveries("u@ex.test")) != 1 {
				t.Errorf("after the restart: the MX got %d messages and %d delivery lines were logged, want 1 and 1", n, len(r.deliveries("u@ex.test")))
			}
			if got := afterReceived(t, msgs[0].Data); !bytes.Equal(got, body) {
				t.Errorf("delivered message differs from the submitted one (%d bytes, want %d)", len(got), len(body))
			}
		})
	}
}

// A second SIGTERM during the grace exits at once, with a non-zero status
// and a log line; the message is still queued (it was on disk before the
// 250), and no attempt is counted for it.
func TestE2EShutdownSecondSignal(t *testing.T) {
	w := testworld.New(t)
	stuck := make(chan struct{}, 16)
	mx := w.NewMX(testworld.MXOptions{Hostname: "mx1.ex.test", Script: func(cmd testworld.Command) *testworld.Reply {
		if cmd.Verb == "DATA" {
			select {
			case stuck <- struct{}{}:
			default:
			}
			return &testworld.Reply{Code: 451, Delay: 10 * time.Minute}
		}
		return nil
	}})
	w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
	w.DNS.SetA("mx1.ex.test", mx.IP())
	cfg := testConfig(t, w)
	cfg.Delivery.ShutdownTimeout = config.Duration{Duration: time.Minute}
	r := startRelayProcess(t, cfg)
	id := r.mustSubmit("sender@client.test", []string{"u@ex.test"}, simpleMessage("second-signal"))
	select {
	case <-stuck:
	case <-time.After(20 * time.Second):
		t.Fatalf("the delivery never reached the stall; log:\n%s", tail(r.logText(), 40))
	}
	if err := r.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	r.waitLog("stopping", 1, 10*time.Second, nil)
	time.Sleep(300 * time.Millisecond)
	select {
	case <-r.done:
		t.Fatalf("the relay exited after one SIGTERM though a delivery had a minute of grace; log:\n%s", tail(r.logText(), 30))
	default:
	}
	start := time.Now()
	if err := r.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-r.done:
	case <-time.After(10 * time.Second):
		t.Fatalf("the relay did not exit within 10s of a second SIGTERM; log:\n%s", tail(r.logText(), 30))
	}
	took := time.Since(start)
	code := r.cmd.ProcessState.ExitCode()
	t.Logf("exited %v after the second SIGTERM, status %d", took.Round(time.Millisecond), code)
	if took > 2*time.Second {
		t.Errorf("the relay took %v to exit after the second SIGTERM", took.Round(time.Millisecond))
	}
	if code == 0 {
		t.Errorf("exit status 0 after a second SIGTERM, want non-zero")
	}
	if len(r.logs("second signal: exiting at once", nil)) != 1 {
		t.Errorf("no log line for the second signal; log:\n%s", tail(r.logText(), 20))
	}
	m := queueShow(t, r, id)
	if rc := m.Rcpts[0]; rc.Attempts != 0 || rc.Status.Final() {
		t.Errorf("queue show after the forced exit: %+v, want queued with 0 attempts", rc)
	}
}
