// Package delivery takes due recipients from the queue, finds where their
// domain's mail goes (RFC 5321 §5.1), applies the domain's MTA-STS policy
// (RFC 8461 §4, §5), delivers over SMTP with STARTTLS, records each
// recipient's outcome, retries what failed temporarily and bounces what
// failed for good with an RFC 3464 DSN.
package delivery

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"math"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/mtasts/mtastsdb"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// PolicySource gives the MTA-STS policy in force for a domain (an
// *mtastsdb.Cache). An error means no decision can be made now (the TXT
// lookup failed and nothing is cached): delivery defers.
type PolicySource interface {
	Get(ctx context.Context, domain string) (mtastsdb.Result, error)
	// Recheck asks DNS for the TXT record even when a recent answer is
	// remembered (RFC 8461 §5.1: before a final failure).
	Recheck(ctx context.Context, domain string) (mtastsdb.Result, error)
}

// TLSRecorder counts TLS-RPT sessions (a *tlsrptdb.Recorder; delivery imports only tlsrpt for Session): one call per
// session, with the result policy.CheckConn or policy.CheckMX decided.
type TLSRecorder interface {
	Record(tlsrpt.Session)
}

// Counters receives delivery outcomes (metrics).
type Counters interface {
	Delivery(result string)
	// Delivered observes, per delivered recipient, the time since the
	// message was accepted.
	Delivered(latency time.Duration)
	TLSSession(resultType string)
}

// Options wire an Engine.
type Options struct {
	Config   *config.Config
	Store    queue.Queue
	Resolver Resolver
	// Policies is nil when MTA-STS is off.
	Policies PolicySource
	// TLSRPT is nil when TLS-RPT is off.
	TLSRPT TLSRecorder
	// Forecast, when set, counts the sessions enforce refused or would
	// have refused (see forecastSession).
	Forecast ForecastRecorder
	Counters Counters
	// Roots verify MX certificates: the system pool plus
	// tls.extra_root_ca_file.
	Roots  *x509.CertPool
	Logger *zap.Logger
	Now    func() time.Time
}

// Engine runs deliveries.
type Engine struct {
	o        Options
	cfg      *config.Config
	store    queue.Queue
	log      *zap.Logger
	now      func() time.Time
	sched    queue.Schedule
	wantV6   bool
	localIPs []net.IP
	// tlsSessions keeps TLS sessions per MX name, so that a new
	// connection to a known MX resumes instead of a full handshake.
	tlsSessions tls.ClientSessionCache

	mu      sync.Mutex
	domains map[string]*domainQueue
	queued  int // jobs waiting in domain queues
	running int // workers
	idle    map[string][]*session
	// dead holds destinations none of whose hosts answered recently.
	dead map[string]deadDest
	// conc holds the adaptive session limit of destinations seen lately.
	conc map[string]*destConcurrency
	kick chan struct{}
	wg   sync.WaitGroup
	// conns are the outbound connections open now, and cut is set once
	// shutdown closed them (drain, shutdown.go).
	conns connSet
	cut   atomic.Bool
	// routing is the [[route]] / [[tls_policy]] tables in force
	// (SetRouting swaps them on reload).
	routing atomic.Pointer[Routing]
	// dane: MX hosts are looked up for TLSA records (RFC 7672):
	// dane.enabled, and a resolver whose AD bit is trusted.
	dane bool
}

type domainQueue struct {
	jobs   []*job
	active int
}

// Adaptive per-destination concurrency, like Postfix's slow start: a
// destination starts with initialConcurrency sessions, gains one for each
// window of successes as large as its current limit, and loses one for
// each failure to connect or 421, down to one; never above
// queue.per_domain_concurrency.
const initialConcurrency = 5

// destConcurrency is a destination's current session limit.
type destConcurrency struct {
	limit   float64
	updated time.Time
}

// deadDest is a destination marked unreachable.
type deadDest struct {
	until  time.Time
	reason string
}

// job is the recipients of one message at one domain.
type job struct {
	ms     *msgState
	domain string
	idx    []int
}

// msgState gathers the results of a message's jobs in one round.
type msgState struct {
	mu      sync.Mutex
	m       *queue.Message
	pending int
	bounced []int
	// attempted is set once a job of this round made an attempt.
	attempted bool
	// tlsRequiredNo is the RFC 8689 §3 header, read once.
	hdrRead       bool
	tlsRequiredNo bool
}

// New makes an Engine.
func New(o Options) *Engine {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Logger == nil {
		o.Logger = zap.NewNop()
	}
	e := &Engine{
		tlsSessions: tls.NewLRUClientSessionCache(4096),
		o:           o,
		cfg:         o.Config,
		store:       o.Store,
		log:         o.Logger,
		now:         o.Now,
		sched:       o.Store.Schedule(),
		wantV6:      dnsclient.HasIPv6Route(),
		domains:     map[string]*domainQueue{},
		idle:        map[string][]*session{},
		dead:        map[string]deadDest{},
		conc:        map[string]*destConcurrency{},
		kick:        make(chan struct{}, 1),
	}
	for _, a := range o.Config.Delivery.LocalAddresses {
		e.localIPs = append(e.localIPs, net.ParseIP(a))
	}
	// DANE needs answers known to be DNSSEC-secure, which only a
	// resolver trusted to validate gives (RFC 7672 §2.1, RFC 6840 §5.8).
	trusted := o.Resolver != nil && o.Resolver.TrustsAD()
	e.dane = o.Config.DANE.Enabled && trusted
	switch {
	case e.dane:
		e.log.Info("dane", zap.Bool("enabled", true))
	case o.Config.DANE.Enabled:
		e.log.Info("dane", zap.Bool("enabled", false), zap.String("reason",
			"the resolver's AD bit is not trusted (dns.trust_ad = "+o.Config.DNS.TrustAD+"): run a validating resolver on loopback"))
	}
	rt, err := NewRouting(o.Config.Routes, o.Config.TLSPolicies, o.Config.Delivery.Port)
	if err != nil {
		// The routes concerned wait (PasswordErr); the rest works.
		e.log.Error("routing", zap.Error(err))
	}
	if rt != nil {
		e.routing.Store(rt)
	}
	return e
}

func (e *Engine) signal() {
	select {
	case e.kick <- struct{}{}:
	default:
	}
}

// maxQueuedJobs bounds how many leased jobs wait in memory.
func (e *Engine) maxQueuedJobs() int {
	return 4*e.cfg.Queue.Workers*e.cfg.Queue.PerDomainConcurrency + 256
}

// Run delivers until ctx ends, then waits for the sessions in flight
// (at most delivery.shutdown_timeout: then their connections are cut and
// their jobs requeued as not attempted) and closes idle connections. An idle relay
// sleeps: it wakes on a new message, a worker finishing, or the next due
// time.
func (e *Engine) Run(ctx context.Context) {
	janitor := time.NewTicker(time.Second)
	defer janitor.Stop()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		e.fill()
		e.dispatch(ctx)
		wait := time.Hour
		if t, ok := e.store.NextDue(); ok {
			wait = t.Sub(e.now())
			if wait < 0 {
				wait = 0
			}
			e.mu.Lock()
			full := e.queued >= e.maxQueuedJobs()
			e.mu.Unlock()
			if full {
				wait = time.Hour // a worker finishing kicks us
			}
		}
		if !timer.Stop() {
			select {
			case <-timer.C:
			default:
			}
		}
		timer.Reset(wait + time.Millisecond)
		select {
		case <-ctx.Done():
			e.drain(e.cfg.Delivery.ShutdownTimeout.Duration)
			e.abandonQueued()
			e.closeIdle(0)
			return
		case <-e.store.Wake():
		case <-e.kick:
		case <-timer.C:
		case <-janitor.C:
			e.closeIdle(e.cfg.Delivery.ConnectionIdleTimeout.Duration)
			e.purgeDead()
		}
	}
}

// fill leases due messages and splits them into per-domain jobs.
func (e *Engine) fill() {
	for {
		e.mu.Lock()
		room := e.maxQueuedJobs() - e.queued
		e.mu.Unlock()
		if room <= 0 {
			return
		}
		now := e.now()
		msgs := e.store.Lease(now, min(room, 256))
		if len(msgs) == 0 {
			return
		}
		for _, m := range msgs {
			e.split(m, now)
		}
	}
}

func (e *Engine) split(m *queue.Message, now time.Time) {
	byDomain := map[string][]int{}
	var order []string
	for i := range m.Rcpts {
		r := &m.Rcpts[i]
		if r.Status.Final() || r.NextAttempt.After(now) {
			continue
		}
		d := r.Domain()
		if _, ok := byDomain[d]; !ok {
			order = append(order, d)
		}
		byDomain[d] = append(byDomain[d], i)
	}
	if len(order) == 0 {
		e.store.Release(m.ID)
		return
	}
	ms := &msgState{m: m, pending: len(order)}
	e.mu.Lock()
	for _, d := range order {
		dq := e.domains[d]
		if dq == nil {
			dq = &domainQueue{}
			e.domains[d] = dq
		}
		dq.jobs = append(dq.jobs, &job{ms: ms, domain: d, idx: byDomain[d]})
		e.queued++
	}
	e.mu.Unlock()
}

// dispatch starts workers for domains with waiting jobs, within
// queue.workers in total and queue.per_domain_concurrency per domain. A
// domain whose MX is down holds at most its own share of workers.
func (e *Engine) dispatch(ctx context.Context) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if ctx.Err() != nil {
		return
	}
	var names []string
	for d, dq := range e.domains {
		if len(dq.jobs) > dq.active {
			names = append(names, d)
		}
	}
	// Oldest waiting job first, so no domain starves.
	sort.Slice(names, func(i, j int) bool {
		return e.domains[names[i]].jobs[0].ms.m.ID < e.domains[names[j]].jobs[0].ms.m.ID
	})
	for progress := true; progress; {
		progress = false
		for _, d := range names {
			dq := e.domains[d]
			if e.running >= e.cfg.Queue.Workers {
				return
			}
			if dq.active >= e.limitLocked(d) || len(dq.jobs) <= dq.active {
				continue
			}
			dq.active++
			e.running++
			e.wg.Add(1)
			go e.worker(ctx, d)
			progress = true
		}
	}
}

// worker delivers the jobs of one domain, one after another, reusing its
// SMTP session between messages (RSET between them, a bounded count),
// then parks the session for a later worker of the same domain.
func (e *Engine) worker(ctx context.Context, domain string) {
	defer e.wg.Done()
	var sess *session
	for {
		e.mu.Lock()
		dq := e.domains[domain]
		if len(dq.jobs) == 0 || ctx.Err() != nil {
			dq.active--
			e.running--
			if dq.active == 0 && len(dq.jobs) == 0 {
				delete(e.domains, domain)
			}
			if sess != nil {
				sess.lastUsed = e.now()
				e.idle[domain] = append(e.idle[domain], sess)
			}
			e.mu.Unlock()
			e.signal()
			return
		}
		j := dq.jobs[0]
		dq.jobs[0] = nil
		dq.jobs = dq.jobs[1:]
		e.queued--
		if sess == nil {
			if pool := e.idle[domain]; len(pool) > 0 {
				sess = pool[len(pool)-1]
				e.idle[domain] = pool[:len(pool)-1]
				if len(e.idle[domain]) == 0 {
					delete(e.idle, domain)
				}
			}
		}
		e.mu.Unlock()
		e.signal() // room for more leased jobs
		sess = e.deliver(ctx, j, sess)
	}
}

// abandonQueued ends, at shutdown, the round of every job that never
// started: no attempt is counted for it, but the message's round is closed
// so that what its other jobs did (a recipient delivered at another
// domain) is recorded rather than redone after the restart.
func (e *Engine) abandonQueued() {
	e.mu.Lock()
	var jobs []*job
	for d, dq := range e.domains {
		jobs = append(jobs, dq.jobs...)
		delete(e.domains, d)
	}
	e.queued = 0
	e.mu.Unlock()
	for _, j := range jobs {
		e.abandon(j)
	}
}

// abandon ends job j without counting an attempt (shutdown cut it
// short); the message's round closes when it was its last job.
func (e *Engine) abandon(j *job) {
	ms := j.ms
	ms.mu.Lock()
	ms.pending--
	last := ms.pending == 0
	ms.mu.Unlock()
	if last {
		e.complete(ms)
	}
}

// closeIdle closes parked sessions idle for longer than maxIdle (all of
// them when maxIdle is 0), in parallel: each close is bounded by
// sessionCloseTimeout, and Run waits for them.
func (e *Engine) closeIdle(maxIdle time.Duration) {
	now := e.now()
	var toClose []*session
	e.mu.Lock()
	for d, pool := range e.idle {
		keep := pool[:0]
		for _, s := range pool {
			if maxIdle == 0 || now.Sub(s.lastUsed) > maxIdle {
				toClose = append(toClose, s)
			} else {
				keep = append(keep, s)
			}
		}
		if len(keep) == 0 {
			delete(e.idle, d)
		} else {
			e.idle[d] = keep
		}
	}
	e.mu.Unlock()
	var wg sync.WaitGroup
	for _, s := range toClose {
		wg.Add(1)
		go func() { defer wg.Done(); s.close() }()
	}
	wg.Wait()
}

// purgeDead forgets suspensions that ran out, and the concurrency of
// destinations not used for a while (they start slow again).
func (e *Engine) purgeDead() {
	now := e.now()
	e.mu.Lock()
	defer e.mu.Unlock()
	for d, dd := range e.dead {
		if !now.Before(dd.until) {
			delete(e.dead, d)
		}
	}
	for d, c := range e.conc {
		if now.Sub(c.updated) > 10*time.Minute && e.domains[d] == nil {
			delete(e.conc, d)
		}
	}
}

// limitLocked is destination d's current session limit. e.mu is held.
func (e *Engine) limitLocked(d string) int {
	max := e.cfg.Queue.PerDomainConcurrency
	c := e.conc[d]
	if c == nil {
		return min(initialConcurrency, max)
	}
	return min(int(c.limit), max)
}

// feedback adjusts destination d's session limit: up by 1/limit for a
// success (one more session per window of successes), down by one for a
// failure to connect, a 421 or a timeout.
func (e *Engine) feedback(d string, ok bool) {
	max := float64(e.cfg.Queue.PerDomainConcurrency)
	e.mu.Lock()
	c := e.conc[d]
	if c == nil {
		c = &destConcurrency{limit: float64(min(initialConcurrency, e.cfg.Queue.PerDomainConcurrency))}
		e.conc[d] = c
	}
	c.updated = e.now()
	grew := false
	if ok {
		before := int(c.limit)
		c.limit = min(max, c.limit+1/c.limit)
		grew = int(c.limit) > before
	} else {
		c.limit = math.Max(1, c.limit-1)
	}
	e.mu.Unlock()
	if grew {
		e.signal() // room for another worker
	}
}
