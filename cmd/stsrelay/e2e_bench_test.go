package main

import (
	"bytes"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/testworld"
)

// BenchmarkE2EPipeline measures the whole pipeline on loopback: M 2 KiB
// messages submitted from 20 concurrent STARTTLS+AUTH sessions to one
// domain whose MX (STARTTLS, verified certificate) accepts everything.
// msgs/s is delivered messages per second from the first submission to
// the MX's last receipt; submit_msgs/s is the acknowledgement rate alone.
//
//	STSRELAY_E2E_NORACE=1 go test ./cmd/stsrelay/ -run '^$' -bench E2EPipeline -benchtime 1x
func BenchmarkE2EPipeline(b *testing.B) {
	const (
		m        = 2000
		sessions = 20
		size     = 2048
	)
	for range b.N {
		b.StopTimer()
		w := testworld.New(b)
		mx := simpleDomain(w, "ex.test")
		cfg := testConfig(b, w)
		cfg.Log.Level = "info"
		r := startRelay(b, cfg)
		bodies := make([][]byte, m)
		for i := range bodies {
			var buf bytes.Buffer
			fmt.Fprintf(&buf, "From: <s@client.test>\r\nTo: <u@ex.test>\r\nSubject: bench %d\r\nMessage-ID: <bench-%d@client.test>\r\n\r\n", i, i)
			for buf.Len() < size-2 {
				buf.WriteString("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\r\n")
			}
			bodies[i] = buf.Bytes()[:size-2]
			bodies[i] = append(bodies[i], "\r\n"...)
		}
		b.StartTimer()

		start := time.Now()
		var wg sync.WaitGroup
		errs := make(chan error, sessions)
		for k := range sessions {
			var idx []int
			for i := k; i < m; i += sessions {
				idx = append(idx, i)
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := submitSession(r.addr, bodies, idx, "u@ex.test", func(int, string) {}); err != nil {
					errs <- err
				}
			}()
		}
		wg.Wait()
		submitted := time.Since(start)
		close(errs)
		for err := range errs {
			b.Fatal(err)
		}
		got := mx.WaitMessages(b, m, 120*time.Second)
		last := got[0].Time
		for _, g := range got {
			if g.Time.After(last) {
				last = g.Time
			}
		}
		b.StopTimer()
		if len(got) != m {
			b.Fatalf("MX got %d messages, want %d", len(got), m)
		}
		elapsed := last.Sub(start)
		b.ReportMetric(float64(m)/elapsed.Seconds(), "msgs/s")
		b.ReportMetric(float64(m)/submitted.Seconds(), "submit_msgs/s")
		b.ReportMetric(float64(mx.Connections()), "mx_conns")
		b.StartTimer()
	}
}
