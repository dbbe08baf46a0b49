package queue

import (
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestIDUniqueAndOrderedInTightLoop(t *testing.T) {
	const n = 100_000
	var g idGen
	seen := make(map[string]bool, n)
	prev := ""
	for i := range n {
		id := g.next(time.Now())
		if seen[id] {
			t.Fatalf("id %d %q generated twice", i, id)
		}
		seen[id] = true
		if id <= prev {
			t.Fatalf("id %d %q does not sort after the previous one %q", i, id, prev)
		}
		prev = id
	}
}

func TestIDUniqueConcurrently(t *testing.T) {
	const workers, each = 16, 100_000 / 16
	var g idGen
	out := make([][]string, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ids := make([]string, 0, each)
			prev := ""
			for range each {
				id := g.next(time.Now())
				if id <= prev {
					t.Errorf("worker %d: %q not after %q", w, id, prev)
					return
				}
				prev = id
				ids = append(ids, id)
			}
			out[w] = ids
		}()
	}
	wg.Wait()
	seen := map[string]bool{}
	for _, ids := range out {
		for _, id := range ids {
			if seen[id] {
				t.Fatalf("id %q generated twice", id)
			}
			seen[id] = true
		}
	}
	if len(seen) != workers*each {
		t.Fatalf("got %d ids, want %d", len(seen), workers*each)
	}
}

func TestIDLexicalOrderIsTimeOrder(t *testing.T) {
	base := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	// Times spanning ms, seconds, years: each ID must sort by its time,
	// whatever the digit that changes.
	offsets := []time.Duration{0, time.Millisecond, 31 * time.Millisecond, 32 * time.Millisecond,
		time.Second, time.Hour, 24 * time.Hour, 365 * 24 * time.Hour, 40 * 365 * 24 * time.Hour}
	var g idGen
	var ids []string
	for _, off := range offsets {
		ids = append(ids, g.next(base.Add(off)))
	}
	if !sort.StringsAreSorted(ids) {
		t.Fatalf("ids made at increasing times are not sorted: %q", ids)
	}
	// An independent generator per time: order comes from the time part,
	// not from the shared counter.
	ids = ids[:0]
	for _, off := range offsets {
		var g idGen
		ids = append(ids, g.next(base.Add(off)))
	}
	if !sort.StringsAreSorted(ids) {
		t.Fatalf("ids of fresh generators at increasing times are not sorted: %q", ids)
	}
}

func TestIDTimeRoundTrip(t *testing.T) {
	for _, tm := range []time.Time{
		time.UnixMilli(0),
		time.Date(2025, 3, 1, 12, 0, 0, 123_456_789, time.UTC),
		time.Date(2099, 12, 31, 23, 59, 59, 999_000_000, time.UTC),
	} {
		var g idGen
		id := g.next(tm)
		want := tm.Truncate(time.Millisecond)
		if got := IDTime(id); !got.Equal(want) {
			t.Errorf("IDTime(%q) = %v, want %v", id, got, want)
		}
	}
}

func TestIDClockGoingBackwardsKeepsOrder(t *testing.T) {
	var g idGen
	now := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	a := g.next(now)
	b := g.next(now.Add(-time.Hour)) // NTP step back
	if b <= a {
		t.Fatalf("id after a clock step back %q does not sort after %q", b, a)
	}
}

func TestIDCounterExhaustionBorrowsNextMillisecond(t *testing.T) {
	now := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
	var g idGen
	a := g.next(now)
	g.ctr = 1<<25 - 1 // the next one in this ms would overflow 5 digits
	b := g.next(now)
	if b <= a {
		t.Fatalf("id after counter exhaustion %q does not sort after %q", b, a)
	}
	if got, want := IDTime(b), now.Add(time.Millisecond); !got.Equal(want) {
		t.Fatalf("id after counter exhaustion has time %v, want the next ms %v", got, want)
	}
	if !ValidID(b) {
		t.Fatalf("%q is not a valid id", b)
	}
}

func TestIDCharactersAreSafe(t *testing.T) {
	var g idGen
	for range 10_000 {
		id := g.next(time.Now())
		if len(id) != IDLen {
			t.Fatalf("id %q has length %d, want %d", id, len(id), IDLen)
		}
		// Safe in file names, SMTP replies and shells: lower-case
		// letters and digits only.
		if strings.Trim(id, "0123456789abcdefghijklmnopqrstuv") != "" {
			t.Fatalf("id %q has characters outside base32hex", id)
		}
		if !ValidID(id) {
			t.Fatalf("ValidID(%q) = false for a generated id", id)
		}
	}
}

func TestValidID(t *testing.T) {
	tests := []struct {
		name string
		id   string
		want bool
	}{
		{"base32hex of the right length", "0123456789abcv", true},
		{"empty", "", false},
		{"one short", "0123456789abc", false},
		{"one long", "0123456789abcvv", false},
		{"upper case is not the alphabet", "0123456789ABCV", false},
		{"w is past base32hex", "0123456789abcw", false},
		{"path separator", "0123456789ab/c", false},
		{"dot dot", "..23456789abcv", false},
		{"space", "0123456789ab c", false},
		{"non-ascii", "0123456789abé", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := ValidID(tt.id); got != tt.want {
				t.Errorf("ValidID(%q) = %v, want %v", tt.id, got, tt.want)
			}
		})
	}
}
