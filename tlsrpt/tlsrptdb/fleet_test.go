package tlsrptdb

import (
	"errors"
	"reflect"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/tlsrpt"
)

// The sessions of one period spread over three recorders merge into what
// one recorder given all of them would have counted.
func TestMergeCountsEqualsOneRecorder(t *testing.T) {
	c := newClock(day1.Add(time.Hour))
	all := newTestRecorder(t, t.TempDir(), c)
	parts := []*Recorder{newTestRecorder(t, t.TempDir(), c), newTestRecorder(t, t.TempDir(), c), newTestRecorder(t, t.TempDir(), c)}
	other := badSession
	other.ReceivingIP, other.AdditionalInfo = "198.51.100.8", "https://info.test/x"
	npf := tlsrpt.Session{PolicyDomain: "two.test", Success: true}
	sessions := []tlsrpt.Session{okSession, badSession, okSession, other, npf, badSession, okSession, other, npf,
		at(okSession, day1.Add(25*time.Hour))}
	for i, s := range sessions {
		all.Record(s)
		parts[i%3].Record(s)
	}
	var in []tlsrpt.PolicyCounts
	for _, p := range parts {
		in = append(in, p.Pending()...)
	}
	got := MergeCounts(in)
	if want := all.Pending(); !reflect.DeepEqual(got, want) {
		t.Errorf("merged:\n got %+v\nwant %+v", got, want)
	}
	if got := MergeCounts(nil); len(got) != 0 {
		t.Errorf("MergeCounts(nil) = %+v", got)
	}
}

// MergeCounts bounds what it is given, as Record does.
func TestMergeCountsBounds(t *testing.T) {
	long := string(make([]byte, 1000))
	got := MergeCounts([]tlsrpt.PolicyCounts{{PeriodStart: day1, PeriodEnd: day1.Add(24 * time.Hour), PolicyDomain: "EX.test",
		Policies: []tlsrpt.PolicyResult{{Policy: tlsrpt.PolicyDesc{PolicyType: "bogus"}, Summary: tlsrpt.Summary{TotalFailureSessionCount: 1},
			FailureDetails: []tlsrpt.FailureDetail{{ResultType: "bogus", ReceivingMXHelo: long, FailedSessionCount: 1}}}}}})
	if len(got) != 1 || got[0].PolicyDomain != "ex.test" || got[0].Failed != 1 {
		t.Fatalf("got %+v", got)
	}
	p := got[0].Policies[0]
	if p.Policy.PolicyType != tlsrpt.PolicyTypeNoPolicyFound || p.FailureDetails[0].ResultType != tlsrpt.ResultValidationFailure ||
		len(p.FailureDetails[0].ReceivingMXHelo) != tlsrpt.MaxNameLen {
		t.Errorf("not bounded: %+v", p)
	}
}

type sinkFunc func(time.Time, []tlsrpt.PolicyCounts) error

func (f sinkFunc) PutCounts(s time.Time, c []tlsrpt.PolicyCounts) error { return f(s, c) }

// HandOff gives each finished period to the sink once, closes it, and
// keeps a period whose PutCounts failed.
func TestHandOff(t *testing.T) {
	c := newClock(day1.Add(time.Hour))
	dir := t.TempDir()
	r := newTestRecorder(t, dir, c)
	r.Record(okSession)
	r.Record(badSession)
	r.Record(at(okSession, day1.Add(25*time.Hour)))
	var got []time.Time
	fail := errors.New("down")
	var failing bool
	sink := sinkFunc(func(s time.Time, pc []tlsrpt.PolicyCounts) error {
		if failing {
			return fail
		}
		if len(pc) != 1 || pc[0].Successful != 1 || pc[0].Failed != 1 {
			t.Errorf("handed %+v", pc)
		}
		got = append(got, s)
		return nil
	})
	grace := 30 * time.Second
	if err := r.HandOff(day1.Add(24*time.Hour+grace-time.Second), grace, sink); err != nil || len(got) != 0 {
		t.Fatalf("before grace: %v %v", got, err)
	}
	failing = true
	if err := r.HandOff(day1.Add(24*time.Hour+grace), grace, sink); !errors.Is(err, fail) || len(r.Pending()) != 2 {
		t.Fatalf("failing sink: %v, pending %d", err, len(r.Pending()))
	}
	failing = false
	if err := r.HandOff(day1.Add(24*time.Hour+grace), grace, sink); err != nil || len(got) != 1 || !got[0].Equal(day1) {
		t.Fatalf("handed %v, %v", got, err)
	}
	r.Record(at(okSession, day1.Add(2*time.Hour))) // late: dropped
	if p := r.Pending(); len(p) != 1 || !p[0].PeriodStart.Equal(day1.Add(24*time.Hour)) {
		t.Errorf("pending after hand-off = %+v", p)
	}
	// Durable: a restart does not hand the period off again.
	if p := newTestRecorder(t, dir, c).Pending(); len(p) != 1 {
		t.Errorf("after restart %+v", p)
	}
}
