package jsqueue

import (
	"bytes"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/fleet/natstest"
	"github.com/stsrelay/stsrelay/queue"
)

// BenchmarkCommit: commits of a 2 KiB message on an in-process 3-node
// R3 cluster, from 16 goroutines; reports p50/p99 time to the publish
// ack (the 250).
func BenchmarkCommit(b *testing.B) {
	c := natstest.Start(b, 3)
	nc := connectB(b, c)
	q, err := New(b.Context(), nc, Options{Prefix: "bench", AckWait: 30 * time.Second, TempDir: b.TempDir()})
	if err != nil {
		b.Fatal(err)
	}
	defer q.Close()
	body := bytes.Repeat([]byte("x"), 2<<10)
	env := queue.Envelope{From: "s@example.org", Rcpts: []queue.RcptSpec{{Addr: "r@example.com"}}}
	var mu sync.Mutex
	var lat []time.Duration
	b.SetParallelism(8)
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		var mine []time.Duration
		for pb.Next() {
			t0 := time.Now()
			if _, err := q.Enqueue(env, bytes.NewReader(body)); err != nil {
				b.Error(err)
				return
			}
			mine = append(mine, time.Since(t0))
		}
		mu.Lock()
		lat = append(lat, mine...)
		mu.Unlock()
	})
	b.StopTimer()
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	if len(lat) > 0 {
		b.ReportMetric(float64(lat[len(lat)/2].Microseconds()), "p50-µs")
		b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
	}
}

// BenchmarkLeaseUpdate: lease and deliver (Update, all final) queued
// messages on one node.
func BenchmarkLeaseUpdate(b *testing.B) {
	c := natstest.Start(b, 3)
	nc := connectB(b, c)
	q, err := New(b.Context(), nc, Options{Prefix: "bench", AckWait: 30 * time.Second, TempDir: b.TempDir(), Prefetch: 512})
	if err != nil {
		b.Fatal(err)
	}
	defer q.Close()
	env := queue.Envelope{From: "s@example.org", Rcpts: []queue.RcptSpec{{Addr: "r@example.com"}}}
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < b.N; i += 8 {
				if _, err := q.Enqueue(env, bytes.NewReader([]byte("hello\r\n"))); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	b.ResetTimer()
	done := 0
	var uw sync.WaitGroup
	deadline := time.Now().Add(time.Minute)
	for done < b.N && time.Now().Before(deadline) {
		for _, m := range q.Lease(time.Now(), 256) {
			m.Rcpts[0].Status = queue.Delivered
			uw.Add(1)
			if err := q.UpdateAsync(m, func(err error) {
				if err != nil {
					b.Error(err)
				}
				uw.Done()
			}); err != nil {
				b.Fatal(err)
			}
			done++
		}
		if done < b.N {
			select {
			case <-q.Wake():
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
	uw.Wait()
}
