package delivery

import (
	"bufio"
	"bytes"
	"context"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/testworld"
	"github.com/stsrelay/stsrelay/queue"
)

// stallMode is where a stalling MX stops.
type stallMode int

const (
	// stallBody answers DATA with 354 and never reads again: the body
	// write blocks once the socket buffers are full.
	stallBody stallMode = iota
	// stallFinal reads the whole body and never answers the final dot.
	stallFinal
)

// stallingMX is a plaintext MX for domain in world w that offers
// PIPELINING (no CHUNKING, no STARTTLS), answers MAIL, RCPT and DATA, then
// stalls as mode says, keeping the connection open until the test ends.
// inData is signalled when a client reached the stall.
func stallingMX(t *testing.T, w *testworld.World, domain string, mode stallMode) (inData <-chan struct{}) {
	t.Helper()
	ip := w.NextIP()
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(w.MXPort())))
	if err != nil {
		t.Fatal(err)
	}
	host := "mx." + domain
	w.DNS.SetMX(domain, testworld.MX{Pref: 10, Host: host})
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
				serveStalling(c, host, mode, stalled, quit)
			}()
		}
	}()
	return stalled
}

func serveStalling(c net.Conn, host string, mode stallMode, stalled chan<- struct{}, quit <-chan struct{}) {
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
			if mode == stallFinal {
				for {
					l, err := br.ReadString('\n')
					if err != nil {
						return
					}
					if l == ".\r\n" {
						break
					}
				}
			}
			select {
			case stalled <- struct{}{}:
			default:
			}
			<-quit // stall: read nothing, answer nothing
			return
		default:
			say("500 5.5.1 what")
		}
	}
}

// bigBody is a message larger than loopback socket buffers hold.
func bigBody(size int) []byte {
	var b bytes.Buffer
	b.WriteString("Subject: big\r\n\r\n")
	line := strings.Repeat("x", 76) + "\r\n"
	for b.Len() < size {
		b.WriteString(line)
	}
	return b.Bytes()
}

// RFC 5321 §4.5.3.2.5 (issue #11): an MX that stops reading after 354
// frees its worker after delivery.data_timeout without progress, and the
// recipient is deferred with a 4xx, the attempt counted.
func TestStalledBodyFreesWorkerAfterDataTimeout(t *testing.T) {
	w := testworld.New(t)
	inData := stallingMX(t, w, "stall.test", stallBody)
	e, st := newTestEngine(t, w, nil, func(c *config.Config) {
		c.Delivery.DataTimeout.Duration = 500 * time.Millisecond
		c.Delivery.CommandTimeout.Duration = time.Minute
	})
	id, err := st.Enqueue(queue.Envelope{From: "", Rcpts: []queue.RcptSpec{{Addr: "u@stall.test"}}}, bytes.NewReader(bigBody(16<<20)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { e.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	select {
	case <-inData:
	case <-time.After(15 * time.Second):
		t.Fatal("the MX never got DATA")
	}
	start := time.Now()
	var m *queue.Message
	waitFor(t, "the stalled attempt to be recorded", func() bool {
		m, err = st.Get(id)
		return err == nil && m.Rcpts[0].Attempts > 0
	})
	took := time.Since(start)
	r := m.Rcpts[0]
	t.Logf("deferred %v after 354: %d %s %q", took.Round(time.Millisecond), r.LastCode, r.LastEnhanced, r.LastError)
	if r.Status != queue.Deferred || r.LastCode/100 != 4 || r.Attempts != 1 {
		t.Errorf("recipient after the stall: status %v code %d attempts %d, want deferred 4xx after 1 attempt", r.Status, r.LastCode, r.Attempts)
	}
	if took > 10*time.Second {
		t.Errorf("the worker was held %v by a stalled MX (data_timeout 500ms)", took)
	}
	waitFor(t, "the worker to end", func() bool {
		e.mu.Lock()
		defer e.mu.Unlock()
		return e.running == 0
	})
}

// Issue #11, finding 1: at shutdown a delivery stuck on a stalled MX gets
// delivery.shutdown_timeout; then its connection is closed and its job
// requeued as not attempted (no attempt counted, the message stays
// queued and due, its lease released).
func TestShutdownCutsStalledDelivery(t *testing.T) {
	for _, tc := range []struct {
		name string
		mode stallMode
		size int
	}{
		{"MX stops reading after 354", stallBody, 16 << 20},
		{"MX never answers the final dot", stallFinal, 1 << 10},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := testworld.New(t)
			inData := stallingMX(t, w, "stall.test", tc.mode)
			const grace = 500 * time.Millisecond
			e, st := newTestEngine(t, w, nil, func(c *config.Config) {
				c.Delivery.DataTimeout.Duration = time.Minute
				c.Delivery.CommandTimeout.Duration = time.Minute
				c.Delivery.ShutdownTimeout.Duration = grace
			})
			id, err := st.Enqueue(queue.Envelope{From: "", Rcpts: []queue.RcptSpec{{Addr: "u@stall.test"}}}, bytes.NewReader(bigBody(tc.size)))
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() { e.Run(ctx); close(done) }()
			select {
			case <-inData:
			case <-time.After(15 * time.Second):
				cancel()
				<-done
				t.Fatal("the MX never got DATA")
			}
			time.Sleep(100 * time.Millisecond) // the body write or final wait is blocked
			start := time.Now()
			cancel()
			select {
			case <-done:
			case <-time.After(15 * time.Second):
				t.Fatal("Run did not return after shutdown with a stalled MX")
			}
			took := time.Since(start)
			t.Logf("Run returned %v after cancel (shutdown_timeout %v)", took.Round(time.Millisecond), grace)
			if took < grace || took > grace+3*time.Second {
				t.Errorf("Run returned %v after cancel, want just over shutdown_timeout %v", took, grace)
			}
			if n := e.conns.open(); n != 0 {
				t.Errorf("%d connections still open after Run", n)
			}
			waitFor(t, "the message's lease to end", func() bool { return !st.Leased(id) })
			m, err := st.Get(id)
			if err != nil {
				t.Fatalf("message gone after a cut delivery: %v", err)
			}
			if r := m.Rcpts[0]; r.Attempts != 0 || r.Status.Final() || r.LastCode != 0 {
				t.Errorf("recipient after the cut: %+v, want untouched (no attempt counted)", r)
			}
		})
	}
}

// A delivery that finishes within shutdown_timeout is recorded as usual:
// the grace is a deadline, not a delay.
func TestShutdownWaitsNoLongerThanNeeded(t *testing.T) {
	w := testworld.New(t)
	ctx, cancel := context.WithCancel(context.Background())
	var once sync.Once
	mx := w.NewMX(testworld.MXOptions{Hostname: "mx.slow.test", Script: func(cmd testworld.Command) *testworld.Reply {
		if cmd.Verb == "DATA" {
			once.Do(cancel)
			return &testworld.Reply{Delay: 300 * time.Millisecond}
		}
		return nil
	}})
	w.DNS.SetMX("slow.test", testworld.MX{Pref: 10, Host: "mx.slow.test"})
	w.DNS.SetA("mx.slow.test", mx.IP())
	e, st := newTestEngine(t, w, nil, func(c *config.Config) { c.Delivery.ShutdownTimeout.Duration = 10 * time.Second })
	id := enqueue(t, st, queue.Envelope{From: "", Rcpts: []queue.RcptSpec{{Addr: "u@slow.test"}}})
	done := make(chan struct{})
	start := time.Now()
	go func() { e.Run(ctx); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("Run did not return")
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("Run took %v to return; the delivery ended after 300ms", took)
	}
	if e.cut.Load() {
		t.Error("the delivery was cut though it ended within shutdown_timeout")
	}
	waitFor(t, "the message to leave the queue", func() bool {
		_, err := st.Get(id)
		return err != nil
	})
	if n := len(mx.Messages()); n != 1 {
		t.Errorf("MX got %d messages, want 1", n)
	}
}
