package dnsclient

import (
	"context"
	"errors"
	"math"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/internal/testworld"
)

// fakeClock is the test kit's clock.
type fakeClock = testworld.Clock

func newFakeClock() *fakeClock {
	return testworld.NewClock(time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC))
}

// zoneServer is a DNS server on loopback that answers from a function of
// the question and counts the questions it receives.
type zoneServer struct {
	addr string

	mu     sync.Mutex
	counts map[dns.Question]int
}

// startZone starts a zoneServer whose answer fills m, a reply to q with
// rcode NOERROR.
func startZone(t *testing.T, answer func(q dns.Question, m *dns.Msg)) *zoneServer {
	t.Helper()
	z := &zoneServer{counts: map[dns.Question]int{}}
	z.addr = startServer(t, func(w dns.ResponseWriter, req *dns.Msg) {
		q := req.Question[0]
		q.Name = strings.ToLower(q.Name)
		z.mu.Lock()
		z.counts[q]++
		z.mu.Unlock()
		m := new(dns.Msg)
		m.SetReply(req)
		answer(q, m)
		w.WriteMsg(m)
	})
	return z
}

// count returns how many times name (lower case, with trailing dot) was
// asked for qtype.
func (z *zoneServer) count(name string, qtype uint16) int {
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.counts[dns.Question{Name: name, Qtype: qtype, Qclass: dns.ClassINET}]
}

func hdr(name string, t uint16, ttl uint32) dns.RR_Header {
	return dns.RR_Header{Name: name, Rrtype: t, Class: dns.ClassINET, Ttl: ttl}
}

func txtRR(name string, ttl uint32, s ...string) dns.RR {
	return &dns.TXT{Hdr: hdr(name, dns.TypeTXT, ttl), Txt: s}
}

func soaRR(zone string, ttl, minimum uint32) dns.RR {
	return &dns.SOA{Hdr: hdr(zone, dns.TypeSOA, ttl), Ns: "ns." + zone, Mbox: "hostmaster." + zone,
		Serial: 1, Refresh: 3600, Retry: 600, Expire: 86400, Minttl: minimum}
}

func newCachedResolver(t *testing.T, clock *fakeClock, entries int, maxTTL time.Duration, servers ...string) *Resolver {
	t.Helper()
	r, err := NewWithOptions(Options{Servers: servers, Timeout: 2 * time.Second,
		CacheEntries: entries, CacheMaxTTL: maxTTL, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestCacheKeepsAnswersForTheirTTL checks, for each way a TTL is set, that
// a lookup within the TTL is answered from the cache and one at its end
// asks the server again; and that the TTL reported is what remains.
func TestCacheKeepsAnswersForTheirTTL(t *testing.T) {
	z := startZone(t, func(q dns.Question, m *dns.Msg) {
		switch q.Name {
		case "plain.test.":
			m.Answer = append(m.Answer, txtRR(q.Name, 60, "a"))
		case "uneven.test.": // RFC 2181 §5.2: the smallest TTL of the set
			m.Answer = append(m.Answer, txtRR(q.Name, 300, "a"), txtRR(q.Name, 40, "b"))
		case "alias.test.": // the CNAME's TTL is shorter than the target's
			m.Answer = append(m.Answer,
				&dns.CNAME{Hdr: hdr(q.Name, dns.TypeCNAME, 30), Target: "target.test."},
				txtRR("target.test.", 300, "t"))
		case "hop.test.": // one hop per response: the chain spans two queries
			m.Answer = append(m.Answer, &dns.CNAME{Hdr: hdr(q.Name, dns.TypeCNAME, 20), Target: "far.test."})
		case "far.test.":
			m.Answer = append(m.Answer, txtRR(q.Name, 300, "far"))
		case "long.test.":
			m.Answer = append(m.Answer, txtRR(q.Name, 86400, "day"))
		case "hostile.test.":
			m.Answer = append(m.Answer, txtRR(q.Name, math.MaxInt32, "forever"))
		}
	})
	tests := []struct {
		name   string
		qname  string
		maxTTL time.Duration
		ttl    time.Duration
	}{
		{"the record's TTL", "plain.test.", time.Hour, 60 * time.Second},
		{"the smallest TTL of the RRset", "uneven.test.", time.Hour, 40 * time.Second},
		{"a CNAME's TTL in the same response", "alias.test.", time.Hour, 30 * time.Second},
		{"a CNAME's TTL from an earlier response", "hop.test.", time.Hour, 20 * time.Second},
		{"capped by cache_max_ttl", "long.test.", time.Hour, time.Hour},
		{"a hostile 2^31-1 capped by cache_max_ttl", "hostile.test.", 10 * time.Minute, 10 * time.Minute},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			r := newCachedResolver(t, clock, 100, tt.maxTTL, z.addr)
			before := z.count(tt.qname, dns.TypeTXT)
			asked := func() int { return z.count(tt.qname, dns.TypeTXT) - before }

			a, err := r.LookupTXTAnswer(testCtx(t), tt.qname)
			if err != nil {
				t.Fatal(err)
			}
			if a.TTL != tt.ttl || !a.Expires.Equal(clock.Now().Add(tt.ttl)) {
				t.Fatalf("first lookup: TTL %v, expires %v; want %v, %v", a.TTL, a.Expires, tt.ttl, clock.Now().Add(tt.ttl))
			}
			clock.Advance(tt.ttl - time.Second)
			a, err = r.LookupTXTAnswer(testCtx(t), tt.qname)
			if err != nil || asked() != 1 {
				t.Fatalf("lookup 1s before the TTL ends: err %v, server asked %d times, want once", err, asked())
			}
			if a.TTL != time.Second {
				t.Fatalf("remaining TTL 1s before the end = %v, want 1s", a.TTL)
			}
			clock.Advance(time.Second)
			if _, err := r.LookupTXTAnswer(testCtx(t), tt.qname); err != nil || asked() != 2 {
				t.Fatalf("lookup when the TTL ends: err %v, server asked %d times, want twice", err, asked())
			}
		})
	}
}

// TestCacheKeyIgnoresCaseAndTrailingDot: one entry per name, however it
// is written.
func TestCacheKeyIgnoresCaseAndTrailingDot(t *testing.T) {
	z := startZone(t, func(q dns.Question, m *dns.Msg) {
		m.Answer = append(m.Answer, txtRR(q.Name, 60, "x"))
	})
	r := newCachedResolver(t, newFakeClock(), 100, time.Hour, z.addr)
	for _, name := range []string{"_mta-sts.ex.test", "_MTA-STS.Ex.Test.", "_mta-sts.ex.test."} {
		if _, err := r.LookupTXT(testCtx(t), name); err != nil {
			t.Fatal(err)
		}
	}
	if n := z.count("_mta-sts.ex.test.", dns.TypeTXT); n != 1 {
		t.Fatalf("server asked %d times for one name written three ways, want once", n)
	}
	// Another type at the same name is another question.
	if _, err := r.Lookup(testCtx(t), "_mta-sts.ex.test", dns.TypeMX); err == nil {
		t.Fatal("MX lookup answered with TXT records")
	}
	if n := z.count("_mta-sts.ex.test.", dns.TypeMX); n != 1 {
		t.Fatalf("MX asked %d times, want once", n)
	}
}

// TestCacheZeroTTL: TTL 0, and TTLs with the high bit set (RFC 2181 §8:
// treated as zero), are used once and not kept.
func TestCacheZeroTTL(t *testing.T) {
	z := startZone(t, func(q dns.Question, m *dns.Msg) {
		ttl := uint32(0)
		if q.Name == "highbit.test." {
			ttl = 1 << 31
		}
		m.Answer = append(m.Answer, txtRR(q.Name, ttl, "now"))
	})
	r := newCachedResolver(t, newFakeClock(), 100, time.Hour, z.addr)
	for _, name := range []string{"zero.test.", "highbit.test."} {
		for range 2 {
			a, err := r.LookupTXTAnswer(testCtx(t), name)
			if err != nil || a.TTL != 0 {
				t.Fatalf("%s: TTL %v, err %v; want 0, nil", name, a.TTL, err)
			}
		}
		if n := z.count(name, dns.TypeTXT); n != 2 {
			t.Fatalf("%s: server asked %d times for 2 lookups, want 2 (not cached)", name, n)
		}
	}
}

// TestNegativeCaching checks RFC 2308 §5: NXDOMAIN and NODATA are cached
// for min(SOA TTL, SOA MINIMUM); without an SOA they are not cached.
func TestNegativeCaching(t *testing.T) {
	z := startZone(t, func(q dns.Question, m *dns.Msg) {
		switch q.Name {
		case "nx.test.":
			m.Rcode = dns.RcodeNameError
			m.Ns = append(m.Ns, soaRR("test.", 300, 30))
		case "nodata.test.":
			m.Ns = append(m.Ns, soaRR("test.", 20, 600))
		case "nx-no-soa.test.":
			m.Rcode = dns.RcodeNameError
		case "nodata-no-soa.test.":
		case "alias-nx.test.": // the CNAME's TTL is shorter than the SOA's
			m.Rcode = dns.RcodeNameError
			m.Answer = append(m.Answer, &dns.CNAME{Hdr: hdr(q.Name, dns.TypeCNAME, 10), Target: "gone.test."})
			m.Ns = append(m.Ns, soaRR("test.", 300, 300))
		case "hostile-nx.test.":
			m.Rcode = dns.RcodeNameError
			m.Ns = append(m.Ns, soaRR("test.", math.MaxInt32, math.MaxInt32))
		}
	})
	tests := []struct {
		name  string
		qname string
		want  error
		ttl   time.Duration // 0: not cached
	}{
		{"NXDOMAIN for the SOA MINIMUM", "nx.test.", ErrNotFound, 30 * time.Second},
		{"NODATA for the SOA TTL when it is smaller", "nodata.test.", ErrNoData, 20 * time.Second},
		{"NXDOMAIN after a CNAME for the CNAME's TTL", "alias-nx.test.", ErrNotFound, 10 * time.Second},
		{"NXDOMAIN with a hostile SOA capped by cache_max_ttl", "hostile-nx.test.", ErrNotFound, time.Hour},
		{"NXDOMAIN without an SOA not cached", "nx-no-soa.test.", ErrNotFound, 0},
		{"NODATA without an SOA not cached", "nodata-no-soa.test.", ErrNoData, 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			r := newCachedResolver(t, clock, 100, time.Hour, z.addr)
			before := z.count(tt.qname, dns.TypeTXT)
			asked := func() int { return z.count(tt.qname, dns.TypeTXT) - before }

			a, err := r.LookupTXTAnswer(testCtx(t), tt.qname)
			if !errors.Is(err, tt.want) || a.TTL != tt.ttl || a.Records != nil {
				t.Fatalf("LookupTXTAnswer = %v, TTL %v, %v; want TTL %v, %v", a.Records, a.TTL, err, tt.ttl, tt.want)
			}
			if tt.ttl == 0 {
				if _, err := r.LookupTXT(testCtx(t), tt.qname); !errors.Is(err, tt.want) || asked() != 2 {
					t.Fatalf("second lookup: %v, server asked %d times; want %v and 2 (not cached)", err, asked(), tt.want)
				}
				return
			}
			clock.Advance(tt.ttl - time.Second)
			if _, err := r.LookupTXT(testCtx(t), tt.qname); !errors.Is(err, tt.want) || asked() != 1 {
				t.Fatalf("lookup within the negative TTL: %v, server asked %d times; want %v, once", err, asked(), tt.want)
			}
			clock.Advance(time.Second)
			if _, err := r.LookupTXT(testCtx(t), tt.qname); !errors.Is(err, tt.want) || asked() != 2 {
				t.Fatalf("lookup at the end of the negative TTL: server asked %d times, want twice", asked())
			}
		})
	}
}

// TestFailuresCachedForSecondsOnly: SERVFAIL and timeouts are kept two
// seconds, so that a burst asks once, and never longer, whatever the SOA
// or cache_max_ttl say.
func TestFailuresCachedForSecondsOnly(t *testing.T) {
	servfail := startZone(t, func(q dns.Question, m *dns.Msg) {
		m.Rcode = dns.RcodeServerFailure
		m.Ns = append(m.Ns, soaRR("test.", 3600, 3600))
	})
	silentCount := make(chan struct{}, 100)
	silent := startServer(t, func(w dns.ResponseWriter, q *dns.Msg) { silentCount <- struct{}{} })

	t.Run("SERVFAIL", func(t *testing.T) {
		clock := newFakeClock()
		r := newCachedResolver(t, clock, 100, time.Hour, servfail.addr)
		for range 3 {
			a, err := r.LookupTXTAnswer(testCtx(t), "broken.test")
			if !IsTemporary(err) || a.TTL > failureTTL {
				t.Fatalf("LookupTXTAnswer = TTL %v, %v; want temporary, TTL ≤ %v", a.TTL, err, failureTTL)
			}
		}
		if n := servfail.count("broken.test.", dns.TypeTXT); n != 1 {
			t.Fatalf("server asked %d times within the failure TTL, want once", n)
		}
		clock.Advance(failureTTL)
		r.LookupTXT(testCtx(t), "broken.test")
		if n := servfail.count("broken.test.", dns.TypeTXT); n != 2 {
			t.Fatalf("server asked %d times after %v, want twice", n, failureTTL)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		clock := newFakeClock()
		r, err := NewWithOptions(Options{Servers: []string{silent}, Timeout: 100 * time.Millisecond,
			CacheEntries: 100, Now: clock.Now})
		if err != nil {
			t.Fatal(err)
		}
		for range 3 {
			if _, err := r.LookupMX(testCtx(t), "slow.test"); !IsTemporary(err) {
				t.Fatalf("err = %v, want temporary", err)
			}
		}
		if n := len(silentCount); n != 1 {
			t.Fatalf("silent server asked %d times within the failure TTL, want once", n)
		}
		clock.Advance(failureTTL)
		r.LookupMX(testCtx(t), "slow.test")
		if n := len(silentCount); n != 2 {
			t.Fatalf("silent server asked %d times after %v, want twice", n, failureTTL)
		}
	})
	t.Run("capped by a smaller cache_max_ttl", func(t *testing.T) {
		clock := newFakeClock()
		r := newCachedResolver(t, clock, 100, time.Second, servfail.addr)
		if a, _ := r.LookupTXTAnswer(testCtx(t), "capped.test"); a.TTL != time.Second {
			t.Fatalf("failure TTL = %v, want the 1s cap", a.TTL)
		}
	})
}

// TestCacheEvictsLeastRecentlyUsed: at the bound, the entry unused for
// longest goes.
func TestCacheEvictsLeastRecentlyUsed(t *testing.T) {
	z := startZone(t, func(q dns.Question, m *dns.Msg) {
		m.Answer = append(m.Answer, txtRR(q.Name, 300, q.Name))
	})
	r := newCachedResolver(t, newFakeClock(), 2, time.Hour, z.addr)
	for _, name := range []string{"a.test", "b.test", "a.test", "c.test"} {
		if _, err := r.LookupTXT(testCtx(t), name); err != nil {
			t.Fatal(err)
		}
	}
	// a was used after b, so c pushed b out.
	for _, name := range []string{"a.test", "c.test", "b.test"} {
		if _, err := r.LookupTXT(testCtx(t), name); err != nil {
			t.Fatal(err)
		}
	}
	got := map[string]int{}
	for _, name := range []string{"a.test.", "b.test.", "c.test."} {
		got[name] = z.count(name, dns.TypeTXT)
	}
	if want := map[string]int{"a.test.": 1, "b.test.": 2, "c.test.": 1}; !reflect.DeepEqual(got, want) {
		t.Fatalf("queries per name = %v, want %v", got, want)
	}
	r.cache.mu.Lock()
	n := len(r.cache.entries)
	r.cache.mu.Unlock()
	if n != 2 {
		t.Fatalf("%d entries in a cache bounded to 2", n)
	}
}

// TestCacheDisabled: with 0 entries every lookup asks, and the TTL is
// still reported.
func TestCacheDisabled(t *testing.T) {
	z := startZone(t, func(q dns.Question, m *dns.Msg) {
		m.Answer = append(m.Answer, txtRR(q.Name, 60, "x"))
	})
	r := newCachedResolver(t, newFakeClock(), 0, time.Hour, z.addr)
	for range 3 {
		a, err := r.LookupTXTAnswer(testCtx(t), "x.test")
		if err != nil || a.TTL != time.Minute {
			t.Fatalf("LookupTXTAnswer = TTL %v, %v; want 1m", a.TTL, err)
		}
	}
	if n := z.count("x.test.", dns.TypeTXT); n != 3 {
		t.Fatalf("server asked %d times for 3 lookups without a cache", n)
	}
	if _, err := NewWithOptions(Options{Servers: []string{z.addr}, CacheEntries: -1}); err == nil {
		t.Fatal("negative cache size accepted")
	}
}

// gatedZone answers TXT queries for any name once release is closed, and
// counts them.
func gatedZone(t *testing.T) (z *zoneServer, release func()) {
	gate := make(chan struct{})
	var once sync.Once
	release = func() { once.Do(func() { close(gate) }) }
	z = startZone(t, func(q dns.Question, m *dns.Msg) {
		select {
		case <-gate:
		case <-time.After(10 * time.Second):
		}
		m.Answer = append(m.Answer, txtRR(q.Name, 60, "v=STSv1; id=1"))
	})
	// Registered after the server's, so it runs before its shutdown,
	// which waits for the handler.
	t.Cleanup(release)
	return z, release
}

// waitWaiters waits until n callers wait for the flight of name.
func waitWaiters(t *testing.T, r *Resolver, name string, n int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for {
		r.cache.mu.Lock()
		f := r.cache.flights[cacheKey{name, dns.TypeTXT}]
		got := 0
		if f != nil {
			got = f.waiters
		}
		r.cache.mu.Unlock()
		if got == n {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d callers wait for %s, want %d", got, name, n)
		}
		time.Sleep(time.Millisecond)
	}
}

// TestConcurrentLookupsCoalesce: a burst of lookups of one question sends
// one query, and every caller gets its answer.
func TestConcurrentLookupsCoalesce(t *testing.T) {
	for _, entries := range []int{100, 0} {
		name := "burst.test"
		if entries == 0 {
			name = "burst-nocache.test"
		}
		t.Run(name, func(t *testing.T) {
			z, release := gatedZone(t)
			r := newCachedResolver(t, newFakeClock(), entries, time.Hour, z.addr)
			const callers = 50
			errs := make(chan error, callers)
			for range callers {
				go func() {
					recs, err := r.LookupTXT(testCtx(t), name)
					if err == nil && len(recs) != 1 {
						err = errors.New("wrong answer")
					}
					errs <- err
				}()
			}
			waitWaiters(t, r, name, callers)
			release()
			for range callers {
				if err := <-errs; err != nil {
					t.Fatal(err)
				}
			}
			if n := z.count(name+".", dns.TypeTXT); n != 1 {
				t.Fatalf("%d concurrent lookups sent %d queries, want 1", callers, n)
			}
			if hits, misses := r.CacheLookups(); hits != 0 || misses != callers {
				t.Fatalf("CacheLookups = %d hits, %d misses; want 0, %d", hits, misses, callers)
			}
		})
	}
}

// TestCallerGivingUp: a caller whose context ends stops waiting at once;
// the lookup goes on for the others, and is dropped when nobody waits.
func TestCallerGivingUp(t *testing.T) {
	t.Run("others still get the answer, and it is cached", func(t *testing.T) {
		z, release := gatedZone(t)
		r := newCachedResolver(t, newFakeClock(), 100, time.Hour, z.addr)
		ctx, cancel := context.WithCancel(testCtx(t))
		quitter := make(chan error, 1)
		go func() { _, err := r.LookupTXT(ctx, "shared.test"); quitter <- err }()
		waitWaiters(t, r, "shared.test", 1)
		stayer := make(chan error, 1)
		go func() { _, err := r.LookupTXT(testCtx(t), "shared.test"); stayer <- err }()
		waitWaiters(t, r, "shared.test", 2)
		cancel()
		if err := <-quitter; !IsTemporary(err) || !errors.Is(err, context.Canceled) {
			t.Fatalf("caller that gave up: %v, want temporary and context.Canceled", err)
		}
		release()
		if err := <-stayer; err != nil {
			t.Fatalf("caller that stayed: %v", err)
		}
		if _, err := r.LookupTXT(testCtx(t), "shared.test"); err != nil || z.count("shared.test.", dns.TypeTXT) != 1 {
			t.Fatalf("after: %v, %d queries; want the cached answer", err, z.count("shared.test.", dns.TypeTXT))
		}
	})
	t.Run("abandoned lookup not cached", func(t *testing.T) {
		z, release := gatedZone(t)
		r := newCachedResolver(t, newFakeClock(), 100, time.Hour, z.addr)
		ctx, cancel := context.WithTimeout(testCtx(t), 50*time.Millisecond)
		defer cancel()
		start := time.Now()
		if _, err := r.LookupTXT(ctx, "alone.test"); !IsTemporary(err) {
			t.Fatalf("err = %v, want temporary", err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("caller waited %v past its 50ms deadline", d)
		}
		release()
		if _, err := r.LookupTXT(testCtx(t), "alone.test"); err != nil {
			t.Fatalf("a new caller after the first gave up: %v", err)
		}
		if n := z.count("alone.test.", dns.TypeTXT); n != 2 {
			t.Fatalf("server asked %d times, want 2 (the abandoned lookup's outcome is not kept)", n)
		}
	})
}

// TestRemainingTTLReported: every lookup kind reports what is left of the
// TTL, and the cache answers with the same records.
func TestRemainingTTLReported(t *testing.T) {
	z := startZone(t, func(q dns.Question, m *dns.Msg) {
		switch q.Qtype {
		case dns.TypeTXT:
			m.Answer = append(m.Answer, txtRR(q.Name, 100, "v=STSv1; id=20260301"))
		case dns.TypeMX:
			m.Answer = append(m.Answer, &dns.MX{Hdr: hdr(q.Name, dns.TypeMX, 100), Preference: 10, Mx: "mx.ex.test."})
		case dns.TypeA:
			m.Answer = append(m.Answer, &dns.A{Hdr: hdr(q.Name, dns.TypeA, 100), A: []byte{192, 0, 2, 1}})
		}
	})
	clock := newFakeClock()
	start := clock.Now()
	r := newCachedResolver(t, clock, 100, time.Hour, z.addr)
	first, err := r.LookupTXTAnswer(testCtx(t), "_mta-sts.ex.test")
	if err != nil {
		t.Fatal(err)
	}
	ans, err := r.Lookup(testCtx(t), "ex.test", dns.TypeMX)
	if err != nil || ans.TTL != 100*time.Second {
		t.Fatalf("Lookup MX: TTL %v, %v; want 100s", ans.TTL, err)
	}
	clock.Advance(25 * time.Second)
	a, err := r.LookupTXTAnswer(testCtx(t), "_mta-sts.ex.test")
	if err != nil {
		t.Fatal(err)
	}
	if a.TTL != 75*time.Second || !a.Expires.Equal(start.Add(100*time.Second)) {
		t.Fatalf("after 25s of 100s: TTL %v, expires %v; want 75s, %v", a.TTL, a.Expires, start.Add(100*time.Second))
	}
	if !reflect.DeepEqual(a.Records, [][]string{{"v=STSv1; id=20260301"}}) || !reflect.DeepEqual(a.Records, first.Records) {
		t.Fatalf("cached records %q, first %q", a.Records, first.Records)
	}
	ans, err = r.Lookup(testCtx(t), "ex.test", dns.TypeMX)
	if err != nil || ans.TTL != 75*time.Second || !ans.Expires.Equal(start.Add(100*time.Second)) || len(ans.RRs) != 1 {
		t.Fatalf("Lookup MX after 25s: %+v, %v; want TTL 75s", ans, err)
	}
	if mx, err := r.LookupMX(testCtx(t), "ex.test"); err != nil || !reflect.DeepEqual(mx, []MX{{"mx.ex.test", 10}}) {
		t.Fatalf("cached LookupMX = %v, %v", mx, err)
	}
	ips, err := r.LookupIP(testCtx(t), "mx.ex.test", false)
	if err != nil || len(ips) != 1 {
		t.Fatal(ips, err)
	}
	ips[0][3] = 99 // a caller scribbling on its result does not reach the cache
	if ips, _ := r.LookupIP(testCtx(t), "mx.ex.test", false); ips[0].String() != "192.0.2.1" {
		t.Fatalf("cached address changed to %v by a caller", ips[0])
	}
	if n := z.count("_mta-sts.ex.test.", dns.TypeTXT) + z.count("ex.test.", dns.TypeMX) + z.count("mx.ex.test.", dns.TypeA); n != 3 {
		t.Fatalf("server asked %d times, want 3 (one per question)", n)
	}
	if hits, misses := r.CacheLookups(); hits != 4 || misses != 3 {
		t.Fatalf("CacheLookups = %d hits, %d misses; want 4, 3", hits, misses)
	}
}

// TestLookupTXTFresh: a fresh lookup asks the server although the cache
// holds an answer, and the new answer replaces the cached one.
func TestLookupTXTFresh(t *testing.T) {
	var mu sync.Mutex
	id := "1"
	z := startZone(t, func(q dns.Question, m *dns.Msg) {
		mu.Lock()
		defer mu.Unlock()
		m.Answer = append(m.Answer, txtRR(q.Name, 3600, "v=STSv1; id="+id))
	})
	clock := newFakeClock()
	r := newCachedResolver(t, clock, 100, time.Hour, z.addr)
	if _, err := r.LookupTXTAnswer(testCtx(t), "_mta-sts.ex.test"); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	id = "2"
	mu.Unlock()
	clock.Advance(10 * time.Minute)
	if a, _ := r.LookupTXTAnswer(testCtx(t), "_mta-sts.ex.test"); a.Records[0][0] != "v=STSv1; id=1" {
		t.Fatalf("cached lookup = %q, want the cached id=1", a.Records)
	}
	a, err := r.LookupTXTFresh(testCtx(t), "_mta-sts.ex.test")
	if err != nil || a.Records[0][0] != "v=STSv1; id=2" || a.TTL != time.Hour {
		t.Fatalf("fresh lookup = %q, TTL %v, %v; want id=2, 1h", a.Records, a.TTL, err)
	}
	if a, _ := r.LookupTXTAnswer(testCtx(t), "_mta-sts.ex.test"); a.Records[0][0] != "v=STSv1; id=2" || a.TTL != time.Hour {
		t.Fatalf("cached lookup after the fresh one = %q, TTL %v; want id=2, 1h", a.Records, a.TTL)
	}
	if n := z.count("_mta-sts.ex.test.", dns.TypeTXT); n != 2 {
		t.Fatalf("server asked %d times, want 2", n)
	}
	if hits, misses := r.CacheLookups(); hits != 2 || misses != 2 {
		t.Fatalf("CacheLookups = %d hits, %d misses; want 2, 2", hits, misses)
	}
}

// TestCachedTXTAllocatesNothing guards the cost BenchmarkCachedTXT
// measures: mtasts asks for the TXT record before every delivery.
func TestCachedTXTAllocatesNothing(t *testing.T) {
	z := startZone(t, func(q dns.Question, m *dns.Msg) {
		m.Answer = append(m.Answer, txtRR(q.Name, 300, "v=STSv1; id=1"))
	})
	r := newCachedResolver(t, newFakeClock(), 100, time.Hour, z.addr)
	ctx := testCtx(t)
	if _, err := r.LookupTXTAnswer(ctx, "_mta-sts.ex.test"); err != nil {
		t.Fatal(err)
	}
	allocs := testing.AllocsPerRun(100, func() {
		if _, err := r.LookupTXTAnswer(ctx, "_mta-sts.ex.test"); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("cached TXT lookup: %v allocations, want 0", allocs)
	}
}

func BenchmarkCachedTXT(b *testing.B) {
	var h dns.HandlerFunc = func(w dns.ResponseWriter, req *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(req)
		m.Answer = append(m.Answer, txtRR(req.Question[0].Name, 3600, "v=STSv1; id=20260301T000000"))
		w.WriteMsg(m)
	}
	addr := startServer(b, h)
	r, err := NewWithOptions(Options{Servers: []string{addr}, CacheEntries: 100000})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	if _, err := r.LookupTXTAnswer(ctx, "_mta-sts.example.com"); err != nil {
		b.Fatal(err)
	}
	b.Run("serial", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := r.LookupTXTAnswer(ctx, "_mta-sts.example.com"); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parallel", func(b *testing.B) {
		b.ReportAllocs()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if _, err := r.LookupTXTAnswer(ctx, "_mta-sts.example.com"); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}
