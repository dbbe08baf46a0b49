package jsqueue

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stsrelay/stsrelay/internal/fleet/natstest"
	"github.com/stsrelay/stsrelay/queue"
)

const testAckWait = 2 * time.Second

func connect(t *testing.T, c *natstest.Cluster) *nats.Conn { return connectB(t, c) }

func connectB(t testing.TB, c *natstest.Cluster) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(c.URL(), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond),
		nats.Timeout(2*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

func newQueue(t *testing.T, nc *nats.Conn, node string, tweak func(*Options)) *Queue {
	t.Helper()
	o := Options{
		Prefix:   "t",
		NodeName: node,
		AckWait:  testAckWait,
		TempDir:  t.TempDir(),
		Schedule: queue.Schedule{Retry: []time.Duration{time.Minute}, MaxQueueTime: time.Hour},
	}
	if tweak != nil {
		tweak(&o)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	q, err := New(ctx, nc, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close() })
	return q
}

func commit(t *testing.T, q *Queue, body []byte, rcpts ...string) string {
	t.Helper()
	env := queue.Envelope{From: "sender@example.org"}
	for _, r := range rcpts {
		env.Rcpts = append(env.Rcpts, queue.RcptSpec{Addr: r})
	}
	id, err := q.Enqueue(env, bytes.NewReader(body))
	if err != nil {
		t.Fatalf("commit: %v", err)
	}
	if !queue.ValidID(id) {
		t.Fatalf("commit returned a bad ID %q", id)
	}
	return id
}

// leaseN leases until n messages came or the time is up.
func leaseN(q *Queue, n int, within time.Duration) []*queue.Message {
	var out []*queue.Message
	deadline := time.Now().Add(within)
	for len(out) < n && time.Now().Before(deadline) {
		out = append(out, q.Lease(time.Now(), n-len(out))...)
		if len(out) < n {
			select {
			case <-q.Wake():
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	return out
}

func deliverAll(t *testing.T, q *Queue, m *queue.Message) {
	t.Helper()
	for i := range m.Rcpts {
		m.Rcpts[i].Status = queue.Delivered
		m.Rcpts[i].Attempts++
	}
	if err := q.Update(m); err != nil {
		t.Fatalf("update %s: %v", m.ID, err)
	}
}

func waitLen(t *testing.T, q *Queue, want int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for q.Len() != want {
		if time.Now().After(deadline) {
			t.Fatalf("Len = %d, want %d", q.Len(), want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func readBody(t *testing.T, q *Queue, id string) []byte {
	t.Helper()
	r, err := q.Body(id)
	if err != nil {
		t.Fatalf("body %s: %v", id, err)
	}
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func bigBody(n int) []byte {
	var b bytes.Buffer
	b.WriteString("Subject: big\r\n\r\n")
	for i := 0; b.Len() < n; i++ {
		fmt.Fprintf(&b, "line %08d of a large body, to go to the object store\r\n", i)
	}
	return b.Bytes()[:n]
}

func TestCommitLeaseDeliver(t *testing.T) {
	c := natstest.Start(t, 3)
	q := newQueue(t, connect(t, c), "a", func(o *Options) { o.InlineBodyBytes = 64 << 10 })
	var published atomic.Int64
	q.ObservePublish(func(s float64) {
		if s > 0 {
			published.Add(1)
		}
	})
	small := []byte("Subject: hi\r\n\r\nhello\r\n")
	big := bigBody(2 << 20)
	idSmall := commit(t, q, small, "rcpt@example.com")
	idBig := commit(t, q, big, "x@example.net", "y@example.net")
	if n := q.Len(); n != 2 {
		t.Fatalf("Len = %d after two commits", n)
	}
	if published.Load() != 2 {
		t.Fatalf("%d publishes observed, want 2", published.Load())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rec, err := q.getRecord(ctx, idBig)
	if err != nil {
		t.Fatal(err)
	}
	if rec.Body == "" {
		t.Fatal("a 2 MiB body went inline")
	}
	if _, err := q.bodies.GetInfo(ctx, rec.Body); err != nil {
		t.Fatalf("body object: %v", err)
	}
	if r, _ := q.getRecord(ctx, idSmall); r.Body != "" {
		t.Fatal("a small body went to the object store")
	}

	msgs := leaseN(q, 2, 10*time.Second)
	if len(msgs) != 2 {
		t.Fatalf("leased %d of 2", len(msgs))
	}
	for _, m := range msgs {
		want := small
		if m.ID == idBig {
			want = big
			if len(m.Rcpts) != 2 || m.Rcpts[1].Addr != "y@example.net" || m.Rcpts[0].Status != queue.Pending {
				t.Fatalf("recipients %+v", m.Rcpts)
			}
		}
		if m.Size != int64(len(want)) {
			t.Fatalf("%s: Size %d, want %d", m.ID, m.Size, len(want))
		}
		if got := readBody(t, q, m.ID); !bytes.Equal(got, want) {
			t.Fatalf("%s: body differs (%d bytes, want %d)", m.ID, len(got), len(want))
		}
		if !q.Leased(m.ID) {
			t.Fatalf("%s not leased", m.ID)
		}
	}
	// Leases are renewed: nothing comes back while held.
	time.Sleep(testAckWait + time.Second)
	if more := q.Lease(time.Now(), 10); len(more) != 0 {
		t.Fatalf("leased again while held: %v", more[0].ID)
	}
	for _, m := range msgs {
		deliverAll(t, q, m)
	}
	waitLen(t, q, 0)
	if _, err := q.bodies.GetInfo(ctx, rec.Body); !errors.Is(err, jetstream.ErrObjectNotFound) {
		t.Fatalf("body object after delivery: %v", err)
	}
	if _, err := q.Get(idBig); !errors.Is(err, queue.ErrNotFound) {
		t.Fatalf("Get after delivery: %v", err)
	}
}

func TestDeferredKeepsHistory(t *testing.T) {
	c := natstest.Start(t, 3)
	q := newQueue(t, connect(t, c), "a", nil)
	id := commit(t, q, []byte("body\r\n"), "a@example.com", "b@example.org")
	m := leaseN(q, 1, 10*time.Second)
	if len(m) != 1 {
		t.Fatal("not leased")
	}
	now := time.Now()
	next := now.Add(3 * time.Second)
	m[0].Rcpts[0].Status = queue.Delivered
	m[0].Rcpts[0].Attempts = 1
	m[0].Rcpts[1].Status = queue.Deferred
	m[0].Rcpts[1].Attempts = 1
	m[0].Rcpts[1].LastCode = 451
	m[0].Rcpts[1].LastError = "try later"
	m[0].Rcpts[1].NextAttempt = next
	if err := q.Update(m[0]); err != nil {
		t.Fatal(err)
	}
	if q.Len() != 1 {
		t.Fatalf("Len = %d", q.Len())
	}
	got, err := q.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	if got.Rcpts[1].LastError != "try later" || got.Rcpts[0].Status != queue.Delivered {
		t.Fatalf("stored states %+v", got.Rcpts)
	}
	if early := leaseN(q, 1, time.Until(next)-300*time.Millisecond); len(early) != 0 {
		t.Fatalf("leased %v before its not-before", time.Until(next))
	}
	again := leaseN(q, 1, 10*time.Second)
	if len(again) != 1 {
		t.Fatal("not leased after its not-before")
	}
	if time.Now().Before(next) {
		t.Fatal("leased early")
	}
	r := again[0].Rcpts
	if r[0].Status != queue.Delivered || r[1].Attempts != 1 || r[1].LastCode != 451 || !r[1].NextAttempt.Equal(next) {
		t.Fatalf("history lost: %+v", r)
	}
	if !again[0].Received.Equal(got.Received) {
		t.Fatalf("Received changed: %v vs %v", again[0].Received, got.Received)
	}
	deliverAll(t, q, again[0])
	waitLen(t, q, 0)
}

func TestTwoNodesShareWork(t *testing.T) {
	c := natstest.Start(t, 3)
	a := newQueue(t, connect(t, c), "a", func(o *Options) { o.Prefetch = 8 })
	b := newQueue(t, connect(t, c), "b", func(o *Options) { o.Prefetch = 8 })
	const n = 40
	ids := map[string]bool{}
	for i := 0; i < n; i++ {
		q := a
		if i%2 == 1 {
			q = b
		}
		ids[commit(t, q, []byte(fmt.Sprintf("msg %d\r\n", i)), fmt.Sprintf("r%d@example.com", i))] = true
	}
	var mu sync.Mutex
	owner := map[string]string{}
	leased := map[string][]*queue.Message{}
	stop := time.Now().Add(2*testAckWait + time.Second)
	var wg sync.WaitGroup
	for name, q := range map[string]*Queue{"a": a, "b": b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stop) {
				for _, m := range q.Lease(time.Now(), 5) {
					mu.Lock()
					if o, dup := owner[m.ID]; dup {
						t.Errorf("%s leased by %s and %s", m.ID, o, name)
					}
					owner[m.ID] = name
					leased[name] = append(leased[name], m)
					mu.Unlock()
				}
				time.Sleep(20 * time.Millisecond)
			}
		}()
	}
	wg.Wait()
	if len(owner) != n {
		t.Fatalf("leased %d of %d", len(owner), n)
	}
	if len(leased["a"]) == 0 || len(leased["b"]) == 0 {
		t.Fatalf("work not shared: a %d, b %d", len(leased["a"]), len(leased["b"]))
	}
	for name, q := range map[string]*Queue{"a": a, "b": b} {
		for _, m := range leased[name] {
			if !ids[m.ID] {
				t.Fatalf("unknown ID %s", m.ID)
			}
			deliverAll(t, q, m)
		}
	}
	waitLen(t, a, 0)
	t.Logf("a delivered %d, b %d", len(leased["a"]), len(leased["b"]))
}

func TestDeadNodeRedelivered(t *testing.T) {
	c := natstest.Start(t, 3)
	ncA := connect(t, c)
	a := newQueue(t, ncA, "a", nil)
	b := newQueue(t, connect(t, c), "b", func(o *Options) { o.Prefetch = 1 })
	id := commit(t, a, []byte("x\r\n"), "r@example.com")
	// Whichever node got it, make a hold it: b gives back what it has.
	var m []*queue.Message
	deadline := time.Now().Add(10 * time.Second)
	for len(m) == 0 && time.Now().Before(deadline) {
		for _, x := range b.Lease(time.Now(), 1) {
			b.Release(x.ID)
		}
		m = a.Lease(time.Now(), 1)
		time.Sleep(20 * time.Millisecond)
	}
	if len(m) != 1 || m[0].ID != id {
		t.Fatal("a did not lease the message")
	}
	// a dies: no ack, no more heartbeats.
	died := time.Now()
	ncA.Close()
	got := leaseN(b, 1, testAckWait+10*time.Second)
	if len(got) != 1 || got[0].ID != id {
		t.Fatal("the dead node's message never came to b")
	}
	if after := time.Since(died); after < testAckWait-200*time.Millisecond {
		t.Fatalf("redelivered %v after the death, before AckWait", after)
	}
	t.Logf("redelivered %v after the node died", time.Since(died).Round(time.Millisecond))
	if b.Redeliveries() != 1 {
		t.Fatalf("Redeliveries = %d, want 1", b.Redeliveries())
	}
	deliverAll(t, b, got[0])
	waitLen(t, b, 0)
}

func TestNATSNodeDown(t *testing.T) {
	c := natstest.Start(t, 3)
	q := newQueue(t, connect(t, c), "a", func(o *Options) { o.InlineBodyBytes = 1 << 10 })
	// Commit from four clients while the stream's leader dies (the
	// worst case): every commit acknowledged must be there.
	var mu sync.Mutex
	acked := map[string]bool{}
	failed := 0
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				body := []byte(fmt.Sprintf("message %d/%d\r\n", w, i))
				if i%4 == 0 {
					body = bigBody(4 << 10) // object store
				}
				id, err := q.Enqueue(queue.Envelope{Rcpts: []queue.RcptSpec{{Addr: fmt.Sprintf("r%d@example.com", i)}}}, bytes.NewReader(body))
				mu.Lock()
				if err != nil {
					failed++
				} else {
					acked[id] = true
				}
				mu.Unlock()
				time.Sleep(5 * time.Millisecond)
			}
		}()
	}
	time.Sleep(500 * time.Millisecond)
	down := 0
	for i := 0; i < c.Len(); i++ {
		if s := c.Server(i); s != nil && s.JetStreamIsStreamLeader(server.DEFAULT_GLOBAL_ACCOUNT, q.n.stream) {
			down = i
		}
	}
	mu.Lock()
	before := len(acked)
	mu.Unlock()
	c.Shutdown(down)
	// Commits go on once a new leader is elected: seconds on a quiet
	// machine, longer on a loaded one (CI under the race detector).
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); {
		mu.Lock()
		n := len(acked) - before
		mu.Unlock()
		if n >= 10 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(time.Second)
	close(stop)
	wg.Wait()
	t.Logf("%d commits acknowledged (%d after n%d, the stream leader, died), %d failed", len(acked), len(acked)-before, down+1, failed)
	if len(acked)-before < 10 {
		t.Fatalf("only %d commits with one server of three down", len(acked)-before)
	}
	got := leaseN(q, len(acked), 30*time.Second)
	for _, m := range got {
		if b := readBody(t, q, m.ID); int64(len(b)) != m.Size {
			t.Fatalf("%s: body %d bytes, want %d", m.ID, len(b), m.Size)
		}
		delete(acked, m.ID)
		deliverAll(t, q, m)
	}
	if len(acked) != 0 {
		t.Fatalf("lost %d acknowledged messages", len(acked))
	}
	c.Restart(down)
	waitLen(t, q, 0)
}

func TestPublishDedup(t *testing.T) {
	c := natstest.Start(t, 3)
	q := newQueue(t, connect(t, c), "a", nil)
	now := time.Now()
	rec := &record{ID: q.ids.Next(now), Version: 1, Received: now, NotBefore: now.Add(time.Hour),
		Env:   queue.Envelope{Rcpts: []queue.RcptSpec{{Addr: "r@example.com"}}},
		Rcpts: []queue.Recipient{{RcptSpec: queue.RcptSpec{Addr: "r@example.com"}, Status: queue.Pending}},
		Size:  2}
	m, err := rec.encode(q.subject(rec.ID), rec.ID+":1:retry", []byte("hi"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p := &pending{msg: m}
	ack1, err := q.publish(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	// The same publish again, as after a lost ack.
	ack2, err := q.publish(ctx, p)
	if err != nil {
		t.Fatal(err)
	}
	if !ack2.Duplicate || ack2.Sequence != ack1.Sequence {
		t.Fatalf("second publish not deduplicated: %+v vs %+v", ack2, ack1)
	}
	if n := q.Len(); n != 1 {
		t.Fatalf("Len = %d after a duplicate publish", n)
	}
	// Another writer with the same ID (another publish): refused by
	// the subject's sequence check, not merged.
	m2, _ := rec.encode(q.subject(rec.ID), rec.ID+":1:other", []byte("hi"))
	if _, err := q.publish(ctx, &pending{msg: m2}); !errors.Is(err, errConflict) {
		t.Fatalf("clashing publish: %v", err)
	}
	if got, err := q.Get(rec.ID); err != nil || got.Size != 2 {
		t.Fatalf("Get: %v %v", got, err)
	}
}

// leased is a message and the node that leased it.
type leased struct {
	m *queue.Message
	q *Queue
}

// leaseAny leases from any of qs until n messages came.
func leaseAny(qs []*Queue, n int, within time.Duration) []leased {
	var out []leased
	deadline := time.Now().Add(within)
	for len(out) < n && time.Now().Before(deadline) {
		for _, q := range qs {
			for _, m := range q.Lease(time.Now(), n-len(out)) {
				out = append(out, leased{m, q})
			}
		}
		if len(out) < n {
			time.Sleep(20 * time.Millisecond)
		}
	}
	return out
}

func TestOperatorsFleetWide(t *testing.T) {
	c := natstest.Start(t, 3)
	a := newQueue(t, connect(t, c), "a", nil)
	b := newQueue(t, connect(t, c), "b", nil)
	both := []*Queue{a, b}
	var ids []string
	for i := 0; i < 5; i++ {
		ids = append(ids, commit(t, a, []byte("x\r\n"), fmt.Sprintf("u%d@example.com", i)))
	}
	multi := commit(t, b, []byte("y\r\n"), "v@example.net", "w@example.com")
	ids = append(ids, multi)

	// Defer everything, as failed deliveries would, on whichever node.
	got := leaseAny(both, 6, 15*time.Second)
	if len(got) != 6 {
		t.Fatalf("leased %d of 6", len(got))
	}
	later := time.Now().Add(time.Hour)
	for _, l := range got {
		for i := range l.m.Rcpts {
			l.m.Rcpts[i].Status = queue.Deferred
			l.m.Rcpts[i].Attempts = 1
			l.m.Rcpts[i].NextAttempt = later
		}
		if err := l.q.Update(l.m); err != nil {
			t.Fatal(err)
		}
	}

	// Both nodes read the fleet's queue.
	for _, q := range both {
		if m, err := q.Get(ids[0]); err != nil || m.Rcpts[0].Attempts != 1 {
			t.Fatalf("Get on %s: %+v %v", q.o.NodeName, m, err)
		}
		all, total := q.Select(queue.ListOptions{})
		if total != 6 || len(all) != 6 || all[0].ID != ids[0] {
			t.Fatalf("Select all: %d of %d", len(all), total)
		}
		for i := 1; i < len(all); i++ {
			if all[i-1].ID >= all[i].ID {
				t.Fatal("Select not oldest first")
			}
		}
		com, total := q.Select(queue.ListOptions{Domain: "example.com", Limit: 2})
		if total != 6 || len(com) != 2 || com[0].ID != ids[0] || com[1].ID != ids[1] {
			t.Fatalf("Select example.com limit 2: %d of %d", len(com), total)
		}
		if net, total := q.Select(queue.ListOptions{Domain: "example.net"}); total != 1 || net[0].ID != multi {
			t.Fatalf("Select example.net: %d", total)
		}
		sum := q.Summary(time.Now())
		if sum.Total != 6 || len(sum.Domains) != 2 || sum.Domains[0].Domain != "example.com" || sum.Domains[0].Total != 6 ||
			sum.Domains[1].Total != 1 || sum.Ages[0] != 6 {
			t.Fatalf("Summary: %+v", sum)
		}
		if old, ok := q.Oldest(); !ok || old.After(time.Now()) || time.Since(old) > time.Minute {
			t.Fatalf("Oldest: %v %v", old, ok)
		}
	}
	b.HoldDomain("example.org", time.Now().Add(time.Hour))
	b.HoldDomain("example.org", time.Time{})
	if s := b.Summary(time.Now()); !s.Domains[0].HeldUntil.IsZero() {
		t.Fatal("hold not ended")
	}

	// Retry on b: the message comes due at once, history kept.
	if err := b.Retry(ids[0]); err != nil {
		t.Fatal(err)
	}
	r := leaseAny(both, 1, 10*time.Second)
	if len(r) != 1 || r[0].m.ID != ids[0] || r[0].m.Rcpts[0].Attempts != 1 {
		t.Fatalf("after Retry leased %v", r)
	}
	holder, other := r[0].q, a
	if holder == a {
		other = b
	}

	// LeaseID on the other node while one holds the lease: refused.
	// The other node's Delete wins, and the holder's update does not
	// bring the message back.
	if _, err := other.LeaseID(ids[0]); !errors.Is(err, queue.ErrLeased) {
		t.Fatalf("LeaseID of a message leased elsewhere: %v", err)
	}
	if err := other.Delete(ids[0]); err != nil {
		t.Fatal(err)
	}
	m := r[0].m
	m.Rcpts[0].NextAttempt = time.Now().Add(time.Minute)
	if err := holder.Update(m); !errors.Is(err, queue.ErrNotFound) {
		t.Fatalf("update of a deleted message: %v", err)
	}
	if _, err := a.Get(ids[0]); !errors.Is(err, queue.ErrNotFound) {
		t.Fatalf("deleted message resurrected: %v", err)
	}
	waitLen(t, a, 5)

	// Operator bounce on b: LeaseID, then Update with all bounced.
	m, err := b.LeaseID(ids[1])
	if err != nil {
		t.Fatal(err)
	}
	if _, err := a.LeaseID(ids[1]); !errors.Is(err, queue.ErrLeased) {
		t.Fatalf("second LeaseID: %v", err)
	}
	if err := a.Retry(ids[1]); !errors.Is(err, queue.ErrLeased) {
		t.Fatalf("Retry under an operator's lease: %v", err)
	}
	for i := range m.Rcpts {
		m.Rcpts[i].Status = queue.Bounced
	}
	if err := b.Update(m); err != nil {
		t.Fatal(err)
	}
	waitLen(t, a, 4)
	// The lock is gone: a can take the next one.
	_, err = a.LeaseID(ids[2])
	if err != nil {
		t.Fatal(err)
	}
	a.Release(ids[2])

	// RetryDomain from b: the messages all in example.com (not the
	// multi-domain one) come due at once.
	if n := b.RetryDomain("example.com"); n != 3 {
		t.Fatalf("RetryDomain released %d, want 3", n)
	}
	due := leaseAny(both, 3, 10*time.Second)
	if len(due) != 3 {
		t.Fatalf("after RetryDomain leased %d of 3", len(due))
	}
	for _, l := range due {
		if l.m.ID == multi {
			t.Fatal("RetryDomain took a multi-domain message")
		}
		deliverAll(t, l.q, l.m)
	}
	waitLen(t, a, 1)
	if err := a.Delete(multi); err != nil {
		t.Fatal(err)
	}
	waitLen(t, a, 0)
	if err := a.Delete(multi); !errors.Is(err, queue.ErrNotFound) {
		t.Fatalf("second Delete: %v", err)
	}
}

func TestSmallMaxPayload(t *testing.T) {
	c := natstest.StartWith(t, 3, func(_ int, o *server.Options) { o.MaxPayload = 64 << 10 })
	nc := connect(t, c)
	if nc.MaxPayload() != 64<<10 {
		t.Fatalf("max_payload %d", nc.MaxPayload())
	}
	q := newQueue(t, nc, "a", nil) // InlineBodyBytes: 256 KiB
	body := bigBody(63 << 10)      // under the inline bound, not under max_payload with its metadata
	id := commit(t, q, body, "r@example.com")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	rec, err := q.getRecord(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if rec.Body == "" {
		t.Fatal("body inline although it does not fit under max_payload")
	}
	big := commit(t, q, bigBody(300<<10), "r@example.com")
	got := leaseN(q, 2, 10*time.Second)
	if len(got) != 2 {
		t.Fatal("not leased")
	}
	for _, m := range got {
		if b := readBody(t, q, m.ID); int64(len(b)) != m.Size || (m.ID == id && !bytes.Equal(b, body)) {
			t.Fatalf("%s: body of %d bytes", m.ID, len(b))
		}
		// A new version (deferral) stays under max_payload too.
		m.Rcpts[0].Status = queue.Deferred
		m.Rcpts[0].LastError = strings.Repeat("e", 1000)
		m.Rcpts[0].NextAttempt = time.Now()
		if err := q.Update(m); err != nil {
			t.Fatal(err)
		}
	}
	again := leaseN(q, 2, 10*time.Second)
	if len(again) != 2 {
		t.Fatal("deferred messages not leased again")
	}
	for _, m := range again {
		deliverAll(t, q, m)
	}
	waitLen(t, q, 0)
	_ = big
}

// With a quorum of the NATS servers gone, nothing is acknowledged: a
// commit fails (no 250), and an update is kept (Requeue) with its lease
// renewed, and lands once the quorum is back.
func TestQuorumLost(t *testing.T) {
	c := natstest.Start(t, 3)
	q := newQueue(t, connect(t, c), "a", func(o *Options) { o.OpTimeout = 3 * time.Second })
	id := commit(t, q, []byte("x\r\n"), "a@example.com", "b@example.org")
	m := leaseN(q, 1, 10*time.Second)
	if len(m) != 1 {
		t.Fatal("not leased")
	}
	c.Shutdown(1)
	c.Shutdown(2)
	start := time.Now()
	if _, err := q.Enqueue(queue.Envelope{Rcpts: []queue.RcptSpec{{Addr: "c@example.com"}}}, strings.NewReader("y\r\n")); err == nil {
		t.Fatal("commit acknowledged without a quorum")
	}
	t.Logf("commit failed after %v", time.Since(start).Round(time.Millisecond))
	m[0].Rcpts[0].Status = queue.Delivered
	m[0].Rcpts[1].Status = queue.Deferred
	m[0].Rcpts[1].Attempts = 1
	m[0].Rcpts[1].NextAttempt = time.Now().Add(time.Hour)
	err := q.Update(m[0])
	if err == nil || errors.Is(err, queue.ErrNotFound) {
		t.Fatalf("update without a quorum: %v", err)
	}
	q.Requeue(m[0])
	if !q.Leased(id) {
		t.Fatal("requeued message not held")
	}
	c.Restart(1)
	deadline := time.Now().Add(30 * time.Second)
	for {
		got, err := q.Get(id)
		if err == nil && got.Rcpts[0].Status == queue.Delivered && got.Rcpts[1].Attempts == 1 && !q.Leased(id) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("requeued update never landed: %+v %v", got, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("update landed %v after the server shutdowns", time.Since(start).Round(time.Millisecond))
	// The recipient delivered is not delivered again, and the commit
	// that got no answer (stored after all once the quorum was back)
	// was taken out again: its client sends it anew.
	if again := leaseN(q, 1, testAckWait+time.Second); len(again) != 0 {
		t.Fatalf("leased again: %+v", again[0].Rcpts)
	}
	waitLen(t, q, 1)
}

// Close hands the messages fetched but not leased back at once: another
// node gets them without waiting for AckWait.
func TestCloseHandsBack(t *testing.T) {
	c := natstest.Start(t, 3)
	a := newQueue(t, connect(t, c), "a", nil)
	for i := 0; i < 5; i++ {
		commit(t, a, []byte("x\r\n"), fmt.Sprintf("r%d@example.com", i))
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		a.mu.Lock()
		n := len(a.ready)
		a.mu.Unlock()
		if n == 5 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a holds %d of 5 ready", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	b := newQueue(t, connect(t, c), "b", nil)
	if err := a.Close(); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	got := leaseN(b, 5, 10*time.Second)
	if len(got) != 5 {
		t.Fatalf("b leased %d of 5", len(got))
	}
	if d := time.Since(start); d > testAckWait {
		t.Fatalf("b waited %v: not handed back at Close", d)
	}
	for _, m := range got {
		deliverAll(t, b, m)
	}
	waitLen(t, b, 0)
}

func TestSweepBodies(t *testing.T) {
	c := natstest.Start(t, 3)
	q := newQueue(t, connect(t, c), "a", func(o *Options) { o.InlineBodyBytes = 1 << 10 })
	id := commit(t, q, bigBody(8<<10), "r@example.com")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// A body whose commit never happened (its node died in between).
	orphan := q.ids.Next(time.Now()) + "-dead"
	if _, err := q.bodies.PutBytes(ctx, orphan, []byte("lost")); err != nil {
		t.Fatal(err)
	}
	if n, err := q.SweepBodies(ctx, time.Hour); err != nil || n != 0 {
		t.Fatalf("sweep of young objects: %d %v", n, err)
	}
	n, err := q.SweepBodies(ctx, 0)
	if err != nil || n != 1 {
		t.Fatalf("sweep: %d %v", n, err)
	}
	if _, err := q.bodies.GetInfo(ctx, orphan); !errors.Is(err, jetstream.ErrObjectNotFound) {
		t.Fatalf("orphan still there: %v", err)
	}
	if b, err := q.Body(id); err != nil || b.Size() != 8<<10 {
		t.Fatalf("live body swept: %v", err)
	}
}
