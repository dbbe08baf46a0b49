package mtastsdb

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/mtasts"
)

const (
	// sharedOpTimeout bounds one request to the shared store.
	sharedOpTimeout = 5 * time.Second
	// sharedSyncTimeout bounds New's first read of the shared store.
	sharedSyncTimeout = 30 * time.Second
	// sharedLockMargin is added to the fetch timeout to make the fetch
	// lock's TTL: the holder's fetch and its write to the store.
	sharedLockMargin = 5 * time.Second
	// sharedLockRounds: how many times a node waits for a lock holder
	// before it fetches without the lock.
	sharedLockRounds = 3
)

// lockTTL is how long a fetch lock lives when its holder dies.
func (c *Cache) lockTTL() time.Duration {
	t := c.fetcher.Timeout
	if t <= 0 {
		t = mtasts.DefaultFetchTimeout
	}
	return t + sharedLockMargin
}

// startShared fills the in-memory copy from the shared store and keeps
// it current.
func (c *Cache) startShared() error {
	ctx, cancel := context.WithTimeout(context.Background(), sharedSyncTimeout)
	defer cancel()
	if err := c.shared.Watch(ctx, c.applyShared); err != nil {
		return fmt.Errorf("mtasts cache: read the shared cache: %w", err)
	}
	return nil
}

// applyShared makes the in-memory copy of d what the shared store holds
// at revision rev (se nil: nothing). A revision older than one already
// applied is ignored, so a Load racing the watcher cannot go back.
func (c *Cache) applyShared(d string, se *SharedEntry, rev uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if rev != 0 {
		if rev <= c.sharedRev[d] {
			return
		}
		c.sharedRev[d] = rev
	}
	if se == nil {
		delete(c.entries, d)
		delete(c.recent, d)
		delete(c.failures, d)
		return
	}
	c.applySharedPolicyLocked(d, se)
	c.applySharedFailureLocked(d, se.Failure)
}

// applySharedPolicyLocked makes the cached policy of d the one se holds
// (none when its Policy is empty). c.mu is held.
func (c *Cache) applySharedPolicyLocked(d string, se *SharedEntry) {
	cur := c.entries[d]
	switch {
	case se.Policy == "":
		if cur != nil {
			delete(c.entries, d)
			delete(c.recent, d)
		}
	case cur != nil && cur.id == se.ID && cur.fetched.Equal(se.Fetched):
		// The same policy (our own write coming back, or a last-use or
		// error update): merge.
		used := se.LastUsed.UnixNano()
		if cur.lastUsed.Load() < used {
			cur.lastUsed.Store(used)
		}
		if cur.persistedUsed.Load() < used {
			cur.persistedUsed.Store(used)
		}
		if se.LastErrorAt.After(cur.lastErrorAt) {
			cur.lastError, cur.lastErrorAt = se.LastError, se.LastErrorAt
		}
	default:
		p, err := mtasts.ParsePolicy([]byte(se.Policy))
		if err != nil {
			c.log.Warn("mtasts_shared_entry", zap.String("domain", d), zap.Error(err))
			return
		}
		ne := &entry{domain: d, id: se.ID, policy: p, body: []byte(se.Policy), fetched: se.Fetched,
			lastError: se.LastError, lastErrorAt: se.LastErrorAt}
		used := se.LastUsed.UnixNano()
		ne.persistedUsed.Store(used)
		if cur != nil && cur.lastUsed.Load() > used {
			used = cur.lastUsed.Load()
		}
		ne.lastUsed.Store(used)
		c.entries[d] = ne
		delete(c.recent, d)
	}
}

// applySharedFailureLocked makes the back-off of d the shared one f (none
// when f is nil). c.mu is held.
func (c *Cache) applySharedFailureLocked(d string, f *SharedFailure) {
	if f == nil {
		delete(c.failures, d)
		return
	}
	if old := c.failures[d]; old == nil || old.id != f.ID || !old.until.Equal(f.Until) {
		c.failures[d] = &failure{id: f.ID, until: f.Until, err: f.fetchError()}
	}
}

// fromShared reads d from the shared store into the in-memory copy and
// returns the decision for id it allows.
func (c *Cache) fromShared(ctx context.Context, d, id string) (Result, *entry, bool, error) {
	lctx, cancel := context.WithTimeout(ctx, sharedOpTimeout)
	se, rev, err := c.shared.Load(lctx, d)
	cancel()
	if err != nil {
		return Result{}, nil, false, err
	}
	if se != nil {
		c.applyShared(d, se, rev)
	}
	res, e, ok := c.localDecision(d, id)
	return res, e, ok, nil
}

// fetchShared is fetchUnlessCached in fleet mode, once the in-memory copy has
// neither the policy for id nor a back-off: it takes the policy or the
// back-off from the shared store, or fetches under the fleet's fetch
// lock, or waits for the node holding it. When the shared store cannot
// be used, it fetches anyway: delivery does not stop with NATS.
func (c *Cache) fetchShared(ctx context.Context, d, id string) (Result, *entry) {
	ttl := c.lockTTL()
	for round := 0; ; round++ {
		res, e, ok, err := c.fromShared(ctx, d, id)
		if err != nil {
			c.log.Warn("mtasts_shared_unavailable", zap.String("domain", d), zap.String("op", "load"), zap.Error(err))
			break
		}
		if ok {
			return res, e
		}
		if round == sharedLockRounds {
			c.log.Warn("mtasts_shared_lock_timeout", zap.String("domain", d), zap.String("id", id))
			break
		}
		lctx, cancel := context.WithTimeout(ctx, sharedOpTimeout)
		unlock, acquired, err := c.shared.Lock(lctx, d, id, ttl)
		cancel()
		if err != nil {
			c.log.Warn("mtasts_shared_unavailable", zap.String("domain", d), zap.String("op", "lock"), zap.Error(err))
			break
		}
		if acquired {
			defer unlock()
			// The last holder may have stored its result between our
			// Load and our Lock.
			res, e, ok, err := c.fromShared(ctx, d, id)
			if err == nil && ok {
				return res, e
			}
			return c.fetchNow(ctx, d, id)
		}
		// Another node is fetching: wait for it (its lock expires by
		// itself if it died), then look again.
		wctx, cancel := context.WithTimeout(ctx, ttl+sharedOpTimeout)
		err = c.shared.Wait(wctx, d)
		cancel()
		if err != nil && !errors.Is(err, context.DeadlineExceeded) {
			c.log.Warn("mtasts_shared_unavailable", zap.String("domain", d), zap.String("op", "wait"), zap.Error(err))
			break
		}
	}
	return c.fetchNow(ctx, d, id)
}

// sharedUpdate is Shared.Update with a bounded time and logged errors:
// the in-memory copy goes on working without the shared store.
func (c *Cache) sharedUpdate(d, op string, fn func(cur *SharedEntry) (*SharedEntry, bool)) bool {
	ctx, cancel := context.WithTimeout(context.Background(), sharedOpTimeout)
	defer cancel()
	if err := c.shared.Update(ctx, d, fn); err != nil {
		c.log.Error("mtasts_shared_write", zap.String("domain", d), zap.String("op", op), zap.Error(err))
		return false
	}
	return true
}

// shareStore writes a freshly fetched policy to the shared store; it
// clears the back-off.
func (c *Cache) shareStore(d string, ne *entry) {
	used := ne.lastUsed.Load()
	ok := c.sharedUpdate(d, "store", func(cur *SharedEntry) (*SharedEntry, bool) {
		next := &SharedEntry{Domain: d, ID: ne.id, Policy: string(ne.body), Fetched: ne.fetched.UTC(),
			LastUsed: time.Unix(0, used).UTC()}
		if cur != nil && cur.LastUsed.After(next.LastUsed) {
			next.LastUsed = cur.LastUsed
		}
		return next, true
	})
	if ok {
		ne.persistedUsed.Store(used)
	}
}

// shareFailure writes the back-off after a failed fetch of (d, id), and
// the error on the shared policy.
func (c *Cache) shareFailure(d, id string, fe *mtasts.Failure, now time.Time) {
	sf := &SharedFailure{ID: id, Until: now.Add(c.backoff).UTC(), ResultType: string(fe.ResultType),
		Reason: fe.Reason, Error: fe.Error()}
	c.sharedUpdate(d, "failure", func(cur *SharedEntry) (*SharedEntry, bool) {
		next := &SharedEntry{Domain: d}
		if cur != nil {
			cp := *cur
			next = &cp
		}
		next.Failure = sf
		if next.Policy != "" {
			next.LastError, next.LastErrorAt = fe.Error(), now.UTC()
		}
		return next, true
	})
}

// shareDrop removes d from the shared store: whatever is there when e is
// nil (Forget), else only while it still holds e's policy (the
// refresher's drops, which every node makes).
func (c *Cache) shareDrop(d string, e *entry) {
	c.sharedUpdate(d, "drop", func(cur *SharedEntry) (*SharedEntry, bool) {
		if cur == nil {
			return nil, false
		}
		if e != nil && (cur.ID != e.id || !cur.Fetched.Equal(e.fetched)) {
			return nil, false
		}
		return nil, true
	})
}

// shareLastUsed writes the last-use times of domains that moved, so that
// the refresher of no node drops a policy another node uses.
func (c *Cache) shareLastUsed(domains []string) {
	for _, d := range domains {
		c.mu.RLock()
		e := c.entries[d]
		c.mu.RUnlock()
		if e == nil {
			continue
		}
		used := e.lastUsed.Load()
		ok := c.sharedUpdate(d, "last-used", func(cur *SharedEntry) (*SharedEntry, bool) {
			if cur == nil || cur.ID != e.id || !cur.Fetched.Equal(e.fetched) || !cur.LastUsed.Before(time.Unix(0, used)) {
				return nil, false
			}
			next := *cur
			next.LastUsed = time.Unix(0, used).UTC()
			return &next, true
		})
		if ok {
			e.persistedUsed.Store(used)
		}
	}
}

// claimRefresh makes one node of the fleet refresh e: it takes the fetch
// lock of e's domain and reports false when another node holds it, or
// when the shared store already holds a newer policy than e (another node
// refreshed it). The caller calls unlock when done.
func (c *Cache) claimRefresh(ctx context.Context, e *entry) (unlock func(), ok bool) {
	d := e.domain
	lctx, cancel := context.WithTimeout(ctx, sharedOpTimeout)
	unlock, acquired, err := c.shared.Lock(lctx, d, e.id, c.lockTTL())
	cancel()
	if err != nil {
		// Without the shared store, refresh alone.
		c.log.Warn("mtasts_shared_unavailable", zap.String("domain", d), zap.String("op", "lock"), zap.Error(err))
		return func() {}, true
	}
	if !acquired {
		return nil, false
	}
	lctx, cancel = context.WithTimeout(ctx, sharedOpTimeout)
	se, rev, err := c.shared.Load(lctx, d)
	cancel()
	if err == nil && se != nil {
		c.applyShared(d, se, rev)
	}
	c.mu.RLock()
	same := c.entries[d] == e
	c.mu.RUnlock()
	if !same {
		unlock()
		return nil, false
	}
	return unlock, true
}
