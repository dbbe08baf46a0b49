package mtasts

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/stsrelay/stsrelay/internal/testworld"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

type cacheEnv struct {
	*env
	clock *fakeClock
	logs  *observer.ObservedLogs
	dir   string
	c     *Cache
}

// newCacheEnv opens a cache on a test world with a fake clock. opts may
// adjust the options.
func newCacheEnv(t *testing.T, adjust func(*Options)) *cacheEnv {
	t.Helper()
	ce := &cacheEnv{env: newEnv(t), clock: newClock(), dir: filepath.Join(t.TempDir(), "mtasts")}
	ce.c = ce.open(t, adjust)
	return ce
}

func (ce *cacheEnv) open(t *testing.T, adjust func(*Options)) *Cache {
	t.Helper()
	core, logs := observer.New(zapcore.DebugLevel)
	ce.logs = logs
	opts := Options{Resolver: ce.dns, Fetcher: ce.f, Dir: ce.dir, Now: ce.clock.Now, Logger: zap.New(core)}
	if adjust != nil {
		adjust(&opts)
	}
	c, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func (ce *cacheEnv) get(t *testing.T, domain string) Result {
	t.Helper()
	res, err := ce.c.Get(context.Background(), domain)
	if err != nil {
		t.Fatalf("Get(%s): %v", domain, err)
	}
	return res
}

// pastGrace moves the clock beyond the TXT grace window.
func (ce *cacheEnv) pastGrace() { ce.clock.Advance(DefaultTXTGrace + time.Second) }

func (ce *cacheEnv) txtQueries(domain string) int {
	return ce.w.DNS.CountQueries("_mta-sts."+domain, dns.TypeTXT)
}

const enforceMX1 = "version: STSv1\nmode: enforce\nmx: mx1.ex.test\nmax_age: 86400\n"
const enforceMX2 = "version: STSv1\nmode: enforce\nmx: mx2.ex.test\nmax_age: 86400\n"

func TestCacheFirstGetFetchesAndLogs(t *testing.T) {
	var hook []string
	ce := newCacheEnv(t, func(o *Options) {
		o.OnFetch = func(d, id string, m Mode, r string) { hook = append(hook, d+" "+id+" "+string(m)+" "+r) }
	})
	ps := ce.stsDomain("ex.test", "a1", enforceMX1)
	res := ce.get(t, "Ex.Test.")
	if res.Policy == nil || res.Policy.Mode != ModeEnforce || res.ID != "a1" || res.Domain != "ex.test" || res.FromCache || res.Failure != nil {
		t.Fatalf("result %+v", res)
	}
	if ps.Count() != 1 {
		t.Errorf("%d GETs", ps.Count())
	}
	entries := ce.logs.FilterMessage("mtasts_fetch").All()
	if len(entries) != 1 {
		t.Fatalf("%d mtasts_fetch lines", len(entries))
	}
	f := entries[0].ContextMap()
	if f["domain"] != "ex.test" || f["id"] != "a1" || f["mode"] != "enforce" || f["result"] != "ok" || f["error"] != "" {
		t.Errorf("log fields %v", f)
	}
	if len(hook) != 1 || hook[0] != "ex.test a1 enforce ok" {
		t.Errorf("OnFetch calls %q", hook)
	}
}

func TestCacheSameIDNotRefetched(t *testing.T) {
	ce := newCacheEnv(t, nil)
	ps := ce.stsDomain("ex.test", "a1", enforceMX1)
	ce.get(t, "ex.test")
	ps.SetPolicy(enforceMX2) // changed without a new id: not noticed (RFC 8461 §8.1)
	for range 5 {
		ce.pastGrace()
		res := ce.get(t, "ex.test")
		if !res.FromCache || !res.Policy.Matches("mx1.ex.test") {
			t.Fatalf("result %+v", res)
		}
	}
	if ps.Count() != 1 {
		t.Errorf("%d GETs, want 1", ps.Count())
	}
	if q := ce.txtQueries("ex.test"); q != 6 {
		t.Errorf("%d TXT queries, want 6 (one per Get past the grace window)", q)
	}
}

func TestCacheIDChangeRefetchesOnce(t *testing.T) {
	ce := newCacheEnv(t, nil)
	ps := ce.stsDomain("ex.test", "a1", "version: STSv1\nmode: enforce\nmx: evil.test\nmax_age: 31557600\n")
	ce.get(t, "ex.test")
	ps.SetPolicy(enforceMX1)
	ce.w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=b2"})
	ce.pastGrace()
	res := ce.get(t, "ex.test")
	if res.FromCache || res.ID != "b2" || !res.Policy.Matches("mx1.ex.test") || res.Policy.Matches("evil.test") {
		t.Fatalf("result %+v (RFC 8461 §10.3: a valid new policy replaces the old)", res)
	}
	for range 3 {
		ce.pastGrace()
		ce.get(t, "ex.test")
	}
	if ps.Count() != 2 {
		t.Errorf("%d GETs, want 2", ps.Count())
	}
}

func TestCacheTXTStringsJoined(t *testing.T) {
	ce := newCacheEnv(t, nil)
	ps := ce.stsDomain("ex.test", "abcd", enforceMX1)
	ce.w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=ab", "cd"})
	if res := ce.get(t, "ex.test"); res.ID != "abcd" {
		t.Fatalf("id %q", res.ID)
	}
	ce.w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=abcd"})
	ce.pastGrace()
	ce.get(t, "ex.test")
	if ps.Count() != 1 {
		t.Errorf("%d GETs, want 1", ps.Count())
	}
}

func TestCacheConcurrentGetsShareOneFetch(t *testing.T) {
	for _, grace := range []time.Duration{-1, 0} {
		ce := newCacheEnv(t, func(o *Options) { o.TXTGrace = grace })
		ps := ce.stsDomain("ex.test", "a1", enforceMX1)
		ps.SetStall(200 * time.Millisecond) // let every Get reach the fetch
		const n = 20
		var wg sync.WaitGroup
		results := make([]Result, n)
		for i := range n {
			wg.Go(func() {
				res, err := ce.c.Get(context.Background(), "ex.test")
				if err != nil {
					t.Error(err)
				}
				results[i] = res
			})
		}
		wg.Wait()
		for i, r := range results {
			if r.Policy == nil || r.ID != "a1" {
				t.Errorf("Get %d: %+v", i, r)
			}
		}
		if got := ps.Count(); got != 1 {
			t.Errorf("grace %v: %d concurrent Gets caused %d GETs, want 1", grace, n, got)
		}
	}
}

func TestCacheFailedFetchKeepsCachedPolicy(t *testing.T) {
	ce := newCacheEnv(t, nil)
	ps := ce.stsDomain("ex.test", "a1", enforceMX1)
	ce.get(t, "ex.test")
	ps.SetResponse(500, "text/plain", "oops", nil)
	ce.w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=b2"})
	ce.pastGrace()
	res := ce.get(t, "ex.test")
	if res.Policy == nil || res.ID != "a1" || !res.FromCache {
		t.Fatalf("cached policy not applied: %+v", res)
	}
	if res.Failure == nil || res.Failure.ResultType != tlsrpt.ResultSTSPolicyFetchError {
		t.Errorf("failure %+v, want %s for TLS-RPT", res.Failure, tlsrpt.ResultSTSPolicyFetchError)
	}
	e, _ := ce.c.Entry("ex.test")
	if e.ID != "a1" || !strings.Contains(e.LastError, "500") {
		t.Errorf("entry %+v", e)
	}
	if n := len(ce.logs.FilterMessage("mtasts_fetch").FilterField(zap.String("result", string(tlsrpt.ResultSTSPolicyFetchError))).All()); n != 1 {
		t.Errorf("%d failed mtasts_fetch lines", n)
	}
}

func TestCacheFailureBackoff(t *testing.T) {
	ce := newCacheEnv(t, func(o *Options) { o.TXTGrace = -1 })
	ps := ce.stsDomain("ex.test", "a1", "")
	ps.SetResponse(500, "text/plain", "oops", nil)
	for i := range 20 {
		res := ce.get(t, "ex.test")
		if res.Policy != nil {
			t.Fatalf("policy from a 500: %+v", res)
		}
		if res.Failure == nil || res.Failure.ResultType != tlsrpt.ResultSTSPolicyFetchError || res.ID != "a1" {
			t.Fatalf("Get %d: failure not reported: %+v", i, res)
		}
		ce.clock.Advance(2 * time.Second)
	}
	if n := ps.Count(); n != 1 {
		t.Errorf("20 Gets within a minute caused %d GETs, want 1 (RFC 8461 §3.3)", n)
	}
	// A new id may be fetched at once.
	ce.w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=b2"})
	ce.get(t, "ex.test")
	if n := ps.Count(); n != 2 {
		t.Errorf("new id: %d GETs, want 2", n)
	}
	// After the backoff, one more try; a success is then used.
	ps.SetPolicy(enforceMX1)
	ce.clock.Advance(DefaultFailureBackoff)
	res := ce.get(t, "ex.test")
	if res.Policy == nil || res.Failure != nil || ps.Count() != 3 {
		t.Errorf("after backoff: %+v, %d GETs", res, ps.Count())
	}
}

func TestCacheConcurrentFailuresOneGET(t *testing.T) {
	ce := newCacheEnv(t, func(o *Options) { o.TXTGrace = -1 })
	ps := ce.stsDomain("ex.test", "a1", "")
	ps.SetResponse(500, "text/plain", "oops", nil)
	var wg sync.WaitGroup
	for range 20 {
		wg.Go(func() { ce.c.Get(context.Background(), "ex.test") })
	}
	wg.Wait()
	if n := ps.Count(); n != 1 {
		t.Errorf("%d GETs, want 1", n)
	}
}

func TestCacheSurvivesReopen(t *testing.T) {
	ce := newCacheEnv(t, nil)
	ps := ce.stsDomain("ex.test", "a1", enforceMX1)
	ce.get(t, "ex.test")
	// The policy host fails and the TXT record vanishes; the relay restarts.
	ps.SetResponse(500, "text/plain", "", nil)
	ce.w.DNS.RemoveName("_mta-sts.ex.test")
	ce.c = ce.open(t, nil)
	ce.clock.Advance(time.Hour)
	res := ce.get(t, "ex.test")
	if res.Policy == nil || res.Policy.Mode != ModeEnforce || res.ID != "a1" || !res.Policy.Matches("mx1.ex.test") {
		t.Fatalf("after restart: %+v (RFC 8461 §3.3: the cached policy MUST apply)", res)
	}
	if res.Failure == nil {
		t.Error("missing TXT with a cached enforce policy not reported")
	}
	if ps.Count() != 1 {
		t.Errorf("%d GETs", ps.Count())
	}
	if got := res.Policy.Lines; len(got) != 4 || got[0] != "version: STSv1" {
		t.Errorf("lines after reload %q", got)
	}
	// The file is JSON named after the domain, and no temporary is left.
	files, _ := os.ReadDir(ce.dir)
	if len(files) != 1 || files[0].Name() != "ex.test.json" {
		t.Errorf("files %v", files)
	}
}

func TestCacheCorruptFileSkipped(t *testing.T) {
	ce := newCacheEnv(t, nil)
	os.WriteFile(filepath.Join(ce.dir, "bad.test.json"), []byte("{nope"), 0o600)
	os.WriteFile(filepath.Join(ce.dir, ".x.json.123.tmp"), []byte("partial"), 0o600)
	c := ce.open(t, nil)
	if len(c.Entries()) != 0 {
		t.Errorf("entries %v", c.Entries())
	}
	if ce.logs.FilterMessage("mtasts_cache_load").Len() != 1 {
		t.Error("corrupt file not logged")
	}
	if _, err := os.Stat(filepath.Join(ce.dir, ".x.json.123.tmp")); !os.IsNotExist(err) {
		t.Error("temporary file left")
	}
}

func TestCacheTXTAbsentKeepsPolicy(t *testing.T) {
	for _, name := range []string{"NXDOMAIN", "invalid", "multiple"} {
		t.Run(name, func(t *testing.T) {
			ce := newCacheEnv(t, nil)
			ce.stsDomain("ex.test", "a1", enforceMX1)
			ce.get(t, "ex.test")
			switch name {
			case "NXDOMAIN":
				ce.w.DNS.RemoveName("_mta-sts.ex.test")
			case "invalid":
				ce.w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=bad-id"})
			case "multiple":
				ce.w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=1"}, []string{"v=STSv1; id=2"})
			}
			ce.pastGrace()
			res := ce.get(t, "ex.test")
			if res.Policy == nil || res.ID != "a1" {
				t.Fatalf("cached policy dropped: %+v (RFC 8461 §3.1 note, §5.1)", res)
			}
			if res.Failure == nil {
				t.Error("failure not reported")
			}
		})
	}
}

func TestCacheNoRecordNoPolicy(t *testing.T) {
	ce := newCacheEnv(t, nil)
	ps := ce.w.PolicyHost("ex.test", testworld.CertValid)
	ps.SetPolicy(enforceMX1)
	ce.w.DNS.SetTXT("ex.test", []string{"v=STSv1; id=a1"}) // at the domain, not at _mta-sts
	res := ce.get(t, "ex.test")
	if res.Policy != nil || res.Failure != nil {
		t.Errorf("%+v", res)
	}
	for _, bad := range [][]string{{"id=a1; v=STSv1"}, {"v=stsv1; id=a1"}, {"v=STSv1; id=" + strings.Repeat("a", 33)}} {
		ce.w.DNS.SetTXT("_mta-sts.ex.test", bad)
		ce.pastGrace()
		if res := ce.get(t, "ex.test"); res.Policy != nil || res.Failure != nil {
			t.Errorf("TXT %q: %+v", bad, res)
		}
	}
	if ps.Count() != 0 {
		t.Errorf("%d GETs", ps.Count())
	}
}

func TestCacheDNSFailure(t *testing.T) {
	ce := newCacheEnv(t, nil)
	ce.w.DNS.SetServFail("_mta-sts.ex.test", dns.TypeTXT, true)
	_, err := ce.c.Get(context.Background(), "ex.test")
	if !errors.Is(err, ErrDNS) {
		t.Fatalf("SERVFAIL with nothing cached: err = %v, want ErrDNS (delivery defers)", err)
	}
	ce.w.DNS.SetServFail("_mta-sts.ex.test", dns.TypeTXT, false)
	ce.stsDomain("ex.test", "a1", enforceMX1)
	ce.get(t, "ex.test")
	ce.w.DNS.SetServFail("_mta-sts.ex.test", dns.TypeTXT, true)
	ce.pastGrace()
	res := ce.get(t, "ex.test")
	if res.Policy == nil || res.Failure == nil || !errors.Is(res.Failure, ErrDNS) {
		t.Errorf("SERVFAIL with a cached policy: %+v", res)
	}
}

func TestCacheExpiry(t *testing.T) {
	ce := newCacheEnv(t, nil)
	ps := ce.stsDomain("ex.test", "a1", enforceMX1)
	ce.get(t, "ex.test")
	ps.SetResponse(500, "text/plain", "", nil)
	ce.clock.Advance(86400*time.Second - time.Second)
	if res := ce.get(t, "ex.test"); res.Policy == nil {
		t.Fatal("policy expired early")
	}
	// The clock passes max_age within the grace window: not applied.
	ce.clock.Advance(time.Second)
	res := ce.get(t, "ex.test")
	if res.Policy != nil {
		t.Fatalf("expired policy applied: %+v", res)
	}
	if res.Failure == nil {
		t.Error("TXT valid and fetch failed: failure not reported")
	}
	e, ok := ce.c.Entry("ex.test")
	if !ok || !e.Expired {
		t.Errorf("entry %+v", e)
	}
}

func TestCacheModeNoneReplacesEnforce(t *testing.T) {
	ce := newCacheEnv(t, nil)
	ps := ce.stsDomain("ex.test", "a1", "version: STSv1\nmode: enforce\nmx: mx1.ex.test\nmax_age: 31557600\n")
	ce.get(t, "ex.test")
	ps.SetPolicy("version: STSv1\nmode: none\nmax_age: 86400\n")
	ce.w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=b2"})
	ce.pastGrace()
	res := ce.get(t, "ex.test")
	if res.Policy == nil || res.Policy.Mode != ModeNone || res.ID != "b2" {
		t.Fatalf("%+v (RFC 8461 §8.3)", res)
	}
	// Removing TXT and policy host: still none, no failure reported.
	ce.w.DNS.RemoveName("_mta-sts.ex.test")
	ps.SetResponse(404, "text/plain", "", nil)
	ce.pastGrace()
	res = ce.get(t, "ex.test")
	if res.Policy == nil || res.Policy.Mode != ModeNone || res.Failure != nil {
		t.Errorf("%+v", res)
	}
}

func TestCacheNoLookupForLiteralsAndNoParent(t *testing.T) {
	ce := newCacheEnv(t, nil)
	ce.stsDomain("ex.test", "a1", enforceMX1)
	for _, d := range []string{"[192.0.2.1]", "192.0.2.1", "[IPv6:2001:db8::1]", "2001:db8::1", "", "a b.test"} {
		res, err := ce.c.Get(context.Background(), d)
		if err != nil || res.Policy != nil {
			t.Errorf("Get(%q) = %+v, %v", d, res, err)
		}
	}
	if q := ce.w.DNS.Queries(); len(q) != 0 {
		t.Errorf("queries for literals: %v", q)
	}
	res := ce.get(t, "mail.ex.test")
	if res.Policy != nil {
		t.Errorf("parent policy applied to a subdomain: %+v", res)
	}
	for _, q := range ce.w.DNS.Queries() {
		if q.Name == "_mta-sts.ex.test." {
			t.Errorf("parent queried (RFC 8461 §3.4): %v", q)
		}
	}
}

func TestCacheGraceWindow(t *testing.T) {
	ce := newCacheEnv(t, nil)
	ce.stsDomain("ex.test", "a1", enforceMX1)
	ce.get(t, "ex.test")
	for range 10 {
		ce.clock.Advance(5 * time.Second)
		if res := ce.get(t, "ex.test"); res.Policy == nil || !res.FromCache {
			t.Fatalf("%+v", res)
		}
	}
	if q := ce.txtQueries("ex.test"); q != 1 {
		t.Errorf("%d TXT queries within the grace window, want 1", q)
	}
	ce.clock.Advance(DefaultTXTGrace)
	ce.get(t, "ex.test")
	if q := ce.txtQueries("ex.test"); q != 2 {
		t.Errorf("%d TXT queries after the grace window, want 2", q)
	}
	// Domains without a policy are remembered too.
	ce.get(t, "nosts.test")
	ce.get(t, "nosts.test")
	if q := ce.txtQueries("nosts.test"); q != 1 {
		t.Errorf("%d TXT queries for a domain without policy", q)
	}
	// Forget clears the remembered outcome.
	if err := ce.c.Forget("ex.test"); err != nil {
		t.Fatal(err)
	}
	if _, ok := ce.c.Entry("ex.test"); ok {
		t.Error("entry still there")
	}
	if _, err := os.Stat(filepath.Join(ce.dir, "ex.test.json")); !os.IsNotExist(err) {
		t.Error("file still there")
	}
	res := ce.get(t, "ex.test")
	if res.FromCache || res.Policy == nil {
		t.Errorf("after Forget: %+v", res)
	}
}

func TestCacheRefreshAndEntries(t *testing.T) {
	ce := newCacheEnv(t, nil)
	ps := ce.stsDomain("ex.test", "a1", enforceMX1)
	if _, err := ce.c.Refresh(context.Background(), "ex.test"); err != nil {
		t.Fatal(err)
	}
	ps.SetPolicy(enforceMX2)
	ce.clock.Advance(time.Hour)
	e, err := ce.c.Refresh(context.Background(), "ex.test")
	if err != nil || len(e.MX) != 1 || e.MX[0] != "mx2.ex.test" || !e.Fetched.Equal(ce.clock.Now()) {
		t.Fatalf("Refresh = %+v, %v", e, err)
	}
	ps.SetResponse(500, "text/plain", "", nil)
	e, err = ce.c.Refresh(context.Background(), "ex.test")
	if ResultType(err) != tlsrpt.ResultSTSPolicyFetchError || e.MX[0] != "mx2.ex.test" {
		t.Errorf("failed Refresh = %+v, %v", e, err)
	}
	if ps.Count() != 3 {
		t.Errorf("%d GETs", ps.Count())
	}
	all := ce.c.Entries()
	if len(all) != 1 || all[0].Domain != "ex.test" || all[0].Mode != ModeEnforce || all[0].MaxAgeSeconds != 86400 ||
		!all[0].Expires.Equal(all[0].Fetched.Add(86400*time.Second)) || all[0].LastError == "" {
		t.Errorf("Entries = %+v", all)
	}
	if _, err := ce.c.Refresh(context.Background(), "nothing.test"); err == nil {
		t.Error("Refresh of a domain without record nor cache succeeded")
	}
}

func TestRefresherProactive(t *testing.T) {
	ce := newCacheEnv(t, nil)
	ps := ce.stsDomain("ex.test", "a1", "version: STSv1\nmode: enforce\nmx: mx1.ex.test\nmax_age: 604800\n")
	ce.get(t, "ex.test")
	ctx := context.Background()

	ce.clock.Advance(time.Hour)
	ce.c.refreshDue(ctx)
	if ps.Count() != 1 {
		t.Fatalf("refreshed a fresh policy: %d GETs", ps.Count())
	}
	// No traffic for 25 h: a daily refresh fetches, and max_age restarts.
	ce.clock.Advance(24 * time.Hour)
	ce.c.refreshDue(ctx)
	if ps.Count() != 2 {
		t.Fatalf("%d GETs after 25 h, want 2 (RFC 8461 §3.3)", ps.Count())
	}
	e, _ := ce.c.Entry("ex.test")
	if !e.Fetched.Equal(ce.clock.Now()) {
		t.Errorf("fetched %v, want now %v", e.Fetched, ce.clock.Now())
	}
	// A new id seen by the refresher is stored with the new policy.
	ce.w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=b2"})
	ce.clock.Advance(25 * time.Hour)
	ce.c.refreshDue(ctx)
	if e, _ := ce.c.Entry("ex.test"); e.ID != "b2" {
		t.Errorf("id %q", e.ID)
	}
}

func TestRefresherNearExpiryAndWarnings(t *testing.T) {
	for _, mode := range []Mode{ModeEnforce, ModeNone} {
		t.Run(string(mode), func(t *testing.T) {
			ce := newCacheEnv(t, nil)
			body := "version: STSv1\nmode: " + string(mode) + "\nmx: mx1.ex.test\nmax_age: 7200\n"
			ps := ce.stsDomain("ex.test", "a1", body)
			ce.get(t, "ex.test")
			ctx := context.Background()
			ce.clock.Advance(30 * time.Minute) // expires in 1.5 h: not yet due (before 1 h, not half of max_age)
			ce.c.refreshDue(ctx)
			if ps.Count() != 1 {
				t.Fatalf("%d GETs", ps.Count())
			}
			ps.SetResponse(500, "text/plain", "", nil)
			ce.clock.Advance(31 * time.Minute) // within RefreshBeforeExpiry
			ce.c.refreshDue(ctx)
			if ps.Count() != 2 {
				t.Fatalf("%d GETs, want a refresh near expiry", ps.Count())
			}
			warns := ce.logs.FilterMessage("mtasts_refresh_failed").Len()
			if mode == ModeNone && warns != 0 {
				t.Errorf("warning for a failed refresh of mode none (RFC 8461 §3.3)")
			}
			if mode == ModeEnforce && warns != 1 {
				t.Errorf("%d warnings for a failed refresh of enforce, want 1", warns)
			}
			// The next pass within the backoff does not fetch again.
			ce.clock.Advance(time.Minute)
			ce.c.refreshDue(ctx)
			if ps.Count() != 2 {
				t.Errorf("%d GETs within the backoff", ps.Count())
			}
			// The cached policy stays in force until it expires, then is dropped.
			ce.w.DNS.SetServFail("_mta-sts.ex.test", dns.TypeTXT, true)
			ce.pastGrace()
			if res := ce.get(t, "ex.test"); res.Policy == nil {
				t.Fatal("cached policy not applied")
			}
			ce.clock.Advance(2 * time.Hour)
			ce.c.refreshDue(ctx)
			if _, ok := ce.c.Entry("ex.test"); ok {
				t.Error("expired entry kept")
			}
		})
	}
}

func TestRefresherDrops(t *testing.T) {
	ce := newCacheEnv(t, nil)
	ce.stsDomain("none.test", "a1", "version: STSv1\nmode: none\nmax_age: 31557600\n")
	ce.stsDomain("unused.test", "a1", "version: STSv1\nmode: enforce\nmx: mx.unused.test\nmax_age: 31557600\n")
	ce.get(t, "none.test")
	ce.get(t, "unused.test")
	ctx := context.Background()
	// mode none whose TXT record is gone: dropped at its refresh.
	ce.w.DNS.RemoveName("_mta-sts.none.test")
	ce.clock.Advance(25 * time.Hour)
	ce.c.refreshDue(ctx)
	if _, ok := ce.c.Entry("none.test"); ok {
		t.Error("mode none entry without TXT kept")
	}
	if _, ok := ce.c.Entry("unused.test"); !ok {
		t.Fatal("used entry dropped")
	}
	if _, err := os.Stat(filepath.Join(ce.dir, "none.test.json")); !os.IsNotExist(err) {
		t.Error("file of dropped entry kept")
	}
	// Unused for MaxUnused: dropped (its max_age of a year is still running).
	ce.clock.Advance(DefaultMaxUnused)
	ce.c.refreshDue(ctx)
	if _, ok := ce.c.Entry("unused.test"); ok {
		t.Error("unused entry kept")
	}
}

func TestLastUsedPersisted(t *testing.T) {
	ce := newCacheEnv(t, nil)
	ce.stsDomain("ex.test", "a1", "version: STSv1\nmode: enforce\nmx: mx1.ex.test\nmax_age: 31557600\n")
	ce.get(t, "ex.test")
	ce.clock.Advance(2 * time.Hour)
	ce.get(t, "ex.test")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	ce.c.Run(ctx) // returns at once, writing last-use times
	c2 := ce.open(t, nil)
	e, _ := c2.Entry("ex.test")
	if !e.LastUsed.Equal(ce.clock.Now()) {
		t.Errorf("last used %v, want %v", e.LastUsed, ce.clock.Now())
	}
}

func TestRunStops(t *testing.T) {
	ce := newCacheEnv(t, func(o *Options) { o.RefreshInterval = 10 * time.Millisecond })
	ps := ce.stsDomain("ex.test", "a1", enforceMX1)
	ce.get(t, "ex.test")
	ce.clock.Advance(23 * time.Hour) // due: expires within the hour
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { ce.c.Run(ctx); close(done) }()
	deadline := time.Now().Add(5 * time.Second)
	for ps.Count() < 2 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	cancel()
	<-done
	if ps.Count() < 2 {
		t.Error("Run did not refresh")
	}
}

func BenchmarkCachedGetAndMatch(b *testing.B) {
	r := &fakeTXT{records: map[string][][]string{"_mta-sts.ex.test": {{"v=STSv1; id=a1"}}}}
	c, err := New(Options{Resolver: r, Now: time.Now})
	if err != nil {
		b.Fatal(err)
	}
	p, err := ParsePolicy([]byte("version: STSv1\nmode: enforce\nmx: mx1.ex.test\nmx: *.mail.ex.test\nmax_age: 86400\n"))
	if err != nil {
		b.Fatal(err)
	}
	c.store("ex.test", "a1", p, nil)
	ctx := context.Background()
	if _, err := c.Get(ctx, "ex.test"); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		res, _ := c.Get(ctx, "ex.test")
		if !res.Policy.Matches("MX7.mail.ex.test.") {
			b.Fatal("no match")
		}
	}
}

func TestCacheCallerGivesUp(t *testing.T) {
	ce := newCacheEnv(t, func(o *Options) { o.TXTGrace = -1 })
	ps := ce.stsDomain("ex.test", "a1", enforceMX1)
	ps.SetStall(time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := ce.c.Get(ctx, "ex.test")
	if err == nil || time.Since(start) > 900*time.Millisecond {
		t.Fatalf("err = %v after %v, want an early error", err, time.Since(start))
	}
	// The shared fetch went on and its result is cached for the next Get.
	deadline := time.Now().Add(5 * time.Second)
	for {
		if _, ok := ce.c.Entry("ex.test"); ok || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	res := ce.get(t, "ex.test")
	if res.Policy == nil || ps.Count() != 1 {
		t.Errorf("%+v, %d GETs", res, ps.Count())
	}
}

func TestCacheRecheckBypassesGrace(t *testing.T) {
	ce := newCacheEnv(t, nil)
	ps := ce.stsDomain("ex.test", "a1", enforceMX1)
	ce.get(t, "ex.test")
	ps.SetPolicy(enforceMX2)
	ce.w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=b2"})
	ce.clock.Advance(time.Second)
	if res := ce.get(t, "ex.test"); res.ID != "a1" {
		t.Fatalf("within the grace window: %+v", res)
	}
	res, err := ce.c.Recheck(context.Background(), "ex.test")
	if err != nil || res.ID != "b2" || !res.Policy.Matches("mx2.ex.test") {
		t.Fatalf("Recheck = %+v, %v", res, err)
	}
	// And Get now sees the new policy too.
	if res := ce.get(t, "ex.test"); res.ID != "b2" {
		t.Errorf("Get after Recheck: %+v", res)
	}
}

// RFC 8461 §3.1, §5.1: a changed TXT id is noticed once the record's TTL
// runs out, not a fixed grace later. With TTL 1 s, a change made 1.5 s
// before the next Get is seen by it.
func TestCacheTXTTTLShorterThanGrace(t *testing.T) {
	ce := newCacheEnv(t, nil)
	ce.w.DNS.SetTTL(1)
	ps := ce.stsDomain("ex.test", "a1", enforceMX1)
	if res := ce.get(t, "ex.test"); res.ID != "a1" {
		t.Fatalf("first Get: %+v", res)
	}
	ps.SetPolicy(enforceMX2)
	ce.w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=b2"})
	ce.clock.Advance(1500 * time.Millisecond)
	res := ce.get(t, "ex.test")
	if res.ID != "b2" || !res.Policy.Matches("mx2.ex.test") {
		t.Fatalf("Get 1.5 s after the change: id %q, want b2 (TTL 1 s)", res.ID)
	}
}
