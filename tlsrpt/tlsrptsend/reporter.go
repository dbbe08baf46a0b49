package tlsrptsend

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"net/mail"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/tlsrpt"
	"github.com/stsrelay/stsrelay/tlsrpt/tlsrptdb"
)

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
	Recorder *tlsrptdb.Recorder
	// Resolver looks up _smtp._tls records and, when it has the method
	// LookupIP(ctx, host string, wantV6 bool) ([]net.IP, error) as
	// *dnsclient.Resolver does, the addresses of https: report endpoints;
	// otherwise the system resolver is used for those.
	Resolver tlsrpt.TXTResolver
	// Enqueue takes mailto: reports; nil fails them.
	Enqueue EnqueueFunc

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
	DKIM *tlsrpt.DKIMOptions

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

	// Fleet mode (see tlsrptdb.Sink). All three nil: standalone, as always.
	//
	// Source, when set, gives the finished periods' counts in place of
	// Recorder, which then only gives the interval (its own periods go
	// elsewhere by Recorder.HandOff). Finished jobs are then pruned
	// after a day without looking at the Recorder: the Source never
	// returns a period and domain again once Done.
	Source tlsrptdb.Source
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
	rec    *tlsrptdb.Recorder
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
	dkim atomic.Pointer[tlsrpt.DKIMOptions]
}

// NewReporter checks opts and loads the report jobs left by an earlier
// run from the Recorder's directory (or from Options.Jobs).
func NewReporter(opts Options) (*Reporter, error) {
	opts, err := checkOptions(opts)
	if err != nil {
		return nil, err
	}
	log := opts.Logger
	if opts.DKIM == nil {
		log.Warn("tlsrpt_no_dkim", zap.String("reason", noDKIMReason))
	}
	if !tlsrpt.ContactMatchesSubmitter(opts.ContactInfo, opts.Hostname) {
		log.Warn("tlsrpt_contact_domain",
			zap.String("contact_info", tlsrpt.ContactAddress(opts.ContactInfo)), zap.String("submitter", opts.Hostname),
			zap.String("reason", "RFC 8460 §5.3: TLS-Report-Submitter (the hostname) must match the domain of contact-info, or its organisational parent"))
	}
	rp := &Reporter{
		opts:     opts,
		rec:      opts.Recorder,
		log:      log,
		now:      opts.Now,
		dir:      filepath.Join(opts.Recorder.Dir(), reportsDir),
		client:   newHTTPClient(opts),
		grace:    min(30*time.Second, opts.Recorder.Interval()/10),
		jobTries: map[string]int{},
		jobs:     map[string]*job{},
		// With a JobStore the first active pass reloads the jobs: they
		// may have moved on since NewReporter read them.
		wasActive: opts.Jobs == nil,
	}
	rp.dkim.Store(opts.DKIM)
	if opts.Jobs != nil {
		// Kept until the first active pass reloads them; a
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

// checkOptions validates opts and fills in the defaults.
func checkOptions(opts Options) (Options, error) {
	if opts.Recorder == nil || opts.Resolver == nil {
		return opts, errors.New("tlsrpt: Reporter needs a Recorder and a Resolver")
	}
	opts.Hostname = tlsrpt.NormDomain(opts.Hostname)
	if opts.Hostname == "" {
		return opts, errors.New("tlsrpt: Reporter needs the relay's Hostname (the report submitter)")
	}
	if opts.Interval != 0 && opts.Interval != opts.Recorder.Interval() {
		return opts, fmt.Errorf("tlsrpt: interval %v differs from the recorder's %v", opts.Interval, opts.Recorder.Interval())
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
		return opts, fmt.Errorf("tlsrpt: from %q: %w", opts.From, err)
	}
	opts.From = from.Address // the envelope sender too: a bare address
	opts.DKIM, err = loadDKIM(opts.DKIM)
	return opts, err
}

// loadDKIM reads the key of d when it has a KeyFile and no Signer, and
// checks it names a domain and selector. A d without key is nil: unsigned.
func loadDKIM(d *tlsrpt.DKIMOptions) (*tlsrpt.DKIMOptions, error) {
	if d != nil && d.Signer == nil {
		if d.KeyFile == "" {
			return nil, nil
		}
		s, err := tlsrpt.LoadDKIMKey(d.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("tlsrpt: %w", err)
		}
		dk := *d
		dk.Signer = s
		d = &dk
	}
	if d != nil && (d.Domain == "" || d.Selector == "") {
		return nil, errors.New("tlsrpt: DKIM needs a domain and a selector")
	}
	return d, nil
}

// SetDKIM replaces the DKIM signing options of mailed reports (a reload:
// a rotated key, or signing turned on or off); nil means unsigned. A
// KeyFile without Signer is read now; on error nothing changes. Reports
// composed afterwards use the new key.
func (rp *Reporter) SetDKIM(d *tlsrpt.DKIMOptions) error {
	d, err := loadDKIM(d)
	if err != nil {
		return err
	}
	if d == nil {
		rp.log.Warn("tlsrpt_no_dkim", zap.String("reason", noDKIMReason))
	}
	rp.dkim.Store(d)
	return nil
}

const noDKIMReason = "mailed TLS reports are sent without a DKIM signature; RFC 8460 §3 lets receivers ignore them"

// active is Options.Active, true when unset.
func (rp *Reporter) active() bool { return rp.opts.Active == nil || rp.opts.Active() }

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
	next := rp.rec.PeriodOf(now).Add(iv + rp.grace)
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
