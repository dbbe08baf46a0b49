package queue

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/message"
)

// openStore opens a store in dir and closes it when the test ends.
func openStore(t testing.TB, dir string, opts ...func(*Options)) *Store {
	t.Helper()
	o := Options{Dir: dir, Schedule: Schedule{Retry: []time.Duration{5 * time.Minute}, MaxQueueTime: 120 * time.Hour}}
	for _, f := range opts {
		f(&o)
	}
	s, err := Open(o)
	if err != nil {
		t.Fatalf("Open(%s): %v", dir, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// reopen closes s and opens its directory again.
func reopen(t testing.TB, s *Store, opts ...func(*Options)) *Store {
	t.Helper()
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	return openStore(t, s.opts.Dir, opts...)
}

func testEnv(rcpts ...string) Envelope {
	env := Envelope{From: "app@sender.test", Body: "8BITMIME", User: "app", ClientIP: "192.0.2.7"}
	for _, r := range rcpts {
		env.Rcpts = append(env.Rcpts, RcptSpec{Addr: r})
	}
	return env
}

// commitBody commits body written in chunks of chunk bytes.
func commitBody(t testing.TB, s *Store, env Envelope, body []byte, chunk int) string {
	t.Helper()
	w := s.NewWriter()
	for len(body) > 0 {
		n := min(chunk, len(body))
		if _, err := w.Write(body[:n]); err != nil {
			t.Fatalf("Write: %v", err)
		}
		body = body[n:]
	}
	id, err := w.Commit(env)
	if err != nil {
		t.Fatalf("Commit: %v", err)
	}
	return id
}

func commitMsg(t testing.TB, s *Store, body string, rcpts ...string) string {
	t.Helper()
	if len(rcpts) == 0 {
		rcpts = []string{"rcpt@dest.test"}
	}
	return commitBody(t, s, testEnv(rcpts...), []byte(body), 4096)
}

func readBody(t testing.TB, s *Store, id string) []byte {
	t.Helper()
	r, err := s.Body(id)
	if err != nil {
		t.Fatalf("Body(%s): %v", id, err)
	}
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("read body of %s: %v", id, err)
	}
	return b
}

func randomBytes(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

func segFiles(t testing.TB, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(dir, "log"))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		if strings.HasSuffix(e.Name(), ".seg") {
			out = append(out, e.Name())
		}
	}
	sort.Strings(out)
	return out
}

func ids(msgs []*Message) []string {
	var out []string
	for _, m := range msgs {
		out = append(out, m.ID)
	}
	return out
}

func TestCommitSurvivesReopen(t *testing.T) {
	const mem = 64 << 10
	tests := []struct {
		name  string
		size  int
		chunk int
	}{
		{"empty body", 0, 1},
		{"small body in memory", 2000, 100},
		{"body exactly at the memory limit stays in memory", mem, 4096},
		{"body one past the memory limit spills", mem + 1, 4096},
		{"5 MiB body spills to the spool file", 5 << 20, 32<<10 + 7},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, dir, func(o *Options) { o.MemBodyBytes = mem })
			body := randomBytes(t, tt.size)
			env := testEnv("a@dest.test", "B@Other.test")
			env.Rcpts[0].Notify = []string{"FAILURE", "DELAY"}
			env.Rcpts[0].ORcpt = "rfc822;a@dest.test"
			env.SMTPUTF8 = true
			env.RequireTLS = true
			env.Ret = "HDRS"
			env.EnvID = "xyz"
			env.Kind = KindDSN
			before := time.Now()
			id := commitBody(t, s, env, body, tt.chunk)
			// Commit decides these by content, whatever the caller said.
			sc := message.NewScanner()
			sc.Write(body)
			env.SetContent(sc.Content())
			if !ValidID(id) {
				t.Fatalf("Commit returned invalid id %q", id)
			}
			if got := readBody(t, s, id); !bytes.Equal(got, body) {
				t.Fatalf("body before reopen differs (len %d, want %d)", len(got), len(body))
			}
			if ents, _ := os.ReadDir(filepath.Join(dir, "spool")); len(ents) != 0 {
				t.Errorf("spool holds %d files after commit, want none", len(ents))
			}

			s = reopen(t, s)
			m, err := s.Get(id)
			if err != nil {
				t.Fatalf("after reopen: Get(%s): %v", id, err)
			}
			if !reflect.DeepEqual(m.Env, env) {
				t.Errorf("envelope after reopen\n got %+v\nwant %+v", m.Env, env)
			}
			if m.Size != int64(tt.size) {
				t.Errorf("Size = %d, want %d", m.Size, tt.size)
			}
			if m.Received.Before(before.Truncate(time.Second)) || m.Received.After(time.Now()) {
				t.Errorf("Received = %v, not around the commit at %v", m.Received, before)
			}
			if len(m.Rcpts) != 2 || m.Rcpts[0].Status != Pending || m.Rcpts[1].Status != Pending ||
				m.Rcpts[1].Addr != "B@Other.test" || !m.Rcpts[0].NextAttempt.Equal(m.Received) {
				t.Errorf("recipients after reopen = %+v, want two pending, due at receipt", m.Rcpts)
			}
			if got := readBody(t, s, id); !bytes.Equal(got, body) {
				t.Fatalf("body after reopen differs (len %d, want %d)", len(got), len(body))
			}
		})
	}
}

func TestEnqueueFromReader(t *testing.T) {
	s := openStore(t, t.TempDir())
	body := randomBytes(t, 200<<10)
	id, err := s.Enqueue(Envelope{From: "", Kind: KindTLSRPT, Rcpts: []RcptSpec{{Addr: "tlsrpt@dest.test"}}}, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	s = reopen(t, s)
	m, err := s.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	if m.Env.Kind != KindTLSRPT || m.Env.From != "" {
		t.Errorf("envelope = %+v, want a null-sender TLS-RPT message", m.Env)
	}
	if !bytes.Equal(readBody(t, s, id), body) {
		t.Error("body differs")
	}
}

func TestCommitWithoutRecipientsFails(t *testing.T) {
	s := openStore(t, t.TempDir())
	w := s.NewWriter()
	w.Write([]byte("x"))
	if _, err := w.Commit(Envelope{From: "a@b.test"}); err == nil {
		t.Fatal("Commit without recipients succeeded")
	}
	if s.Len() != 0 {
		t.Fatalf("Len = %d, want 0", s.Len())
	}
}

func TestWriterUsedTwiceFails(t *testing.T) {
	s := openStore(t, t.TempDir())
	w := s.NewWriter()
	w.Write([]byte("x"))
	if _, err := w.Commit(testEnv("a@b.test")); err != nil {
		t.Fatal(err)
	}
	if _, err := w.Commit(testEnv("a@b.test")); err == nil {
		t.Fatal("second Commit on one Writer succeeded")
	}
	if s.Len() != 1 {
		t.Fatalf("Len = %d, want 1", s.Len())
	}
}

// recordBounds returns the [start, end) offsets of each whole record in a
// segment file.
func recordBounds(t *testing.T, path string) [][2]int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out [][2]int64
	var off int64
	end, err := scanSegment(f, func(r scanRecord) error {
		e := r.bodyOff + r.bodyLen
		out = append(out, [2]int64{off, e})
		off = e
		return nil
	})
	if err != nil || end != off {
		t.Fatalf("scan %s: end %d err %v", path, end, err)
	}
	return out
}

func TestRecoveryDropsTornTail(t *testing.T) {
	type damage func(t *testing.T, path string, last [2]int64)
	truncateAt := func(f func(last [2]int64) int64) damage {
		return func(t *testing.T, path string, last [2]int64) {
			if err := os.Truncate(path, f(last)); err != nil {
				t.Fatal(err)
			}
		}
	}
	appendBytes := func(b []byte) damage {
		return func(t *testing.T, path string, last [2]int64) {
			f, err := os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.Write(b); err != nil {
				t.Fatal(err)
			}
		}
	}
	flipAt := func(f func(last [2]int64) int64) damage {
		return func(t *testing.T, path string, last [2]int64) {
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			b[f(last)] ^= 0x40
			if err := os.WriteFile(path, b, 0o640); err != nil {
				t.Fatal(err)
			}
		}
	}
	// A header whose magic is right, announcing a body that never came.
	var hdr [headerLen]byte
	putHeader(hdr[:], recMessage, 10, 1000, 0)

	tests := []struct {
		name string
		// keepLast says whether the last whole record survives.
		keepLast bool
		damage   damage
	}{
		{"garbage after whole records is cut off", true, appendBytes([]byte("\x00garbage\xffgarbage"))},
		{"zeros after whole records (size grew, data never written) are cut off", true, appendBytes(make([]byte, 4096))},
		{"a header without its record is cut off", true, appendBytes(hdr[:])},
		{"record cut inside its header is dropped", false, truncateAt(func(l [2]int64) int64 { return l[0] + 7 })},
		{"record cut inside its metadata is dropped", false, truncateAt(func(l [2]int64) int64 { return l[0] + headerLen + 5 })},
		{"record cut inside its body is dropped", false, truncateAt(func(l [2]int64) int64 { return (l[0] + l[1]) / 2 })},
		{"record cut one byte short is dropped", false, truncateAt(func(l [2]int64) int64 { return l[1] - 1 })},
		{"record with a flipped body byte fails its CRC and is dropped", false, flipAt(func(l [2]int64) int64 { return l[1] - 3 })},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openStore(t, dir)
			var want []string
			var bodies [][]byte
			for i := range 4 {
				b := randomBytes(t, 3000+i)
				bodies = append(bodies, b)
				want = append(want, commitBody(t, s, testEnv("r@dest.test"), b, 4096))
			}
			torn := want[3]
			if err := s.Close(); err != nil {
				t.Fatal(err)
			}
			// A crash writes no index checkpoint: recovery reads the log.
			if err := os.Remove(filepath.Join(dir, "index.ckpt")); err != nil {
				t.Fatal(err)
			}
			segs := segFiles(t, dir)
			if len(segs) != 1 {
				t.Fatalf("want all records in one segment, have %v", segs)
			}
			path := filepath.Join(dir, "log", segs[0])
			bounds := recordBounds(t, path)
			if len(bounds) != 4 {
				t.Fatalf("segment holds %d records, want 4", len(bounds))
			}
			last := bounds[3]
			tt.damage(t, path, last)
			wantSize := last[0]
			if tt.keepLast {
				wantSize = last[1]
			} else {
				want = want[:3]
			}

			s = openStore(t, dir)
			if got := ids(s.List()); !reflect.DeepEqual(got, want) {
				t.Fatalf("after recovery the queue holds %q, want %q", got, want)
			}
			for i, id := range want {
				if !bytes.Equal(readBody(t, s, id), bodies[i]) {
					t.Errorf("body of %s differs after recovery", id)
				}
			}
			if fi, err := os.Stat(path); err != nil || fi.Size() != wantSize {
				t.Fatalf("torn segment: size %v err %v, want it cut back to %d", fi.Size(), err, wantSize)
			}

			// The queue goes on: a new commit survives another reopen, and
			// the torn message stays gone.
			newID := commitMsg(t, s, "after the crash")
			s = reopen(t, s)
			if got, want := ids(s.List()), append(want, newID); !reflect.DeepEqual(got, want) {
				t.Fatalf("after second reopen the queue holds %q, want %q", got, want)
			}
			if !tt.keepLast {
				if _, err := s.Get(torn); !errors.Is(err, ErrNotFound) {
					t.Fatalf("torn message %s: Get err = %v, want ErrNotFound", torn, err)
				}
			}
			if got := string(readBody(t, s, newID)); got != "after the crash" {
				t.Fatalf("body of the post-crash message = %q", got)
			}
		})
	}
}

func TestRecoveryOfTornStateRecordKeepsEarlierState(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	id := commitMsg(t, s, "body", "a@dest.test", "b@dest.test")
	now := time.Now()
	m := s.Lease(now, 1)[0]
	m.Rcpts[0].Status = Delivered
	m.Rcpts[1].Status = Deferred
	m.Rcpts[1].Attempts = 1
	m.Rcpts[1].NextAttempt = now.Add(time.Hour)
	if err := s.Update(m); err != nil {
		t.Fatal(err)
	}
	m = s.Lease(now.Add(2*time.Hour), 1)[0]
	m.Rcpts[1].Attempts = 2
	m.Rcpts[1].NextAttempt = now.Add(3 * time.Hour)
	if err := s.Update(m); err != nil {
		t.Fatal(err)
	}
	s.Close()
	path := filepath.Join(dir, "log", segFiles(t, dir)[len(segFiles(t, dir))-1])
	bounds := recordBounds(t, path)
	last := bounds[len(bounds)-1]
	if err := os.Truncate(path, last[1]-2); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir)
	got, err := s.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	if got.Rcpts[1].Attempts != 1 || !got.Rcpts[1].NextAttempt.Equal(now.Add(time.Hour)) || got.Rcpts[0].Status != Delivered {
		t.Fatalf("after losing the last state record, recipients = %+v; want the first update's state", got.Rcpts)
	}
}

func TestRecipientStatesSurviveReopen(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	id := commitMsg(t, s, "hello", "done@dest.test", "later@dest.test", "bounce@dest.test")
	now := time.Now()
	leased := s.Lease(now, 10)
	if len(leased) != 1 || leased[0].ID != id {
		t.Fatalf("Lease = %q, want [%s]", ids(leased), id)
	}
	m := leased[0]
	next := now.Add(30 * time.Minute).Round(0)
	m.Rcpts[0].Status = Delivered
	m.Rcpts[0].Attempts = 1
	m.Rcpts[0].LastCode = 250
	m.Rcpts[0].LastMX = "mx1.dest.test"
	m.Rcpts[1].Status = Deferred
	m.Rcpts[1].Attempts = 1
	m.Rcpts[1].NextAttempt = next
	m.Rcpts[1].LastAttempt = now
	m.Rcpts[1].LastCode = 451
	m.Rcpts[1].LastEnhanced = "4.7.1"
	m.Rcpts[1].LastError = "greylisted"
	m.Rcpts[2].Status = Bounced
	m.Rcpts[2].LastCode = 550
	m.DelayNotified = true
	if err := s.Update(m); err != nil {
		t.Fatal(err)
	}
	want := m.Rcpts

	check := func(s *Store, when string) {
		t.Helper()
		got, err := s.Get(id)
		if err != nil {
			t.Fatalf("%s: Get: %v", when, err)
		}
		if len(got.Rcpts) != len(want) {
			t.Fatalf("%s: %d recipients, want %d", when, len(got.Rcpts), len(want))
		}
		for i := range want {
			g, w := got.Rcpts[i], want[i]
			if g.Status != w.Status || g.Attempts != w.Attempts || !g.NextAttempt.Equal(w.NextAttempt) ||
				!g.LastAttempt.Equal(w.LastAttempt) || g.LastCode != w.LastCode || g.LastEnhanced != w.LastEnhanced ||
				g.LastError != w.LastError || g.LastMX != w.LastMX || g.Addr != w.Addr {
				t.Errorf("%s: recipient %d\n got %+v\nwant %+v", when, i, g, w)
			}
		}
		if !got.DelayNotified {
			t.Errorf("%s: DelayNotified lost", when)
		}
		if d, ok := s.NextDue(); !ok || !d.Equal(next) {
			t.Errorf("%s: NextDue = %v %v, want the deferred recipient's %v", when, d, ok, next)
		}
		if l := s.Lease(now.Add(time.Minute), 10); len(l) != 0 {
			t.Errorf("%s: leased %q before the deferred recipient is due", when, ids(l))
		}
	}
	check(s, "before reopen")
	s = reopen(t, s)
	check(s, "after reopen")

	// Finishing the last recipient takes the message out of the queue.
	l := s.Lease(next, 10)
	if len(l) != 1 {
		t.Fatalf("Lease at the deferred time = %q, want the message", ids(l))
	}
	l[0].Rcpts[1].Status = Delivered
	if err := s.Update(l[0]); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(id); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after all recipients are final: Get err = %v, want ErrNotFound", err)
	}
	s = reopen(t, s)
	if _, err := s.Get(id); !errors.Is(err, ErrNotFound) {
		t.Fatalf("after reopen: finished message still there (err %v)", err)
	}
	if s.Len() != 0 {
		t.Fatalf("Len = %d, want 0", s.Len())
	}
}

func TestDeleteSurvivesReopen(t *testing.T) {
	s := openStore(t, t.TempDir())
	keep := commitMsg(t, s, "keep")
	del := commitMsg(t, s, "delete me")
	if err := s.Delete(del); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(del); !errors.Is(err, ErrNotFound) {
		t.Fatalf("second Delete err = %v, want ErrNotFound", err)
	}
	s = reopen(t, s)
	if got := ids(s.List()); !reflect.DeepEqual(got, []string{keep}) {
		t.Fatalf("after reopen the queue holds %q, want only %s", got, keep)
	}
}

func TestDeleteOfLeasedMessageMakesUpdateFail(t *testing.T) {
	s := openStore(t, t.TempDir())
	id := commitMsg(t, s, "x")
	m := s.Lease(time.Now(), 1)[0]
	if err := s.Delete(id); err != nil {
		t.Fatal(err)
	}
	m.Rcpts[0].Status = Deferred
	m.Rcpts[0].NextAttempt = time.Now().Add(time.Hour)
	if err := s.Update(m); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Update after Delete err = %v, want ErrNotFound", err)
	}
	if s.Len() != 0 {
		t.Fatalf("Len = %d, want 0", s.Len())
	}
}

func TestRetryMakesDueNow(t *testing.T) {
	clock := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	var mu sync.Mutex
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	s := openStore(t, t.TempDir(), func(o *Options) { o.Now = now })
	id := commitMsg(t, s, "x", "a@dest.test", "b@dest.test")
	received := now()
	m := s.Lease(now(), 1)[0]
	m.Rcpts[0].Status = Delivered
	m.Rcpts[1].Status = Deferred
	m.Rcpts[1].NextAttempt = now().Add(4 * time.Hour)
	if err := s.Update(m); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	clock = clock.Add(time.Minute)
	mu.Unlock()
	if l := s.Lease(now(), 1); len(l) != 0 {
		t.Fatal("deferred message leased before Retry")
	}
	if err := s.Retry(id); err != nil {
		t.Fatal(err)
	}
	if err := s.Retry("00000000000000"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Retry of unknown id err = %v, want ErrNotFound", err)
	}
	check := func(s *Store, when string) {
		t.Helper()
		got, err := s.Get(id)
		if err != nil {
			t.Fatal(err)
		}
		if got.Rcpts[0].Status != Delivered || !got.Rcpts[0].NextAttempt.Equal(received) {
			t.Errorf("%s: Retry touched the delivered recipient: %+v", when, got.Rcpts[0])
		}
		if !got.Rcpts[1].NextAttempt.Equal(now()) {
			t.Errorf("%s: deferred recipient due %v, want now %v", when, got.Rcpts[1].NextAttempt, now())
		}
		if l := s.Lease(now(), 1); len(l) != 1 || l[0].ID != id {
			t.Errorf("%s: Lease after Retry = %q, want %s", when, ids(l), id)
		} else {
			s.Release(id)
		}
	}
	check(s, "before reopen")
	s = reopen(t, s, func(o *Options) { o.Now = now })
	check(s, "after reopen")
}

func TestLeaseSemantics(t *testing.T) {
	s := openStore(t, t.TempDir())
	id := commitMsg(t, s, "x")
	now := time.Now()

	l := s.Lease(now, 10)
	if len(l) != 1 || l[0].ID != id {
		t.Fatalf("Lease = %q, want [%s]", ids(l), id)
	}
	if again := s.Lease(now.Add(time.Hour), 10); len(again) != 0 {
		t.Fatalf("a leased message was leased again: %q", ids(again))
	}
	if d, ok := s.NextDue(); ok {
		t.Fatalf("NextDue = %v with the only message leased, want none", d)
	}

	// Release gives it back unchanged.
	s.Release(id)
	l = s.Lease(now, 10)
	if len(l) != 1 || l[0].ID != id {
		t.Fatalf("after Release: Lease = %q, want [%s]", ids(l), id)
	}

	// Update with a future attempt keeps it leased-out until then.
	m := l[0]
	m.Rcpts[0].Status = Deferred
	m.Rcpts[0].NextAttempt = now.Add(time.Hour)
	if err := s.Update(m); err != nil {
		t.Fatal(err)
	}
	if l := s.Lease(now, 10); len(l) != 0 {
		t.Fatalf("message due in an hour leased now: %q", ids(l))
	}
	if l := s.Lease(now.Add(time.Hour-time.Nanosecond), 10); len(l) != 0 {
		t.Fatalf("message leased a nanosecond before it is due: %q", ids(l))
	}
	if d, ok := s.NextDue(); !ok || !d.Equal(now.Add(time.Hour)) {
		t.Fatalf("NextDue = %v %v, want %v", d, ok, now.Add(time.Hour))
	}
	if l := s.Lease(now.Add(time.Hour), 10); len(l) != 1 {
		t.Fatalf("message not leased at its due time: %q", ids(l))
	}
}

func TestLeaseOrderAndLimit(t *testing.T) {
	s := openStore(t, t.TempDir())
	var all []string
	for range 3 {
		all = append(all, commitMsg(t, s, "x"))
	}
	now := time.Now()
	// Give them due times in another order than commit order.
	delays := map[string]time.Duration{all[0]: 3 * time.Hour, all[1]: time.Hour, all[2]: 2 * time.Hour}
	for _, m := range s.Lease(now, 10) {
		m.Rcpts[0].Status = Deferred
		m.Rcpts[0].NextAttempt = now.Add(delays[m.ID])
		if err := s.Update(m); err != nil {
			t.Fatal(err)
		}
	}
	if d, ok := s.NextDue(); !ok || !d.Equal(now.Add(time.Hour)) {
		t.Fatalf("NextDue = %v %v, want the earliest, %v", d, ok, now.Add(time.Hour))
	}
	if l := s.Lease(now.Add(90*time.Minute), 10); !reflect.DeepEqual(ids(l), []string{all[1]}) {
		t.Fatalf("Lease at +90m = %q, want only the one due at +1h (%s)", ids(l), all[1])
	}
	if l := s.Lease(now.Add(10*time.Hour), 1); !reflect.DeepEqual(ids(l), []string{all[2]}) {
		t.Fatalf("Lease(n=1) at +10h = %q, want the earliest due (%s)", ids(l), all[2])
	}
	if l := s.Lease(now.Add(10*time.Hour), 10); !reflect.DeepEqual(ids(l), []string{all[0]}) {
		t.Fatalf("Lease at +10h = %q, want the remaining one (%s)", ids(l), all[0])
	}
}

func TestWakeSignalsOnCommit(t *testing.T) {
	s := openStore(t, t.TempDir())
	select {
	case <-s.Wake():
	default:
	}
	commitMsg(t, s, "x")
	select {
	case <-s.Wake():
	case <-time.After(5 * time.Second):
		t.Fatal("no wake-up after a commit")
	}
}

func TestSegmentGC(t *testing.T) {
	const segBytes = 4 << 10
	small := func(o *Options) { o.SegmentBytes = segBytes }
	finish := func(t *testing.T, s *Store, skip string) {
		t.Helper()
		for _, m := range s.Lease(time.Now(), 1000) {
			if m.ID == skip {
				s.Release(m.ID)
				continue
			}
			m.Rcpts[0].Status = Delivered
			if err := s.Update(m); err != nil {
				t.Fatal(err)
			}
		}
	}

	t.Run("finished messages free their segments", func(t *testing.T) {
		dir := t.TempDir()
		s := openStore(t, dir, small)
		for range 40 {
			commitBody(t, s, testEnv("r@dest.test"), randomBytes(t, 1500), 4096)
		}
		if n := len(segFiles(t, dir)); n < 10 {
			t.Fatalf("40 messages of 1.5 KiB made only %d segments of 4 KiB", n)
		}
		finish(t, s, "")
		if s.Len() != 0 {
			t.Fatalf("Len = %d after finishing all", s.Len())
		}
		// Segments behind the active one go at the next commit; the
		// one that just rolled over may wait for it.
		if segs := segFiles(t, dir); len(segs) > 2 {
			t.Fatalf("after finishing every message %d segments remain: %v", len(segs), segs)
		}
		reopen(t, s, small)
		if segs := segFiles(t, dir); len(segs) != 1 {
			t.Fatalf("after reopen of an empty queue %d segments remain, want only the active one: %v", len(segs), segs)
		}
	})

	t.Run("a queued message in the oldest segment keeps it and the newer ones", func(t *testing.T) {
		dir := t.TempDir()
		s := openStore(t, dir, small)
		oldBody := randomBytes(t, 1500)
		oldest := commitBody(t, s, testEnv("r@dest.test"), oldBody, 4096)
		for range 39 {
			commitBody(t, s, testEnv("r@dest.test"), randomBytes(t, 1500), 4096)
		}
		before := segFiles(t, dir)
		finish(t, s, oldest)
		after := segFiles(t, dir)
		for _, name := range before {
			if !contains(after, name) {
				t.Fatalf("segment %s was removed while the oldest segment still holds a queued message", name)
			}
		}
		s = reopen(t, s, small)
		if got := ids(s.List()); !reflect.DeepEqual(got, []string{oldest}) {
			t.Fatalf("after reopen the queue holds %q, want only %s", got, oldest)
		}
		if !bytes.Equal(readBody(t, s, oldest), oldBody) {
			t.Fatal("body of the kept message differs after reopen")
		}
		finish(t, s, "")
		commitMsg(t, s, "one more batch to run the collector")
		if segs := segFiles(t, dir); len(segs) > 2 {
			t.Fatalf("after the last old message finished %d segments remain: %v", len(segs), segs)
		}
		if contains(segFiles(t, dir), before[0]) {
			t.Fatalf("oldest segment %s still there after its message finished", before[0])
		}
	})
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func TestGroupCommitSharesSyncs(t *testing.T) {
	s := openStore(t, t.TempDir())
	const writers, each = 100, 5
	start := make(chan struct{})
	var wg sync.WaitGroup
	errs := make(chan error, writers*each)
	for range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			for range each {
				w := s.NewWriter()
				w.Write(bytes.Repeat([]byte("x"), 2048))
				if _, err := w.Commit(testEnv("r@dest.test")); err != nil {
					errs <- err
				}
			}
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	st := s.Stats()
	if st.Records != writers*each {
		t.Fatalf("Records = %d, want %d", st.Records, writers*each)
	}
	if st.Syncs >= st.Records {
		t.Fatalf("%d syncs for %d records: concurrent commits did not share fsyncs", st.Syncs, st.Records)
	}
	t.Logf("%d records in %d syncs (%.1f per sync)", st.Records, st.Syncs, float64(st.Records)/float64(st.Syncs))
}

func TestConcurrentCommitLeaseUpdate(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, func(o *Options) { o.SegmentBytes = 16 << 10 })
	const producers, each = 8, 40
	total := producers * each
	var committed sync.Map
	var wg sync.WaitGroup
	for p := range producers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range each {
				id, err := s.Enqueue(testEnv("a@dest.test", "b@dest.test"), strings.NewReader(fmt.Sprintf("msg %d/%d", p, i)))
				if err != nil {
					t.Error(err)
					return
				}
				committed.Store(id, fmt.Sprintf("msg %d/%d", p, i))
			}
		}()
	}
	// Workers: the first lease defers recipient b, the second finishes.
	var leases sync.Map // id → times leased
	deadline := time.Now().Add(30 * time.Second)
	var done sync.WaitGroup
	for range 4 {
		done.Add(1)
		go func() {
			defer done.Done()
			for time.Now().Before(deadline) {
				if s.Len() == 0 && countMap(&committed) == total {
					return
				}
				for _, m := range s.Lease(time.Now(), 5) {
					n, _ := leases.LoadOrStore(m.ID, new(int))
					*n.(*int)++ // only this holder of the lease touches it
					body, err := s.Body(m.ID)
					if err != nil {
						t.Error(err)
						continue
					}
					b, _ := io.ReadAll(body)
					if want, _ := committed.Load(m.ID); want != nil && string(b) != want.(string) {
						t.Errorf("body of %s = %q, want %q", m.ID, b, want)
					}
					m.Rcpts[0].Status = Delivered
					if m.Rcpts[1].Status == Pending {
						m.Rcpts[1].Status = Deferred
						m.Rcpts[1].NextAttempt = time.Now()
					} else {
						m.Rcpts[1].Status = Delivered
					}
					if err := s.Update(m); err != nil {
						t.Error(err)
					}
				}
				time.Sleep(time.Millisecond)
			}
		}()
	}
	wg.Wait()
	done.Wait()
	if n := s.Len(); n != 0 {
		t.Fatalf("%d messages left in the queue after the workers finished", n)
	}
	leases.Range(func(k, v any) bool {
		if *v.(*int) != 2 {
			t.Errorf("message %s leased %d times, want 2 (defer, then deliver)", k, *v.(*int))
		}
		return true
	})
	if n := countMap(&leases); n != total {
		t.Fatalf("%d messages leased, want %d", n, total)
	}
	s = reopen(t, s)
	if n := s.Len(); n != 0 {
		t.Fatalf("%d messages back after reopen", n)
	}
}

func countMap(m *sync.Map) int {
	n := 0
	m.Range(func(any, any) bool { n++; return true })
	return n
}

func TestSecondOpenIsLocked(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	id := commitMsg(t, s, "visible to the CLI")

	if s2, err := Open(Options{Dir: dir}); !errors.Is(err, ErrLocked) {
		if s2 != nil {
			s2.Close()
		}
		t.Fatalf("second Open err = %v, want ErrLocked", err)
	}

	ro, err := Open(Options{Dir: dir, ReadOnly: true})
	if err != nil {
		t.Fatalf("ReadOnly Open while the writer runs: %v", err)
	}
	defer ro.Close()
	if got := ids(ro.List()); !reflect.DeepEqual(got, []string{id}) {
		t.Fatalf("read-only store lists %q, want [%s]", got, id)
	}
	if got := string(readBody(t, ro, id)); got != "visible to the CLI" {
		t.Fatalf("read-only body = %q", got)
	}
	if _, err := ro.Enqueue(testEnv("a@b.test"), strings.NewReader("x")); err == nil {
		t.Fatal("Enqueue on a read-only store succeeded")
	}
	if err := ro.Delete(id); err == nil {
		t.Fatal("Delete on a read-only store succeeded")
	}
	if _, err := s.Get(id); err != nil {
		t.Fatalf("the writer lost %s after read-only actions: %v", id, err)
	}

	// Once the writer closes, another writer may open.
	s.Close()
	s3 := openStore(t, dir)
	if s3.Len() != 1 {
		t.Fatalf("Len = %d after reopen, want 1", s3.Len())
	}
}

func TestReadOnlyOpenOfMissingDirIsEmpty(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "never-created")
	ro, err := Open(Options{Dir: dir, ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	if ro.Len() != 0 {
		t.Fatalf("Len = %d", ro.Len())
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("read-only Open created %s", dir)
	}
}

func TestClosedStoreRefusesWrites(t *testing.T) {
	s := openStore(t, t.TempDir())
	id := commitMsg(t, s, "x")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	w := s.NewWriter()
	w.Write([]byte("late"))
	if _, err := w.Commit(testEnv("a@b.test")); !errors.Is(err, ErrClosed) {
		t.Fatalf("Commit after Close err = %v, want ErrClosed", err)
	}
	if err := s.Delete(id); !errors.Is(err, ErrClosed) {
		t.Fatalf("Delete after Close err = %v, want ErrClosed", err)
	}
	if err := s.Retry(id); !errors.Is(err, ErrClosed) {
		t.Fatalf("Retry after Close err = %v, want ErrClosed", err)
	}
}

func TestCommitRacingCloseNeverHangs(t *testing.T) {
	for round := range 50 {
		dir := t.TempDir()
		s, err := Open(Options{Dir: dir})
		if err != nil {
			t.Fatal(err)
		}
		var mu sync.Mutex
		var acked []string
		var wg sync.WaitGroup
		for range 20 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					id, err := s.Enqueue(testEnv("a@b.test"), strings.NewReader("x"))
					if err != nil {
						if !errors.Is(err, ErrClosed) {
							t.Errorf("Commit racing Close: %v", err)
						}
						return
					}
					mu.Lock()
					acked = append(acked, id)
					mu.Unlock()
				}
			}()
		}
		time.Sleep(time.Duration(round%5) * time.Millisecond)
		s.Close()
		finished := make(chan struct{})
		go func() { wg.Wait(); close(finished) }()
		select {
		case <-finished:
		case <-time.After(10 * time.Second):
			t.Fatalf("round %d: a Commit racing Close never returned", round)
		}
		// Every acknowledged message is durable.
		s2, err := Open(Options{Dir: dir})
		if err != nil {
			t.Fatal(err)
		}
		for _, id := range acked {
			if _, err := s2.Get(id); err != nil {
				t.Errorf("round %d: acknowledged %s lost: %v", round, id, err)
			}
		}
		s2.Close()
	}
}

// TestCommitPastClosedCheckGetsErrClosed replays deterministically the
// window TestCommitRacingCloseNeverHangs can only hit by luck: a Commit
// that read closed == false just before Close ran to the end.
func TestCommitPastClosedCheckGetsErrClosed(t *testing.T) {
	s := openStore(t, t.TempDir())
	s.Close()
	s.mu.Lock()
	s.closed = false // as seen by a submitter that checked before Close
	s.mu.Unlock()
	for i := range 20 {
		res := make(chan error, 1)
		go func() {
			_, err := s.Enqueue(testEnv("a@b.test"), strings.NewReader("x"))
			res <- err
		}()
		select {
		case err := <-res:
			if !errors.Is(err, ErrClosed) {
				t.Fatalf("try %d: err = %v, want ErrClosed", i, err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("try %d: Commit after the committer stopped never returned", i)
		}
	}
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
}

func TestWriterAbortLeavesNothing(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	w := s.NewWriter()
	if _, err := w.Write(randomBytes(t, 1<<20)); err != nil { // spills to the spool
		t.Fatal(err)
	}
	w.Abort()
	w.Abort() // twice is harmless
	if ents, _ := os.ReadDir(filepath.Join(dir, "spool")); len(ents) != 0 {
		t.Fatalf("spool holds %d files after Abort", len(ents))
	}
	if s.Len() != 0 {
		t.Fatalf("Len = %d after Abort", s.Len())
	}
	if st := s.Stats(); st.Records != 0 {
		t.Fatalf("Abort wrote %d records", st.Records)
	}
	s = reopen(t, s)
	if s.Len() != 0 {
		t.Fatalf("Len = %d after Abort and reopen", s.Len())
	}
}

func TestStaleSpoolFilesRemovedAtOpen(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir)
	s.Close()
	stale := filepath.Join(dir, "spool", "7.tmp")
	if err := os.WriteFile(stale, []byte("half a message"), 0o640); err != nil {
		t.Fatal(err)
	}
	openStore(t, dir)
	if _, err := os.Stat(stale); !os.IsNotExist(err) {
		t.Fatalf("stale spool file survived Open (err %v)", err)
	}
}

func TestScheduleNext(t *testing.T) {
	recv := time.Date(2025, 3, 1, 0, 0, 0, 0, time.UTC)
	sch := Schedule{Retry: []time.Duration{5 * time.Minute, 30 * time.Minute, 2 * time.Hour}, MaxQueueTime: 24 * time.Hour}
	tests := []struct {
		name     string
		sch      Schedule
		attempts int
		now      time.Time
		want     time.Time
		expired  bool
	}{
		{"first failure waits the first interval", sch, 1, recv, recv.Add(5 * time.Minute), false},
		{"second failure waits the second interval", sch, 2, recv.Add(time.Hour), recv.Add(time.Hour + 30*time.Minute), false},
		{"last interval applies at its position", sch, 3, recv.Add(time.Hour), recv.Add(3 * time.Hour), false},
		{"last interval repeats past the end", sch, 10, recv.Add(time.Hour), recv.Add(3 * time.Hour), false},
		{"zero attempts use the first interval", sch, 0, recv, recv.Add(5 * time.Minute), false},
		{"next attempt is capped at expiry", sch, 3, recv.Add(23 * time.Hour), recv.Add(24 * time.Hour), false},
		{"a nanosecond before expiry is not expired", sch, 3, recv.Add(24*time.Hour - 1), recv.Add(24 * time.Hour), false},
		{"at expiry the message has expired", sch, 3, recv.Add(24 * time.Hour), time.Time{}, true},
		{"after expiry the message has expired", sch, 1, recv.Add(100 * time.Hour), time.Time{}, true},
		{"empty schedule waits five minutes", Schedule{MaxQueueTime: time.Hour}, 1, recv, recv.Add(5 * time.Minute), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, expired := tt.sch.Next(recv, tt.attempts, tt.now)
			if expired != tt.expired || !got.Equal(tt.want) {
				t.Fatalf("Next(attempts=%d, now=%v) = %v, %v; want %v, %v", tt.attempts, tt.now, got, expired, tt.want, tt.expired)
			}
			if e := tt.sch.Expired(recv, tt.now); e != tt.expired {
				t.Fatalf("Expired = %v, want %v", e, tt.expired)
			}
		})
	}
}

func TestMessageDoneAndNextDue(t *testing.T) {
	t0 := time.Date(2025, 3, 1, 0, 0, 0, 0, time.UTC)
	tests := []struct {
		name  string
		rcpts []Recipient
		done  bool
		due   time.Time
	}{
		{"all final is done and never due", []Recipient{{Status: Delivered}, {Status: Bounced}}, true, time.Time{}},
		{"earliest of the unfinished", []Recipient{{Status: Deferred, NextAttempt: t0.Add(2 * time.Hour)},
			{Status: Delivered, NextAttempt: t0}, {Status: Pending, NextAttempt: t0.Add(time.Hour)}}, false, t0.Add(time.Hour)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := &Message{Rcpts: tt.rcpts}
			if m.Done() != tt.done || !m.NextDue().Equal(tt.due) {
				t.Fatalf("Done = %v, NextDue = %v; want %v, %v", m.Done(), m.NextDue(), tt.done, tt.due)
			}
		})
	}
}

func TestAddrDomain(t *testing.T) {
	for _, tt := range []struct{ addr, want string }{
		{"a@Example.COM", "example.com"},
		{"a@example.com.", "example.com"},
		{"\"a@b\"@c.test", "c.test"},
		{"postmaster", ""},
	} {
		if got := AddrDomain(tt.addr); got != tt.want {
			t.Errorf("AddrDomain(%q) = %q, want %q", tt.addr, got, tt.want)
		}
	}
}

// UpdateAsync reports through its callback once the state is durable; the
// message stays leased until then, and the state survives a reopen.
func TestUpdateAsync(t *testing.T) {
	s := openStore(t, t.TempDir())
	id := commitBody(t, s, testEnv("a@x.test", "b@x.test"), []byte("body\r\n"), 1024)
	m := s.Lease(time.Now().Add(time.Second), 1)[0]
	m.Rcpts[0].Status = Delivered
	m.Rcpts[1].Status = Deferred
	m.Rcpts[1].NextAttempt = time.Now().Add(time.Hour)
	done := make(chan error, 1)
	if err := s.UpdateAsync(m, func(err error) { done <- err }); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("UpdateAsync callback never ran")
	}
	if s.Leased(id) {
		t.Error("still leased after the update was applied")
	}
	s = reopen(t, s)
	got, err := s.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	if got.Rcpts[0].Status != Delivered || got.Rcpts[1].Status != Deferred {
		t.Errorf("states after reopen: %s, %s", got.Rcpts[0].Status, got.Rcpts[1].Status)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.UpdateAsync(got, func(error) {}); !errors.Is(err, ErrClosed) {
		t.Errorf("UpdateAsync after Close: %v, want ErrClosed", err)
	}
}

// When Update fails, the engine gives the message back with the outcomes
// it learnt: a delivered recipient must not come due again (that would
// redeliver it in a loop for as long as the disk fails).
func TestRequeueKeepsOutcomesInMemory(t *testing.T) {
	s := openStore(t, t.TempDir())
	id := commitMsg(t, s, "x", "a@one.test", "b@two.test")
	now := time.Now()
	l := s.Lease(now, 10)
	if len(l) != 1 {
		t.Fatalf("Lease = %q", ids(l))
	}
	m := l[0]
	m.Rcpts[0].Status = Delivered
	m.Rcpts[1].Status = Deferred
	m.Rcpts[1].NextAttempt = now.Add(time.Hour)
	s.Requeue(m)
	if s.Leased(id) {
		t.Fatal("still leased after Requeue")
	}
	if l := s.Lease(now.Add(time.Minute), 10); len(l) != 0 {
		t.Fatalf("requeued message due again at once: %q", ids(l))
	}
	got, err := s.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	if got.Rcpts[0].Status != Delivered || got.Rcpts[1].Status != Deferred {
		t.Fatalf("states after Requeue: %v %v", got.Rcpts[0].Status, got.Rcpts[1].Status)
	}
	if l := s.Lease(now.Add(time.Hour), 10); len(l) != 1 {
		t.Fatalf("requeued message not due at its next attempt: %q", ids(l))
	}
}

// Commit decides what a message needs of the next hop from its content
// (RFC 6531 §3.2, RFC 6532 §3, RFC 6152 §3), not from MAIL's parameters,
// and the decision survives a restart.
func TestCommitDecidesContentNeeds(t *testing.T) {
	tests := []struct {
		name           string
		from, rcpt     string
		smtputf8Flag   bool
		body           string
		utf8, eightBit bool
	}{
		{"ascii with the SMTPUTF8 flag needs nothing", "a@x.test", "b@y.test", true, "Subject: hi\r\n\r\nhello\r\n", false, false},
		{"utf-8 recipient", "a@x.test", "jörg@y.test", true, "Subject: hi\r\n\r\nhello\r\n", true, false},
		{"utf-8 sender", "jörg@x.test", "b@y.test", true, "Subject: hi\r\n\r\nhello\r\n", true, false},
		{"utf-8 header field", "a@x.test", "b@y.test", false, "Subject: grüße\r\n\r\nhello\r\n", true, false},
		{"8-bit body only", "a@x.test", "b@y.test", false, "Subject: hi\r\n\r\ngrüße\r\n", false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := openStore(t, t.TempDir())
			env := Envelope{From: tt.from, SMTPUTF8: tt.smtputf8Flag, Rcpts: []RcptSpec{{Addr: tt.rcpt}}}
			id := commitBody(t, s, env, []byte(tt.body), 3)
			s = reopen(t, s)
			m, err := s.Get(id)
			if err != nil {
				t.Fatal(err)
			}
			if !m.Env.Scanned || m.Env.NeedsSMTPUTF8 != tt.utf8 || m.Env.EightBit != tt.eightBit {
				t.Errorf("Scanned=%v NeedsSMTPUTF8=%v EightBit=%v, want true %v %v",
					m.Env.Scanned, m.Env.NeedsSMTPUTF8, m.Env.EightBit, tt.utf8, tt.eightBit)
			}
		})
	}
}
