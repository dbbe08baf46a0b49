package mtastsdb

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/singleflight"

	"github.com/stsrelay/stsrelay/mtasts"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// Defaults of Options.
const (
	DefaultRefreshBeforeExpiry = time.Hour
	DefaultFailureBackoff      = 5 * time.Minute // RFC 8461 §3.3: "five minutes or longer"
	DefaultMaxUnused           = 180 * 24 * time.Hour
	DefaultTXTGrace            = time.Minute
	DefaultRefreshInterval     = time.Minute
)

// Options configure a Cache. Resolver is required; the rest have defaults.
type Options struct {
	// Resolver looks up "_mta-sts" TXT records.
	Resolver mtasts.TXTResolver
	// Fetcher fetches policies; nil means a Fetcher with its defaults.
	Fetcher *mtasts.Fetcher
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
	OnFetch func(domain, id string, mode mtasts.Mode, result string)
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
	Policy *mtasts.Policy
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
	Failure *mtasts.Failure
}

// Cache is the persistent MTA-STS policy cache (RFC 8461 §3.3, §5.1). It
// is safe for concurrent use.
type Cache struct {
	resolver      mtasts.TXTResolver
	fetcher       *mtasts.Fetcher
	dir           string
	now           func() time.Time
	log           *zap.Logger
	refreshBefore time.Duration
	backoff       time.Duration
	maxUnused     time.Duration
	grace         time.Duration
	interval      time.Duration
	onFetch       func(domain, id string, mode mtasts.Mode, result string)

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
	policy  *mtasts.Policy
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
	err   *mtasts.Failure
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
		c.fetcher = &mtasts.Fetcher{}
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
		if err := c.openDir(); err != nil {
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
//     wrapping mtasts.ErrDNS: the caller should defer, as it cannot tell whether
//     the domain requires TLS (a choice; RFC 8461 is silent).
//   - The outcome is reused for TXTGrace (60 s by default) without a new
//     DNS query: a policy change is noticed up to that much later, which
//     RFC 8461 §8.1 already expects through the TXT record's TTL.
//
// A policy whose max_age has run out is never returned.
func (c *Cache) Get(ctx context.Context, domain string) (Result, error) {
	d, ok := mtasts.NormalizeDomain(domain)
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
	d, ok := mtasts.NormalizeDomain(domain)
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
		if e.policy.Mode != mtasts.ModeNone {
			// RFC 8461 §6: a failure while a policy is cached is
			// reportable.
			res.Failure = mtasts.AsFailure(lerr)
		}
	} else if errors.Is(lerr, mtasts.ErrDNS) {
		return res, fmt.Errorf("MTA-STS policy of %s unknown: %w", d, lerr)
	}
	c.remember(d, res, e, now, ttl)
	return res, nil
}

// lookup is LookupRecord shared by concurrent callers for one domain: a
// burst of messages to a domain makes one TXT query, not one each. The
// query runs detached from the caller's cancellation, bounded by the
// resolver's timeout.
func (c *Cache) lookup(ctx context.Context, d string, fresh bool) (*mtasts.Record, time.Duration, error) {
	lctx := context.WithoutCancel(ctx)
	key := "txt\x00" + d
	if fresh {
		key = "fresh\x00" + d
	}
	type out struct {
		rec *mtasts.Record
		ttl time.Duration
	}
	ch := c.flight.DoChan(key, func() (any, error) {
		rec, ttl, err := mtasts.LookupRecordTTL(lctx, c.resolver, d, fresh)
		return out{rec, ttl}, err
	})
	select {
	case r := <-ch:
		o, _ := r.Val.(out)
		return o.rec, o.ttl, r.Err
	case <-ctx.Done():
		return nil, 0, fmt.Errorf("look up TXT _mta-sts.%s: %w (%w)", d, mtasts.ErrDNS, ctx.Err())
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
		res, e := c.fetchUnlessCached(fctx, d, id)
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
		fe := &mtasts.Failure{ResultType: tlsrpt.ResultSTSPolicyFetchError, Reason: "cancelled", Err: fmt.Errorf("fetch MTA-STS policy of %s: %w: %w", d, mtasts.ErrPolicyFetch, ctx.Err())}
		if e != nil && e.validAt(now) {
			res := e.result()
			res.Failure = fe
			return res, e, nil
		}
		return Result{Domain: d}, nil, fe
	}
}

// fetchUnlessCached is the body of the single flight for (d, id): it
// looks again at what the cache holds, since another flight may just have
// finished, and fetches only when neither the policy for id nor a
// back-off for id is there. It takes c.mu itself, briefly; the fetch runs
// without it.
func (c *Cache) fetchUnlessCached(ctx context.Context, d, id string) (Result, *entry) {
	if res, e, ok := c.localDecision(d, id); ok {
		return res, e
	}
	if c.shared != nil {
		return c.fetchShared(ctx, d, id)
	}
	return c.fetchNow(ctx, d, id)
}

// localDecision is what the in-memory copy says about (d, id): the
// cached policy for id (RFC 8461 §5.1: never an expired one), or the
// back-off for id (§3.3: wait before fetching again for this id). ok is
// false when neither applies; e is then the valid cached policy, if any.
func (c *Cache) localDecision(d, id string) (res Result, e *entry, ok bool) {
	now := c.now()
	c.mu.RLock()
	e = c.entries[d]
	f := c.failures[d]
	c.mu.RUnlock()
	if e != nil && !e.validAt(now) {
		e = nil
	}
	if e != nil && e.id == id {
		e.touch(now)
		return e.result(), e, true
	}
	if f != nil && f.id == id && now.Before(f.until) {
		return c.failedResult(d, id, e, f.err), e, true
	}
	return Result{}, e, false
}

// fetchNow fetches the policy of d for id and records the outcome (in the
// shared store too in fleet mode, through storeFetched and noteFailure).
// On failure the valid cached policy, if any, stays in force.
func (c *Cache) fetchNow(ctx context.Context, d, id string) (Result, *entry) {
	e := c.validEntry(d)
	p, body, err := c.fetcher.Fetch(ctx, d)
	if err != nil {
		fe := mtasts.AsFailure(err)
		c.noteFailure(d, id, fe, false)
		return c.failedResult(d, id, e, fe), e
	}
	ne := c.storeFetched(d, id, p, body)
	return Result{Policy: ne.policy, ID: id, Domain: d}, ne
}

// validEntry is the cached policy of d while it has not expired, else nil.
func (c *Cache) validEntry(d string) *entry {
	now := c.now()
	c.mu.RLock()
	e := c.entries[d]
	c.mu.RUnlock()
	if e != nil && !e.validAt(now) {
		return nil
	}
	return e
}

// failedResult: the cached policy (if any) with the failure attached. A
// fetch failure while a valid TXT record exists is reportable even when
// nothing is cached (RFC 8461 §6).
func (c *Cache) failedResult(d, id string, e *entry, fe *mtasts.Failure) Result {
	if e != nil {
		res := e.result()
		res.Failure = fe
		return res
	}
	return Result{Domain: d, ID: id, Failure: fe}
}

// noteFailure records a failed fetch: the backoff for (d, id), the
// entry's last error, the log line and the hook.
func (c *Cache) noteFailure(d, id string, fe *mtasts.Failure, refresh bool) {
	now := c.now()
	c.mu.Lock()
	c.failures[d] = &failure{id: id, until: now.Add(c.backoff), err: fe}
	e := c.entries[d]
	var mode mtasts.Mode
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
		if refresh && mode != mtasts.ModeNone {
			// RFC 8461 §3.3, §10.2: alert when refreshes fail, unless
			// the cached mode is none.
			c.log.Warn("mtasts_refresh_failed", zap.String("domain", d), zap.String("id", e.id),
				zap.String("mode", string(mode)), zap.Time("expires", e.expires()), zap.String("error", fe.Error()))
		}
		c.persist(d)
	}
}

// storeFetched makes a freshly fetched policy the cached one for d: in
// memory, on disk or in the shared store, the log line and the hook.
func (c *Cache) storeFetched(d, id string, p *mtasts.Policy, body []byte) *entry {
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

// Forget removes the cached policy of domain, in memory and on disk (the
// operator's `policy forget`).
func (c *Cache) Forget(domain string) error {
	d, ok := mtasts.NormalizeDomain(domain)
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
