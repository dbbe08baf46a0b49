package mtastsdb

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"time"

	"go.uber.org/zap"
	"golang.org/x/sync/errgroup"

	"github.com/stsrelay/stsrelay/mtasts"
)

const (
	// refreshEvery is the proactive refresh period of RFC 8461 §3.3
	// ("a suggested refresh frequency is once per day").
	refreshEvery = 24 * time.Hour
	// lastUsedPersistSlack: a LastUsed that moved less than this since
	// it was written is not worth a disk write.
	lastUsedPersistSlack = time.Hour
	// refreshParallel bounds concurrent refreshes in one refresher pass.
	refreshParallel = 8
)

// Refresh fetches the policy of domain now, whatever the TXT id says (the
// operator's `policy refresh`, and the refresher). A valid policy replaces
// the cached one; on failure the cached one stays and the error is
// returned. The id stored is that of the current TXT record, or the
// cached one when the record cannot be read.
func (c *Cache) Refresh(ctx context.Context, domain string) (Entry, error) {
	d, ok := mtasts.NormalizeDomain(domain)
	if !ok {
		return Entry{}, fmt.Errorf("refresh MTA-STS policy: %q is not a domain name", domain)
	}
	c.mu.RLock()
	e := c.entries[d]
	c.mu.RUnlock()
	rec, _, lerr := mtasts.LookupRecordTTL(ctx, c.resolver, d, true)
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
			fe := mtasts.AsFailure(err)
			c.noteFailure(d, id, fe, true)
			return fe, nil
		}
		c.storeFetched(d, id, p, body)
		return nil, nil
	})
	ent, _ := c.Entry(d)
	if fe, ok := v.(*mtasts.Failure); ok && fe != nil {
		return ent, fe
	}
	return ent, nil
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
	entries := c.snapshotAndPrune(now)

	// A few refreshes at a time: one slow policy host must not hold up
	// the others for its whole timeout.
	var g errgroup.Group
	g.SetLimit(refreshParallel)
	defer g.Wait()
	for _, e := range entries {
		if ctx.Err() != nil {
			return
		}
		if c.dropStale(e, now) || !c.refreshWanted(e, now) {
			continue
		}
		g.Go(func() error { c.refreshEntry(ctx, e); return nil })
	}
	g.Wait()
	c.flushLastUsed(false)
}

// snapshotAndPrune returns the cached entries sorted by domain, and
// prunes the outcomes and back-offs the delivery path accumulates once
// they have run out.
func (c *Cache) snapshotAndPrune(now time.Time) []*entry {
	c.mu.Lock()
	entries := make([]*entry, 0, len(c.entries))
	for _, e := range c.entries {
		entries = append(entries, e)
	}
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
	return entries
}

// dropStale drops e when it was not used for MaxUnused or has expired,
// and reports whether it was one of those.
func (c *Cache) dropStale(e *entry, now time.Time) bool {
	d := e.domain
	lastUsed := time.Unix(0, e.lastUsed.Load())
	switch {
	case now.Sub(lastUsed) >= c.maxUnused:
		if c.drop(d, e) {
			c.log.Info("mtasts_policy_dropped", zap.String("domain", d), zap.String("reason", "unused"), zap.Time("last_used", lastUsed))
		}
		return true
	case !e.validAt(now):
		if c.drop(d, e) {
			c.log.Info("mtasts_policy_dropped", zap.String("domain", d), zap.String("reason", "expired"), zap.Time("expires", e.expires()))
		}
		return true
	}
	return false
}

// refreshWanted: e expires within RefreshBeforeExpiry or was fetched a
// day (or half its max_age) ago, and no refresh of it failed within the
// back-off.
func (c *Cache) refreshWanted(e *entry, now time.Time) bool {
	age := now.Sub(e.fetched)
	due := e.expires().Sub(now) <= c.refreshBefore || age >= min(refreshEvery, e.policy.MaxAge/2)
	if !due {
		return false
	}
	c.mu.RLock()
	lastErrAt := e.lastErrorAt
	c.mu.RUnlock()
	return !(lastErrAt.After(e.fetched) && now.Sub(lastErrAt) < c.backoff)
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
	rec, _, lerr := mtasts.LookupRecordTTL(ctx, c.resolver, d, true)
	switch {
	case lerr == nil:
		id = rec.ID
	case e.policy.Mode == mtasts.ModeNone && errors.Is(lerr, mtasts.ErrNoRecord):
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
