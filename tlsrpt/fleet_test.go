package tlsrpt

import (
	"context"
	"errors"
	"reflect"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// The sessions of one period spread over three recorders merge into what
// one recorder given all of them would have counted.
func TestMergeCountsEqualsOneRecorder(t *testing.T) {
	c := newClock(day1.Add(time.Hour))
	all := newTestRecorder(t, t.TempDir(), c)
	parts := []*Recorder{newTestRecorder(t, t.TempDir(), c), newTestRecorder(t, t.TempDir(), c), newTestRecorder(t, t.TempDir(), c)}
	other := badSession
	other.ReceivingIP, other.AdditionalInfo = "198.51.100.8", "https://info.test/x"
	npf := Session{PolicyDomain: "two.test", Success: true}
	sessions := []Session{okSession, badSession, okSession, other, npf, badSession, okSession, other, npf,
		at(okSession, day1.Add(25*time.Hour))}
	for i, s := range sessions {
		all.Record(s)
		parts[i%3].Record(s)
	}
	var in []PolicyCounts
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
	got := MergeCounts([]PolicyCounts{{PeriodStart: day1, PeriodEnd: day1.Add(24 * time.Hour), PolicyDomain: "EX.test",
		Policies: []PolicyResult{{Policy: PolicyDesc{PolicyType: "bogus"}, Summary: Summary{TotalFailureSessionCount: 1},
			FailureDetails: []FailureDetail{{ResultType: "bogus", ReceivingMXHelo: long, FailedSessionCount: 1}}}}}})
	if len(got) != 1 || got[0].PolicyDomain != "ex.test" || got[0].Failed != 1 {
		t.Fatalf("got %+v", got)
	}
	p := got[0].Policies[0]
	if p.Policy.PolicyType != PolicyTypeNoPolicyFound || p.FailureDetails[0].ResultType != ResultValidationFailure ||
		len(p.FailureDetails[0].ReceivingMXHelo) != maxNameLen {
		t.Errorf("not bounded: %+v", p)
	}
}

type sinkFunc func(time.Time, []PolicyCounts) error

func (f sinkFunc) PutCounts(s time.Time, c []PolicyCounts) error { return f(s, c) }

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
	sink := sinkFunc(func(s time.Time, pc []PolicyCounts) error {
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

// memFleet is a Source and JobStore in memory, shared by reporters.
type memFleet struct {
	mu     sync.Mutex
	counts []PolicyCounts
	done   map[string]bool
	jobs   map[string][]byte
}

func newMemFleet() *memFleet { return &memFleet{done: map[string]bool{}, jobs: map[string][]byte{}} }

func fkey(s time.Time, d string) string { return s.UTC().Format(time.RFC3339) + " " + d }

func (m *memFleet) Closed(now time.Time) ([]PolicyCounts, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []PolicyCounts
	for _, pc := range MergeCounts(m.counts) {
		if !m.done[fkey(pc.PeriodStart, pc.PolicyDomain)] && !now.Before(pc.PeriodEnd) {
			out = append(out, pc)
		}
	}
	return out, nil
}

func (m *memFleet) Done(s time.Time, d string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.done[fkey(s, d)] = true
	return nil
}

func (m *memFleet) LoadJobs() ([][]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out [][]byte
	for _, j := range m.jobs {
		out = append(out, j)
	}
	return out, nil
}

func (m *memFleet) CreateJob(s time.Time, d string, data []byte) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if j, ok := m.jobs[fkey(s, d)]; ok {
		return j, nil
	}
	m.jobs[fkey(s, d)] = data
	return data, nil
}

func (m *memFleet) UpdateJob(s time.Time, d string, data []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.jobs[fkey(s, d)] = data
	return nil
}

func (m *memFleet) RemoveJob(s time.Time, d string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.jobs, fkey(s, d))
	return nil
}

// With a Source, a JobStore and Active: only the active reporter makes
// and sends; the job goes to the store; a reporter that becomes active
// takes the jobs over from the store and does not send again what the
// other sent; finished jobs are pruned from the store.
func TestReporterSourceJobsActive(t *testing.T) {
	e := newEnv(t)
	st := &memQueue{}
	fl := newMemFleet()
	var active [2]bool
	var amu sync.Mutex
	isActive := func(i int) func() bool {
		return func() bool { amu.Lock(); defer amu.Unlock(); return active[i] }
	}
	setActive := func(i int) { amu.Lock(); active = [2]bool{}; active[i] = true; amu.Unlock() }
	e.w.DNS.SetTXT("_smtp._tls.ex.test", []string{"v=TLSRPTv1;rua=mailto:a@rep.test"})
	e.w.DNS.SetTXT("_smtp._tls.two.test", []string{"v=TLSRPTv1;rua=mailto:b@rep.test"})
	var rps [2]*Reporter
	for i := range rps {
		o := e.opts
		o.Recorder, o.Queue, o.Source, o.Jobs, o.Active = newTestRecorder(t, t.TempDir(), e.clock), st, fl, fl, isActive(i)
		rp, err := NewReporter(o)
		if err != nil {
			t.Fatal(err)
		}
		rps[i] = rp
	}
	pass := func() {
		for _, rp := range rps {
			rp.SendDue(context.Background())
		}
	}
	ex := PolicyCounts{PeriodStart: day1, PeriodEnd: day1.Add(24 * time.Hour), PolicyDomain: "ex.test",
		Policies: []PolicyResult{{Policy: PolicyDesc{PolicyType: PolicyTypeSTS}, Summary: Summary{TotalSuccessfulSessionCount: 2}}}}
	two := ex
	two.PolicyDomain = "two.test"
	fl.counts = []PolicyCounts{ex, ex, two}

	e.clock.Set(afterDay1)
	pass()
	if len(st.List()) != 0 || len(fl.jobs) != 0 {
		t.Fatal("an inactive reporter acted")
	}
	setActive(0)
	pass()
	msgs := st.List()
	if len(msgs) != 2 || len(fl.jobs) != 2 || len(fl.done) != 2 {
		t.Fatalf("after first active pass: %d mails, %d jobs, %d done", len(msgs), len(fl.jobs), len(fl.done))
	}
	ids := map[string]bool{}
	for _, r := range rps[0].Reports() {
		ids[r.ReportID] = true
		if !r.Done || r.Outcome != "sent" {
			t.Errorf("report %+v", r)
		}
	}
	// The other takes over: nothing is sent again; it sees the same jobs.
	setActive(1)
	e.clock.Advance(time.Hour)
	pass()
	if n := len(st.List()); n != 2 {
		t.Errorf("%d mails after takeover", n)
	}
	for _, r := range rps[1].Reports() {
		if !ids[r.ReportID] {
			t.Errorf("job with another report-id after takeover: %+v", r)
		}
	}
	e.clock.Advance(doneRetention)
	pass()
	if len(fl.jobs) != 0 || len(rps[1].Reports()) != 0 {
		t.Errorf("finished jobs not pruned: %d", len(fl.jobs))
	}
}

// A job already in the store (another reporter made it) wins over the one
// this reporter would make: the report-id stays.
func TestReporterJobStoreExistingWins(t *testing.T) {
	e := newEnv(t)
	st := &memQueue{}
	fl := newMemFleet()
	e.w.DNS.SetTXT("_smtp._tls.ex.test", []string{"v=TLSRPTv1;rua=mailto:a@rep.test"})
	pc := PolicyCounts{PeriodStart: day1, PeriodEnd: day1.Add(24 * time.Hour), PolicyDomain: "ex.test",
		Policies: []PolicyResult{{Policy: PolicyDesc{PolicyType: PolicyTypeSTS}, Summary: Summary{TotalSuccessfulSessionCount: 2}}}}
	fl.counts = []PolicyCounts{pc}
	mk := func() *Reporter {
		o := e.opts
		o.Recorder, o.Queue, o.Source, o.Jobs = newTestRecorder(t, t.TempDir(), e.clock), st, fl, fl
		rp, err := NewReporter(o)
		if err != nil {
			t.Fatal(err)
		}
		return rp
	}
	first := mk()
	e.clock.Set(afterDay1)
	e.w.DNS.SetServFail("_smtp._tls.ex.test", dns.TypeTXT, true) // discovery fails: job stays
	first.SendDue(context.Background())
	if len(first.Reports()) != 1 {
		t.Fatal("no job")
	}
	id := first.Reports()[0].ReportID
	fl.done = map[string]bool{} // as if Done had not reached the source
	e.w.DNS.SetServFail("_smtp._tls.ex.test", dns.TypeTXT, false)
	second := mk()
	e.clock.Advance(time.Hour)
	second.SendDue(context.Background())
	msgs := st.List()
	if len(msgs) != 1 {
		t.Fatalf("%d mails", len(msgs))
	}
	if r := second.Reports(); len(r) != 1 || r[0].ReportID != id {
		t.Errorf("report-id %+v, want %s", r, id)
	}
}
