// Package forecast answers the question every domain owner in MTA-STS
// testing mode asks (RFC 8461 §5): "if I switched to enforce today, what
// mail would stop?" Delivery tells it, for each session TLS-RPT counts,
// whether enforce would have refused it (for a domain in testing mode) or
// did refuse it (for a domain in enforce mode, the mirror figure); it
// keeps rolling per-domain counts over the last day and the last 7 days,
// by reason and by MX host, and writes them to one file under data_dir so
// that a restart keeps them.
//
// It only counts. Whether a session would have been refused is decided
// by delivery/policy with the same policy in mode enforce, so the
// forecast and enforce itself cannot disagree.
//
// Counts are sessions, not messages: a message that enforce refuses on
// one MX host may still go on the next, so a would-be refusal of a session
// is not a would-be deferral of a message.
//
// Size is bounded: at most MaxDomains domains (the least recently seen is
// dropped), hourly buckets for 7 days, and at most maxPairs (MX, reason)
// pairs per bucket.
package forecast

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/stsrelay/stsrelay/internal/atomicfile"
	domainpkg "github.com/stsrelay/stsrelay/internal/domain"
)

// Modes a session is counted under.
const (
	ModeTesting = "testing"
	ModeEnforce = "enforce"
)

// Reason names of refusals (the metric's reason label and the counts'
// keys): ReasonMXNotInPolicy, or an RFC 8460 result type such as
// "starttls-not-supported" or "certificate-expired".
const ReasonMXNotInPolicy = "mx-not-in-policy"

const (
	// DefaultMaxDomains bounds the domains kept.
	DefaultMaxDomains = 10000
	// maxPairs bounds the (MX, reason) pairs kept per hourly bucket;
	// more fall into one pair with MX "other".
	maxPairs = 16
	// maxMXLen bounds an MX name kept (it comes from DNS).
	maxMXLen = 255
	// maxReasonLen bounds a reason kept.
	maxReasonLen = 64
	// fileName is the counts file under the directory.
	fileName = "counts.json"
	// fileVersion is the counts file's format.
	fileVersion = 1
	// Day and Week are the two windows.
	Day  = 24 * time.Hour
	Week = 7 * Day
)

// Session is one delivery session as the forecast counts it.
type Session struct {
	Time   time.Time
	Domain string // the policy domain
	Mode   string // ModeTesting or ModeEnforce: the mode in force
	MX     string // the MX host of the session
	// Refused: enforce would have refused the session (Mode testing) or
	// refused it (Mode enforce).
	Refused bool
	// Reason names the refusal: ReasonMXNotInPolicy or an RFC 8460
	// result type.
	Reason string
}

// Options configures a Counter.
type Options struct {
	// Dir holds counts.json; "" keeps counts in memory only.
	Dir string
	// MaxDomains bounds the domains kept (DefaultMaxDomains when 0).
	MaxDomains int
	// Now is the clock (time.Now when nil).
	Now func() time.Time
	// OnRefusal, when set, is called for each session enforce would have
	// refused in a testing-mode domain (the metric).
	OnRefusal func(reason string)
	// FlushInterval is how often Run writes changed counts (10s when 0).
	FlushInterval time.Duration
}

// Counter keeps the counts. It is safe for concurrent use.
type Counter struct {
	o    Options
	path string

	mu      sync.Mutex
	domains map[string]*domain
	dirty   bool
}

// domain is one domain's counts, as stored.
type domain struct {
	Domain   string    `json:"domain"`
	Mode     string    `json:"mode"` // of the latest session
	LastSeen time.Time `json:"last_seen"`
	Buckets  []*bucket `json:"buckets"` // by Hour, then Mode
}

// bucket is one hour's sessions in one mode.
type bucket struct {
	Hour     int64   `json:"hour"` // Unix time / 3600
	Mode     string  `json:"mode"`
	Sessions int64   `json:"sessions"`
	Refused  int64   `json:"refused"`
	Pairs    []*pair `json:"pairs,omitempty"`
}

// pair counts the refused sessions of one MX host for one reason.
type pair struct {
	MX     string    `json:"mx"`
	Reason string    `json:"reason"`
	N      int64     `json:"n"`
	Last   time.Time `json:"last"`
}

type file struct {
	Version int       `json:"version"`
	Domains []*domain `json:"domains"`
}

// Open loads the counts kept in o.Dir (none yet is fine).
func Open(o Options) (*Counter, error) {
	if o.MaxDomains <= 0 {
		o.MaxDomains = DefaultMaxDomains
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.FlushInterval <= 0 {
		o.FlushInterval = 10 * time.Second
	}
	c := &Counter{o: o, domains: map[string]*domain{}}
	if o.Dir == "" {
		return c, nil
	}
	if err := os.MkdirAll(o.Dir, 0o750); err != nil {
		return nil, fmt.Errorf("forecast: %w", err)
	}
	c.path = filepath.Join(o.Dir, fileName)
	data, err := os.ReadFile(c.path)
	if errors.Is(err, os.ErrNotExist) {
		return c, nil
	}
	if err != nil {
		return nil, fmt.Errorf("forecast: %w", err)
	}
	var f file
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("forecast: %s: %w", c.path, err)
	}
	if f.Version != fileVersion {
		return nil, fmt.Errorf("forecast: %s: unknown version %d", c.path, f.Version)
	}
	for _, d := range f.Domains {
		if d == nil || d.Domain == "" {
			continue
		}
		c.domains[d.Domain] = d
	}
	c.mu.Lock()
	c.pruneLocked(c.o.Now())
	c.mu.Unlock()
	return c, nil
}

// Record counts one session.
func (c *Counter) Record(s Session) {
	if s.Domain == "" || (s.Mode != ModeTesting && s.Mode != ModeEnforce) {
		return
	}
	if s.Time.IsZero() {
		s.Time = c.o.Now()
	}
	s.Domain = domainpkg.Key(s.Domain)
	s.MX = trunc(domainpkg.Key(s.MX), maxMXLen)
	s.Reason = trunc(s.Reason, maxReasonLen)
	if s.Refused && s.Reason == "" {
		s.Reason = "unknown"
	}
	c.mu.Lock()
	d := c.domains[s.Domain]
	if d == nil {
		if len(c.domains) >= c.o.MaxDomains {
			c.evictLocked()
		}
		d = &domain{Domain: s.Domain}
		c.domains[s.Domain] = d
	}
	if !s.Time.Before(d.LastSeen) {
		d.LastSeen, d.Mode = s.Time, s.Mode
	}
	hour := s.Time.Unix() / 3600
	b := d.bucket(hour, s.Mode)
	b.Sessions++
	if s.Refused {
		b.Refused++
		b.addPair(s.MX, s.Reason, s.Time)
	}
	d.prune(c.o.Now())
	c.dirty = true
	c.mu.Unlock()
	if s.Refused && s.Mode == ModeTesting && c.o.OnRefusal != nil {
		c.o.OnRefusal(s.Reason)
	}
}

func trunc(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// bucket returns the bucket of hour and mode, making it.
func (d *domain) bucket(hour int64, mode string) *bucket {
	for i := len(d.Buckets) - 1; i >= 0; i-- {
		b := d.Buckets[i]
		if b.Hour == hour && b.Mode == mode {
			return b
		}
		if b.Hour < hour {
			break
		}
	}
	b := &bucket{Hour: hour, Mode: mode}
	d.Buckets = append(d.Buckets, b)
	sort.SliceStable(d.Buckets, func(i, j int) bool { return d.Buckets[i].Hour < d.Buckets[j].Hour })
	return b
}

func (b *bucket) addPair(mx, reason string, t time.Time) {
	for _, p := range b.Pairs {
		if p.MX == mx && p.Reason == reason {
			p.N++
			if t.After(p.Last) {
				p.Last = t
			}
			return
		}
	}
	if len(b.Pairs) >= maxPairs-1 {
		mx = "other"
		for _, p := range b.Pairs {
			if p.MX == mx && p.Reason == reason {
				p.N++
				if t.After(p.Last) {
					p.Last = t
				}
				return
			}
		}
		if len(b.Pairs) >= maxPairs {
			// Even "other" pairs are full: count it under the last one.
			p := b.Pairs[len(b.Pairs)-1]
			p.N++
			return
		}
	}
	b.Pairs = append(b.Pairs, &pair{MX: mx, Reason: reason, N: 1, Last: t})
}

// prune drops buckets older than the week.
func (d *domain) prune(now time.Time) {
	oldest := now.Add(-Week).Unix()/3600 + 1
	i := 0
	for i < len(d.Buckets) && d.Buckets[i].Hour < oldest {
		i++
	}
	if i > 0 {
		d.Buckets = append(d.Buckets[:0], d.Buckets[i:]...)
	}
}

func (c *Counter) pruneLocked(now time.Time) {
	for k, d := range c.domains {
		d.prune(now)
		if len(d.Buckets) == 0 {
			delete(c.domains, k)
			c.dirty = true
		}
	}
	for len(c.domains) > c.o.MaxDomains {
		c.evictLocked()
	}
}

// evictLocked drops the least recently seen domain.
func (c *Counter) evictLocked() {
	var victim *domain
	for _, d := range c.domains {
		if victim == nil || d.LastSeen.Before(victim.LastSeen) || d.LastSeen.Equal(victim.LastSeen) && d.Domain < victim.Domain {
			victim = d
		}
	}
	if victim != nil {
		delete(c.domains, victim.Domain)
		c.dirty = true
	}
}

// Flush writes the counts if they changed since the last write.
func (c *Counter) Flush() error {
	c.mu.Lock()
	if !c.dirty || c.path == "" {
		c.mu.Unlock()
		return nil
	}
	c.pruneLocked(c.o.Now())
	f := file{Version: fileVersion}
	for _, d := range c.domains {
		f.Domains = append(f.Domains, d)
	}
	sort.Slice(f.Domains, func(i, j int) bool { return f.Domains[i].Domain < f.Domains[j].Domain })
	data, err := json.Marshal(f)
	c.dirty = false
	c.mu.Unlock()
	if err == nil {
		err = atomicfile.Write(c.path, data)
	}
	if err != nil {
		c.mu.Lock()
		c.dirty = true
		c.mu.Unlock()
		return fmt.Errorf("forecast: %w", err)
	}
	return nil
}

// Run writes changed counts every FlushInterval until ctx ends, then
// once more.
func (c *Counter) Run(ctx context.Context) {
	t := time.NewTicker(c.o.FlushInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			_ = c.Flush()
			return
		case <-t.C:
			_ = c.Flush()
		}
	}
}

// Close writes the counts.
func (c *Counter) Close() error { return c.Flush() }

// Window is the counts of one mode over one window.
type Window struct {
	Sessions int64 `json:"sessions"`
	// Refused is the sessions enforce would have refused (testing) or
	// refused (enforce).
	Refused  int64            `json:"refused"`
	ByReason map[string]int64 `json:"by_reason,omitempty"`
	// ByMX lists the refusals by MX host and reason, most first.
	ByMX []MXCount `json:"by_mx,omitempty"`
}

// MXCount is the refusals of one MX host for one reason.
type MXCount struct {
	MX     string    `json:"mx"`
	Reason string    `json:"reason"`
	Count  int64     `json:"count"`
	Last   time.Time `json:"last"`
}

// Windows is one mode's figures over the last day and the last 7 days.
type Windows struct {
	Day  Window `json:"last_1d"`
	Week Window `json:"last_7d"`
}

// Summary is what `stsrelay policy forecast` shows for a domain.
type Summary struct {
	Domain string `json:"domain"`
	// Mode is the mode of the domain's latest session.
	Mode     string    `json:"mode"`
	LastSeen time.Time `json:"last_seen"`
	// Testing: sessions while the domain was in testing mode, and those
	// enforce would have refused.
	Testing Windows `json:"testing"`
	// Enforce: sessions while the domain was in enforce mode, and those
	// enforce refused.
	Enforce Windows `json:"enforce"`
	// Safe: in testing mode, sessions were seen in the last 7 days and
	// enforce would have refused none of them.
	Safe    bool   `json:"safe"`
	Verdict string `json:"verdict"`
}

// Summaries returns every domain's summary, by domain name.
func (c *Counter) Summaries() []Summary {
	now := c.o.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]Summary, 0, len(c.domains))
	for _, d := range c.domains {
		out = append(out, d.summary(now))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Domain < out[j].Domain })
	return out
}

// Summary returns domain's summary.
func (c *Counter) Summary(name string) (Summary, bool) {
	name = domainpkg.Key(name)
	now := c.o.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	d, ok := c.domains[name]
	if !ok {
		return Summary{}, false
	}
	return d.summary(now), true
}

func (d *domain) summary(now time.Time) Summary {
	s := Summary{Domain: d.Domain, Mode: d.Mode, LastSeen: d.LastSeen}
	hour := now.Unix() / 3600
	dayFrom, weekFrom := hour-23, hour-7*24+1
	for _, b := range d.Buckets {
		if b.Hour < weekFrom {
			continue
		}
		w := &s.Testing
		if b.Mode == ModeEnforce {
			w = &s.Enforce
		}
		w.Week.add(b)
		if b.Hour >= dayFrom {
			w.Day.add(b)
		}
	}
	for _, w := range []*Windows{&s.Testing, &s.Enforce} {
		w.Day.sortMX()
		w.Week.sortMX()
	}
	s.Safe, s.Verdict = verdict(s)
	return s
}

func (w *Window) add(b *bucket) {
	w.Sessions += b.Sessions
	w.Refused += b.Refused
	for _, p := range b.Pairs {
		if w.ByReason == nil {
			w.ByReason = map[string]int64{}
		}
		w.ByReason[p.Reason] += p.N
		found := false
		for i := range w.ByMX {
			m := &w.ByMX[i]
			if m.MX == p.MX && m.Reason == p.Reason {
				m.Count += p.N
				if p.Last.After(m.Last) {
					m.Last = p.Last
				}
				found = true
				break
			}
		}
		if !found {
			w.ByMX = append(w.ByMX, MXCount{MX: p.MX, Reason: p.Reason, Count: p.N, Last: p.Last})
		}
	}
}

func (w *Window) sortMX() {
	sort.SliceStable(w.ByMX, func(i, j int) bool {
		a, b := w.ByMX[i], w.ByMX[j]
		if a.Count != b.Count {
			return a.Count > b.Count
		}
		if !a.Last.Equal(b.Last) {
			return a.Last.After(b.Last)
		}
		return a.MX+" "+a.Reason < b.MX+" "+b.Reason
	})
}

// verdict is the one-line answer for a domain.
func verdict(s Summary) (bool, string) {
	if s.Mode == ModeEnforce {
		w := s.Enforce.Week
		if w.Refused == 0 {
			return false, fmt.Sprintf("enforce in force: 0 of %s in 7 days refused", sessions(w.Sessions))
		}
		top := w.ByMX[0]
		return false, fmt.Sprintf("enforce in force: %s of %s in 7 days refused; most: %s to %s failed %s, last on %s",
			Thousands(w.Refused), sessions(w.Sessions), Thousands(top.Count), mxName(top.MX), top.Reason, top.Last.UTC().Format(time.RFC3339))
	}
	w := s.Testing.Week
	if w.Sessions == 0 {
		return false, "no data: no sessions in testing mode in 7 days"
	}
	if w.Refused == 0 {
		return true, fmt.Sprintf("safe to enforce: 0 of %s in 7 days would have been refused", sessions(w.Sessions))
	}
	top := w.ByMX[0]
	return false, fmt.Sprintf("not yet: %s to %s failed %s; last on %s (%s of %s in 7 days would have been refused)",
		sessions(top.Count), mxName(top.MX), top.Reason, top.Last.UTC().Format(time.RFC3339), Thousands(w.Refused), sessions(w.Sessions))
}

// sessions is "1 session", "12,408 sessions".
func sessions(n int64) string {
	if n == 1 {
		return "1 session"
	}
	return Thousands(n) + " sessions"
}

func mxName(mx string) string {
	if mx == "" {
		return "(no MX)"
	}
	return mx
}

// Thousands formats n with commas: 12408 → "12,408".
func Thousands(n int64) string {
	s := strconv.FormatInt(n, 10)
	neg := strings.HasPrefix(s, "-")
	if neg {
		s = s[1:]
	}
	var b strings.Builder
	for i, r := range s {
		if i > 0 && (len(s)-i)%3 == 0 {
			b.WriteByte(',')
		}
		b.WriteRune(r)
	}
	if neg {
		return "-" + b.String()
	}
	return b.String()
}

// Load reads the counts a stopped relay left in dir, for the CLI.
func Load(dir string) (*Counter, error) {
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return Open(Options{})
	}
	return Open(Options{Dir: dir})
}
