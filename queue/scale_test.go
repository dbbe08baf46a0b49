package queue

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"runtime"
	"sort"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// smallSegments makes the log roll every 64 KiB and compaction look
// every few milliseconds, so tests see many segments and compactions.
func smallSegments(o *Options) {
	o.SegmentBytes = 64 << 10
	o.compactTick = 5 * time.Millisecond
}

// leaseID is LeaseID that waits out a compaction copying the message.
func leaseID(s *Store, id string) (*Message, error) {
	for range 1000 {
		m, err := s.LeaseID(id)
		if !errors.Is(err, ErrLeased) {
			return m, err
		}
		time.Sleep(time.Millisecond)
	}
	return s.LeaseID(id)
}

// deliver leases id and records every recipient delivered.
func deliver(t testing.TB, s *Store, id string) {
	t.Helper()
	m, err := leaseID(s, id)
	if err != nil {
		t.Fatalf("LeaseID(%s): %v", id, err)
	}
	for i := range m.Rcpts {
		m.Rcpts[i].Status = Delivered
	}
	if err := s.Update(m); err != nil {
		t.Fatalf("Update(%s): %v", id, err)
	}
}

// defer1 leases id and records one more failed attempt.
func defer1(t testing.TB, s *Store, id, reason string, next time.Time) {
	t.Helper()
	m, err := leaseID(s, id)
	if err != nil {
		t.Fatalf("LeaseID(%s): %v", id, err)
	}
	for i := range m.Rcpts {
		m.Rcpts[i].Status = Deferred
		m.Rcpts[i].Attempts++
		m.Rcpts[i].LastError = reason
		m.Rcpts[i].NextAttempt = next
	}
	if err := s.Update(m); err != nil {
		t.Fatalf("Update(%s): %v", id, err)
	}
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// diskBound is issue #12's bound: at most twice the live data plus two
// segments.
func diskBound(s *Store) (ok bool, st Stats) {
	st = s.Stats()
	return st.DiskBytes <= 2*st.LiveBytes+2*s.opts.SegmentBytes, st
}

func dirBytes(t testing.TB, dir string) int64 {
	t.Helper()
	var n int64
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		fi, err := e.Info()
		if err == nil {
			n += fi.Size()
		}
	}
	return n
}

// One message deferred for days must not keep the log behind it on
// disk: compaction copies it forward and the old segments go.
func TestPinnedMessageDoesNotPinDisk(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, smallSegments)
	pinned := commitMsg(t, s, "pinned to a dead host", "u@dead.test")
	defer1(t, s, pinned, "connection refused", time.Now().Add(time.Hour))
	body := strings.Repeat("x", 2000)
	for i := range 600 {
		id := commitMsg(t, s, body, fmt.Sprintf("u%d@live.test", i))
		deliver(t, s, id)
	}
	waitFor(t, "compaction to bound the log", func() bool { ok, _ := diskBound(s); return ok })
	ok, st := diskBound(s)
	if !ok || st.Compactions == 0 {
		t.Fatalf("stats %+v: want disk <= 2*live + 2 segments after compaction", st)
	}
	if onDisk := dirBytes(t, filepath.Join(dir, "log")); onDisk > 2*st.LiveBytes+2*s.opts.SegmentBytes {
		t.Fatalf("log directory holds %d bytes, live %d: not bounded", onDisk, st.LiveBytes)
	}
	// The pinned message kept its ID, arrival and history.
	m, err := s.Get(pinned)
	if err != nil {
		t.Fatal(err)
	}
	if m.Rcpts[0].Attempts != 1 || m.Rcpts[0].LastError != "connection refused" || m.Rcpts[0].Status != Deferred {
		t.Fatalf("pinned message after compaction: %+v", m.Rcpts[0])
	}
	if got := string(readBody(t, s, pinned)); got != "pinned to a dead host" {
		t.Fatalf("pinned body after compaction = %q", got)
	}
}

// A message deferred across several compactions keeps its history and
// is delivered exactly once: after its delivery, no copy of it comes
// back, not even after a reopen that reads the whole log.
func TestDeferredAcrossCompactionsDeliveredOnce(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, smallSegments)
	id := commitMsg(t, s, "keep me", "u@slow.test")
	received, _ := s.Get(id)
	filler := strings.Repeat("f", 3000)
	for round := 1; round <= 4; round++ {
		defer1(t, s, id, fmt.Sprintf("attempt %d failed", round), time.Now().Add(time.Hour))
		before := s.Stats().Compactions
		for i := range 60 {
			deliver(t, s, commitMsg(t, s, filler, fmt.Sprintf("f%d@live.test", i)))
		}
		waitFor(t, "a compaction", func() bool { return s.Stats().Compactions > before })
	}
	m, err := s.Get(id)
	if err != nil {
		t.Fatal(err)
	}
	if m.Rcpts[0].Attempts != 4 || m.Rcpts[0].LastError != "attempt 4 failed" || !m.Received.Equal(received.Received) {
		t.Fatalf("after 4 compactions: %+v received %v (want %v)", m.Rcpts[0], m.Received, received.Received)
	}
	// The history survives a reopen from the checkpoint and from the log.
	s = reopen(t, s, smallSegments)
	if m2, _ := s.Get(id); m2 == nil || m2.Rcpts[0].Attempts != 4 {
		t.Fatalf("after reopen: %+v", m2)
	}
	s.Close()
	os.Remove(filepath.Join(dir, "index.ckpt"))
	s = openStore(t, dir, smallSegments)
	if !s.Stats().FullScan {
		t.Fatal("open without a checkpoint did not read the log")
	}
	if m2, _ := s.Get(id); m2 == nil || m2.Rcpts[0].Attempts != 4 || m2.Rcpts[0].LastError != "attempt 4 failed" {
		t.Fatalf("after full scan: %+v", m2)
	}
	deliver(t, s, id)
	s.Close()
	os.Remove(filepath.Join(dir, "index.ckpt"))
	s = openStore(t, dir, smallSegments)
	if _, err := s.Get(id); !errors.Is(err, ErrNotFound) {
		t.Fatalf("delivered message is back after recovery: err = %v", err)
	}
	if n := s.Len(); n != 0 {
		t.Fatalf("queue holds %d messages, want 0", n)
	}
}

// The checkpoint gives the same index as reading the log, and a stale or
// damaged checkpoint is never trusted.
func TestCheckpointMatchesFullScan(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, smallSegments)
	var keep []string
	for i := range 200 {
		id := commitMsg(t, s, strings.Repeat("b", 500+i), fmt.Sprintf("u%d@d%d.test", i, i%7))
		switch i % 3 {
		case 0:
			deliver(t, s, id)
		case 1:
			defer1(t, s, id, "later", time.Now().Add(time.Duration(i)*time.Minute))
			keep = append(keep, id)
		default:
			keep = append(keep, id)
		}
	}
	sort.Strings(keep)
	want := s.List()
	s = reopen(t, s, smallSegments)
	if s.Stats().FullScan {
		t.Fatal("reopen after Close did not use the checkpoint")
	}
	fromCkpt := s.List()
	if !reflect.DeepEqual(ids(fromCkpt), keep) {
		t.Fatalf("from checkpoint: %d messages, want %d", len(fromCkpt), len(keep))
	}
	if !reflect.DeepEqual(withoutLoc(fromCkpt), withoutLoc(want)) {
		t.Fatal("messages read through the checkpoint differ from those before Close")
	}
	next, _ := s.NextDue()
	// More records after the checkpoint: they come from the log tail.
	extra := commitMsg(t, s, "after the checkpoint", "x@tail.test")
	s.Close() // writes a new checkpoint
	// Damage the checkpoint: a full scan must give the same answer.
	ck := filepath.Join(dir, "index.ckpt")
	data, err := os.ReadFile(ck)
	if err != nil {
		t.Fatal(err)
	}
	data[len(data)/2] ^= 0xff
	if err := os.WriteFile(ck, data, 0o640); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir, smallSegments)
	if !s.Stats().FullScan {
		t.Fatal("a damaged checkpoint was used")
	}
	full := s.List()
	if got, wantIDs := ids(full), append(append([]string(nil), keep...), extra); !reflect.DeepEqual(got, wantIDs) {
		t.Fatalf("full scan: %v, want %v", got, wantIDs)
	}
	if !reflect.DeepEqual(withoutLoc(full[:len(full)-1]), withoutLoc(want)) {
		t.Fatal("messages read by a full scan differ from the checkpoint's")
	}
	if n2, _ := s.NextDue(); !n2.Equal(next) && n2.After(next) {
		t.Fatalf("NextDue %v after full scan, %v from checkpoint", n2, next)
	}
}

// withoutLoc drops where bodies lie (segment handles differ between
// opens) so messages can be compared.
func withoutLoc(msgs []*Message) []Message {
	out := make([]Message, len(msgs))
	for i, m := range msgs {
		out[i] = *m
		out[i].loc = bodyLoc{}
	}
	return out
}

// A checkpoint older than a segment that compaction removed since is
// stale: records that lay in that segment are gone, so the whole log is
// read instead.
func TestStaleCheckpointFallsBackToLog(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, smallSegments)
	a := commitMsg(t, s, "a", "u@a.test")
	b := commitMsg(t, s, "b", "u@b.test")
	s.mu.Lock()
	snap := s.snapshotLocked()
	s.mu.Unlock()
	if err := s.writeCheckpoint(snap); err != nil {
		t.Fatal(err)
	}
	// b leaves; enough traffic follows for its segment to be compacted
	// away (a is copied forward).
	deliver(t, s, b)
	for i := range 100 {
		deliver(t, s, commitMsg(t, s, strings.Repeat("z", 2000), fmt.Sprintf("z%d@z.test", i)))
	}
	waitFor(t, "compaction", func() bool { return s.Stats().Compactions > 0 })
	// Crash: no checkpoint at Close. Keep the old one.
	saved, _ := os.ReadFile(filepath.Join(dir, "index.ckpt"))
	s.Close()
	if err := os.WriteFile(filepath.Join(dir, "index.ckpt"), saved, 0o640); err != nil {
		t.Fatal(err)
	}
	s = openStore(t, dir, smallSegments)
	if !s.Stats().FullScan {
		t.Fatal("stale checkpoint was used")
	}
	if got := ids(s.List()); !reflect.DeepEqual(got, []string{a}) {
		t.Fatalf("after recovery: %v, want [%s]", got, a)
	}
}

func openFDs(t testing.TB) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// ENOSPC in the middle of a write: the message is refused, nothing
// acknowledged is lost, and no segment or descriptor is left behind,
// however long the disk stays full.
func TestENOSPCLeavesNothingBehind(t *testing.T) {
	dir := t.TempDir()
	var full atomic.Bool
	var truncFails atomic.Bool
	fault := func(o *Options) {
		o.testFault = func(op string) error {
			switch {
			case op == "write" && full.Load():
				return syscall.ENOSPC
			case op == "truncate" && truncFails.Load():
				return syscall.EIO
			}
			return nil
		}
	}
	s := openStore(t, dir, fault)
	acked := []string{commitMsg(t, s, "before the disk filled", "u@x.test")}
	segsBefore := len(segFiles(t, dir))
	fdsBefore := openFDs(t)
	full.Store(true)
	for range 200 {
		w := s.NewWriter()
		w.Write([]byte("refused"))
		_, err := w.Commit(testEnv("v@x.test"))
		if !errors.Is(err, syscall.ENOSPC) {
			t.Fatalf("Commit on a full disk: err = %v, want ENOSPC", err)
		}
	}
	if n := len(segFiles(t, dir)); n != segsBefore {
		t.Fatalf("200 failed commits left %d segments, had %d", n, segsBefore)
	}
	if n := openFDs(t); n > fdsBefore+2 {
		t.Fatalf("200 failed commits: %d descriptors open, had %d", n, fdsBefore)
	}
	// A write that fails and cannot be cut off moves to a new segment.
	truncFails.Store(true)
	w := s.NewWriter()
	w.Write([]byte("refused too"))
	if _, err := w.Commit(testEnv("v@x.test")); err == nil {
		t.Fatal("commit succeeded on a full disk")
	}
	truncFails.Store(false)
	full.Store(false)
	acked = append(acked, commitMsg(t, s, "after space returned", "u@x.test"))
	s.Close()
	os.Remove(filepath.Join(dir, "index.ckpt"))
	s = openStore(t, dir)
	if got := ids(s.List()); !reflect.DeepEqual(got, acked) {
		t.Fatalf("after recovery: %v, want %v", got, acked)
	}
}

// Over max_disk_bytes new messages are refused with ErrFull, and
// accepted again by themselves once deliveries free the space.
func TestHighWaterMarkRefusesAndRecovers(t *testing.T) {
	dir := t.TempDir()
	s := openStore(t, dir, smallSegments, func(o *Options) { o.MaxDiskBytes = 200 << 10 })
	body := strings.Repeat("q", 8000)
	var queued []string
	var refused error
	for range 100 {
		w := s.NewWriter()
		w.Write([]byte(body))
		id, err := w.Commit(testEnv("u@dead.test"))
		if err != nil {
			refused = err
			break
		}
		queued = append(queued, id)
	}
	if !errors.Is(refused, ErrFull) {
		t.Fatalf("after %d messages: err = %v, want ErrFull", len(queued), refused)
	}
	if err := s.CheckSpace(8000); !errors.Is(err, ErrFull) {
		t.Fatalf("CheckSpace at the mark = %v", err)
	}
	if st := s.Stats(); st.DiskBytes > 200<<10 {
		t.Fatalf("queue grew to %d bytes past the mark", st.DiskBytes)
	}
	for _, id := range queued {
		deliver(t, s, id)
	}
	waitFor(t, "space to return", func() bool { return s.CheckSpace(8000) == nil })
	commitMsg(t, s, body, "u@live.test")

	// The free-space floor: no file system has an exabyte free.
	s2 := openStore(t, t.TempDir(), func(o *Options) { o.MinFreeBytes = 1 << 60 })
	w := s2.NewWriter()
	w.Write([]byte("x"))
	if _, err := w.Commit(testEnv("u@x.test")); !errors.Is(err, ErrFull) || !strings.Contains(err.Error(), "min_free_disk_bytes") {
		t.Fatalf("below the free-space floor: err = %v", err)
	}
}

// Messages of a held destination are not handed out until the hold
// ends; RetryDomain releases them all at once.
func TestHoldAndRetryDomain(t *testing.T) {
	s := openStore(t, t.TempDir())
	now := time.Now()
	var dead []string
	for i := range 50 {
		dead = append(dead, commitMsg(t, s, "m", fmt.Sprintf("u%d@dead.test", i)))
	}
	live := commitMsg(t, s, "m", "u@live.test")
	// Half of them failed once and wait an hour.
	for _, id := range dead[:25] {
		defer1(t, s, id, "refused", now.Add(time.Hour))
	}
	s.HoldDomain("dead.test", now.Add(time.Hour))
	got := s.Lease(now.Add(time.Minute), 1000)
	if len(got) != 1 || got[0].ID != live {
		t.Fatalf("with dead.test held, Lease gave %v, want only %s", ids(got), live)
	}
	if next, _ := s.NextDue(); !next.Equal(now.Add(time.Hour).Truncate(0)) && next.Sub(now.Add(time.Hour)).Abs() > time.Millisecond {
		t.Fatalf("NextDue = %v, want the hold's end", next)
	}
	sum := s.Summary(now)
	if sum.Total != 51 || len(sum.Domains) != 2 || sum.Domains[0].Domain != "dead.test" || sum.Domains[0].Total != 50 || sum.Domains[0].HeldUntil.IsZero() {
		t.Fatalf("summary %+v", sum)
	}
	if n := s.RetryDomain("dead.test"); n != 50 {
		t.Fatalf("RetryDomain released %d, want 50", n)
	}
	got = s.Lease(time.Now(), 1000)
	leased := ids(got)
	sort.Strings(leased)
	if !reflect.DeepEqual(leased, dead) {
		t.Fatalf("after RetryDomain Lease gave %d messages, want the 50 of dead.test", len(got))
	}
	for _, m := range got {
		if m.NextDue().After(time.Now()) {
			t.Fatalf("%s leased after RetryDomain but its recipients are due at %v", m.ID, m.NextDue())
		}
		s.Release(m.ID)
	}
	// Select by domain, with a limit and the total.
	msgs, total := s.Select(ListOptions{Domain: "dead.test", Limit: 10})
	if len(msgs) != 10 || total != 50 || msgs[0].ID != dead[0] {
		t.Fatalf("Select: %d messages, total %d", len(msgs), total)
	}
}

// A message with recipients in several domains is listed and summed
// under each.
func TestMultiDomainMessageInSummaryAndSelect(t *testing.T) {
	s := openStore(t, t.TempDir())
	id := commitMsg(t, s, "m", "a@one.test", "b@two.test")
	sum := s.Summary(time.Now())
	if sum.Total != 1 || len(sum.Domains) != 2 {
		t.Fatalf("summary %+v", sum)
	}
	for _, d := range []string{"one.test", "two.test"} {
		if msgs, total := s.Select(ListOptions{Domain: d}); total != 1 || msgs[0].ID != id {
			t.Fatalf("Select(%s) = %v, %d", d, ids(msgs), total)
		}
	}
	if _, total := s.Select(ListOptions{Domain: "three.test"}); total != 0 {
		t.Fatalf("Select(three.test) total %d", total)
	}
}

// The index costs at most 100 bytes per queued message (issue #12).
func TestIndexBytesPerMessage(t *testing.T) {
	if testing.Short() {
		t.Skip("allocates 200k entries")
	}
	per := indexBytesPerMessage(t, 200_000)
	t.Logf("index: %.1f bytes per message", per)
	if per > 100 {
		t.Fatalf("index takes %.1f bytes per message, want at most 100", per)
	}
}

// indexBytesPerMessage fills an index (no log) with n entries spread
// over a few domains and measures the heap it takes.
func indexBytesPerMessage(t testing.TB, n int) float64 {
	s := &Store{domIdx: map[string]uint32{}, segs: map[uint64]*segment{1: {seq: 1}}, overrides: map[string]*stateMeta{}}
	var g idGen
	base := time.Now()
	ids := make([]string, n)
	for i := range ids {
		ids[i] = g.next(base)
	}
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for i, id := range ids {
		s.insertEntry(id, fmt.Sprintf("d%d.test", i%16), base.Add(time.Duration(i)*time.Millisecond), 2048, recLoc{off: int64(i) * 3000, seg: 1, metaLen: 300})
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	// The IDs were allocated before the first reading: keep them alive
	// through the second, or their freeing would hide part of the index.
	runtime.KeepAlive(ids)
	runtime.KeepAlive(s)
	return float64(after.HeapAlloc-before.HeapAlloc) / float64(n)
}

// List's limit keeps the oldest messages, in order, and counts them all.
func TestSelectLimitKeepsOldest(t *testing.T) {
	s := openStore(t, t.TempDir())
	var all []string
	for i := range 40 {
		all = append(all, commitMsg(t, s, "m", fmt.Sprintf("u%d@d%d.test", i, i%3)))
	}
	// Free slots get reused out of ID order: delete some, add more.
	for _, id := range all[5:10] {
		if err := s.Delete(id); err != nil {
			t.Fatal(err)
		}
	}
	all = append(all[:5], all[10:]...)
	for i := range 5 {
		all = append(all, commitMsg(t, s, "m", fmt.Sprintf("v%d@d.test", i)))
	}
	msgs, total := s.Select(ListOptions{Limit: 10})
	if total != 40 || !reflect.DeepEqual(ids(msgs), all[:10]) {
		t.Fatalf("Select(Limit 10) = %v total %d, want %v total 40", ids(msgs), total, all[:10])
	}
	if msgs, total := s.Select(ListOptions{}); total != 40 || !reflect.DeepEqual(ids(msgs), all) {
		t.Fatalf("Select() = %d messages total %d", len(msgs), total)
	}
}

// Paging with After walks the whole queue once, in order.
func TestSelectPagesWithAfter(t *testing.T) {
	s := openStore(t, t.TempDir())
	var all []string
	for i := range 23 {
		all = append(all, commitMsg(t, s, "m", fmt.Sprintf("u%d@d.test", i)))
	}
	var got []string
	after := ""
	for {
		page, _ := s.Select(ListOptions{Limit: 5, After: after})
		got = append(got, ids(page)...)
		if len(page) < 5 {
			break
		}
		after = page[len(page)-1].ID
	}
	if !reflect.DeepEqual(got, all) {
		t.Fatalf("paged: %v\nwant %v", got, all)
	}
}
