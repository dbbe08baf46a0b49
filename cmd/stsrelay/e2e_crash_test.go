package main

// Durability across a crash: a 250 reply means the message is on disk. The
// relay is killed with SIGKILL in the middle of many concurrent
// submissions; after a restart every acknowledged message is still queued
// or gets delivered, byte-exact, and none twice (except a message whose
// delivery was in flight at the kill: its outcome may not have been
// recorded yet).

import (
	"crypto/rand"
	"crypto/tls"
	"encoding/base64"
	"fmt"
	mrand "math/rand/v2"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/internal/testworld"
)

// crashMessage is message i of a crash test: unique Message-ID, unique
// random payload of 1–4 KiB.
func crashMessage(t testing.TB, tag string, i int) (msgID string, body []byte) {
	t.Helper()
	raw := make([]byte, 768+mrand.IntN(2304))
	if _, err := rand.Read(raw); err != nil {
		t.Fatal(err)
	}
	enc := base64.StdEncoding.EncodeToString(raw)
	msgID = fmt.Sprintf("<%s-%d@client.test>", tag, i)
	b := fmt.Sprintf("From: <s@client.test>\r\nTo: <u@ex.test>\r\nSubject: %s %d\r\nMessage-ID: %s\r\n\r\n", tag, i, msgID)
	for len(enc) > 76 {
		b += enc[:76] + "\r\n"
		enc = enc[76:]
	}
	b += enc + "\r\n.starts with a dot\r\n"
	return msgID, []byte(b)
}

// submitSession sends msgs over one authenticated STARTTLS session and
// calls ack with the index and queue ID of each message that got its 250.
// It stops at the first error.
func submitSession(addr string, msgs [][]byte, idx []int, rcpt string, ack func(i int, id string)) error {
	c, err := smtp.DialStartTLS(addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.Auth(sasl.NewPlainClient("", testUser, testPassword)); err != nil {
		return err
	}
	for _, i := range idx {
		if err := c.Mail("s@client.test", nil); err != nil {
			return err
		}
		if err := c.Rcpt(rcpt, nil); err != nil {
			return err
		}
		w, err := c.Data()
		if err != nil {
			return err
		}
		if _, err := w.Write(msgs[i]); err != nil {
			return err
		}
		resp, err := w.CloseWithResponse()
		if err != nil {
			return err
		}
		const prefix = "2.0.0 OK queued as "
		if len(resp.StatusText) <= len(prefix) || resp.StatusText[:len(prefix)] != prefix {
			return fmt.Errorf("unexpected 250 text %q", resp.StatusText)
		}
		ack(i, resp.StatusText[len(prefix):])
	}
	return c.Quit()
}

func TestE2ECrashDuringSubmission(t *testing.T) {
	t.Parallel()
	// MX down: after the restart the queue must list every acknowledged
	// message; then the MX comes up and each arrives exactly once.
	t.Run("MXDown", func(t *testing.T) { t.Parallel(); crashDuringSubmission(t, false) })
	// MX up throughout: deliveries run while the relay is killed; every
	// acknowledged message arrives, duplicates only for deliveries in
	// flight at the kill.
	t.Run("MXUp", func(t *testing.T) { t.Parallel(); crashDuringSubmission(t, true) })
}

func crashDuringSubmission(t *testing.T, mxUp bool) {
	// More messages than the clients can send before the kill (which
	// falls 50–500 ms into the burst), so that it lands mid-stream.
	const (
		n       = 800
		clients = 20
	)
	w := testworld.New(t)
	var up atomic.Bool
	up.Store(mxUp)
	mx := scriptedDomain(w, "ex.test", func(c testworld.Command) *testworld.Reply {
		if up.Load() {
			return nil
		}
		return tempFail(c)
	})
	cfg := testConfig(t, w)
	cfg.Log.Level = "info"
	cfg.Queue.PerDomainConcurrency = 8
	r := startRelayProcess(t, cfg)

	tag := fmt.Sprintf("crash%v", mxUp)
	msgIDs := make([]string, n)
	bodies := make([][]byte, n)
	byMsgID := map[string][]byte{}
	for i := range n {
		msgIDs[i], bodies[i] = crashMessage(t, tag, i)
		byMsgID[msgIDs[i]] = bodies[i]
	}

	var mu sync.Mutex
	acked := map[int]string{} // message index → queue ID
	firstAck := make(chan struct{})
	var firstOnce sync.Once
	var wg sync.WaitGroup
	for k := range clients {
		var idx []int
		for i := k; i < n; i += clients {
			idx = append(idx, i)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			// A session that breaks (the kill) is not resumed: the
			// relay is gone until the test restarts it.
			_ = submitSession(r.addr, bodies, idx, "u@ex.test", func(i int, id string) {
				mu.Lock()
				acked[i] = id
				mu.Unlock()
				firstOnce.Do(func() { close(firstAck) })
			})
		}()
	}
	// The kill falls at a random moment of the burst: 50–500 ms after the
	// first acknowledgement (so that the relay is past its start-up and
	// 250 replies are flowing).
	select {
	case <-firstAck:
	case <-time.After(20 * time.Second):
		t.Fatal("no submission acknowledged within 20s")
	}
	delay := time.Duration(50+mrand.IntN(451)) * time.Millisecond
	time.Sleep(delay)
	killedAt := time.Now()
	r.kill9()
	wg.Wait()
	before := len(mx.Messages())
	t.Logf("killed %v after the first 250: %d of %d messages acknowledged, %d delivered before the kill", delay, len(acked), n, before)
	if !mxUp && before != 0 {
		t.Fatalf("MX that answers 451 received %d messages", before)
	}

	// Whatever the old process had written into its sockets has reached
	// the MX by now; a copy received before the restart was in flight.
	time.Sleep(200 * time.Millisecond)
	restartedAt := time.Now()
	r.start()
	if !mxUp {
		listed := map[string]bool{}
		for _, m := range queueList(t, r) {
			listed[m.ID] = true
			if len(m.Rcpts) != 1 || m.Rcpts[0].Addr != "u@ex.test" || m.Env.From != "s@client.test" {
				t.Errorf("recovered message %s has envelope %+v", m.ID, m.Env)
			}
		}
		for i, id := range acked {
			if !listed[id] {
				t.Errorf("acknowledged message %d (%s) is not in the queue after the crash", i, id)
			}
		}
		if t.Failed() {
			return
		}
		up.Store(true)
	}

	// Every acknowledged message arrives, byte-exact.
	deadline := time.Now().Add(30 * time.Second)
	var got []testworld.Received
	for {
		got = mx.Messages()
		seen := messageIDs(t, got)
		missing := 0
		for i := range acked {
			if seen[msgIDs[i]] == 0 {
				missing++
			}
		}
		if missing == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d acknowledged messages not delivered 30s after the restart", missing)
		}
		time.Sleep(50 * time.Millisecond)
	}
	waitQueueEmpty(t, r, 20*time.Second)
	time.Sleep(500 * time.Millisecond)
	got = mx.Messages()

	first := map[string]time.Time{}
	count := map[string]int{}
	for _, m := range got {
		id := headerValue(t, m.Data, "Message-ID")
		want, ok := byMsgID[id]
		if !ok {
			t.Errorf("MX received an unknown message %q", id)
			continue
		}
		if body := afterReceived(t, m.Data); string(body) != string(want) {
			t.Errorf("message %s delivered with different bytes (%d, want %d)", id, len(body), len(want))
		}
		count[id]++
		if f, ok := first[id]; !ok || m.Time.Before(f) {
			first[id] = m.Time
		}
	}
	var dups []string
	for id, c := range count {
		if c > 1 {
			dups = append(dups, fmt.Sprintf("%s×%d", id, c))
			if !mxUp {
				t.Errorf("message %s delivered %d times (none was in flight at the kill)", id, c)
			} else if c > 2 || !first[id].Before(restartedAt) {
				t.Errorf("message %s delivered %d times, first at %v, kill at %v, restart at %v: not a delivery in flight at the kill", id, c, first[id], killedAt, restartedAt)
			}
		}
	}
	sort.Strings(dups)
	if len(dups) > cfg.Queue.PerDomainConcurrency {
		t.Errorf("%d messages delivered twice, more than the %d deliveries that can be in flight: %v", len(dups), cfg.Queue.PerDomainConcurrency, dups)
	}
	t.Logf("%d distinct messages delivered (%d acknowledged), %d duplicates %v", len(count), len(acked), len(dups), dups)
}
