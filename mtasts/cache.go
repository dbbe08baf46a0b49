package mtasts

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/singleflight"

	"github.com/stsrelay/stsrelay/internal/atomicfile"
	"github.com/stsrelay/stsrelay/internal/domain"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// Defaults of Options.
const (
	DefaultRefreshBeforeExpiry = time.Hour
	DefaultFailureBackoff      = 5 * time.Minute // RFC 8461 §3.3: "five minutes or longer"
	DefaultMaxUnused           = 180 * 24 * time.Hour
	DefaultTXTGrace            = time.Minute
	DefaultRefreshInterval     = time.Minute
	// refreshEvery is the proactive refresh period of RFC 8461 §3.3
	// ("a suggested refresh frequency is once per day").
	refreshEvery = 24 * time.Hour
	// lastUsedPersistSlack: a LastUsed that moved less than this since
	// it was written is not worth a disk write.
	lastUsedPersistSlack = time.Hour
	// refreshParallel bounds concurrent refreshes in one refresher pass.
	refreshParallel = 8
)

// Options configure a Cache. Resolver is required; the rest have defaults.
type Options struct {
	// Resolver looks up "_mta-sts" TXT records.
	Resolver TXTResolver
	// Fetcher fetches policies; nil means a Fetcher with its defaults.
	Fetcher *Fetcher
	// Dir holds one JSON file per domain (data_dir/mtasts). Empty: the
	// cache lives in memory only (tests, the checker).
	Dir string
	// Now is the clock; nil means time.Now.
	Now func() time.Time
	// Logger receives the "mtasts_fetch" lines and refresh warnings; nil
	// means no logging.
	Logger *zap.Logger
	// RefreshBeforeExpiry: the refresher fetches a cached policy again
	// when it expires within this; it also refreshes every policy about
	// daily (or at half its max_age when that is shorter).
	RefreshBeforeExpiry time.Duration
	// FailureBackoff: after a failed fetch for a (domain, id), no new
	// fetch for that pair is tried for this long (RFC 8461 §3.3).
	FailureBackoff time.Duration
	// MaxUnused: the refresher drops policies not used for this long.
	MaxUnused time.Duration
	// TXTGrace: Get reuses the outcome of a TXT lookup for this long at
	// most before asking DNS again, and only as long as the TXT answer's
	// TTL when the resolver tells it (RFC 8461 §3.1). Negative disables
	// it.
	TXTGrace time.Duration
	// RefreshInterval is how often Run wakes up (with ±10% jitter).
	RefreshInterval time.Duration
	// OnFetch, when set, is called after every HTTPS fetch with its
	// outcome: "ok" or an RFC 8460 result-type. mode is the fetched
	// policy's mode, or on failure that of the cached policy still in
	// force ("" if none). For metrics.
	OnFetch func(domain, id string, mode Mode, result string)
	// Shared, when set, is the fleet's shared cache (fleet mode): the
	// store of record in place of Dir, which is then not used; the
	// cache keeps an in-memory copy of it. Nil: standalone.
	Shared Shared
}

// Result is the policy in force for a domain, as Cache.Get found it.
type Result struct {
	// Policy is the policy in force, nil when there is none. A policy in
	// mode none is returned as such: treat it as no policy (RFC 8461 §5)
	// but log its mode.
	Policy *Policy
	// ID is the TXT id of Policy.
	ID string
	// Domain is the normalized policy domain.
	Domain string
	// FromCache is true when Policy was not fetched by this call.
	FromCache bool
	// Failure is a discovery or fetch failure met while finding the
	// policy, for TLS-RPT (RFC 8461 §6), even when a cached policy was
	// applied. Nil when nothing failed, or when the failure is not
	// reportable (no record and nothing cached, or a cached mode none).
	Failure *FetchError
}

// Entry describes one cached policy (for `stsrelay policy list/show`).
type Entry struct {
	Domain        string        `json:"domain"`
	ID            string        `json:"id"`
	Mode          Mode          `json:"mode"`
	MX            []string      `json:"mx"`
	MaxAge        time.Duration `json:"-"`
	MaxAgeSeconds int64         `json:"max_age"`
	Fetched       time.Time     `json:"fetched"`
	Expires       time.Time     `json:"expires"`
	Expired       bool          `json:"expired"`
	LastUsed      time.Time     `json:"last_used"`
	LastError     string        `json:"last_error,omitempty"`
	LastErrorAt   time.Time     `json:"last_error_at,omitzero"`
	Policy        *Policy       `json:"-"`
}

// Cache is the persistent MTA-STS policy cache (RFC 8461 §3.3, §5.1). It
// is safe for concurrent use.
type Cache struct {
	resolver      TXTResolver
	fetcher       *Fetcher
	dir           string
	now           func() time.Time
	log           *zap.Logger
	refreshBefore time.Duration
	backoff       time.Duration
	maxUnused     time.Duration
	grace         time.Duration
	interval      time.Duration
	onFetch       func(domain, id string, mode Mode, result string)

	flight singleflight.Group
	diskMu sync.Mutex // serializes file writes, so the last state wins

	mu       sync.RWMutex
	entries  map[string]*entry
	recent   map[string]*decision // outcome of the last lookup, for TXTGrace
	failures map[string]*failure  // last failed fetch per domain

	shared    Shared            // nil when standalone
	sharedRev map[string]uint64 // revision of the shared entry last applied, guarded by mu
}

// entry is one cached policy. Fields other than lastUsed, lastError and
// lastErrorAt never change; an update replaces the entry.
type entry struct {
	domain  string
	id      string
	policy  *Policy
	body    []byte
	fetched time.Time

	lastUsed      atomic.Int64 // unix nanoseconds
	persistedUsed atomic.Int64 // lastUsed as last written to disk

	// guarded by Cache.mu
	lastError   string
	lastErrorAt time.Time
}

func (e *entry) expires() time.Time { return e.fetched.Add(e.policy.MaxAge) }

// validAt: RFC 8461 §5.1, a policy is used while time since fetch has not
// exceeded max_age.
func (e *entry) validAt(now time.Time) bool { return now.Before(e.expires()) }

func (e *entry) touch(now time.Time) {
	n := now.UnixNano()
	if e.lastUsed.Load() < n {
		e.lastUsed.Store(n)
	}
}

func (e *entry) result() Result {
	return Result{Policy: e.policy, ID: e.id, Domain: e.domain, FromCache: true}
}

// decision is a Get outcome reused during TXTGrace. It is valid while the
// cache still holds the same entry (nil included).
type decision struct {
	res   Result
	entry *entry
	until time.Time
}

type failure struct {
	id    string
	until time.Time
	err   *FetchError
}

// New opens the cache, loading every entry stored in opts.Dir.
func New(opts Options) (*Cache, error) {
	if opts.Resolver == nil {
		return nil, errors.New("mtasts: Options.Resolver is required")
	}
	c := &Cache{
		resolver:      opts.Resolver,
		fetcher:       opts.Fetcher,
		dir:           opts.Dir,
		now:           opts.Now,
		log:           opts.Logger,
		refreshBefore: orDefault(opts.RefreshBeforeExpiry, DefaultRefreshBeforeExpiry),
		backoff:       orDefault(opts.FailureBackoff, DefaultFailureBackoff),
		maxUnused:     orDefault(opts.MaxUnused, DefaultMaxUnused),
		grace:         opts.TXTGrace,
		interval:      orDefault(opts.RefreshInterval, DefaultRefreshInterval),
		onFetch:       opts.OnFetch,
		entries:       map[string]*entry{},
		recent:        map[string]*decision{},
		failures:      map[string]*failure{},
	}
	if c.fetcher == nil {
		c.fetcher = &Fetcher{}
	}
	if c.now == nil {
		c.now = time.Now
	}
	if c.log == nil {
		c.log = zap.NewNop()
	}
	if c.grace == 0 {
		c.grace = DefaultTXTGrace
	}
	if opts.Shared != nil {
		// Fleet mode: the shared store replaces the directory.
		c.shared, c.dir, c.sharedRev = opts.Shared, "", map[string]uint64{}
		if err := c.startShared(); err != nil {
			return nil, err
		}
		return c, nil
	}
	if c.dir != "" {
		if err := os.MkdirAll(c.dir, 0o700); err != nil {
			return nil, fmt.Errorf("mtasts cache: %w", err)
		}
		if err := c.load(); err != nil {
			return nil, err
		}
	}
	return c, nil
}

func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// Get returns the policy in force for the recipient (policy) domain: the
// delivery path (RFC 8461 §3, §5.1).
//
//   - Address literals and IP addresses have no policy and cause no
//     lookup (§3.4); only "_mta-sts.<domain>" is queried, never a parent.
//   - The TXT id equal to that of the unexpired cached policy: the cached
//     policy, no fetch. A new id: one fetch, shared by concurrent callers,
//     whose valid result replaces the cached policy whatever its mode or
//     max_age (§8.3, §10.3). A failed fetch leaves an unexpired cached
//     policy in force and is not retried for that id during
//     FailureBackoff (§3.3).
//   - No usable TXT record: an unexpired cached policy stays in force
//     (§3.1, §5.1); without one, no policy.
//   - A temporary DNS failure with nothing cached returns an error
//     wrapping ErrDNS: the caller should defer, as it cannot tell whether
//     the domain requires TLS (a choice; RFC 8461 is silent).
//   - The outcome is reused for TXTGrace (60 s by default) without a new
//     DNS query: a policy change is noticed up to that much later, which
//     RFC 8461 §8.1 already expects through the TXT record's TTL.
//
// A policy whose max_age has run out is never returned.
func (c *Cache) Get(ctx context.Context, domain string) (Result, error) {
	d, ok := normalizeDomain(domain)
	if !ok {
		return Result{Domain: domain}, nil
	}
	now := c.now()
	c.mu.RLock()
	dec := c.recent[d]
	cur := c.entries[d]
	c.mu.RUnlock()
	if dec != nil && dec.entry == cur && now.Before(dec.until) && (dec.res.Policy == nil || cur.validAt(now)) {
		if dec.res.Policy != nil {
			cur.touch(now)
		}
		return dec.res, nil
	}
	return c.get(ctx, d, now, false)
}

// Recheck is Get without the remembered outcome and without the
// resolver's cache: it always asks DNS for the current TXT id, and
// fetches when the id changed. Delivery calls it before failing a message
// permanently because of an enforce policy (RFC 8461 §5, §5.1 step 3:
// check for a new policy first).
func (c *Cache) Recheck(ctx context.Context, domain string) (Result, error) {
	d, ok := normalizeDomain(domain)
	if !ok {
		return Result{Domain: domain}, nil
	}
	return c.get(ctx, d, c.now(), true)
}

// get is Get after the remembered outcome ran out: it looks up the TXT
// record.
func (c *Cache) get(ctx context.Context, d string, now time.Time, fresh bool) (Result, error) {
	rec, ttl, lerr := c.lookup(ctx, d, fresh)
	if lerr == nil {
		res, used, err := c.fetchIfNew(ctx, d, rec.ID)
		if err != nil {
			return res, err
		}
		c.remember(d, res, used, now, ttl)
		return res, nil
	}
	c.mu.RLock()
	e := c.entries[d]
	c.mu.RUnlock()
	res := Result{Domain: d}
	if e != nil && e.validAt(now) {
		e.touch(now)
		res = e.result()
		if e.policy.Mode != ModeNone {
			// RFC 8461 §6: a failure while a policy is cached is
			// reportable.
			res.Failure = &FetchError{ResultType: ResultType(lerr), Reason: reasonOf(lerr), Err: lerr}
		}
	} else if errors.Is(lerr, ErrDNS) {
		return res, fmt.Errorf("MTA-STS policy of %s unknown: %w", d, lerr)
	}
	c.remember(d, res, e, now, ttl)
	return res, nil
}

// lookup is LookupRecord shared by concurrent callers for one domain: a
// burst of messages to a domain makes one TXT query, not one each. The
// query runs detached from the caller's cancellation, bounded by the
// resolver's timeout.
func (c *Cache) lookup(ctx context.Context, d string, fresh bool) (*Record, time.Duration, error) {
	lctx := context.WithoutCancel(ctx)
	key := "txt\x00" + d
	if fresh {
		key = "fresh\x00" + d
	}
	type out struct {
		rec *Record
		ttl time.Duration
	}
	ch := c.flight.DoChan(key, func() (any, error) {
		rec, _, ttl, err := lookupRecordTTL(lctx, c.resolver, d, fresh)
		return out{rec, ttl}, err
	})
	select {
	case r := <-ch:
		o, _ := r.Val.(out)
		return o.rec, o.ttl, r.Err
	case <-ctx.Done():
		return nil, 0, fmt.Errorf("look up TXT _mta-sts.%s: %w (%w)", d, ErrDNS, ctx.Err())
	}
}

// fetchIfNew returns the cached policy when its id is id, else fetches
// (once for all concurrent callers). The entry the result was based on is
// returned too.
func (c *Cache) fetchIfNew(ctx context.Context, d, id string) (Result, *entry, error) {
	type out struct {
		res Result
		e   *entry
	}
	// The fetch runs detached from the caller's cancellation (it is
	// shared and bounded by the Fetcher's timeout); a caller that gives
	// up falls back to what is cached.
	fctx := context.WithoutCancel(ctx)
	ch := c.flight.DoChan(d+"\x00"+id, func() (any, error) {
		res, e := c.fetchLocked(fctx, d, id)
		return out{res, e}, nil
	})
	select {
	case r := <-ch:
		o := r.Val.(out)
		return o.res, o.e, nil
	case <-ctx.Done():
		now := c.now()
		c.mu.RLock()
		e := c.entries[d]
		c.mu.RUnlock()
		fe := &FetchError{ResultType: tlsrpt.ResultSTSPolicyFetchError, Reason: "cancelled", Err: fmt.Errorf("fetch MTA-STS policy of %s: %w: %w", d, ErrPolicyFetch, ctx.Err())}
		if e != nil && e.validAt(now) {
			res := e.result()
			res.Failure = fe
			return res, e, nil
		}
		return Result{Domain: d}, nil, fe
	}
}

// fetchLocked runs inside the single flight for (d, id). It checks again
// what the cache holds, since another flight may just have finished.
func (c *Cache) fetchLocked(ctx context.Context, d, id string) (Result, *entry) {
	now := c.now()
	c.mu.RLock()
	e := c.entries[d]
	f := c.failures[d]
	c.mu.RUnlock()
	if e != nil && !e.validAt(now) {
		e = nil // RFC 8461 §5.1: an expired policy is not applied
	}
	if e != nil && e.id == id {
		e.touch(now)
		return e.result(), e
	}
	if f != nil && f.id == id && now.Before(f.until) {
		// RFC 8461 §3.3: wait before fetching again for this id.
		return c.failedResult(d, id, e, f.err), e
	}
	if c.shared != nil {
		return c.fetchShared(ctx, d, id)
	}
	p, body, err := c.fetcher.Fetch(ctx, d)
	if err != nil {
		fe := asFetchError(err)
		c.noteFailure(d, id, fe, false)
		return c.failedResult(d, id, e, fe), e
	}
	ne := c.store(d, id, p, body)
	return Result{Policy: ne.policy, ID: id, Domain: d}, ne
}

// failedResult: the cached policy (if any) with the failure attached. A
// fetch failure while a valid TXT record exists is reportable even when
// nothing is cached (RFC 8461 §6).
func (c *Cache) failedResult(d, id string, e *entry, fe *FetchError) Result {
	if e != nil {
		res := e.result()
		res.Failure = fe
		return res
	}
	return Result{Domain: d, ID: id, Failure: fe}
}

// reasonOf is the failure-reason-code of a failure that is not a fetch:
// the TXT discovery (RFC 8461 §3.1).
func reasonOf(err error) string {
	var fe *FetchError
	switch {
	case errors.As(err, &fe):
		return fe.Reason
	case errors.Is(err, ErrDNS):
		return "dns-error"
	case errors.Is(err, ErrNoRecord):
		return "no-record"
	case errors.Is(err, ErrMultipleRecords):
		return "multiple-records"
	case errors.Is(err, ErrRecordSyntax):
		return "record-syntax"
	}
	return "unknown"
}

func asFetchError(err error) *FetchError {
	var fe *FetchError
	if errors.As(err, &fe) {
		return fe
	}
	return &FetchError{ResultType: ResultType(err), Reason: reasonOf(err), Err: err}
}

// noteFailure records a failed fetch: the backoff for (d, id), the
// entry's last error, the log line and the hook.
func (c *Cache) noteFailure(d, id string, fe *FetchError, refresh bool) {
	now := c.now()
	c.mu.Lock()
	c.failures[d] = &failure{id: id, until: now.Add(c.backoff), err: fe}
	e := c.entries[d]
	var mode Mode
	if e != nil {
		e.lastError = fe.Error()
		e.lastErrorAt = now
		mode = e.policy.Mode
	}
	c.mu.Unlock()
	if c.shared != nil {
		c.shareFailure(d, id, fe, now)
	}
	c.log.Info("mtasts_fetch", zap.String("domain", d), zap.String("id", id), zap.String("mode", string(mode)),
		zap.String("result", string(fe.ResultType)), zap.String("error", fe.Error()))
	if c.onFetch != nil {
		c.onFetch(d, id, mode, string(fe.ResultType))
	}
	if e != nil {
		if refresh && mode != ModeNone {
			// RFC 8461 §3.3, §10.2: alert when refreshes fail, unless
			// the cached mode is none.
			c.log.Warn("mtasts_refresh_failed", zap.String("domain", d), zap.String("id", e.id),
				zap.String("mode", string(mode)), zap.Time("expires", e.expires()), zap.String("error", fe.Error()))
		}
		c.persist(d)
	}
}

// store makes a freshly fetched policy the cached one for d.
func (c *Cache) store(d, id string, p *Policy, body []byte) *entry {
	now := c.now()
	ne := &entry{domain: d, id: id, policy: p, body: body, fetched: now}
	ne.lastUsed.Store(now.UnixNano())
	c.mu.Lock()
	if old := c.entries[d]; old != nil && old.lastUsed.Load() > now.UnixNano() {
		ne.lastUsed.Store(old.lastUsed.Load())
	}
	c.entries[d] = ne
	delete(c.recent, d)
	delete(c.failures, d)
	c.mu.Unlock()
	c.log.Info("mtasts_fetch", zap.String("domain", d), zap.String("id", id), zap.String("mode", string(p.Mode)),
		zap.String("result", "ok"), zap.String("error", ""))
	if c.onFetch != nil {
		c.onFetch(d, id, p.Mode, "ok")
	}
	c.persist(d)
	if c.shared != nil {
		c.shareStore(d, ne)
	}
	return ne
}

// remember keeps a Get outcome while the TXT answer it rests on holds
// (its TTL, RFC 8461 §3.1: a changed id is noticed once the TTL runs
// out), and never longer than TXTGrace; unless the cache changed since it
// was computed. Past TXTGrace the lookup is asked again, and answered
// from the resolver's cache until the TTL runs out.
func (c *Cache) remember(d string, res Result, based *entry, now time.Time, ttl time.Duration) {
	hold := c.grace
	if ttl >= 0 && ttl < hold {
		hold = ttl
	}
	if hold <= 0 {
		return
	}
	if res.Policy != nil {
		res.FromCache = true // on reuse, it comes from the cache
	}
	c.mu.Lock()
	if c.entries[d] == based {
		c.recent[d] = &decision{res: res, entry: based, until: now.Add(hold)}
	}
	c.mu.Unlock()
}

// Refresh fetches the policy of domain now, whatever the TXT id says (the
// operator's `policy refresh`, and the refresher). A valid policy replaces
// the cached one; on failure the cached one stays and the error is
// returned. The id stored is that of the current TXT record, or the
// cached one when the record cannot be read.
func (c *Cache) Refresh(ctx context.Context, domain string) (Entry, error) {
	d, ok := normalizeDomain(domain)
	if !ok {
		return Entry{}, fmt.Errorf("refresh MTA-STS policy: %q is not a domain name", domain)
	}
	c.mu.RLock()
	e := c.entries[d]
	c.mu.RUnlock()
	rec, _, _, lerr := lookupRecordTTL(ctx, c.resolver, d, true)
	id := ""
	switch {
	case lerr == nil:
		id = rec.ID
	case e != nil:
		id = e.id
	default:
		return Entry{}, fmt.Errorf("refresh MTA-STS policy of %s: nothing cached and %w", d, lerr)
	}
	return c.refresh(ctx, d, id)
}

func (c *Cache) refresh(ctx context.Context, d, id string) (Entry, error) {
	v, _, _ := c.flight.Do("refresh\x00"+d, func() (any, error) {
		p, body, err := c.fetcher.Fetch(ctx, d)
		if err != nil {
			fe := asFetchError(err)
			c.noteFailure(d, id, fe, true)
			return fe, nil
		}
		c.store(d, id, p, body)
		return nil, nil
	})
	ent, _ := c.Entry(d)
	if fe, ok := v.(*FetchError); ok && fe != nil {
		return ent, fe
	}
	return ent, nil
}

// Forget removes the cached policy of domain, in memory and on disk (the
// operator's `policy forget`).
func (c *Cache) Forget(domain string) error {
	d, ok := normalizeDomain(domain)
	if !ok {
		return fmt.Errorf("forget MTA-STS policy: %q is not a domain name", domain)
	}
	if c.shared != nil {
		// Fleet mode: forgotten by the whole fleet, or not at all.
		ctx, cancel := context.WithTimeout(context.Background(), sharedOpTimeout)
		err := c.shared.Update(ctx, d, func(cur *SharedEntry) (*SharedEntry, bool) { return nil, cur != nil })
		cancel()
		if err != nil {
			return fmt.Errorf("forget MTA-STS policy of %s: %w", d, err)
		}
	}
	c.drop(d, nil)
	return nil
}

// drop removes d's entry (only if it is still e, when e is not nil).
func (c *Cache) drop(d string, e *entry) bool {
	c.mu.Lock()
	if e != nil && c.entries[d] != e {
		c.mu.Unlock()
		return false
	}
	delete(c.entries, d)
	delete(c.recent, d)
	delete(c.failures, d)
	c.mu.Unlock()
	c.persist(d)
	if c.shared != nil {
		c.shareDrop(d, e)
	}
	return true
}

// Entries lists the cached policies, sorted by domain.
func (c *Cache) Entries() []Entry {
	now := c.now()
	c.mu.RLock()
	out := make([]Entry, 0, len(c.entries))
	for _, e := range c.entries {
		out = append(out, c.entryLocked(e, now))
	}
	c.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Domain < out[j].Domain })
	return out
}

// Entry returns the cached policy of domain, if any.
func (c *Cache) Entry(domain string) (Entry, bool) {
	d, ok := normalizeDomain(domain)
	if !ok {
		return Entry{}, false
	}
	now := c.now()
	c.mu.RLock()
	defer c.mu.RUnlock()
	e := c.entries[d]
	if e == nil {
		return Entry{}, false
	}
	return c.entryLocked(e, now), true
}

func (c *Cache) entryLocked(e *entry, now time.Time) Entry {
	return Entry{
		Domain:        e.domain,
		ID:            e.id,
		Mode:          e.policy.Mode,
		MX:            append([]string(nil), e.policy.MX...),
		MaxAge:        e.policy.MaxAge,
		MaxAgeSeconds: int64(e.policy.MaxAge / time.Second),
		Fetched:       e.fetched,
		Expires:       e.expires(),
		Expired:       !e.validAt(now),
		LastUsed:      time.Unix(0, e.lastUsed.Load()).UTC(),
		LastError:     e.lastError,
		LastErrorAt:   e.lastErrorAt,
		Policy:        e.policy,
	}
}

// Run is the background refresher (RFC 8461 §3.3, §10.2). Every
// RefreshInterval (jittered) it refreshes each cached policy that expires
// within RefreshBeforeExpiry or was fetched a day (or half its max_age)
// ago, logging a warning when the refresh of a policy other than mode none
// fails; it drops expired policies, policies unused for MaxUnused, and
// mode-none policies whose TXT record is gone; and it writes changed
// last-use times. It returns when ctx is done, after a last write.
func (c *Cache) Run(ctx context.Context) {
	t := time.NewTimer(c.jitter())
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			c.flushLastUsed(true)
			return
		case <-t.C:
		}
		c.refreshDue(ctx)
		t.Reset(c.jitter())
	}
}

func (c *Cache) jitter() time.Duration {
	j := time.Duration(rand.Int64N(int64(c.interval)/5+1)) - c.interval/10
	return c.interval + j
}

// refreshDue is one pass of the refresher.
func (c *Cache) refreshDue(ctx context.Context) {
	now := c.now()
	c.mu.Lock()
	entries := make([]*entry, 0, len(c.entries))
	for _, e := range c.entries {
		entries = append(entries, e)
	}
	// Prune what the delivery path accumulates.
	for d, dec := range c.recent {
		if !now.Before(dec.until) {
			delete(c.recent, d)
		}
	}
	for d, f := range c.failures {
		if !now.Before(f.until) {
			delete(c.failures, d)
		}
	}
	c.mu.Unlock()
	sort.Slice(entries, func(i, j int) bool { return entries[i].domain < entries[j].domain })

	// A few refreshes at a time: one slow policy host must not hold up
	// the others for its whole timeout.
	var g errgroup.Group
	g.SetLimit(refreshParallel)
	defer g.Wait()
	for _, e := range entries {
		if ctx.Err() != nil {
			return
		}
		d := e.domain
		lastUsed := time.Unix(0, e.lastUsed.Load())
		switch {
		case now.Sub(lastUsed) >= c.maxUnused:
			if c.drop(d, e) {
				c.log.Info("mtasts_policy_dropped", zap.String("domain", d), zap.String("reason", "unused"), zap.Time("last_used", lastUsed))
			}
			continue
		case !e.validAt(now):
			if c.drop(d, e) {
				c.log.Info("mtasts_policy_dropped", zap.String("domain", d), zap.String("reason", "expired"), zap.Time("expires", e.expires()))
			}
			continue
		}
		age := now.Sub(e.fetched)
		due := e.expires().Sub(now) <= c.refreshBefore || age >= min(refreshEvery, e.policy.MaxAge/2)
		if !due {
			continue
		}
		c.mu.RLock()
		lastErrAt := e.lastErrorAt
		c.mu.RUnlock()
		if lastErrAt.After(e.fetched) && now.Sub(lastErrAt) < c.backoff {
			continue
		}
		g.Go(func() error { c.refreshEntry(ctx, e); return nil })
	}
	g.Wait()
	c.flushLastUsed(false)
}

// refreshEntry refreshes one due entry: it reads the TXT id (a new id is
// stored with the new policy), drops a mode-none policy whose record is
// gone, and otherwise fetches whatever the TXT state (checklist STS-3.3-j:
// a refresh may fetch the live policy even when DNS is blocked).
func (c *Cache) refreshEntry(ctx context.Context, e *entry) {
	d := e.domain
	id := e.id
	if c.shared != nil {
		// One node of the fleet refreshes a policy.
		unlock, ok := c.claimRefresh(ctx, e)
		if !ok {
			return
		}
		defer unlock()
	}
	rec, _, _, lerr := lookupRecordTTL(ctx, c.resolver, d, true)
	switch {
	case lerr == nil:
		id = rec.ID
	case e.policy.Mode == ModeNone && errors.Is(lerr, ErrNoRecord):
		// RFC 8461 §8.3: the domain has opted out and removed its record.
		if c.drop(d, e) {
			c.log.Info("mtasts_policy_dropped", zap.String("domain", d), zap.String("reason", "mode none and no TXT record"))
		}
		return
	}
	_, _ = c.refresh(ctx, d, id)
}

// flushLastUsed writes entries whose last use moved by more than an hour
// since written (all changed ones when final).
func (c *Cache) flushLastUsed(final bool) {
	c.mu.RLock()
	var dirty []string
	for d, e := range c.entries {
		moved := time.Duration(e.lastUsed.Load() - e.persistedUsed.Load())
		if moved >= lastUsedPersistSlack || (final && moved > 0) {
			dirty = append(dirty, d)
		}
	}
	c.mu.RUnlock()
	if c.shared != nil {
		c.shareLastUsed(dirty)
		return
	}
	for _, d := range dirty {
		c.persist(d)
	}
}

// fileEntry is the on-disk form of an entry: data_dir/mtasts/<domain>.json.
// The policy is kept as fetched and parsed again on load.
type fileEntry struct {
	Domain      string    `json:"domain"`
	ID          string    `json:"id"`
	Policy      string    `json:"policy"`
	Fetched     time.Time `json:"fetched"`
	LastUsed    time.Time `json:"last_used"`
	LastError   string    `json:"last_error,omitempty"`
	LastErrorAt time.Time `json:"last_error_at,omitzero"`
}

// persist writes the current state of d to disk, or removes its file when
// nothing is cached. Errors are logged: the in-memory cache still works.
func (c *Cache) persist(d string) {
	if c.dir == "" {
		return
	}
	c.diskMu.Lock()
	defer c.diskMu.Unlock()
	c.mu.RLock()
	e := c.entries[d]
	var fe fileEntry
	var used int64
	if e != nil {
		used = e.lastUsed.Load()
		fe = fileEntry{Domain: d, ID: e.id, Policy: string(e.body), Fetched: e.fetched.UTC(),
			LastUsed: time.Unix(0, used).UTC(), LastError: e.lastError, LastErrorAt: e.lastErrorAt.UTC()}
		if e.lastErrorAt.IsZero() {
			fe.LastErrorAt = time.Time{}
		}
	}
	c.mu.RUnlock()
	path := filepath.Join(c.dir, domain.FileName(d)+".json")
	if e == nil {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			c.log.Error("mtasts_cache_write", zap.String("domain", d), zap.Error(err))
		} else if err == nil {
			atomicfile.SyncDir(c.dir)
		}
		return
	}
	data, err := json.MarshalIndent(fe, "", "  ")
	if err == nil {
		err = atomicfile.Write(path, append(data, '\n'))
	}
	if err != nil {
		c.log.Error("mtasts_cache_write", zap.String("domain", d), zap.Error(err))
		return
	}
	e.persistedUsed.Store(used)
}

// load reads every stored entry. A file that cannot be read or whose
// policy no longer parses is logged and skipped (and left in place for the
// operator); leftover temporary files are removed.
func (c *Cache) load() error {
	err := atomicfile.ReadDirJSON(c.dir, func(path string, data []byte, err error) error {
		var e *entry
		if err == nil {
			e, err = c.loadFile(path, data)
		}
		if err != nil {
			c.log.Warn("mtasts_cache_load", zap.String("file", filepath.Base(path)), zap.Error(err))
			return nil
		}
		c.entries[e.domain] = e
		return nil
	})
	if err != nil {
		return fmt.Errorf("mtasts cache: %w", err)
	}
	return nil
}

func (c *Cache) loadFile(path string, data []byte) (*entry, error) {
	var fe fileEntry
	if err := json.Unmarshal(data, &fe); err != nil {
		return nil, err
	}
	d, ok := normalizeDomain(fe.Domain)
	if !ok || d != fe.Domain || filepath.Base(path) != domain.FileName(d)+".json" {
		return nil, fmt.Errorf("domain %q does not match the file name", fe.Domain)
	}
	if !validID(fe.ID) && fe.ID != "" {
		return nil, fmt.Errorf("invalid id %q", fe.ID)
	}
	p, err := ParsePolicy([]byte(fe.Policy))
	if err != nil {
		return nil, err
	}
	e := &entry{domain: d, id: fe.ID, policy: p, body: []byte(fe.Policy), fetched: fe.Fetched,
		lastError: fe.LastError, lastErrorAt: fe.LastErrorAt}
	e.lastUsed.Store(fe.LastUsed.UnixNano())
	e.persistedUsed.Store(fe.LastUsed.UnixNano())
	return e, nil
}
