package tlsrptdb

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/stsrelay/stsrelay/tlsrpt"
)

// clock is a settable test clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock(t time.Time) *clock { return &clock{t: t} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

var (
	day1       = time.Date(2026, 3, 14, 0, 0, 0, 0, time.UTC)
	stsLines   = []string{"version: STSv1", "mode: enforce", "mx: mx1.ex.test", "mx: *.backup.ex.test", "max_age: 86400"}
	stsMX      = []string{"mx1.ex.test", "*.backup.ex.test"}
	okSession  = tlsrpt.Session{PolicyDomain: "ex.test", PolicyType: "sts", PolicyString: stsLines, MXPatterns: stsMX, Success: true}
	badSession = tlsrpt.Session{PolicyDomain: "ex.test", PolicyType: "sts", PolicyString: stsLines, MXPatterns: stsMX,
		ResultType: tlsrpt.ResultCertificateNotTrusted, SendingIP: "192.0.2.1", ReceivingMX: "mx1.ex.test",
		ReceivingHelo: "mx1.ex.test", ReceivingIP: "198.51.100.7", FailureReasonCode: "certificate-unknown-authority"}
)

func at(s tlsrpt.Session, t time.Time) tlsrpt.Session { s.Time = t; return s }

func newTestRecorder(t testing.TB, dir string, c *clock, opts ...RecorderOption) *Recorder {
	t.Helper()
	r, err := NewRecorder(dir, c.Now, zaptest.NewLogger(t), opts...)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// RPT-4-i: a session at 23:59:59Z is day D, one at 00:00:00Z day D+1; the
// periods are whole UTC days whatever the local zone of the time given.
func TestDayBoundaries(t *testing.T) {
	c := newClock(day1.Add(36 * time.Hour))
	r := newTestRecorder(t, t.TempDir(), c)
	last := day1.Add(24*time.Hour - time.Second)
	east := time.FixedZone("UTC+5", 5*3600)
	r.Record(at(okSession, last.In(east)))
	r.Record(at(okSession, day1.Add(24*time.Hour)))
	r.Record(at(okSession, day1)) // first second of D

	p := r.Pending()
	if len(p) != 2 {
		t.Fatalf("pending = %d entries, want 2: %+v", len(p), p)
	}
	if !p[0].PeriodStart.Equal(day1) || !p[0].PeriodEnd.Equal(day1.Add(24*time.Hour)) || p[0].Successful != 2 {
		t.Errorf("day D = %v–%v successful %d, want %v, 2", p[0].PeriodStart, p[0].PeriodEnd, p[0].Successful, day1)
	}
	if !p[1].PeriodStart.Equal(day1.Add(24*time.Hour)) || p[1].Successful != 1 {
		t.Errorf("day D+1 = %v successful %d", p[1].PeriodStart, p[1].Successful)
	}
	rep := tlsrpt.BuildReport(tlsrpt.ReportOptions{Submitter: "relay.test"}, p[0])
	if rep.DateRange.StartDatetime != "2026-03-14T00:00:00Z" || rep.DateRange.EndDatetime != "2026-03-14T23:59:59Z" {
		t.Errorf("date-range = %+v", rep.DateRange)
	}
	rep = tlsrpt.BuildReport(tlsrpt.ReportOptions{Submitter: "relay.test"}, p[1])
	if rep.DateRange.StartDatetime != "2026-03-15T00:00:00Z" {
		t.Errorf("D+1 date-range = %+v", rep.DateRange)
	}
}

func TestShortIntervalAlignment(t *testing.T) {
	c := newClock(day1)
	r := newTestRecorder(t, t.TempDir(), c, WithInterval(10*time.Second))
	r.Record(at(okSession, day1.Add(9*time.Second+999*time.Millisecond)))
	r.Record(at(okSession, day1.Add(10*time.Second)))
	p := r.Pending()
	if len(p) != 2 || !p[0].PeriodStart.Equal(day1) || !p[1].PeriodStart.Equal(day1.Add(10*time.Second)) ||
		!p[0].PeriodEnd.Equal(day1.Add(10*time.Second)) {
		t.Fatalf("pending = %+v", p)
	}
	if _, err := NewRecorder(t.TempDir(), nil, nil, WithInterval(1500*time.Millisecond)); err == nil {
		t.Error("interval 1.5s accepted")
	}
	if got := periodStart(-1, 10); got != -10 {
		t.Errorf("periodStart(-1, 10) = %d", got)
	}
}

// RPT-4-j, RPT-4-d: sessions are counted, successes only per policy.
func TestAggregation(t *testing.T) {
	c := newClock(day1.Add(time.Hour))
	r := newTestRecorder(t, t.TempDir(), c)
	for range 3 {
		r.Record(okSession) // zero Time: the clock's now
	}
	r.Record(badSession)
	r.Record(badSession)
	other := badSession
	other.ReceivingIP = "198.51.100.8"
	r.Record(other)
	r.Record(tlsrpt.Session{PolicyDomain: "EX.TEST.", PolicyType: "no-policy-found", Success: true})

	p := r.Pending()
	if len(p) != 1 {
		t.Fatalf("pending = %+v", p)
	}
	pc := p[0]
	if pc.PolicyDomain != "ex.test" || pc.Successful != 4 || pc.Failed != 3 || len(pc.Policies) != 2 {
		t.Fatalf("counts = %+v", pc)
	}
	np, sts := pc.Policies[0], pc.Policies[1]
	if np.Policy.PolicyType != "no-policy-found" || np.Summary.TotalSuccessfulSessionCount != 1 || len(np.FailureDetails) != 0 {
		t.Errorf("no-policy-found entry = %+v", np)
	}
	if sts.Summary != (tlsrpt.Summary{TotalSuccessfulSessionCount: 3, TotalFailureSessionCount: 3}) || len(sts.FailureDetails) != 2 ||
		sts.FailureDetails[0].FailedSessionCount != 2 || sts.FailureDetails[1].FailedSessionCount != 1 {
		t.Errorf("sts entry = %+v", sts)
	}
}

// Recording persists: Flush and reopen gives the same Pending; so does a
// Recorder killed after Run flushed (no Close, no explicit Flush).
func TestRecorderPersists(t *testing.T) {
	c := newClock(day1.Add(time.Hour))
	dir := t.TempDir()
	r := newTestRecorder(t, dir, c)
	r.Record(okSession)
	r.Record(badSession)
	r.Record(at(badSession, day1.Add(-time.Minute)))
	if err := r.Flush(); err != nil {
		t.Fatal(err)
	}
	want := r.Pending()
	r2 := newTestRecorder(t, dir, c)
	if got := r2.Pending(); !reflect.DeepEqual(got, want) {
		t.Errorf("after reopen:\n got %+v\nwant %+v", got, want)
	}

	// Counts added by r2 and only flushed by its Run loop.
	dir2 := t.TempDir()
	r3 := newTestRecorder(t, dir2, c)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r3.Run(ctx); close(done) }()
	r3.Record(okSession)
	r3.Record(badSession)
	want = r3.Pending()
	time.Sleep(flushEvery + 500*time.Millisecond)
	// "kill -9": read the directory as it is now, before the final flush.
	snap := t.TempDir()
	data, err := os.ReadFile(filepath.Join(dir2, countsFile))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(snap, countsFile), data, 0o600)
	cancel()
	<-done
	r4 := newTestRecorder(t, snap, c)
	if got := r4.Pending(); !reflect.DeepEqual(got, want) {
		t.Errorf("after Run flush:\n got %+v\nwant %+v", got, want)
	}
}

func TestRecorderIntervalChange(t *testing.T) {
	c := newClock(day1.Add(time.Hour))
	dir := t.TempDir()
	r := newTestRecorder(t, dir, c, WithInterval(time.Hour))
	r.Record(at(okSession, day1.Add(time.Hour)))
	r.Record(at(okSession, day1.Add(3*time.Hour)))
	r.Flush()
	r2 := newTestRecorder(t, dir, c)
	p := r2.Pending()
	if len(p) != 1 || !p[0].PeriodStart.Equal(day1) || p[0].Successful != 2 {
		t.Errorf("after interval change: %+v", p)
	}
}

func TestRecordLateSessionDropped(t *testing.T) {
	c := newClock(day1.Add(25 * time.Hour))
	r := newTestRecorder(t, t.TempDir(), c)
	r.Record(at(okSession, day1.Add(time.Hour)))
	r.ClosePeriod(day1.Unix(), nil)
	r.Record(at(okSession, day1.Add(2*time.Hour))) // period already reported
	r.Record(at(okSession, day1.Add(24*time.Hour)))
	p := r.Pending()
	if len(p) != 1 || !p[0].PeriodStart.Equal(day1.Add(24*time.Hour)) {
		t.Errorf("pending = %+v", p)
	}
}

func TestRecordNoAllocs(t *testing.T) {
	c := newClock(day1.Add(time.Hour))
	r := newTestRecorder(t, t.TempDir(), c)
	s := at(badSession, day1.Add(time.Hour))
	ok := at(okSession, day1.Add(time.Hour))
	r.Record(s)
	r.Record(ok)
	if n := testing.AllocsPerRun(1000, func() { r.Record(s); r.Record(ok) }); n != 0 {
		t.Errorf("Record allocates %v times per call with an existing key", n)
	}
}

// BenchmarkRecord records sessions in parallel into existing aggregates
// (a few domains and failure kinds), the delivery hot path.
func BenchmarkRecord(b *testing.B) {
	c := newClock(day1.Add(time.Hour))
	r := newTestRecorder(b, b.TempDir(), c)
	var sessions []tlsrpt.Session
	for d := range 8 {
		s := at(okSession, day1.Add(time.Hour))
		s.PolicyDomain = fmt.Sprintf("d%d.test", d)
		sessions = append(sessions, s)
		f := at(badSession, day1.Add(time.Hour))
		f.PolicyDomain = s.PolicyDomain
		sessions = append(sessions, f)
	}
	for _, s := range sessions {
		r.Record(s)
	}
	var next atomic.Uint64
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := int(next.Add(1))
		for pb.Next() {
			r.Record(sessions[i%len(sessions)])
			i++
		}
	})
	b.StopTimer()
	var total int64
	for _, pc := range r.Pending() {
		total += pc.Successful + pc.Failed
	}
	if total != int64(b.N+len(sessions)) {
		b.Fatalf("counted %d sessions, want %d", total, b.N+len(sessions))
	}
}

// Issue #9 finding 7: a peer's greeting word of a megabyte, a huge reason
// or bytes outside printable ASCII never reach the counts file or the
// report unbounded, whatever the caller passes.
func TestRecordBoundsPeerStrings(t *testing.T) {
	c := newClock(day1.Add(time.Hour))
	dir := t.TempDir()
	r := newTestRecorder(t, dir, c)
	huge := strings.Repeat("h", 1<<20)
	for i := range 100 {
		s := at(badSession, day1.Add(time.Hour))
		s.ReceivingHelo = huge + strconv.Itoa(i) // a different word each session
		s.ReceivingMX = huge + ".example"
		s.FailureReasonCode = huge
		s.AdditionalInfo = huge
		s.SendingIP, s.ReceivingIP = huge, huge
		r.Record(s)
	}
	odd := at(badSession, day1.Add(time.Hour))
	odd.ReceivingHelo = "mx\x00\x1b[31m\u00e9.test"
	r.Record(odd)
	if err := r.Flush(); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, countsFile))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() > 16<<10 {
		t.Errorf("counts.json is %d bytes after 100 sessions with 1 MB strings", fi.Size())
	}
	p := r.Pending()
	if len(p) != 1 {
		t.Fatalf("pending = %d", len(p))
	}
	var helos []string
	for _, d := range p[0].Policies[0].FailureDetails {
		for name, v := range map[string]string{"helo": d.ReceivingMXHelo, "mx": d.ReceivingMXHostname,
			"reason": d.FailureReasonCode, "info": d.AdditionalInformation, "ip": d.ReceivingIP, "sending ip": d.SendingMTAIP} {
			limit := map[string]int{"reason": tlsrpt.MaxReasonLen, "ip": tlsrpt.MaxIPLen, "sending ip": tlsrpt.MaxIPLen}[name]
			if limit == 0 {
				limit = tlsrpt.MaxNameLen
			}
			if len(v) > limit {
				t.Errorf("%s of %d bytes", name, len(v))
			}
			for i := 0; i < len(v); i++ {
				if v[i] < 0x20 || v[i] >= 0x7f {
					t.Errorf("%s %q has a byte outside printable ASCII", name, v)
					break
				}
			}
		}
		helos = append(helos, d.ReceivingMXHelo)
	}
	// Cut to 255 bytes, the 100 different words are one word.
	if len(helos) != 2 || !slices.Contains(helos, "mx??[31m??.test") {
		t.Errorf("helos = %q", helos)
	}
	// A file written before the bounds is bounded when loaded.
	r2 := newTestRecorder(t, dir, c)
	if got := r2.Pending(); !reflect.DeepEqual(got, p) {
		t.Errorf("reloaded pending differs")
	}
}

// RFC 8460 §4.3.2.2: a domain with an _mta-sts record whose policy could
// not be fetched is reported under policy-type sts (with an empty policy
// string and mx-host), not no-policy-found, even when the caller says
// no-policy-found or nothing.
func TestRecordSTSFetchFailure(t *testing.T) {
	c := newClock(day1.Add(time.Hour))
	r := newTestRecorder(t, t.TempDir(), c)
	for _, pt := range []tlsrpt.PolicyType{"", tlsrpt.PolicyTypeNoPolicyFound, tlsrpt.PolicyTypeSTS} {
		r.Record(tlsrpt.Session{PolicyDomain: "ex.test", PolicyType: pt, ResultType: tlsrpt.ResultSTSPolicyFetchError, FailureReasonCode: "http-status-404"})
	}
	r.Record(tlsrpt.Session{PolicyDomain: "ex.test", ResultType: tlsrpt.ResultSTSWebPKIInvalid, FailureReasonCode: "certificate-expired"})
	// The delivery that followed, with no policy applied.
	r.Record(tlsrpt.Session{PolicyDomain: "ex.test", PolicyType: tlsrpt.PolicyTypeNoPolicyFound, Success: true})
	// An unknown result type is validation-failure.
	r.Record(tlsrpt.Session{PolicyDomain: "ex.test", PolicyType: "bogus", ResultType: "bogus", ReceivingMX: "mx1.ex.test"})

	p := r.Pending()
	if len(p) != 1 || len(p[0].Policies) != 2 {
		t.Fatalf("pending = %+v", p)
	}
	np, sts := p[0].Policies[0], p[0].Policies[1]
	if np.Policy.PolicyType != tlsrpt.PolicyTypeNoPolicyFound || np.Summary != (tlsrpt.Summary{TotalSuccessfulSessionCount: 1, TotalFailureSessionCount: 1}) ||
		len(np.FailureDetails) != 1 || np.FailureDetails[0].ResultType != tlsrpt.ResultValidationFailure {
		t.Errorf("no-policy-found entry = %+v", np)
	}
	if sts.Policy.PolicyType != tlsrpt.PolicyTypeSTS || sts.Policy.PolicyString == nil || len(sts.Policy.PolicyString) != 0 ||
		sts.Policy.MXHost == nil || len(sts.Policy.MXHost) != 0 || sts.Summary != (tlsrpt.Summary{TotalSuccessfulSessionCount: 0, TotalFailureSessionCount: 4}) {
		t.Fatalf("sts entry = %+v", sts)
	}
	want := []tlsrpt.FailureDetail{
		{ResultType: tlsrpt.ResultSTSPolicyFetchError, FailedSessionCount: 3, FailureReasonCode: "http-status-404"},
		{ResultType: tlsrpt.ResultSTSWebPKIInvalid, FailedSessionCount: 1, FailureReasonCode: "certificate-expired"},
	}
	if !reflect.DeepEqual(sts.FailureDetails, want) {
		t.Errorf("failure details = %+v", sts.FailureDetails)
	}
	raw, err := json.Marshal(tlsrpt.BuildReport(tlsrpt.ReportOptions{Submitter: "relay.example.net"}, p[0]))
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"policy":{"policy-type":"sts","policy-string":[],"policy-domain":"ex.test","mx-host":[]}`; !strings.Contains(string(raw), want) {
		t.Errorf("report %s lacks %s", raw, want)
	}
}
