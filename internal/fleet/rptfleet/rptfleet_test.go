package rptfleet_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"mime/multipart"
	"net/mail"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest"

	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/internal/fleet/natstest"
	"github.com/stsrelay/stsrelay/internal/fleet/rptfleet"
	"github.com/stsrelay/stsrelay/tlsrpt"
	"github.com/stsrelay/stsrelay/tlsrpt/tlsrptdb"
	"github.com/stsrelay/stsrelay/tlsrpt/tlsrptsend"
)

const (
	prefix   = "TEST"
	leaseTTL = 2 * time.Second
	ruaAddr  = "tlsrpt@rep.test"
)

// clock is the settable clock of periods shared by the nodes; real time
// while t is zero.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.t.IsZero() {
		return time.Now()
	}
	return c.t
}
func (c *clock) Set(t time.Time)     { c.mu.Lock(); c.t = t; c.mu.Unlock() }
func (c *clock) Add(d time.Duration) { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }

// resolver gives every policy domain the record rua=mailto:ruaAddr.
type resolver struct{}

func (resolver) LookupTXT(_ context.Context, name string) ([][]string, error) {
	if strings.HasPrefix(name, "_smtp._tls.") {
		return [][]string{{"v=TLSRPTv1; rua=mailto:" + ruaAddr}}, nil
	}
	return nil, fmt.Errorf("%s: %w", name, dnsclient.ErrNotFound)
}

// queue is the fleet's (shared) queue: it keeps the report mails, or
// refuses them while failing (and keeps those apart).
type queue struct {
	mu      sync.Mutex
	failing bool
	mails   [][]byte
	refused [][]byte
}

func (q *queue) EnqueueReport(from, to string, msg io.Reader) (string, error) {
	b, err := io.ReadAll(msg)
	if err != nil {
		return "", err
	}
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.failing {
		q.refused = append(q.refused, b)
		return "", errors.New("queue unavailable")
	}
	if to != ruaAddr {
		return "", fmt.Errorf("report to %s", to)
	}
	q.mails = append(q.mails, b)
	return fmt.Sprintf("q%d", len(q.mails)), nil
}

func (q *queue) setFailing(f bool) { q.mu.Lock(); q.failing = f; q.mu.Unlock() }

// reports decodes the queued reports.
func (q *queue) reports(t *testing.T) []tlsrpt.Report {
	t.Helper()
	q.mu.Lock()
	mails := slices.Clone(q.mails)
	q.mu.Unlock()
	var out []tlsrpt.Report
	for _, m := range mails {
		out = append(out, parseReportMail(t, m))
	}
	return out
}

// refusedReports decodes the reports refused while failing: attempts made.
func (q *queue) refusedReports(t *testing.T) []tlsrpt.Report {
	t.Helper()
	q.mu.Lock()
	mails := slices.Clone(q.refused)
	q.mu.Unlock()
	var out []tlsrpt.Report
	for _, m := range mails {
		out = append(out, parseReportMail(t, m))
	}
	return out
}

// parseReportMail returns the report attached to a report mail.
func parseReportMail(t *testing.T, raw []byte) tlsrpt.Report {
	t.Helper()
	msg, err := mail.ReadMessage(bytes.NewReader(raw))
	if err != nil {
		t.Fatal(err)
	}
	_, params, err := mime.ParseMediaType(msg.Header.Get("Content-Type"))
	if err != nil {
		t.Fatal(err)
	}
	mr := multipart.NewReader(msg.Body, params["boundary"])
	for {
		p, err := mr.NextPart()
		if err != nil {
			t.Fatalf("no report attachment: %v", err)
		}
		if mt, _, _ := mime.ParseMediaType(p.Header.Get("Content-Type")); mt != tlsrpt.MediaTypeGzip {
			continue
		}
		zr, err := gzip.NewReader(base64.NewDecoder(base64.StdEncoding, p))
		if err != nil {
			t.Fatal(err)
		}
		var r tlsrpt.Report
		if err := json.NewDecoder(zr).Decode(&r); err != nil {
			t.Fatal(err)
		}
		return r
	}
}

// node is one relay: its own NATS connection, Recorder, rptfleet.Node
// and Reporter.
type node struct {
	name   string
	nc     *nats.Conn
	rec    *tlsrptdb.Recorder
	fn     *rptfleet.Node
	rp     *tlsrptsend.Reporter
	cancel context.CancelFunc
	wg     sync.WaitGroup
	down   bool
}

type fleetT struct {
	t        *testing.T
	cluster  *natstest.Cluster
	clock    *clock
	q        *queue
	interval time.Duration
	nodes    []*node
}

// newFleet starts a 3-server JetStream cluster and n relays on it; the
// relays run their rptfleet.Node (election, hand-off) and Recorder, and
// with runReporter also their Reporter's Run loop (otherwise the test
// drives SendDue).
func newFleet(t *testing.T, n int, interval time.Duration, start time.Time, runReporter bool, configure ...func(int, *server.Options)) *fleetT {
	t.Helper()
	var cfg func(int, *server.Options)
	if len(configure) > 0 {
		cfg = configure[0]
	}
	f := &fleetT{t: t, cluster: natstest.StartWith(t, 3, cfg), clock: &clock{t: start}, q: &queue{}, interval: interval}
	for i := range n {
		f.nodes = append(f.nodes, f.startNode(fmt.Sprintf("relay-%c", 'a'+i), runReporter))
	}
	return f
}

func (f *fleetT) startNode(name string, runReporter bool) *node {
	t := f.t
	t.Helper()
	log := zaptest.NewLogger(t, zaptest.Level(zap.InfoLevel)).With(zap.String("relay", name))
	nc, err := nats.Connect(f.cluster.URL(), nats.Name(name), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := tlsrptdb.NewRecorder(t.TempDir(), f.clock.Now, log, tlsrptdb.WithInterval(f.interval))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	fn, err := rptfleet.Open(ctx, rptfleet.Config{
		JS: js, Prefix: prefix, Node: name, Replicas: 3, Interval: f.interval,
		HandOffGrace: f.interval / 10, MergeAfter: f.interval / 2,
		SnapshotEvery: 100 * time.Millisecond, LeaseTTL: leaseTTL,
		Now: f.clock.Now, Logger: log,
	})
	if err != nil {
		t.Fatal(err)
	}
	rp, err := tlsrptsend.NewReporter(tlsrptsend.Options{
		Recorder: rec, Resolver: resolver{}, Enqueue: f.q.EnqueueReport,
		Hostname: "relay.example.net", OrganizationName: "Example", ContactInfo: "mailto:postmaster@example.net",
		Now: f.clock.Now, Logger: log, RetryBase: time.Minute,
		Source: fn, Jobs: fn, Active: fn.IsReporter,
	})
	if err != nil {
		t.Fatal(err)
	}
	n := &node{name: name, nc: nc, rec: rec, fn: fn, rp: rp}
	rctx, rcancel := context.WithCancel(context.Background())
	n.cancel = rcancel
	n.wg.Go(func() { fn.Run(rctx, rec) })
	n.wg.Go(func() { rec.Run(rctx) })
	if runReporter {
		n.wg.Go(func() { rp.Run(rctx) })
	}
	t.Cleanup(n.stop)
	return n
}

// stop shuts the relay down in order: loops (last snapshot, lease
// released), then the connection.
func (n *node) stop() {
	n.cancel()
	n.wg.Wait()
	n.nc.Close()
	n.down = true
}

// kill is a crash: the connection goes first, so nothing more reaches
// NATS (no last snapshot, no release).
func (n *node) kill() {
	n.nc.Close()
	n.cancel()
	n.wg.Wait()
	n.down = true
}

func (f *fleetT) alive() []*node {
	var out []*node
	for _, n := range f.nodes {
		if !n.down {
			out = append(out, n)
		}
	}
	return out
}

// waitFor polls cond every 20ms for up to d.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// reporter waits until exactly one live node is the reporter and returns
// it.
func (f *fleetT) reporter() *node {
	f.t.Helper()
	var rep *node
	waitFor(f.t, 3*leaseTTL, "one reporter", func() bool {
		rep = nil
		count := 0
		for _, n := range f.alive() {
			if n.fn.IsReporter() {
				rep, count = n, count+1
			}
		}
		return count == 1
	})
	return rep
}

// handedOff waits until every live node has handed off its finished
// periods (its Recorder holds only periods after before).
func (f *fleetT) handedOff(before time.Time) {
	f.t.Helper()
	waitFor(f.t, 10*time.Second, "hand-off", func() bool {
		for _, n := range f.alive() {
			for _, pc := range n.rec.Pending() {
				if pc.PeriodStart.Before(before) {
					return false
				}
			}
		}
		return true
	})
}

// sendUntil runs SendDue on every live node until there are want reports
// (at most d), then a few more passes, and returns the reports.
func (f *fleetT) sendUntil(want int, d time.Duration) []tlsrpt.Report {
	f.t.Helper()
	pass := func() {
		for _, n := range f.alive() {
			n.rp.SendDue(context.Background())
		}
	}
	waitFor(f.t, d, fmt.Sprintf("%d reports", want), func() bool {
		pass()
		return len(f.q.reports(f.t)) >= want
	})
	for range 3 {
		pass()
	}
	return f.q.reports(f.t)
}

var (
	sts   = []string{"version: STSv1", "mode: enforce", "mx: mx.ex.test", "max_age: 86400"}
	okS   = tlsrpt.Session{PolicyDomain: "ex.test", PolicyType: tlsrpt.PolicyTypeSTS, PolicyString: sts, MXPatterns: []string{"mx.ex.test"}, Success: true}
	failS = tlsrpt.Session{PolicyDomain: "ex.test", PolicyType: tlsrpt.PolicyTypeSTS, PolicyString: sts, MXPatterns: []string{"mx.ex.test"},
		ResultType: tlsrpt.ResultCertificateExpired, SendingIP: "192.0.2.1", ReceivingMX: "mx.ex.test", ReceivingIP: "198.51.100.1",
		FailureReasonCode: "certificate-expired"}
)

// recordOn records ok successes and one failure on n, for policy domain d.
func recordOn(n *node, d string, ok int) {
	for range ok {
		s := okS
		s.PolicyDomain = d
		n.rec.Record(s)
	}
	s := failS
	s.PolicyDomain = d
	n.rec.Record(s)
}

// totals sums a report's counts.
func totals(r tlsrpt.Report) (ok, failed int64) {
	for _, p := range r.Policies {
		ok += p.Summary.TotalSuccessfulSessionCount
		failed += p.Summary.TotalFailureSessionCount
	}
	return ok, failed
}

func byDomainPeriod(t *testing.T, reps []tlsrpt.Report) map[string]tlsrpt.Report {
	t.Helper()
	out := map[string]tlsrpt.Report{}
	ids := map[string]bool{}
	for _, r := range reps {
		if len(r.Policies) == 0 {
			t.Fatalf("report without policies: %+v", r)
		}
		k := r.Policies[0].Policy.PolicyDomain + " " + r.DateRange.StartDatetime
		if _, dup := out[k]; dup {
			t.Errorf("two reports for %s: %s and %s", k, out[k].ReportID, r.ReportID)
		}
		if ids[r.ReportID] {
			t.Errorf("report-id %s used twice", r.ReportID)
		}
		ids[r.ReportID] = true
		out[k] = r
	}
	return out
}

// period returns the aligned start of the period holding t.
func period(t time.Time, iv time.Duration) time.Time { return t.Truncate(iv).UTC() }

func stamp(t time.Time) string { return t.UTC().Format("2006-01-02T15:04:05Z") }

// Three relays count sessions for one policy domain in one period: the
// fleet sends exactly one report for it, with the sum of the three and one
// report-id; exactly one relay says it is the reporter, and all name it.
func TestOneReportForTheFleet(t *testing.T) {
	const iv = 4 * time.Second
	p := time.Unix(1_800_000_000, 0).Truncate(iv)
	f := newFleet(t, 3, iv, p.Add(time.Second), false)
	rep := f.reporter()
	for _, n := range f.nodes {
		waitFor(t, 2*leaseTTL, "everyone knows the reporter", func() bool { return n.fn.Reporter() == rep.name })
	}
	for i, n := range f.nodes {
		recordOn(n, "ex.test", i+1) // 1+2+3 ok, 3 failed
	}
	recordOn(f.nodes[1], "solo.test", 4)

	f.clock.Set(p.Add(iv + iv/2))
	f.handedOff(p.Add(iv))
	reps := byDomainPeriod(t, f.sendUntil(2, 10*time.Second))
	if len(reps) != 2 {
		t.Fatalf("%d reports, want 2: %+v", len(reps), reps)
	}
	ex, ok := reps["ex.test "+stamp(p)]
	if !ok {
		t.Fatalf("no report for ex.test: %+v", reps)
	}
	if o, fl := totals(ex); o != 6 || fl != 3 {
		t.Errorf("ex.test: %d ok, %d failed; want 6, 3", o, fl)
	}
	if d := ex.Policies[0].FailureDetails; len(d) != 1 || d[0].FailedSessionCount != 3 || d[0].ResultType != tlsrpt.ResultCertificateExpired {
		t.Errorf("failure details %+v", d)
	}
	if ex.DateRange.EndDatetime != stamp(p.Add(iv-time.Second)) {
		t.Errorf("date-range %+v", ex.DateRange)
	}
	if !strings.HasPrefix(ex.ReportID, fmt.Sprint(p.Unix())+".ex.test.") {
		t.Errorf("report-id %s", ex.ReportID)
	}
	if o, fl := totals(reps["solo.test "+stamp(p)]); o != 4 || fl != 1 {
		t.Errorf("solo.test: %d ok, %d failed", o, fl)
	}
	// The job state is the reporter's; the others send nothing.
	for _, n := range f.nodes {
		if n != rep && n.fn.IsReporter() {
			t.Errorf("%s is a reporter too", n.name)
		}
	}
	// Later passes, even much later, send nothing more.
	f.clock.Add(3 * time.Hour)
	if n := len(f.sendUntil(2, time.Second)); n != 2 {
		t.Errorf("%d reports later", n)
	}
}

// A relay that counted sessions, wrote them to the bucket (a snapshot of
// the open period) and died: its counts are in the fleet's report. Another
// relay counted sessions and handed off the finished period just before it
// died: its counts are in too. One of the three NATS servers dies as well.
func TestDeadRelaysCountsReported(t *testing.T) {
	const iv = 4 * time.Second
	p := time.Unix(1_800_000_000, 0).Truncate(iv)
	f := newFleet(t, 3, iv, p.Add(time.Second), false)
	a, b, c := f.nodes[0], f.nodes[1], f.nodes[2]
	recordOn(a, "ex.test", 1)
	recordOn(b, "ex.test", 2)
	recordOn(c, "ex.test", 5)

	// c dies mid-period, after a snapshot reached the bucket.
	js, err := jetstream.New(a.nc)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(context.Background(), prefix+"_TLSRPT")
	if err != nil {
		t.Fatal(err)
	}
	key := fmt.Sprintf("counts.%d.ex_test.%s", p.Unix(), c.name)
	waitFor(t, 5*time.Second, "c's snapshot", func() bool {
		e, err := kv.Get(context.Background(), key)
		return err == nil && bytes.Contains(e.Value(), []byte(`"successful":5`))
	})
	c.kill()

	// b hands the finished period off, then dies.
	f.clock.Set(p.Add(iv + iv/5))
	waitFor(t, 5*time.Second, "b's hand-off", func() bool { return len(b.rec.Pending()) == 0 })
	b.kill()
	f.cluster.Shutdown(0)

	f.clock.Set(p.Add(iv + iv/2))
	f.handedOff(p.Add(iv))
	// a may have to take the lease first, once the bucket has a leader.
	reps := f.sendUntil(1, 30*time.Second)
	if len(reps) != 1 {
		t.Fatalf("%d reports", len(reps))
	}
	if o, fl := totals(reps[0]); o != 8 || fl != 3 {
		t.Errorf("%d ok, %d failed; want 8, 3 (a 1+1, b 2+1, c 5+1)", o, fl)
	}
	if !a.fn.IsReporter() {
		t.Error("the one relay left is not the reporter")
	}
}

// The reporter dies with one report sent, one report's job made but not
// yet delivered (the queue refused it), and one period's counts handed off
// but not yet merged. Another relay takes the lease after its TTL and
// sends the two missing reports — the pending one with the report-id the
// dead reporter gave it — and not the one already sent.
func TestReporterDiesAnotherTakesOver(t *testing.T) {
	const iv = 4 * time.Second
	p1 := time.Unix(1_800_000_000, 0).Truncate(iv)
	p2, p3 := p1.Add(iv), p1.Add(2*iv)
	f := newFleet(t, 3, iv, p1.Add(time.Second), false)
	old := f.reporter()

	// P1: sent.
	for i, n := range f.nodes {
		recordOn(n, "ex.test", i+1)
	}
	f.clock.Set(p2.Add(iv / 2))
	f.handedOff(p2)
	if reps := f.sendUntil(1, 10*time.Second); len(reps) != 1 {
		t.Fatalf("P1: %d reports", len(reps))
	}

	// P2 (counted at p2 + iv/2): the job is made, the queue refuses it.
	for _, n := range f.nodes {
		recordOn(n, "ex.test", 10)
	}
	f.q.setFailing(true)
	f.clock.Set(p3.Add(iv / 2))
	f.handedOff(p3)
	var id2 string
	waitFor(t, 10*time.Second, "P2's job", func() bool {
		for _, n := range f.alive() {
			n.rp.SendDue(context.Background())
		}
		for _, r := range f.q.refusedReports(t) {
			if r.DateRange.StartDatetime == p2.UTC().Format(time.RFC3339) {
				id2 = r.ReportID
				return true
			}
		}
		return false
	})
	if n := len(f.q.reports(t)); n != 1 {
		t.Fatalf("%d reports while the queue refuses", n)
	}

	// P3: every relay hands it off; the reporter dies before merging it.
	for _, n := range f.nodes {
		recordOn(n, "ex.test", 100)
	}
	f.clock.Set(p3.Add(iv + iv/5))
	f.handedOff(p3.Add(iv))
	old.kill()
	f.q.setFailing(false)

	f.clock.Set(p3.Add(iv + iv/2 + time.Minute)) // P2's retry is due
	reps := byDomainPeriod(t, f.sendUntil(3, 5*leaseTTL))
	if len(reps) != 3 {
		t.Fatalf("%d reports, want 3: %+v", len(reps), reps)
	}
	want := map[time.Time]int64{p1: 6, p2: 30, p3: 300}
	for start, ok := range want {
		r, found := reps["ex.test "+stamp(start)]
		if !found {
			t.Errorf("no report for the period at %s", stamp(start))
			continue
		}
		if o, fl := totals(r); o != ok || fl != 3 {
			t.Errorf("period %s: %d ok, %d failed; want %d, 3", stamp(start), o, fl, ok)
		}
	}
	if got := reps["ex.test "+stamp(p2)].ReportID; got != id2 {
		t.Errorf("P2 report-id %s, want the dead reporter's %s", got, id2)
	}
	rep := f.reporter()
	if rep == old {
		t.Fatal("dead reporter still the reporter")
	}
	for _, n := range f.alive() {
		if n.fn.Reporter() != rep.name {
			t.Errorf("%s says the reporter is %q, not %s", n.name, n.fn.Reporter(), rep.name)
		}
	}
}

// A reporter that stops cleanly hands the lease over at once (well within
// its TTL); and everything runs with real time and every loop, Reporter.Run
// included.
func TestRealTimeAndCleanHandover(t *testing.T) {
	const iv = 2 * time.Second
	f := newFleet(t, 3, iv, time.Time{}, true) // periods follow real time
	rep := f.reporter()
	at := time.Now()
	for i, n := range f.nodes {
		for range i + 1 {
			s := okS
			s.Time = at
			n.rec.Record(s)
		}
	}
	waitFor(t, 15*time.Second, "the report", func() bool { return len(f.q.reports(t)) >= 1 })
	time.Sleep(iv)
	reps := f.q.reports(t)
	if len(reps) != 1 {
		t.Fatalf("%d reports", len(reps))
	}
	if o, _ := totals(reps[0]); o != 6 {
		t.Errorf("%d ok, want 6", o)
	}
	if reps[0].DateRange.StartDatetime != stamp(period(at, iv)) {
		t.Errorf("date-range %+v for a session at %v", reps[0].DateRange, at)
	}

	rep.stop()
	start := time.Now()
	next := f.reporter()
	if next == rep {
		t.Fatal("stopped reporter still reporter")
	}
	if d := time.Since(start); d >= leaseTTL {
		t.Errorf("handover took %v, not under the lease TTL %v", d, leaseTTL)
	}
}

// With a small max_payload, counts too big for it lose their rarest
// failure details, never their totals, and the report is still sent.
func TestCountsFitMaxPayload(t *testing.T) {
	const iv = 4 * time.Second
	p := time.Unix(1_800_000_000, 0).Truncate(iv)
	f := newFleet(t, 3, iv, p.Add(time.Second), false, func(_ int, o *server.Options) { o.MaxPayload = 32 << 10 })
	for i, n := range f.nodes {
		for j := range 300 {
			s := failS
			s.ReceivingIP = fmt.Sprintf("198.51.%d.%d", i, j%250)
			s.ReceivingMX = fmt.Sprintf("mx%d.ex.test", j)
			n.rec.Record(s)
		}
		n.rec.Record(failS) // the common one: 3 in all
		n.rec.Record(failS)
		recordOn(n, "ex.test", 10)
	}
	f.clock.Set(p.Add(iv + iv/2))
	f.handedOff(p.Add(iv))
	reps := f.sendUntil(1, 10*time.Second)
	if len(reps) != 1 {
		t.Fatalf("%d reports", len(reps))
	}
	if o, fl := totals(reps[0]); o != 30 || fl != 3*303 {
		t.Errorf("%d ok, %d failed; want 30, %d", o, fl, 3*303)
	}
	d := reps[0].Policies[0].FailureDetails
	if len(d) == 0 || len(d) >= 900 || d[0].FailedSessionCount != 9 {
		t.Errorf("%d details, first %+v: want the common one (9) kept and the rarest dropped", len(d), d[0])
	}
}

// Relays starting together all open (create) the bucket; a bad
// configuration is refused.
func TestOpen(t *testing.T) {
	c := natstest.Start(t, 3)
	var wg sync.WaitGroup
	errs := make([]error, 3)
	for i := range errs {
		wg.Go(func() {
			nc, err := nats.Connect(c.URL())
			if err != nil {
				errs[i] = err
				return
			}
			defer nc.Close()
			js, _ := jetstream.New(nc)
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			_, errs[i] = rptfleet.Open(ctx, rptfleet.Config{JS: js, Node: fmt.Sprint("n", i), Interval: time.Hour})
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("node %d: %v", i, err)
		}
	}
	nc, err := nats.Connect(c.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	js, _ := jetstream.New(nc)
	for _, cfg := range []rptfleet.Config{
		{JS: js, Interval: time.Hour},
		{JS: js, Node: "x"},
		{JS: js, Node: "x", Interval: time.Hour, HandOffGrace: time.Minute, MergeAfter: time.Minute},
		{JS: js, Node: "x", Interval: time.Hour, LeaseTTL: 500 * time.Millisecond},
	} {
		if _, err := rptfleet.Open(context.Background(), cfg); err == nil {
			t.Errorf("accepted %+v", cfg)
		}
	}
}
