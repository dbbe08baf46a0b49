package jsqueue_test

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/stsrelay/stsrelay/delivery"
	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/fleet/jsqueue"
	"github.com/stsrelay/stsrelay/internal/fleet/natstest"
	"github.com/stsrelay/stsrelay/internal/testworld"
	"github.com/stsrelay/stsrelay/internal/testworld/worldres"
	"github.com/stsrelay/stsrelay/queue"
)

// The delivery engine runs unchanged on the fleet queue: two relays (two
// queues, two engines) share one queue on a 3-node cluster, deliver every
// message once, bounce what the destination refuses with a DSN, and leave
// the queue empty.
func TestDeliveryEngineOnFleetQueue(t *testing.T) {
	w := testworld.New(t)
	dest := w.Mailbox("dest.test")
	senders := w.Mailbox("sender.test")
	refuse := w.NewMX(testworld.MXOptions{Hostname: "mx.refuse.test", Cert: w.CA.Issue(testworld.CertValid, "mx.refuse.test"),
		Script: func(c testworld.Command) *testworld.Reply {
			if c.Verb == "RCPT" {
				return &testworld.Reply{Code: 550, Enhanced: "5.1.1", Text: "no such user"}
			}
			return nil
		}})
	w.DNS.SetMX("refuse.test", testworld.MX{Pref: 10, Host: "mx.refuse.test"})
	w.DNS.SetA("mx.refuse.test", refuse.IP())

	c := natstest.Start(t, 3)
	cfg := config.Default()
	cfg.Hostname = "relay.test"
	cfg.Delivery.Port = w.MXPort()
	cfg.Delivery.ConnectTimeout.Duration = 5 * time.Second
	cfg.Delivery.CommandTimeout.Duration = 10 * time.Second
	res := worldres.New(t, w)
	var qs []*jsqueue.Queue
	ctx, cancel := context.WithCancel(context.Background())
	var done []chan struct{}
	for i, node := range []string{"relay-a", "relay-b"} {
		nc, err := nats.Connect(c.URL(), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(nc.Close)
		octx, ocancel := context.WithTimeout(context.Background(), 30*time.Second)
		q, err := jsqueue.New(octx, nc, jsqueue.Options{Prefix: "relay", NodeName: node, AckWait: 3 * time.Second,
			InlineBodyBytes: 16 << 10, TempDir: t.TempDir(),
			Schedule: queue.Schedule{Retry: []time.Duration{time.Hour}, MaxQueueTime: cfg.Queue.MaxQueueTime.Duration}})
		ocancel()
		if err != nil {
			t.Fatal(err)
		}
		qs = append(qs, q)
		e := delivery.New(delivery.Options{Config: cfg, Store: q, Resolver: res, Roots: w.CA.Pool()})
		d := make(chan struct{})
		done = append(done, d)
		go func() { e.Run(ctx); close(d) }()
		_ = i
	}
	defer func() {
		cancel()
		for _, d := range done {
			<-d
		}
		for _, q := range qs {
			q.Close()
		}
	}()

	const n, bounced = 30, 3
	for i := 0; i < n; i++ {
		body := fmt.Sprintf("Subject: m%d\r\nMessage-Id: <m%d@sender.test>\r\n\r\nbody %d\r\n", i, i, i)
		if i%10 == 0 {
			body += strings.Repeat("a large body line, stored in the object store\r\n", 1000)
		}
		rcpt := fmt.Sprintf("u%d@dest.test", i)
		if i < bounced {
			rcpt = fmt.Sprintf("u%d@refuse.test", i)
		}
		if _, err := qs[i%2].Enqueue(queue.Envelope{From: "s@sender.test", Rcpts: []queue.RcptSpec{{Addr: rcpt}}},
			strings.NewReader(body)); err != nil {
			t.Fatal(err)
		}
	}
	dest.WaitMessages(t, n-bounced, 30*time.Second)
	dsns := senders.WaitMessages(t, bounced, 30*time.Second)
	deadline := time.Now().Add(15 * time.Second)
	for qs[0].Len() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d messages left in the queue", qs[0].Len())
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond) // any duplicate would show now
	got := dest.Messages()
	if len(got) != n-bounced {
		t.Fatalf("destination got %d messages, want %d", len(got), n-bounced)
	}
	seen := map[string]bool{}
	for _, m := range got {
		i := bytes.Index(m.Data, []byte("Message-Id: "))
		id := string(m.Data[i : i+bytes.IndexByte(m.Data[i:], '\n')])
		if seen[id] {
			t.Fatalf("%s delivered twice", id)
		}
		seen[id] = true
		if bytes.Contains(m.Data, []byte("Subject: m10\r\n")) && len(m.Data) < 40000 {
			t.Fatalf("large body cut to %d bytes", len(m.Data))
		}
	}
	if len(senders.Messages()) != bounced || !bytes.Contains(dsns[0].Data, []byte("5.1.1")) {
		t.Fatalf("DSNs: %d", len(senders.Messages()))
	}
}
