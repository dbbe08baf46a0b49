package queue

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BenchmarkEnqueue measures durable commits of 2 KiB messages by
// concurrent writers, as the submission server makes them. msgs/fsync
// shows how well group commit shares the disk's fsyncs.
func BenchmarkEnqueue(b *testing.B) {
	body := make([]byte, 2048)
	for i := range body {
		body[i] = 'a' + byte(i%26)
	}
	env := testEnv("rcpt@dest.test")
	for _, writers := range []int{1, 20, 100} {
		b.Run(fmt.Sprintf("writers=%d", writers), func(b *testing.B) {
			s := openStore(b, b.TempDir())
			var next atomic.Int64
			var wg sync.WaitGroup
			b.SetBytes(int64(len(body)))
			b.ResetTimer()
			start := time.Now()
			for range writers {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for next.Add(1) <= int64(b.N) {
						w := s.NewWriter()
						w.Write(body)
						if _, err := w.Commit(env); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			elapsed := time.Since(start)
			b.StopTimer()
			st := s.Stats()
			if st.Records != uint64(b.N) {
				b.Fatalf("Records = %d, want %d", st.Records, b.N)
			}
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "msgs/s")
			b.ReportMetric(float64(st.Records)/float64(max(st.Syncs, 1)), "msgs/fsync")
		})
	}
}

// BenchmarkFsync is the disk's limit: one 4 KiB append and fdatasync per
// operation, what a queue without group commit would pay per message.
func BenchmarkFsync(b *testing.B) {
	f, err := os.OpenFile(filepath.Join(b.TempDir(), "fsync"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	b.SetBytes(int64(len(buf)))
	b.ResetTimer()
	start := time.Now()
	for range b.N {
		if _, err := f.Write(buf); err != nil {
			b.Fatal(err)
		}
		if err := unix.Fdatasync(int(f.Fd())); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "fsyncs/s")
}

// BenchmarkRecover measures Open (recovery) of a queue holding 100,000
// 2 KiB messages: the restart-time target is under 2 s.
func BenchmarkRecover(b *testing.B) {
	dir := b.TempDir()
	s, err := Open(Options{Dir: dir, Schedule: Schedule{MaxQueueTime: time.Hour}})
	if err != nil {
		b.Fatal(err)
	}
	body := bytes.Repeat([]byte("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcd\r\n"), 32)
	const n, writers = 100000, 100
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range n / writers {
				env := Envelope{From: "app@sender.test", Rcpts: []RcptSpec{{Addr: fmt.Sprintf("u%d@dest.test", w)}}}
				if _, err := s.Enqueue(env, bytes.NewReader(body)); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	s.Close()
	b.ResetTimer()
	for b.Loop() {
		s, err := Open(Options{Dir: dir, Schedule: Schedule{MaxQueueTime: time.Hour}})
		if err != nil {
			b.Fatal(err)
		}
		if s.Len() != n {
			b.Fatalf("recovered %d messages, want %d", s.Len(), n)
		}
		s.Close()
	}
}
