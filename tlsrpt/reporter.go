package tlsrpt

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/mail"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/net/publicsuffix"

	"github.com/stsrelay/stsrelay/internal/atomicfile"
	"github.com/stsrelay/stsrelay/internal/domain"
)

// Enqueuer queues a report mail for delivery (RFC 8460 §5.3): msg is the
// complete message, from the envelope sender and to the one recipient.
// The queue must mark it as a TLS-RPT report (queue.KindTLSRPT), which
// delivery sends despite MTA-STS failures and never counts for TLS-RPT
// itself (§3, §5.3: no reports about reports). It returns the queue ID.
type Enqueuer interface {
	EnqueueReport(from, to string, msg io.Reader) (queueID string, err error)
}

// Defaults of Options.
const (
	DefaultHTTPTimeout = 2 * time.Minute
	DefaultRetryFor    = 24 * time.Hour // RFC 8460 §5.5
	DefaultRetryBase   = 5 * time.Minute
	maxRetryGap        = 4 * time.Hour
	// doneRetention is how long a finished job's file is kept (it also
	// guards against making the same report twice after a crash).
	doneRetention = 24 * time.Hour
	// sendParallel bounds concurrent report jobs in one pass.
	sendParallel = 16
	reportsDir   = "reports"
	// maxJobTries is how many passes (about a minute apart) try to write
	// a policy domain's report job before its counts for that period are
	// given up.
	maxJobTries = 10
)

// Outcomes of sending a report to one rua, passed to Options.OnReport and
// logged as "result".
const (
	SendOK      = "ok"      // the rua accepted the report
	SendFailed  = "failed"  // one attempt failed; it will be retried
	SendDropped = "dropped" // given up on the rua: after RetryFor, or its address is refused
)

// DefaultSendDelay is the RFC 8460 §4.1 suggestion for interval: a random
// delay of up to 4 hours after a day ends, or a sixth of shorter intervals.
func DefaultSendDelay(interval time.Duration) time.Duration {
	return min(4*time.Hour, interval/6)
}

// Options configure a Reporter.
type Options struct {
	// Recorder holds the counts; its directory also holds the report jobs.
	Recorder *Recorder
	// Resolver looks up _smtp._tls records and, when it has the method
	// LookupIP(ctx, host string, wantV6 bool) ([]net.IP, error) as
	// *dnsclient.Resolver does, the addresses of https: report endpoints;
	// otherwise the system resolver is used for those.
	Resolver TXTResolver
	// Queue takes mailto: reports.
	Queue Enqueuer

	// RootCAs verify https: report endpoints: the complete pool (system
	// roots plus tls.extra_root_ca_file). Nil means the system roots.
	RootCAs *x509.CertPool
	// Timeout bounds one HTTPS POST; 0 means DefaultHTTPTimeout.
	Timeout time.Duration
	// AllowPrivateRUA (tlsrpt.allow_private_rua) lets https: report
	// endpoints be on loopback, private, link-local and other
	// non-public addresses. By default they are refused, since the
	// rua is chosen by whoever controls the recipient domain's DNS.
	// The check is made on the address actually connected to, so DNS
	// rebinding cannot get around it.
	AllowPrivateRUA bool
	// HTTPSPort, when non-zero, is dialled for https: URIs that name no
	// port instead of 443. Only tests use it.
	HTTPSPort int

	// Hostname is the report submitter: the relay's hostname (a domain,
	// RFC 8460 §5.1 "sender", §5.3 TLS-Report-Submitter). Required.
	Hostname string
	// OrganizationName and ContactInfo go into every report (§4.4).
	OrganizationName string
	ContactInfo      string
	// From is the From: header and envelope sender of mailed reports;
	// empty means "tlsrpt-noreply@<Hostname>".
	From string
	// Interval must be 0 or equal to the Recorder's interval.
	Interval time.Duration
	// DKIM signs mailed reports when set.
	DKIM *DKIMOptions

	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Logger; nil discards.
	Logger *zap.Logger
	// OnReport is called with SendOK/SendFailed/SendDropped per rua
	// attempt outcome (metrics: stsrelay_tlsrpt_reports_total{result}).
	OnReport func(result string)
	// SendDelay is the largest random delay between the end of a period
	// and the first attempt at its reports (§4.1); each policy domain
	// draws its own. 0 sends at once (tests); production should use
	// DefaultSendDelay(interval).
	SendDelay time.Duration
	// RetryFor is how long after the first attempt a failing rua is
	// retried (§5.5); 0 means DefaultRetryFor.
	RetryFor time.Duration
	// RetryBase is the first retry gap, doubled after each failure up to
	// 4h; 0 means DefaultRetryBase.
	RetryBase time.Duration

	// Fleet mode (see Sink). All three nil: standalone, as always.
	//
	// Source, when set, gives the finished periods' counts in place of
	// Recorder, which then only gives the interval (its own periods go
	// elsewhere by Recorder.HandOff). Finished jobs are then pruned
	// after a day without looking at the Recorder: the Source never
	// returns a period and domain again once Done.
	Source Source
	// Jobs, when set, keeps the report jobs in place of files under the
	// Recorder's directory.
	Jobs JobStore
	// Active, when set, says whether this relay is the one that makes and
	// sends reports now; while it says false SendDue does nothing, and
	// when it turns true again the jobs are reloaded from Jobs (another
	// relay may have advanced them).
	Active func() bool
}

// fleetPoll bounds the Run loop's sleep when Source or Active is set: how
// soon a relay that became the reporter, or a Source whose period became
// ready, is noticed.
const fleetPoll = 5 * time.Second

// Reporter turns finished periods into reports and sends them (RFC 8460
// §5). Create it with NewReporter and call Run.
type Reporter struct {
	opts   Options
	rec    *Recorder
	log    *zap.Logger
	now    func() time.Time
	dir    string
	client *http.Client
	grace  time.Duration

	passMu sync.Mutex // one pass at a time
	// jobTries counts the failed attempts at writing a job, by file name
	// (under passMu).
	jobTries map[string]int
	// wasActive is whether the previous pass found Options.Active true
	// (under passMu).
	wasActive bool
	mu        sync.Mutex
	jobs      map[string]*job // by file name
	// dkim signs mailed reports (nil: unsigned); SetDKIM replaces it.
	dkim atomic.Pointer[DKIMOptions]
}

// SetDKIM replaces the DKIM signing options of mailed reports (a reload:
// a rotated key, or signing turned on or off); nil means unsigned. A
// KeyFile without Signer is read now; on error nothing changes. Reports
// composed afterwards use the new key.
func (rp *Reporter) SetDKIM(d *DKIMOptions) error {
	if d != nil && d.Signer == nil {
		if d.KeyFile == "" {
			d = nil
		} else {
			s, err := LoadDKIMKey(d.KeyFile)
			if err != nil {
				return fmt.Errorf("tlsrpt: %w", err)
			}
			dk := *d
			dk.Signer = s
			d = &dk
		}
	}
	if d != nil && (d.Domain == "" || d.Selector == "") {
		return errors.New("tlsrpt: DKIM needs a domain and a selector")
	}
	if d == nil {
		rp.log.Warn("tlsrpt_no_dkim", zap.String("reason", noDKIMReason))
	}
	rp.dkim.Store(d)
	return nil
}

const noDKIMReason = "mailed TLS reports are sent without a DKIM signature; RFC 8460 §3 lets receivers ignore them"

// ContactMatchesSubmitter reports whether the domain of contact-info (a
// mailto: URI or an address) is the submitter's domain — the relay's
// hostname — or a parent of it up to the organisational domain (public
// suffix plus one label): relay.example.net may give
// postmaster@example.net, not postmaster@net. RFC 8460 §5.3 asks that
// TLS-Report-Submitter be the domain responsible for the reports.
func ContactMatchesSubmitter(contactInfo, hostname string) bool {
	_, dom, ok := strings.Cut(ContactAddress(contactInfo), "@")
	if !ok {
		return false
	}
	dom, host := normDomain(dom), normDomain(hostname)
	if dom == "" || host == "" {
		return false
	}
	if dom == host {
		return true
	}
	if !strings.HasSuffix(host, "."+dom) {
		return false
	}
	org, err := publicsuffix.EffectiveTLDPlusOne(host)
	if err != nil {
		return false
	}
	// dom is a parent of host; it must not be above the organisation.
	return dom == org || strings.HasSuffix(dom, "."+org)
}

// job is one report for one policy domain and period, and its delivery
// state. It is persisted as reports/<start>_<domain.FileName>.json.
type job struct {
	PeriodStart  int64     `json:"period_start"`
	PolicyDomain string    `json:"policy_domain"`
	Report       *Report   `json:"report"`
	Created      time.Time `json:"created"`
	// NotBefore is the period end plus the random send delay.
	NotBefore time.Time `json:"not_before"`
	// Discovery of the TLSRPT record: attempts and the next one.
	Discovered   bool      `json:"discovered"`
	LookupTries  int       `json:"lookup_tries,omitempty"`
	FirstAttempt time.Time `json:"first_attempt,omitzero"`
	NextAttempt  time.Time `json:"next_attempt,omitzero"`
	Targets      []*target `json:"targets,omitempty"`
	// Done: nothing more to do; Outcome says why.
	Done    bool      `json:"done"`
	Outcome string    `json:"outcome,omitempty"` // sent, partial, no-record, dropped
	DoneAt  time.Time `json:"done_at,omitzero"`
}

// target is one rua of a job.
type target struct {
	RUA          RUA       `json:"rua"`
	State        string    `json:"state"` // pending, sent, dropped
	Attempts     int       `json:"attempts"`
	FirstAttempt time.Time `json:"first_attempt,omitzero"`
	NextAttempt  time.Time `json:"next_attempt,omitzero"`
	LastError    string    `json:"last_error,omitempty"`
	QueueID      string    `json:"queue_id,omitempty"`
	SentAt       time.Time `json:"sent_at,omitzero"`
}

const (
	statePending = "pending"
	stateSent    = "sent"
	stateDropped = "dropped"
)

// NewReporter checks opts and loads the report jobs left by an earlier
// run from the Recorder's directory.
func NewReporter(opts Options) (*Reporter, error) {
	if opts.Recorder == nil || opts.Resolver == nil {
		return nil, errors.New("tlsrpt: Reporter needs a Recorder and a Resolver")
	}
	opts.Hostname = normDomain(opts.Hostname)
	if opts.Hostname == "" {
		return nil, errors.New("tlsrpt: Reporter needs the relay's Hostname (the report submitter)")
	}
	if opts.Interval != 0 && opts.Interval != opts.Recorder.Interval() {
		return nil, fmt.Errorf("tlsrpt: interval %v differs from the recorder's %v", opts.Interval, opts.Recorder.Interval())
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = zap.NewNop()
	}
	if opts.Timeout <= 0 {
		opts.Timeout = DefaultHTTPTimeout
	}
	if opts.RetryFor <= 0 {
		opts.RetryFor = DefaultRetryFor
	}
	if opts.RetryBase <= 0 {
		opts.RetryBase = DefaultRetryBase
	}
	if opts.From == "" {
		opts.From = "tlsrpt-noreply@" + opts.Hostname
	}
	from, err := mail.ParseAddress(opts.From)
	if err != nil {
		return nil, fmt.Errorf("tlsrpt: from %q: %w", opts.From, err)
	}
	opts.From = from.Address // the envelope sender too: a bare address
	if d := opts.DKIM; d != nil && d.Signer == nil {
		if d.KeyFile == "" {
			opts.DKIM = nil
		} else {
			s, err := LoadDKIMKey(d.KeyFile)
			if err != nil {
				return nil, fmt.Errorf("tlsrpt: %w", err)
			}
			dk := *d
			dk.Signer = s
			opts.DKIM = &dk
		}
	}
	if opts.DKIM != nil && (opts.DKIM.Domain == "" || opts.DKIM.Selector == "") {
		return nil, errors.New("tlsrpt: DKIM needs a domain and a selector")
	}
	log := opts.Logger
	if opts.DKIM == nil {
		log.Warn("tlsrpt_no_dkim", zap.String("reason", noDKIMReason))
	}
	if !ContactMatchesSubmitter(opts.ContactInfo, opts.Hostname) {
		log.Warn("tlsrpt_contact_domain",
			zap.String("contact_info", ContactAddress(opts.ContactInfo)), zap.String("submitter", opts.Hostname),
			zap.String("reason", "RFC 8460 §5.3: TLS-Report-Submitter (the hostname) must match the domain of contact-info, or its organisational parent"))
	}

	rd := &ruaDialer{
		resolver:     opts.Resolver,
		timeout:      opts.Timeout,
		allowPrivate: opts.AllowPrivateRUA,
		httpsPort:    opts.HTTPSPort,
	}
	transport := &http.Transport{
		Proxy:               nil,
		DialContext:         rd.DialContext,
		TLSClientConfig:     &tls.Config{RootCAs: opts.RootCAs, MinVersion: tls.VersionTLS12},
		TLSHandshakeTimeout: opts.Timeout,
		DisableKeepAlives:   true,
		ForceAttemptHTTP2:   true,
	}
	rp := &Reporter{
		opts: opts,
		rec:  opts.Recorder,
		log:  log,
		now:  opts.Now,
		dir:  filepath.Join(opts.Recorder.dir, reportsDir),
		client: &http.Client{
			Transport: transport,
			Timeout:   opts.Timeout,
			// Never follow redirects: a 3xx is a failed attempt.
			CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
		},
		grace:    min(30*time.Second, opts.Recorder.Interval()/10),
		jobTries: map[string]int{},
		jobs:     map[string]*job{},
		// With a JobStore the first active pass reloads the jobs: they
		// may have moved on since NewReporter read them.
		wasActive: opts.Jobs == nil,
	}
	rp.dkim.Store(opts.DKIM)
	if opts.Jobs != nil {
		// Only for Reports until the first active pass reloads them; a
		// store that cannot be read now does not stop the relay.
		if jobs, err := rp.loadStoreJobs(); err != nil {
			log.Warn("tlsrpt_jobs_load", zap.Error(err))
		} else {
			rp.jobs = jobs
		}
		return rp, nil
	}
	if err := os.MkdirAll(rp.dir, 0o750); err != nil {
		return nil, fmt.Errorf("tlsrpt: %w", err)
	}
	if err := rp.loadJobs(); err != nil {
		return nil, err
	}
	return rp, nil
}

// loadStoreJobs reads the jobs from Options.Jobs.
func (rp *Reporter) loadStoreJobs() (map[string]*job, error) {
	docs, err := rp.opts.Jobs.LoadJobs()
	if err != nil {
		return nil, fmt.Errorf("tlsrpt: load report jobs: %w", err)
	}
	jobs := make(map[string]*job, len(docs))
	for _, data := range docs {
		j := &job{}
		if err := json.Unmarshal(data, j); err != nil || j.Report == nil || j.PolicyDomain == "" {
			rp.log.Error("tlsrpt_job_corrupt", zap.Int("bytes", len(data)), zap.Error(err))
			continue
		}
		jobs[jobName(j.PeriodStart, j.PolicyDomain)] = j
	}
	return jobs, nil
}

// active is Options.Active, true when unset.
func (rp *Reporter) active() bool { return rp.opts.Active == nil || rp.opts.Active() }

func (rp *Reporter) loadJobs() error {
	err := atomicfile.ReadDirJSON(rp.dir, func(path string, data []byte, err error) error {
		if err != nil {
			return err
		}
		j := &job{}
		if err := json.Unmarshal(data, j); err != nil || j.Report == nil {
			os.Rename(path, path+".bad")
			rp.log.Error("tlsrpt_job_corrupt", zap.String("file", path+".bad"), zap.Error(err))
			return nil
		}
		rp.jobs[filepath.Base(path)] = j
		return nil
	})
	if err != nil {
		return fmt.Errorf("tlsrpt: %w", err)
	}
	return nil
}

// jobName is the job's file name: deterministic, so that a period is never
// turned into a second job for the same domain, and short enough for any
// file system whatever the domain (domain.FileName).
func jobName(start int64, policyDomain string) string {
	return strconv.FormatInt(start, 10) + "_" + domain.FileName(policyDomain) + ".json"
}

// Run sends reports until ctx ends: after each period, plus a grace for
// sessions still being recorded (a tenth of the interval, at most 30s), it
// makes the period's report jobs, then attempts the due ones. The
// Recorder's own Run, which flushes counts every second, must run too.
func (rp *Reporter) Run(ctx context.Context) {
	for {
		rp.SendDue(ctx)
		wait := rp.nextWake().Sub(rp.now())
		wait = min(max(wait, 50*time.Millisecond), time.Minute)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// nextWake is when the next pass has something to do.
func (rp *Reporter) nextWake() time.Time {
	now := rp.now()
	if !rp.active() {
		return now.Add(fleetPoll)
	}
	iv := rp.rec.Interval()
	next := time.Unix(periodStart(now.Unix(), int64(iv/time.Second)), 0).Add(iv + rp.grace)
	if rp.opts.Source != nil || rp.opts.Active != nil {
		if p := now.Add(fleetPoll); p.Before(next) {
			next = p
		}
	}
	rp.mu.Lock()
	defer rp.mu.Unlock()
	for _, j := range rp.jobs {
		if t, ok := j.due(); ok && t.Before(next) {
			next = t
		}
	}
	return next
}

// due is when the job next has something to do.
func (j *job) due() (time.Time, bool) {
	if j.Done {
		return time.Time{}, false
	}
	if !j.Discovered {
		return later(j.NotBefore, j.NextAttempt), true
	}
	var t time.Time
	found := false
	for _, tg := range j.Targets {
		if tg.State == statePending && (!found || tg.NextAttempt.Before(t)) {
			t, found = tg.NextAttempt, true
		}
	}
	// With no rua pending the job only needs to be marked done (a crash
	// may have come between the last rua's state and that).
	return later(j.NotBefore, t), true
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// SendDue does one pass: it turns every finished period into report jobs,
// attempts the jobs that are due, and removes old finished ones. Run calls
// it; tests with a fake clock call it directly.
func (rp *Reporter) SendDue(ctx context.Context) {
	rp.passMu.Lock()
	defer rp.passMu.Unlock()
	if !rp.active() {
		rp.wasActive = false
		return
	}
	if !rp.wasActive && rp.opts.Jobs != nil {
		// Another relay was the reporter meanwhile: its view of the
		// jobs, not ours, is current.
		jobs, err := rp.loadStoreJobs()
		if err != nil {
			rp.log.Error("tlsrpt_jobs_reload", zap.Error(err))
			return
		}
		rp.mu.Lock()
		rp.jobs = jobs
		rp.mu.Unlock()
	}
	rp.wasActive = true
	now := rp.now()
	if rp.opts.Source != nil {
		rp.makeSourceJobs(now)
	} else {
		rp.makeJobs(now)
	}
	rp.attemptDue(ctx, now)
	rp.prune(now)
}

// makeSourceJobs is makeJobs for Options.Source: one job per period and
// policy domain the Source has ready, made durable (or found made, by this
// relay or by another one that was the reporter before) before the Source
// is told Done. A job that cannot be made is retried at the next passes,
// up to maxJobTries, then given up, as in makeJobs.
func (rp *Reporter) makeSourceJobs(now time.Time) {
	counts, err := rp.opts.Source.Closed(now)
	if err != nil {
		rp.log.Error("tlsrpt_source", zap.Error(err))
		// Whatever it returned is still worth a job.
	}
	iv := int64(rp.rec.Interval() / time.Second)
	for _, pc := range counts {
		start := pc.PeriodStart.Unix()
		name := jobName(start, pc.PolicyDomain)
		rp.mu.Lock()
		_, exists := rp.jobs[name]
		rp.mu.Unlock()
		if !exists {
			end := time.Unix(start+iv, 0)
			j := &job{
				PeriodStart:  start,
				PolicyDomain: pc.PolicyDomain,
				Report: BuildReport(ReportOptions{
					OrganizationName: rp.opts.OrganizationName,
					ContactInfo:      rp.opts.ContactInfo,
					Submitter:        rp.opts.Hostname,
				}, pc),
				Created:   now.UTC(),
				NotBefore: end.Add(rp.sendDelay()).UTC(),
			}
			stored, err := rp.createJob(name, j)
			if err != nil {
				rp.jobTries[name]++
				fields := []zap.Field{zap.String("policy_domain", pc.PolicyDomain),
					zap.Time("period_start", time.Unix(start, 0).UTC()), zap.Int("attempt", rp.jobTries[name]), zap.Error(err)}
				if rp.jobTries[name] < maxJobTries {
					rp.log.Warn("tlsrpt_report_job_failed", fields...)
					continue // the Source returns it again
				}
				delete(rp.jobTries, name)
				rp.log.Error("tlsrpt_report_dropped", fields...)
				rp.onReport(SendDropped)
			} else {
				delete(rp.jobTries, name)
				rp.mu.Lock()
				rp.jobs[name] = stored
				rp.mu.Unlock()
			}
		}
		if err := rp.opts.Source.Done(pc.PeriodStart, pc.PolicyDomain); err != nil {
			// The Source returns the counts again; the job exists then.
			rp.log.Warn("tlsrpt_source_done", zap.String("policy_domain", pc.PolicyDomain),
				zap.Time("period_start", pc.PeriodStart.UTC()), zap.Error(err))
		}
	}
}

// createJob makes j durable as a new job and returns the job stored: j,
// or the one a JobStore already held for that period and domain.
func (rp *Reporter) createJob(name string, j *job) (*job, error) {
	if rp.opts.Jobs == nil {
		return j, rp.writeJob(name, j, true)
	}
	data, err := json.Marshal(j)
	if err != nil {
		return nil, err
	}
	stored, err := rp.opts.Jobs.CreateJob(time.Unix(j.PeriodStart, 0).UTC(), j.PolicyDomain, data)
	if err != nil {
		return nil, err
	}
	if bytes.Equal(stored, data) {
		return j, nil
	}
	old := &job{}
	if err := json.Unmarshal(stored, old); err != nil || old.Report == nil ||
		old.PeriodStart != j.PeriodStart || old.PolicyDomain != j.PolicyDomain {
		return nil, fmt.Errorf("existing report job for %s is not valid: %v", j.PolicyDomain, err)
	}
	return old, nil
}

// saveJob writes the changed state of job j.
func (rp *Reporter) saveJob(name string, j *job) error {
	if rp.opts.Jobs == nil {
		return rp.writeJob(name, j, false)
	}
	data, err := json.Marshal(j)
	if err != nil {
		return err
	}
	return rp.opts.Jobs.UpdateJob(time.Unix(j.PeriodStart, 0).UTC(), j.PolicyDomain, data)
}

// makeJobs turns the counts of each finished period into one job per policy
// domain, written durably before the counts are dropped from the Recorder.
// A job that already exists (the counts survived a crash after the jobs were
// written) is not made again. A domain whose job cannot be written keeps
// its counts and is tried again at the next passes, up to maxJobTries,
// then given up; it never holds up the reports of other domains or
// periods.
func (rp *Reporter) makeJobs(now time.Time) {
	iv := int64(rp.rec.Interval() / time.Second)
	for _, start := range rp.rec.pendingPeriods() {
		end := time.Unix(start+iv, 0)
		if now.Before(end.Add(rp.grace)) {
			break
		}
		counts := rp.rec.collect(func(s int64) bool { return s == start })
		wrote := false
		var keep map[string]bool // domains whose counts stay for another try
		for _, pc := range counts {
			name := jobName(start, pc.PolicyDomain)
			rp.mu.Lock()
			_, exists := rp.jobs[name]
			rp.mu.Unlock()
			if exists {
				continue
			}
			j := &job{
				PeriodStart:  start,
				PolicyDomain: pc.PolicyDomain,
				Report: BuildReport(ReportOptions{
					OrganizationName: rp.opts.OrganizationName,
					ContactInfo:      rp.opts.ContactInfo,
					Submitter:        rp.opts.Hostname,
				}, pc),
				Created:   now.UTC(),
				NotBefore: end.Add(rp.sendDelay()).UTC(),
			}
			if err := rp.writeJob(name, j, false); err != nil {
				rp.jobTries[name]++
				fields := []zap.Field{zap.String("policy_domain", pc.PolicyDomain),
					zap.Time("period_start", time.Unix(start, 0).UTC()), zap.Int("attempt", rp.jobTries[name]), zap.Error(err)}
				if rp.jobTries[name] >= maxJobTries {
					delete(rp.jobTries, name)
					rp.log.Error("tlsrpt_report_dropped", fields...)
					rp.onReport(SendDropped)
					continue
				}
				rp.log.Warn("tlsrpt_report_job_failed", fields...)
				if keep == nil {
					keep = map[string]bool{}
				}
				keep[pc.PolicyDomain] = true
				continue
			}
			delete(rp.jobTries, name)
			rp.mu.Lock()
			rp.jobs[name] = j
			rp.mu.Unlock()
			wrote = true
		}
		if wrote {
			if err := atomicfile.SyncDir(rp.dir); err != nil {
				// The period stays open; the jobs written exist and are
				// not made again at the next pass.
				rp.log.Error("tlsrpt_report_jobs_sync", zap.String("dir", rp.dir), zap.Error(err))
				continue
			}
		}
		rp.rec.closePeriod(start, keep)
		if err := rp.rec.Flush(); err != nil {
			// The counts file still holds the period; after a crash the
			// jobs, which exist, are not made again.
			rp.log.Error("tlsrpt_flush", zap.Error(err))
		}
		rp.log.Debug("tlsrpt_period_closed", zap.Time("period_start", time.Unix(start, 0).UTC()),
			zap.Int("policy_domains", len(counts)), zap.Int("retry_later", len(keep)))
	}
}

func (rp *Reporter) sendDelay() time.Duration {
	if rp.opts.SendDelay <= 0 {
		return 0
	}
	return rand.N(rp.opts.SendDelay)
}

// writeJob writes j to its file (tmp, fsync, rename); syncParent also
// fsyncs the directory.
func (rp *Reporter) writeJob(name string, j *job, syncParent bool) error {
	data, err := json.Marshal(j)
	if err != nil {
		return err
	}
	path := filepath.Join(rp.dir, name)
	if err := atomicfile.WriteNoDirSync(path, data); err != nil {
		return fmt.Errorf("write report job %s: %w", path, err)
	}
	if syncParent {
		return atomicfile.SyncDir(rp.dir)
	}
	return nil
}

// attemptDue runs the due jobs, a bounded number at a time.
func (rp *Reporter) attemptDue(ctx context.Context, now time.Time) {
	type item struct {
		name string
		j    *job
	}
	var due []item
	rp.mu.Lock()
	for name, j := range rp.jobs {
		if t, ok := j.due(); ok && !t.After(now) {
			due = append(due, item{name, j.clone()})
		}
	}
	rp.mu.Unlock()
	slices.SortFunc(due, func(a, b item) int { return strings.Compare(a.name, b.name) })

	sem := make(chan struct{}, sendParallel)
	var wg sync.WaitGroup
	for _, it := range due {
		if ctx.Err() != nil || !rp.active() {
			break
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			rp.attemptJob(ctx, it.name, it.j)
		}()
	}
	wg.Wait()
}

// attemptJob discovers the domain's TLSRPT record if not done yet, then
// tries each due rua. j is this goroutine's own copy; after every change it
// is written to disk and a copy published in rp.jobs.
func (rp *Reporter) attemptJob(ctx context.Context, name string, j *job) {
	now := rp.now()
	pd := j.PolicyDomain
	save := func() {
		if err := rp.saveJob(name, j); err != nil {
			rp.log.Error("tlsrpt_job_write", zap.String("policy_domain", pd), zap.Error(err))
		}
		c := j.clone()
		rp.mu.Lock()
		rp.jobs[name] = c
		rp.mu.Unlock()
	}
	if !j.Discovered {
		if j.FirstAttempt.IsZero() {
			j.FirstAttempt = now.UTC()
		}
		lctx, cancel := context.WithTimeout(ctx, rp.opts.Timeout)
		rec, err := LookupRecord(lctx, rp.opts.Resolver, pd)
		cancel()
		switch {
		case err == nil:
			j.Discovered = true
			for _, rua := range rec.RUAs {
				j.Targets = append(j.Targets, &target{RUA: rua, State: statePending})
			}
			if len(rec.Ignored) > 0 {
				rp.log.Debug("tlsrpt_rua_ignored", zap.String("policy_domain", pd), zap.Strings("rua", clipList(rec.Ignored)))
			}
			if len(rec.Excess) > 0 {
				rp.log.Warn("tlsrpt_rua_excess", zap.String("policy_domain", pd), zap.Int("used", len(rec.RUAs)),
					zap.Int("ignored", len(rec.Excess)), zap.Strings("rua", clipList(rec.Excess)))
			}
		case errors.Is(err, ErrDNS) && ctx.Err() == nil:
			j.LookupTries++
			if now.Sub(j.FirstAttempt) >= rp.opts.RetryFor {
				rp.finish(j, now, SendDropped)
				rp.log.Info("tlsrpt_sent", zap.String("policy_domain", pd), zap.String("rua", ""),
					zap.String("report_id", j.Report.ReportID), zap.String("result", SendDropped), zap.Error(err))
				rp.onReport(SendDropped)
			} else {
				j.NextAttempt = now.Add(rp.backoff(j.LookupTries)).UTC()
				rp.log.Debug("tlsrpt_lookup_failed", zap.String("policy_domain", pd), zap.Error(err))
			}
			save()
			return
		case ctx.Err() != nil:
			return // shutting down; try again next time
		default:
			// No (valid) record: the domain does not want reports (§3).
			rp.finish(j, now, "no-record")
			rp.log.Debug("tlsrpt_no_record", zap.String("policy_domain", pd), zap.Error(err))
			save()
			return
		}
		save()
	}

	var gz []byte
	for _, tg := range j.Targets {
		if tg.State != statePending || tg.NextAttempt.After(now) || ctx.Err() != nil {
			continue
		}
		if gz == nil {
			var err error
			if gz, err = j.Report.Gzip(); err != nil {
				rp.log.Error("tlsrpt_gzip", zap.String("policy_domain", pd), zap.Error(err))
				return
			}
		}
		if tg.FirstAttempt.IsZero() {
			tg.FirstAttempt = now.UTC()
		}
		tg.Attempts++
		var err error
		switch tg.RUA.Scheme {
		case "https":
			err = rp.post(ctx, tg.RUA.URI, gz)
		case "mailto":
			tg.QueueID, err = rp.mail(j, tg.RUA.Address, gz)
		default:
			err = fmt.Errorf("unsupported rua scheme %q", tg.RUA.Scheme)
		}
		result := SendOK
		switch {
		case err == nil:
			tg.State, tg.SentAt, tg.LastError = stateSent, rp.now().UTC(), ""
		case ctx.Err() != nil:
			// Interrupted by shutdown: not a failure of the endpoint.
			tg.Attempts--
			continue
		case errors.Is(err, ErrRUAAddressRefused):
			// Not a failure that retrying mends: the domain names an
			// endpoint on an address we do not post to.
			tg.State, tg.LastError = stateDropped, err.Error()
			result = SendDropped
		case rp.now().Sub(tg.FirstAttempt) >= rp.opts.RetryFor:
			tg.State, tg.LastError = stateDropped, err.Error()
			result = SendDropped
		default:
			tg.LastError = err.Error()
			tg.NextAttempt = rp.now().Add(rp.backoff(tg.Attempts)).UTC()
			result = SendFailed
		}
		// Persist before logging "ok": a sent report is never sent again.
		save()
		fields := []zap.Field{zap.String("policy_domain", pd), zap.String("rua", tg.RUA.URI),
			zap.String("report_id", j.Report.ReportID), zap.String("result", result), zap.Int("attempt", tg.Attempts)}
		if err != nil {
			fields = append(fields, zap.Error(err))
		}
		if tg.QueueID != "" && result == SendOK {
			fields = append(fields, zap.String("queue_id", tg.QueueID))
		}
		rp.log.Info("tlsrpt_sent", fields...)
		rp.onReport(result)
	}

	sent, pending := 0, 0
	for _, tg := range j.Targets {
		switch tg.State {
		case stateSent:
			sent++
		case statePending:
			pending++
		}
	}
	if pending == 0 {
		switch {
		case sent == len(j.Targets):
			rp.finish(j, now, "sent")
		case sent > 0:
			rp.finish(j, now, "partial")
		default:
			rp.finish(j, now, SendDropped)
		}
		save()
	}
}

func (rp *Reporter) finish(j *job, now time.Time, outcome string) {
	j.Done, j.Outcome, j.DoneAt = true, outcome, now.UTC()
}

func (rp *Reporter) onReport(result string) {
	if rp.opts.OnReport != nil {
		rp.opts.OnReport(result)
	}
}

// backoff is the gap after the n-th failed attempt: RetryBase doubled each
// time (§5.5 "exponential backoff"), at most 4h.
func (rp *Reporter) backoff(n int) time.Duration {
	d := rp.opts.RetryBase
	for i := 1; i < n && d < maxRetryGap; i++ {
		d *= 2
	}
	return min(d, maxRetryGap)
}

// mail queues the report for a mailto: rua (§5.3). A successful Enqueue is
// a sent report: from there on the queue owns its delivery.
func (rp *Reporter) mail(j *job, to string, gz []byte) (string, error) {
	if rp.opts.Queue == nil {
		return "", errors.New("no queue for mailto: reports")
	}
	msg, err := composeMail(mailReport{
		From:         rp.opts.From,
		To:           to,
		Submitter:    rp.opts.Hostname,
		PolicyDomain: j.PolicyDomain,
		Date:         rp.now(),
		MessageID:    "tlsrpt." + newUnique() + "@" + rp.opts.Hostname,
		Report:       j.Report,
		Gzip:         gz,
		Filename:     j.Report.Filename(rp.opts.Hostname, j.PolicyDomain),
	}, rp.dkim.Load())
	if err != nil {
		return "", err
	}
	return rp.opts.Queue.EnqueueReport(rp.opts.From, to, bytes.NewReader(msg))
}

// prune removes finished jobs after doneRetention, once the Recorder's
// durable state no longer holds the counts of their period (so the job can
// never be made again).
//
// With Options.Source the Recorder is not looked at: the Source never
// returns a period and domain again once told Done.
func (rp *Reporter) prune(now time.Time) {
	closed := rp.rec.durableClosed()
	iv := int64(rp.rec.Interval() / time.Second)
	rp.mu.Lock()
	var old []string
	for name, j := range rp.jobs {
		if !j.Done || now.Sub(j.DoneAt) < doneRetention || rp.opts.Source == nil && j.PeriodStart+iv > closed {
			continue
		}
		old = append(old, name)
	}
	rp.mu.Unlock()
	slices.Sort(old)
	for _, name := range old {
		var err error
		if rp.opts.Jobs != nil {
			rp.mu.Lock()
			j := rp.jobs[name]
			rp.mu.Unlock()
			err = rp.opts.Jobs.RemoveJob(time.Unix(j.PeriodStart, 0).UTC(), j.PolicyDomain)
		} else if err = os.Remove(filepath.Join(rp.dir, name)); errors.Is(err, os.ErrNotExist) {
			err = nil
		}
		if err != nil {
			rp.log.Error("tlsrpt_job_remove", zap.String("file", name), zap.Error(err))
			continue
		}
		rp.mu.Lock()
		delete(rp.jobs, name)
		rp.mu.Unlock()
	}
}

// ReportStatus is the state of one report job, for the CLI.
type ReportStatus struct {
	PolicyDomain string         `json:"policy_domain"`
	PeriodStart  time.Time      `json:"period_start"`
	ReportID     string         `json:"report_id"`
	Done         bool           `json:"done"`
	Outcome      string         `json:"outcome,omitempty"`
	Targets      []TargetStatus `json:"targets,omitempty"`
}

// TargetStatus is the state of one rua of a report.
type TargetStatus struct {
	URI         string    `json:"uri"`
	State       string    `json:"state"` // pending, sent, dropped
	Attempts    int       `json:"attempts"`
	NextAttempt time.Time `json:"next_attempt,omitzero"`
	LastError   string    `json:"last_error,omitempty"`
}

// Reports lists the report jobs kept (pending, and finished ones for a
// day), in order of period and domain.
func (rp *Reporter) Reports() []ReportStatus {
	rp.mu.Lock()
	defer rp.mu.Unlock()
	var out []ReportStatus
	for _, j := range rp.jobs {
		s := ReportStatus{PolicyDomain: j.PolicyDomain, PeriodStart: time.Unix(j.PeriodStart, 0).UTC(),
			ReportID: j.Report.ReportID, Done: j.Done, Outcome: j.Outcome}
		for _, tg := range j.Targets {
			s.Targets = append(s.Targets, TargetStatus{URI: tg.RUA.URI, State: tg.State,
				Attempts: tg.Attempts, NextAttempt: tg.NextAttempt, LastError: tg.LastError})
		}
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b ReportStatus) int {
		if c := a.PeriodStart.Compare(b.PeriodStart); c != 0 {
			return c
		}
		return strings.Compare(a.PolicyDomain, b.PolicyDomain)
	})
	return out
}

// clipList bounds a list of URIs from DNS for a log line.
func clipList(l []string) []string {
	const n = 10
	if len(l) <= n {
		return l
	}
	return append(slices.Clone(l[:n]), fmt.Sprintf("(%d more)", len(l)-n))
}

// clone copies j deeply enough for one goroutine to change it while
// others read the original (the Report is never changed).
func (j *job) clone() *job {
	c := *j
	c.Targets = make([]*target, len(j.Targets))
	for i, t := range j.Targets {
		tc := *t
		c.Targets[i] = &tc
	}
	return &c
}
