package queue

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sort"
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
// 2 KiB messages, from the index checkpoint and by a full scan of the
// log (no checkpoint: after a crash long after the last one). The
// restart-time target is under 2 s at a million.
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
	for _, mode := range []string{"checkpoint", "fullscan"} {
		b.Run(mode, func(b *testing.B) {
			for b.Loop() {
				if mode == "fullscan" {
					b.StopTimer()
					os.Remove(filepath.Join(dir, "index.ckpt"))
					b.StartTimer()
				}
				s, err := Open(Options{Dir: dir, Schedule: Schedule{MaxQueueTime: time.Hour}})
				if err != nil {
					b.Fatal(err)
				}
				if s.Len() != n || s.Stats().FullScan != (mode == "fullscan") {
					b.Fatalf("recovered %d messages (full scan %v), want %d", s.Len(), s.Stats().FullScan, n)
				}
				b.StopTimer()
				s.Close()
				b.StartTimer()
			}
		})
	}
}

// BenchmarkIndexBytesPerMessage reports the heap the in-memory index
// takes per queued message (issue #12: at most 100).
func BenchmarkIndexBytesPerMessage(b *testing.B) {
	var per float64
	for b.Loop() {
		per = indexBytesPerMessage(b, 1_000_000)
	}
	b.ReportMetric(per, "bytes/msg")
}

// BenchmarkCompaction measures copying live messages forward: a log of
// 2 KiB messages in which every fourth one is still queued is compacted
// until it is within its bound.
func BenchmarkCompaction(b *testing.B) {
	body := bytes.Repeat([]byte("x"), 2048)
	var copied uint64
	var elapsed time.Duration
	for range b.N {
		b.StopTimer()
		dir := b.TempDir()
		s, err := Open(Options{Dir: dir, Schedule: Schedule{MaxQueueTime: time.Hour}, SegmentBytes: 1 << 20, compactTick: time.Hour})
		if err != nil {
			b.Fatal(err)
		}
		for i := range 20000 {
			id, err := s.Enqueue(Envelope{From: "a@x.test", Rcpts: []RcptSpec{{Addr: "u@dest.test"}}}, bytes.NewReader(body))
			if err != nil {
				b.Fatal(err)
			}
			if i%4 != 0 {
				m, _ := s.LeaseID(id)
				m.Rcpts[0].Status = Delivered
				if err := s.Update(m); err != nil {
					b.Fatal(err)
				}
			}
		}
		before := s.Stats().Copied
		b.StartTimer()
		start := time.Now()
		for s.compactOnce() {
		}
		elapsed += time.Since(start)
		b.StopTimer()
		copied += s.Stats().Copied - before
		s.Close()
		b.StartTimer()
	}
	b.ReportMetric(float64(copied)/elapsed.Seconds(), "msgs/s")
	b.ReportMetric(float64(copied)*2048/elapsed.Seconds()/(1<<20), "MB/s")
}

// BenchmarkCommitLatencyDuringCompaction measures time-to-250 (Commit
// returning) of 32 concurrent submitters on a queue whose log needs
// compaction, with compaction running and held off, side by side:
// compaction shares group commits with submissions and copies at most
// compactBatchBytes per commit, so p99 should barely move.
func BenchmarkCommitLatencyDuringCompaction(b *testing.B) {
	body := bytes.Repeat([]byte("y"), 2048)
	for _, mode := range []string{"idle", "compacting"} {
		b.Run(mode, func(b *testing.B) {
			tick := time.Hour
			if mode == "compacting" {
				tick = time.Millisecond
			}
			var lat []time.Duration
			var mu sync.Mutex
			var copied uint64
			for range b.N {
				b.StopTimer()
				s, err := Open(Options{Dir: b.TempDir(), Schedule: Schedule{MaxQueueTime: time.Hour}, SegmentBytes: 1 << 20, compactTick: time.Hour})
				if err != nil {
					b.Fatal(err)
				}
				// A log of 20 MB in which every fourth message is live.
				for i := range 10000 {
					id, err := s.Enqueue(Envelope{From: "a@x.test", Rcpts: []RcptSpec{{Addr: "u@dead.test"}}}, bytes.NewReader(body))
					if err != nil {
						b.Fatal(err)
					}
					if i%4 != 0 {
						m, _ := s.LeaseID(id)
						m.Rcpts[0].Status = Delivered
						s.Update(m)
					}
				}
				s.Close()
				s, err = Open(Options{Dir: s.opts.Dir, Schedule: Schedule{MaxQueueTime: time.Hour}, SegmentBytes: 1 << 20, compactTick: tick})
				if err != nil {
					b.Fatal(err)
				}
				before := s.Stats().Copied
				b.StartTimer()
				var wg sync.WaitGroup
				for range 32 {
					wg.Add(1)
					go func() {
						defer wg.Done()
						for range 100 {
							t0 := time.Now()
							if _, err := s.Enqueue(Envelope{From: "a@x.test", Rcpts: []RcptSpec{{Addr: "u@live.test"}}}, bytes.NewReader(body)); err != nil {
								b.Error(err)
								return
							}
							d := time.Since(t0)
							mu.Lock()
							lat = append(lat, d)
							mu.Unlock()
						}
					}()
				}
				wg.Wait()
				b.StopTimer()
				copied += s.Stats().Copied - before
				s.Close()
				b.StartTimer()
			}
			sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds())/1000, "p99-ms")
			b.ReportMetric(float64(copied)/float64(b.N), "copied/op")
		})
	}
}
