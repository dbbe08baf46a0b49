package dnsclient

import (
	"context"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/internal/domain"
)

// DefaultCacheMaxTTL is the longest an answer is cached when
// Options.CacheMaxTTL is not set (config dns.cache_max_ttl).
const DefaultCacheMaxTTL = time.Hour

// failureTTL is how long a failure (SERVFAIL, REFUSED from every server,
// timeout, network error, CNAME loop) is cached: long enough that a burst
// of deliveries to a broken domain asks once, short enough that a server
// that recovers is used again at once. RFC 2308 §7.1 allows up to five
// minutes; we want seconds.
const failureTTL = 2 * time.Second

// cacheKey names a cached answer. The name is lower case without its
// trailing dot, so that "Example.COM." and "example.com" share an entry and
// a caller that already passes the canonical form builds no string.
type cacheKey struct {
	name  string
	qtype uint16
}

// canonicalName returns name as a cacheKey holds it. It allocates only when
// name has upper-case letters.
func canonicalName(name string) string {
	return domain.Key(name)
}

// entry is one lookup outcome: an answer or an error, and when it expires.
// An entry never changes once made, so it is shared with callers without
// copying.
type entry struct {
	key cacheKey
	ans *Answer // nil when err is set; its TTL and Expires are not set
	// txt holds the character-strings of ans's TXT records, made once so
	// that a cached TXT lookup allocates nothing.
	txt [][]string
	err error
	// secure is whether the outcome is DNSSEC-secure: ans.Secure for an
	// answer, whether the denial was for NXDOMAIN or NODATA, false for a
	// failure. It is kept apart from ans so that a cached denial keeps it.
	secure  bool
	expires time.Time

	prev, next *entry // LRU list; guarded by cache.mu
}

func newEntry(k cacheKey, ans *Answer, secure bool, err error, ttl time.Duration, now time.Time) *entry {
	e := &entry{key: k, ans: ans, err: err, secure: secure, expires: now.Add(ttl)}
	if ans != nil && k.qtype == dns.TypeTXT {
		e.txt = make([][]string, 0, len(ans.RRs))
		for _, rr := range ans.RRs {
			if t, ok := rr.(*dns.TXT); ok {
				e.txt = append(e.txt, t.Txt)
			}
		}
	}
	return e
}

// remaining is the TTL of e left at now, never negative.
func (e *entry) remaining(now time.Time) time.Duration {
	return max(e.expires.Sub(now), 0)
}

// flight is a lookup in progress that callers asking the same question
// wait for, instead of asking again.
type flight struct {
	done    chan struct{}
	cancel  context.CancelFunc
	waiters int    // guarded by cache.mu
	e       *entry // set before done is closed
}

// cache holds answers for their TTL, at most max of them, dropping the
// least recently used first; and the flights in progress.
type cache struct {
	max int // 0: nothing is kept (flights still coalesce)

	mu      sync.Mutex
	entries map[cacheKey]*entry
	lru     entry // sentinel: lru.next is the most recently used
	flights map[cacheKey]*flight

	hits, misses atomic.Uint64
}

func newCache(max int) *cache {
	c := &cache{max: max, entries: map[cacheKey]*entry{}, flights: map[cacheKey]*flight{}}
	c.lru.next, c.lru.prev = &c.lru, &c.lru
	return c
}

// getLocked returns the unexpired entry for k, marking it used, or nil.
func (c *cache) getLocked(k cacheKey, now time.Time) *entry {
	e := c.entries[k]
	if e == nil {
		return nil
	}
	if !now.Before(e.expires) {
		c.removeLocked(e)
		return nil
	}
	if c.lru.next != e {
		e.prev.next, e.next.prev = e.next, e.prev
		c.pushFrontLocked(e)
	}
	return e
}

// putLocked stores e, evicting the least recently used entries beyond max.
func (c *cache) putLocked(e *entry) {
	if c.max <= 0 {
		return
	}
	if old := c.entries[e.key]; old != nil {
		c.removeLocked(old)
	}
	c.entries[e.key] = e
	c.pushFrontLocked(e)
	for len(c.entries) > c.max {
		c.removeLocked(c.lru.prev)
	}
}

func (c *cache) pushFrontLocked(e *entry) {
	e.prev, e.next = &c.lru, c.lru.next
	c.lru.next.prev = e
	c.lru.next = e
}

func (c *cache) removeLocked(e *entry) {
	e.prev.next, e.next.prev = e.next, e.prev
	e.prev, e.next = nil, nil
	delete(c.entries, e.key)
}

// resolve returns the outcome of asking name for qtype, from the cache when
// it holds one (unless fresh), else by joining the lookup in progress for
// the same question or starting one. The returned now is the time the
// outcome's remaining TTL is to be measured at. The error is only for the
// caller's context ending before an outcome was there; the outcome's own
// error is in the entry.
func (r *Resolver) resolve(ctx context.Context, name string, qtype uint16, fresh bool) (*entry, time.Time, error) {
	k := cacheKey{name: canonicalName(name), qtype: qtype}
	c := r.cache
	now := r.now()
	c.mu.Lock()
	if e := c.getLocked(k, now); e != nil && !fresh {
		c.mu.Unlock()
		c.hits.Add(1)
		return e, now, nil
	}
	c.misses.Add(1)
	if err := ctx.Err(); err != nil {
		c.mu.Unlock()
		return nil, now, contextError(k, err)
	}
	f := c.flights[k]
	if f == nil {
		// The lookup outlives the caller that started it: others may be
		// waiting for it too. It ends when its answer is in, or when the
		// last caller waiting for it gives up.
		fctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
		f = &flight{done: make(chan struct{}), cancel: cancel}
		c.flights[k] = f
		go r.fly(fctx, k, f)
	}
	f.waiters++
	c.mu.Unlock()

	select {
	case <-f.done:
		return f.e, r.now(), nil
	case <-ctx.Done():
		c.mu.Lock()
		f.waiters--
		if f.waiters == 0 {
			f.cancel()
			if c.flights[k] == f {
				delete(c.flights, k)
			}
		}
		c.mu.Unlock()
		return nil, r.now(), contextError(k, ctx.Err())
	}
}

func contextError(k cacheKey, err error) error {
	return fmt.Errorf("%s %s: %w: %w", dns.Fqdn(k.name), dns.TypeToString[k.qtype], err, ErrTemporary)
}

// fly runs the lookup of flight f and caches its outcome, unless every
// caller gave up on it (then the outcome is only the cancellation).
func (r *Resolver) fly(ctx context.Context, k cacheKey, f *flight) {
	ans, ttl, secure, err := r.lookup(ctx, dns.Fqdn(k.name), k.qtype)
	now := r.now()
	e := newEntry(k, ans, secure, err, min(ttl, r.maxTTL), now)
	c := r.cache
	c.mu.Lock()
	if c.flights[k] == f {
		delete(c.flights, k)
	}
	if ctx.Err() == nil && e.expires.After(now) {
		c.putLocked(e)
	}
	f.e = e
	c.mu.Unlock()
	f.cancel()
	close(f.done)
}

// CacheLookups returns how many lookups the cache answered (hits) and how
// many it did not (misses: a query was sent, a caller joined one in
// progress, or LookupTXTFresh asked), since the resolver was made. Each question counts once: LookupMX
// is one lookup, LookupIP one per address family. With the cache disabled
// every lookup is a miss. It feeds stsrelay_dns_cache_lookups_total.
func (r *Resolver) CacheLookups() (hits, misses uint64) {
	return r.cache.hits.Load(), r.cache.misses.Load()
}

// ttlOf reads a record's TTL. RFC 2181 §8: a value with the most
// significant bit set is treated as zero.
func ttlOf(v uint32) uint32 {
	if v > math.MaxInt32 {
		return 0
	}
	return v
}

// negativeTTL is how long a negative answer (NXDOMAIN, NODATA) in msg may
// be cached, at most chain seconds: RFC 2308 §5, the smaller of the TTL of
// the SOA in the authority section and its MINIMUM field, and no longer
// than any record of the answer section (the CNAMEs that led there). A
// negative answer without an SOA is not cached (§5: "SHOULD NOT be
// cached").
func negativeTTL(msg *dns.Msg, chain uint32) time.Duration {
	var soa *dns.SOA
	for _, rr := range msg.Ns {
		if s, ok := rr.(*dns.SOA); ok {
			soa = s
			break
		}
	}
	if soa == nil {
		return 0
	}
	ttl := min(chain, ttlOf(soa.Hdr.Ttl), ttlOf(soa.Minttl))
	for _, rr := range msg.Answer {
		ttl = min(ttl, ttlOf(rr.Header().Ttl))
	}
	return time.Duration(ttl) * time.Second
}
