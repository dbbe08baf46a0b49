package tlsrptsend

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/tlsrpt"
	"github.com/stsrelay/stsrelay/tlsrpt/tlsrptdb"
)

// The sessions of one period spread over three recorders merge into what
// one recorder given all of them would have counted.
// memFleet is a Source and JobStore in memory, shared by reporters.
type memFleet struct {
	mu     sync.Mutex
	counts []tlsrpt.PolicyCounts
	done   map[string]bool
	jobs   map[string][]byte
}

func newMemFleet() *memFleet { return &memFleet{done: map[string]bool{}, jobs: map[string][]byte{}} }

func fkey(s time.Time, d string) string { return s.UTC().Format(time.RFC3339) + " " + d }

func (m *memFleet) Closed(now time.Time) ([]tlsrpt.PolicyCounts, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []tlsrpt.PolicyCounts
	for _, pc := range tlsrptdb.MergeCounts(m.counts) {
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
		o.Recorder, o.Enqueue, o.Source, o.Jobs, o.Active = newTestRecorder(t, t.TempDir(), e.clock), st.EnqueueReport, fl, fl, isActive(i)
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
	ex := tlsrpt.PolicyCounts{PeriodStart: day1, PeriodEnd: day1.Add(24 * time.Hour), PolicyDomain: "ex.test",
		Policies: []tlsrpt.PolicyResult{{Policy: tlsrpt.PolicyDesc{PolicyType: tlsrpt.PolicyTypeSTS}, Summary: tlsrpt.Summary{TotalSuccessfulSessionCount: 2}}}}
	two := ex
	two.PolicyDomain = "two.test"
	fl.counts = []tlsrpt.PolicyCounts{ex, ex, two}

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
	pc := tlsrpt.PolicyCounts{PeriodStart: day1, PeriodEnd: day1.Add(24 * time.Hour), PolicyDomain: "ex.test",
		Policies: []tlsrpt.PolicyResult{{Policy: tlsrpt.PolicyDesc{PolicyType: tlsrpt.PolicyTypeSTS}, Summary: tlsrpt.Summary{TotalSuccessfulSessionCount: 2}}}}
	fl.counts = []tlsrpt.PolicyCounts{pc}
	mk := func() *Reporter {
		o := e.opts
		o.Recorder, o.Enqueue, o.Source, o.Jobs = newTestRecorder(t, t.TempDir(), e.clock), st.EnqueueReport, fl, fl
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
