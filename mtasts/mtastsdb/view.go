package mtastsdb

import (
	"sort"
	"time"

	"github.com/stsrelay/stsrelay/mtasts"
)

// Entry describes one cached policy (for `stsrelay policy list/show`).
type Entry struct {
	Domain        string         `json:"domain"`
	ID            string         `json:"id"`
	Mode          mtasts.Mode    `json:"mode"`
	MX            []string       `json:"mx"`
	MaxAge        time.Duration  `json:"-"`
	MaxAgeSeconds int64          `json:"max_age"`
	Fetched       time.Time      `json:"fetched"`
	Expires       time.Time      `json:"expires"`
	Expired       bool           `json:"expired"`
	LastUsed      time.Time      `json:"last_used"`
	LastError     string         `json:"last_error,omitempty"`
	LastErrorAt   time.Time      `json:"last_error_at,omitzero"`
	Policy        *mtasts.Policy `json:"-"`
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
	d, ok := mtasts.NormalizeDomain(domain)
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
