package mtastsdb

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/mtasts"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

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
	if mtasts.ResultType(err) != tlsrpt.ResultSTSPolicyFetchError || e.MX[0] != "mx2.ex.test" {
		t.Errorf("failed Refresh = %+v, %v", e, err)
	}
	if ps.Count() != 3 {
		t.Errorf("%d GETs", ps.Count())
	}
	all := ce.c.Entries()
	if len(all) != 1 || all[0].Domain != "ex.test" || all[0].Mode != mtasts.ModeEnforce || all[0].MaxAgeSeconds != 86400 ||
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
	for _, mode := range []mtasts.Mode{mtasts.ModeEnforce, mtasts.ModeNone} {
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
			if mode == mtasts.ModeNone && warns != 0 {
				t.Errorf("warning for a failed refresh of mode none (RFC 8461 §3.3)")
			}
			if mode == mtasts.ModeEnforce && warns != 1 {
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
