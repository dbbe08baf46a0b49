package queue

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The crash child: a queue under a steady mix of submissions, deliveries
// and deferrals with tiny segments, so that compaction runs all the
// time, and index checkpoints are written every few milliseconds. It
// reports each acknowledged step on stdout, one line each:
//
//	A id      Commit returned: the message is queued
//	d id      a delivery's Update is about to start (in flight)
//	D id      that Update returned: the message is gone for good
//	S id n    a deferral with n attempts is durable
//	C n       compactions so far
//
// The parent kills it with SIGKILL at a random moment.
const crashChildEnv = "STSRELAY_QUEUE_CRASH_CHILD"

func TestMain(m *testing.M) {
	if dir := os.Getenv(crashChildEnv); dir != "" {
		crashChild(dir)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func crashChild(dir string) {
	s, err := Open(Options{Dir: dir, Schedule: Schedule{Retry: []time.Duration{time.Hour}, MaxQueueTime: 120 * time.Hour},
		SegmentBytes: 32 << 10, compactTick: time.Millisecond, CheckpointInterval: 30 * time.Millisecond})
	if err != nil {
		fmt.Println("E", err)
		os.Exit(3)
	}
	// Unbuffered: a line is out before the next step starts.
	say := func(format string, a ...any) { fmt.Fprintf(os.Stdout, format+"\n", a...) }
	body := strings.Repeat("c", 1500)
	var deferred []string
	for i := 0; ; i++ {
		w := s.NewWriter()
		w.Write([]byte(body))
		id, err := w.Commit(Envelope{From: "a@x.test", Rcpts: []RcptSpec{{Addr: fmt.Sprintf("u%d@d%d.test", i, i%3)}}})
		if err != nil {
			continue
		}
		say("A %s", id)
		m, err := s.LeaseID(id)
		if err != nil {
			continue
		}
		if i%5 == 0 {
			// Deferred: stays, and is deferred again now and then.
			m.Rcpts[0].Status = Deferred
			m.Rcpts[0].Attempts = 1
			m.Rcpts[0].NextAttempt = time.Now().Add(time.Hour)
			if s.Update(m) == nil {
				say("S %s 1", id)
				deferred = append(deferred, id)
			}
		} else {
			for j := range m.Rcpts {
				m.Rcpts[j].Status = Delivered
			}
			say("d %s", id)
			if s.Update(m) == nil {
				say("D %s", id)
			}
		}
		if len(deferred) > 0 && i%7 == 0 {
			old := deferred[rand.IntN(len(deferred))]
			if m, err := s.LeaseID(old); err == nil {
				m.Rcpts[0].Attempts++
				n := m.Rcpts[0].Attempts
				if s.Update(m) == nil {
					say("S %s %d", old, n)
				}
			}
		}
		if i%50 == 0 {
			say("C %d", s.Stats().Compactions)
		}
	}
}

// kill -9 at random points while compaction runs: everything
// acknowledged is there after recovery, with at least its acknowledged
// history, and nothing whose removal was acknowledged comes back.
func TestKillDuringCompaction(t *testing.T) {
	dir := t.TempDir()
	iterations := 12
	if testing.Short() {
		iterations = 4
	}
	totalCompactions, fullScans := 0, 0
	queued := map[string]bool{}   // acknowledged and not (maybe) removed
	attempts := map[string]int{}  // acknowledged attempts
	removed := map[string]bool{}  // removal acknowledged
	inFlight := map[string]bool{} // removal started
	for it := range iterations {
		cmd := exec.Command(os.Args[0], "-test.run=^$")
		cmd.Env = append(os.Environ(), crashChildEnv+"="+dir)
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		lines := make(chan string, 1024)
		go func() {
			sc := bufio.NewScanner(stdout)
			for sc.Scan() {
				lines <- sc.Text()
			}
			close(lines)
		}()
		killAt := time.After(time.Duration(150+rand.IntN(400)) * time.Millisecond)
		compactions := 0
	read:
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					break read
				}
				f := strings.Fields(l)
				switch f[0] {
				case "A":
					queued[f[1]] = true
				case "d":
					inFlight[f[1]] = true
				case "D":
					removed[f[1]] = true
					delete(queued, f[1])
				case "S":
					n, _ := strconv.Atoi(f[2])
					attempts[f[1]] = max(attempts[f[1]], n)
				case "C":
					compactions, _ = strconv.Atoi(f[1])
				case "E":
					t.Fatalf("child: %s", l)
				}
			case <-killAt:
				cmd.Process.Kill() // SIGKILL: no Close, no checkpoint
				killAt = nil
			}
		}
		cmd.Wait()
		totalCompactions += compactions
		if it%3 == 2 {
			// Recovery without a checkpoint reads the whole log.
			os.Remove(filepath.Join(dir, "index.ckpt"))
		}

		s, err := Open(Options{Dir: dir, Schedule: Schedule{Retry: []time.Duration{time.Hour}, MaxQueueTime: 120 * time.Hour}, ReadOnly: true})
		if err != nil {
			t.Fatalf("iteration %d: recovery: %v", it, err)
		}
		present := map[string]*Message{}
		for _, m := range s.List() {
			if present[m.ID] != nil {
				t.Fatalf("iteration %d: %s listed twice", it, m.ID)
			}
			present[m.ID] = m
		}
		for id := range queued {
			if present[id] == nil && !inFlight[id] {
				t.Fatalf("iteration %d: acknowledged message %s lost", it, id)
			}
		}
		for id := range removed {
			if present[id] != nil {
				t.Fatalf("iteration %d: delivered message %s is back", it, id)
			}
		}
		for id, n := range attempts {
			if m := present[id]; m != nil && m.Rcpts[0].Attempts < n {
				t.Fatalf("iteration %d: %s has %d attempts after recovery, %d were acknowledged", it, id, m.Rcpts[0].Attempts, n)
			}
			if present[id] == nil && !removed[id] && !inFlight[id] {
				t.Fatalf("iteration %d: deferred message %s lost", it, id)
			}
		}
		for id := range present {
			if got, err := s.Body(id); err != nil || got.Size() != 1500 {
				t.Fatalf("iteration %d: body of %s: %v", it, id, err)
			}
		}
		if s.Stats().FullScan {
			fullScans++
		}
		s.Close()
	}
	if fullScans == 0 || fullScans == iterations {
		t.Fatalf("%d of %d recoveries by full scan: want both kinds", fullScans, iterations)
	}
	if totalCompactions == 0 {
		t.Fatal("no compaction ran in any iteration: the test proved nothing")
	}
	t.Logf("%d iterations, %d compactions, %d recoveries by full scan (the rest from a checkpoint), %d messages queued at the end",
		iterations, totalCompactions, fullScans, len(queued))
}
