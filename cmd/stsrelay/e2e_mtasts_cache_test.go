package main

// The MTA-STS policy cache end to end: persistence across restarts (clean
// and kill -9), id changes, no refetch for an unchanged id, one fetch for
// many concurrent deliveries, failure backoff, expiry, proactive refresh,
// connection reuse after a policy change, and the `stsrelay policy` CLI.
//
// The relay reuses the outcome of a TXT lookup for 60 s (mtasts
// Options.TXTGrace, DefaultTXTGrace; no configuration key sets it), so a
// new TXT id is noticed up to a minute late. Tests that change the id
// restart the relay (the grace is in memory, the cache on disk), use
// `stsrelay policy refresh`, or wait the minute out (one test, to check the
// real path).

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/testworld"
)

// txtGrace is mtasts.DefaultTXTGrace, as the binary uses it.
const txtGrace = 60 * time.Second

// A cached enforce policy stays in force when the new id's fetch fails
// (500), across a clean restart, and across kill -9 with the TXT record
// removed or SERVFAILing: the MX that now has a self-signed certificate
// never gets the message. STS-3.3-i, STS-3.1-i, STS-5.1-b (failed fetch
// keeps the cache).
func TestE2EMTASTSCachedPolicySurvives(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mxWithCert(w, "mx1.ex.test", testworld.CertValid)
	w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
	pol := stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "mx1.ex.test"))
	r := startRelayProcess(t, testConfig(t, w))
	r.send("u1@ex.test", "cache1")
	checkFields(t, "u1", r.waitResult("u1@ex.test", "delivered", stsWait), map[string]any{"sts_mode": "enforce", "sts_policy_id": "a1"})
	if _, err := os.Stat(filepath.Join(r.cfg.DataDir, "mtasts", "ex.test.json")); err != nil {
		t.Errorf("policy not persisted under data_dir/mtasts: %v", err)
	}

	// mx1.ex.test now answers with a self-signed certificate; the policy
	// host fails; a new id is published.
	bad := mxWithCert(w, "mx1.ex.test", testworld.CertSelfSigned)
	pol.SetResponse(http.StatusInternalServerError, "text/plain", "oops\n", nil)
	w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=b2"})
	r.restart()
	r.send("u2@ex.test", "cache2")
	checkFields(t, "u2", r.waitAttempts("u2@ex.test", "deferred", 1, stsWait)[0],
		map[string]any{"sts_mode": "enforce", "sts_policy_id": "a1", "tlsrpt_result": "certificate-not-trusted"})
	f := r.waitLog("mtasts_fetch", 1, stsWait, func(l map[string]any) bool { return l["id"] == "b2" })
	checkFields(t, "fetch of b2", f[0], map[string]any{"result": "sts-policy-fetch-error", "mode": "enforce"})

	// TXT record gone, relay killed without warning.
	w.DNS.Remove("_mta-sts.ex.test", dnsTypeTXT)
	r.kill9()
	r.start()
	n := len(r.deliveries("u2@ex.test"))
	r.send("u3@ex.test", "cache3")
	checkFields(t, "u3", r.waitAttempts("u3@ex.test", "deferred", 1, stsWait)[0], map[string]any{"sts_mode": "enforce", "sts_policy_id": "a1"})
	r.waitLog("delivery", n+1, stsWait, func(l map[string]any) bool { return l["rcpt"] == "u2@ex.test" })

	// TXT lookup SERVFAILs: the cached policy still applies.
	w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=b2"})
	w.DNS.SetServFail("_mta-sts.ex.test", dnsTypeTXT, true)
	r.kill9()
	r.start()
	r.send("u4@ex.test", "cache4")
	checkFields(t, "u4", r.waitAttempts("u4@ex.test", "deferred", 1, stsWait)[0], map[string]any{"sts_mode": "enforce", "sts_policy_id": "a1"})

	for _, rc := range []string{"u2@ex.test", "u3@ex.test", "u4@ex.test"} {
		r.noResult(rc, "delivered")
		r.noResult(rc, "bounced")
	}
	if n := mailCommands(bad); n != 0 {
		t.Errorf("self-signed MX got %d MAIL commands", n)
	}
	out, code := r.cli("policy", "show", "-json", "ex.test")
	var e map[string]any
	if code != 0 || json.Unmarshal([]byte(out), &e) != nil {
		t.Fatalf("policy show: exit %d: %s", code, out)
	}
	if e["id"] != "a1" || e["mode"] != "enforce" || e["last_error"] == "" || e["last_error"] == nil {
		t.Errorf("policy show = %v, want id a1, mode enforce and the last fetch error", e)
	}
}

// A new TXT id makes the relay fetch again, and the new policy moves mail
// to the MX it lists; an unchanged id with a changed policy body is not
// fetched (the cached policy stays in force). STS-5.1-b, STS-10.3-a.
func TestE2EMTASTSIDChange(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx1 := mxWithCert(w, "mx1.ex.test", testworld.CertValid)
	mx2 := mxWithCert(w, "mx2.ex.test", testworld.CertValid)
	w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"}, testworld.MX{Pref: 20, Host: "mx2.ex.test"})
	pol := stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "mx1.ex.test"))
	r := startRelay(t, testConfig(t, w))
	r.send("u1@ex.test", "id1")
	checkFields(t, "u1", r.waitResult("u1@ex.test", "delivered", stsWait), map[string]any{"mx": "mx1.ex.test", "sts_policy_id": "a1"})

	// Same id, new body: not fetched, mx1 still used.
	pol.SetPolicy(stsPolicy("enforce", "mx2.ex.test"))
	r.restart()
	r.send("u2@ex.test", "id2")
	checkFields(t, "u2", r.waitResult("u2@ex.test", "delivered", stsWait), map[string]any{"mx": "mx1.ex.test", "sts_policy_id": "a1"})
	if n := len(policyGETs(pol)); n != 1 {
		t.Errorf("policy GETs after an unchanged id = %d, want 1", n)
	}

	// New id: fetched, and mail moves to mx2.
	w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=b2"})
	r.restart()
	conns := mx1.Connections()
	r.send("u3@ex.test", "id3")
	checkFields(t, "u3", r.waitResult("u3@ex.test", "delivered", stsWait), map[string]any{"mx": "mx2.ex.test", "sts_policy_id": "b2", "attempt": float64(1)})
	mx2.WaitMessages(t, 1, stsWait)
	if n := len(policyGETs(pol)); n != 2 {
		t.Errorf("policy GETs after the id change = %d, want 2", n)
	}
	if n := len(mx1.Messages()); n != 2 {
		t.Errorf("mx1 has %d messages, want 2 (none after the change)", n)
	}
	if mx1.Connections() != conns {
		t.Errorf("mx1, no longer in the policy, was contacted after the change")
	}
}

// An enforce failure is temporary: while only an unlisted MX exists the
// recipient is deferred; once the domain publishes a new id whose policy
// lists the MX, the queued message goes out. STS-5-d.
func TestE2EMTASTSEnforceFailureThenNewPolicy(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := simpleDomain(w, "ex.test")
	pol := stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "mx9.ex.test"))
	r := startRelay(t, testConfig(t, w))
	r.send("u@ex.test", "recheck")
	r.waitAttempts("u@ex.test", "deferred", 2, 20*time.Second)
	if mx.Connections() != 0 {
		t.Fatalf("unlisted MX contacted")
	}
	pol.SetPolicy(stsPolicy("enforce", "mx1.ex.test"))
	w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=b2"})
	r.restart()
	l := r.waitResult("u@ex.test", "delivered", 20*time.Second)
	checkFields(t, "delivery", l, map[string]any{"sts_policy_id": "b2", "tls_verified": true})
	r.noResult("u@ex.test", "bounced")
	mx.WaitMessages(t, 1, stsWait)
}

// The same id is never fetched twice: 20 messages, then a restart and one
// more, and the policy host has seen one GET. STS-5.1-b.
func TestE2EMTASTSSameIDNoRefetch(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := simpleDomain(w, "ex.test")
	pol := stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "mx1.ex.test"))
	r := startRelay(t, testConfig(t, w))
	for i := range 20 {
		r.send(fmt.Sprintf("u%d@ex.test", i), fmt.Sprintf("same%d", i))
	}
	mx.WaitMessages(t, 20, 30*time.Second)
	r.waitLog("delivery", 20, stsWait, func(l map[string]any) bool { return l["result"] == "delivered" && l["sts_policy_id"] == "a1" })
	if n := len(policyGETs(pol)); n != 1 {
		t.Errorf("policy GETs for 20 messages = %d, want 1", n)
	}
	r.restart()
	r.send("late@ex.test", "same-late")
	checkFields(t, "after restart", r.waitResult("late@ex.test", "delivered", stsWait), map[string]any{"sts_mode": "enforce", "sts_policy_id": "a1"})
	if n := len(policyGETs(pol)); n != 1 {
		t.Errorf("policy GETs after a restart with the same id = %d, want 1", n)
	}
	if n := len(r.logs("mtasts_fetch", nil)); n != 1 {
		t.Errorf("%d mtasts_fetch lines, want 1", n)
	}
}

// stsConcurrentN is how many messages to a new domain are submitted at
// once in TestE2EMTASTSConcurrentFirstFetch.
const stsConcurrentN = 40

// N messages to a domain the relay has never seen, submitted at once and
// delivered by up to N concurrent workers while the policy host takes a
// second to answer: exactly one GET, and every message goes out under the
// policy. (Design: the first deliveries wait for one shared fetch.)
func TestE2EMTASTSConcurrentFirstFetch(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := simpleDomain(w, "ex.test")
	pol := stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "mx1.ex.test"))
	pol.SetStall(time.Second)
	cfg := testConfig(t, w)
	cfg.Queue.Workers = 2 * stsConcurrentN
	cfg.Queue.PerDomainConcurrency = stsConcurrentN
	r := startRelay(t, cfg)

	var wg sync.WaitGroup
	errs := make(chan error, stsConcurrentN)
	for i := range stsConcurrentN {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := r.submit("s@client.test", []string{fmt.Sprintf("c%d@ex.test", i)}, simpleMessage(fmt.Sprintf("conc%d", i))); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("submit: %v", err)
	}
	mx.WaitMessages(t, stsConcurrentN, 30*time.Second)
	ls := r.waitLog("delivery", stsConcurrentN, stsWait, func(l map[string]any) bool { return l["result"] == "delivered" })
	for _, l := range ls {
		if l["sts_mode"] != "enforce" || l["sts_policy_id"] != "a1" {
			t.Errorf("delivered without the policy: %v", l)
		}
	}
	gets := len(policyGETs(pol))
	t.Logf("N=%d concurrent deliveries to a new domain → %d policy GET(s)", stsConcurrentN, gets)
	if gets != 1 {
		t.Errorf("policy GETs = %d for %d concurrent deliveries, want 1", gets, stsConcurrentN)
	}
}

// After a failed fetch the relay does not hammer the policy host: 20
// messages in a row cause one GET for id a1 (all delivered as no policy);
// a new id may be fetched at once. STS-3.3-f, STS-3.3-h.
func TestE2EMTASTSFetchFailureBackoff(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := simpleDomain(w, "ex.test")
	pol := w.PolicyHost("ex.test", testworld.CertValid)
	pol.SetResponse(http.StatusInternalServerError, "text/plain", "down\n", nil)
	w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=a1"})
	r := startRelay(t, testConfig(t, w))
	for i := range 20 {
		r.send(fmt.Sprintf("u%d@ex.test", i), fmt.Sprintf("bo%d", i))
	}
	mx.WaitMessages(t, 20, 30*time.Second)
	r.waitLog("delivery", 20, stsWait, func(l map[string]any) bool { return l["result"] == "delivered" && l["sts_mode"] == "" })
	if n := len(policyGETs(pol)); n != 1 {
		t.Errorf("policy GETs for id a1 = %d, want 1", n)
	}
	w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=b2"})
	r.restart()
	r.send("late@ex.test", "bo-late")
	r.waitResult("late@ex.test", "delivered", stsWait)
	if n := len(policyGETs(pol)); n != 2 {
		t.Errorf("policy GETs after the id changed to b2 = %d, want 2", n)
	}
}

// mode none with a new id replaces a cached enforce policy with a much
// longer max_age; removing the record and the policy host afterwards
// changes nothing and raises no alert. STS-8.3-a.
func TestE2EMTASTSModeNoneReplacesEnforce(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := badCertDomain(w, "ex.test")
	pol := stsDomain(w, "ex.test", "a1", "version: STSv1\nmode: enforce\nmx: mx1.ex.test\nmax_age: 31557600\n")
	r := startRelay(t, testConfig(t, w))
	r.send("u1@ex.test", "none1")
	r.waitAttempts("u1@ex.test", "deferred", 1, stsWait)

	pol.SetPolicy("version: STSv1\nmode: none\nmax_age: 86400\n")
	w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=b2"})
	r.restart()
	checkFields(t, "u1", r.waitResult("u1@ex.test", "delivered", 20*time.Second), map[string]any{"sts_mode": "none", "sts_policy_id": "b2"})

	w.DNS.Remove("_mta-sts.ex.test", dnsTypeTXT)
	pol.SetResponse(http.StatusNotFound, "text/plain", "gone\n", nil)
	r.restart()
	r.send("u2@ex.test", "none2")
	l := r.waitResult("u2@ex.test", "delivered", stsWait)
	if m := l["sts_mode"]; m != "none" && m != "" {
		t.Errorf("sts_mode %v after opting out, want none or empty", m)
	}
	mx.WaitMessages(t, 2, stsWait)
	if ws := r.logs("mtasts_refresh_failed", nil); len(ws) != 0 {
		t.Errorf("alert for a domain that opted out: %v", ws)
	}
	for _, l := range strings.Split(r.logText(), "\n") {
		if strings.Contains(l, `"level":"warn"`) && strings.Contains(l, "ex.test") {
			t.Errorf("warning about ex.test: %s", l)
		}
	}
}

// A cached policy is used only until max_age after its fetch: with
// max_age 5 and the policy host down, the bad-cert MX is refused while the
// policy is fresh and gets the message once it has expired. STS-5.1-a.
func TestE2EMTASTSPolicyExpiry(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	good := mxWithCert(w, "mx1.ex.test", testworld.CertValid)
	w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
	pol := stsDomain(w, "ex.test", "a1", "version: STSv1\nmode: enforce\nmx: mx1.ex.test\nmax_age: 5\n")
	r := startRelay(t, testConfig(t, w))
	r.send("u1@ex.test", "exp1")
	r.waitResult("u1@ex.test", "delivered", stsWait)
	fetched := time.Now()
	good.Close() // and with it the parked session

	bad := mxWithCert(w, "mx1.ex.test", testworld.CertSelfSigned)
	pol.SetResponse(http.StatusInternalServerError, "text/plain", "down\n", nil)
	r.send("u2@ex.test", "exp2")
	first := r.waitLog("delivery", 1, stsWait, func(l map[string]any) bool { return l["rcpt"] == "u2@ex.test" })[0]
	if time.Since(fetched) < 4*time.Second {
		checkFields(t, "before expiry", first, map[string]any{"result": "deferred", "sts_mode": "enforce"})
	}
	l := r.waitResult("u2@ex.test", "delivered", 20*time.Second)
	if el := time.Since(fetched); el < 5*time.Second {
		t.Errorf("delivered to the bad-cert MX %v after the fetch, before max_age 5s ran out", el)
	}
	checkFields(t, "after expiry", l, map[string]any{"sts_mode": "", "tls_verified": false})
	bad.WaitMessages(t, 1, stsWait)
}

// No HTTP caching (RFC 8461 §3.3): the refetch after an id change carries
// no conditional headers although the server sent ETag, Last-Modified and
// Cache-Control, and a 304 answer is not taken for a policy. STS-3.3-e.
func TestE2EMTASTSNoHTTPCaching(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	simpleDomain(w, "ex.test")
	pol := w.PolicyHost("ex.test", testworld.CertValid)
	hdrs := map[string]string{"ETag": `"v1"`, "Cache-Control": "max-age=3600", "Last-Modified": "Mon, 02 Jan 2006 15:04:05 GMT"}
	pol.SetResponse(http.StatusOK, "text/plain", stsPolicy("enforce", "mx1.ex.test"), hdrs)
	w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=a1"})
	r := startRelay(t, testConfig(t, w))
	r.send("u1@ex.test", "etag1")
	r.waitResult("u1@ex.test", "delivered", stsWait)

	pol.SetResponse(http.StatusOK, "text/plain", stsPolicy("testing", "mx1.ex.test"), hdrs)
	w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=b2"})
	r.restart()
	r.send("u2@ex.test", "etag2")
	checkFields(t, "u2", r.waitResult("u2@ex.test", "delivered", stsWait), map[string]any{"sts_mode": "testing", "sts_policy_id": "b2"})
	gets := policyGETs(pol)
	if len(gets) != 2 {
		t.Fatalf("policy GETs = %d, want 2", len(gets))
	}
	for _, h := range []string{"If-None-Match", "If-Modified-Since", "Cache-Control"} {
		if v := gets[1].Header.Get(h); v != "" {
			t.Errorf("refetch sent %s: %s", h, v)
		}
	}

	pol.SetResponse(http.StatusNotModified, "text/plain", "", hdrs)
	w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=c3"})
	r.restart()
	r.send("u3@ex.test", "etag3")
	checkFields(t, "u3", r.waitResult("u3@ex.test", "delivered", stsWait), map[string]any{"sts_mode": "testing", "sts_policy_id": "b2"})
	f := r.waitLog("mtasts_fetch", 1, stsWait, func(l map[string]any) bool { return l["id"] == "c3" })
	checkFields(t, "304", f[0], map[string]any{"result": "sts-policy-fetch-error"})
}

// A session parked after delivering under one policy is not reused when
// the policy in force no longer allows its MX (RFC 8461 §5): the next
// message goes to mx2. Shown for a new id and for a new body under the
// same id (both made visible at once with `policy refresh`), and for the
// plain path: a new TXT id noticed after the 60 s TXT grace, with the
// idle session kept longer than that.
func TestE2EMTASTSConnectionReuse(t *testing.T) {
	t.Parallel()
	setup := func(t *testing.T, idle time.Duration) (*testworld.World, *relayProc, *testworld.PolicyServer, *testworld.MXServer, *testworld.MXServer) {
		w := testworld.New(t)
		mx1 := mxWithCert(w, "mx1.ex.test", testworld.CertValid)
		mx2 := mxWithCert(w, "mx2.ex.test", testworld.CertValid)
		w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"}, testworld.MX{Pref: 20, Host: "mx2.ex.test"})
		pol := stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "mx1.ex.test"))
		cfg := testConfig(t, w)
		if idle > 0 {
			cfg.Delivery.ConnectionIdleTimeout.Duration = idle
		}
		r := startRelay(t, cfg)
		// Two messages over one parked session: reuse works here.
		r.send("u1@ex.test", "reuse1")
		r.waitResult("u1@ex.test", "delivered", stsWait)
		r.send("u2@ex.test", "reuse2")
		r.waitResult("u2@ex.test", "delivered", stsWait)
		got := mx1.WaitMessages(t, 2, stsWait)
		if got[0].ConnID != got[1].ConnID || mx1.Connections() != 1 {
			t.Fatalf("the second message did not reuse the parked session (conns %d)", mx1.Connections())
		}
		return w, r, pol, mx1, mx2
	}
	after := func(t *testing.T, r *relayProc, mx1, mx2 *testworld.MXServer, wantID string) {
		r.send("u3@ex.test", "reuse3")
		checkFields(t, "u3", r.waitResult("u3@ex.test", "delivered", stsWait), map[string]any{"mx": "mx2.ex.test", "sts_policy_id": wantID})
		mx2.WaitMessages(t, 1, stsWait)
		if n := len(mx1.Messages()); n != 2 {
			t.Errorf("mx1 got %d messages, want 2: the parked session bypassed the new policy", n)
		}
	}
	t.Run("new-id-refresh", func(t *testing.T) {
		t.Parallel()
		w, r, pol, mx1, mx2 := setup(t, 0)
		pol.SetPolicy(stsPolicy("enforce", "mx2.ex.test"))
		w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=b2"})
		if out, code := r.cli("policy", "refresh", "ex.test"); code != 0 || !strings.Contains(out, "b2") {
			t.Fatalf("policy refresh: exit %d: %s", code, out)
		}
		after(t, r, mx1, mx2, "b2")
	})
	t.Run("same-id-new-body-refresh", func(t *testing.T) {
		t.Parallel()
		_, r, pol, mx1, mx2 := setup(t, 0)
		pol.SetPolicy(stsPolicy("enforce", "mx2.ex.test"))
		if out, code := r.cli("policy", "refresh", "ex.test"); code != 0 || !strings.Contains(out, "mx2.ex.test") {
			t.Fatalf("policy refresh: exit %d: %s", code, out)
		}
		after(t, r, mx1, mx2, "a1")
	})
	t.Run("new-id-after-txt-grace", func(t *testing.T) {
		t.Parallel()
		w, r, pol, mx1, mx2 := setup(t, 3*txtGrace)
		pol.SetPolicy(stsPolicy("enforce", "mx2.ex.test"))
		w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=b2"})
		time.Sleep(txtGrace + 3*time.Second)
		if mx1.Connections() != 1 {
			t.Fatalf("mx1 connections %d: the parked session is gone, nothing left to test", mx1.Connections())
		}
		after(t, r, mx1, mx2, "b2")
	})
}

// `stsrelay policy list|show|refresh|forget` against the running relay.
func TestE2EMTASTSPolicyCLI(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	simpleDomain(w, "ex.test")
	pol := stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "mx1.ex.test"))
	r := startRelay(t, testConfig(t, w))
	r.send("u1@ex.test", "cli1")
	r.waitResult("u1@ex.test", "delivered", stsWait)

	out, code := r.cli("policy", "list", "-json")
	var list []map[string]any
	if code != 0 || json.Unmarshal([]byte(out), &list) != nil {
		t.Fatalf("policy list -json: exit %d: %s", code, out)
	}
	if len(list) != 1 {
		t.Fatalf("policy list: %d entries, want 1: %s", len(list), out)
	}
	e := list[0]
	checkFields(t, "list entry", e, map[string]any{"domain": "ex.test", "id": "a1", "mode": "enforce", "max_age": float64(86400), "expired": false})
	if mx, _ := e["mx"].([]any); len(mx) != 1 || mx[0] != "mx1.ex.test" {
		t.Errorf("list entry mx = %v, want [mx1.ex.test]", e["mx"])
	}
	for _, k := range []string{"fetched", "expires", "last_used"} {
		if _, ok := e[k]; !ok {
			t.Errorf("list entry lacks %s", k)
		}
	}

	out, code = r.cli("policy", "show", "ex.test")
	if code != 0 || !strings.Contains(out, "a1") || !strings.Contains(out, "enforce") || !strings.Contains(out, "mx1.ex.test") {
		t.Errorf("policy show: exit %d: %s", code, out)
	}
	out, code = r.cli("policy", "show", "-json", "ex.test")
	var one map[string]any
	if code != 0 || json.Unmarshal([]byte(out), &one) != nil || one["id"] != "a1" {
		t.Errorf("policy show -json: exit %d: %s", code, out)
	}
	if out, code = r.cli("policy", "show", "nothing.test"); code != 1 {
		t.Errorf("policy show of an unknown domain: exit %d, want 1: %s", code, out)
	}

	// refresh fetches now, whatever the id says, and the new policy is
	// in force at once.
	pol.SetPolicy(stsPolicy("testing", "mx1.ex.test"))
	out, code = r.cli("policy", "refresh", "-json", "ex.test")
	if code != 0 || json.Unmarshal([]byte(out), &one) != nil || one["mode"] != "testing" {
		t.Fatalf("policy refresh -json: exit %d: %s", code, out)
	}
	if n := len(policyGETs(pol)); n != 2 {
		t.Errorf("policy GETs after refresh = %d, want 2", n)
	}
	r.send("u2@ex.test", "cli2")
	checkFields(t, "after refresh", r.waitResult("u2@ex.test", "delivered", stsWait), map[string]any{"sts_mode": "testing"})

	// A failing refresh keeps the cached policy and exits non-zero.
	pol.SetResponse(http.StatusInternalServerError, "text/plain", "down\n", nil)
	if out, code = r.cli("policy", "refresh", "ex.test"); code == 0 {
		t.Errorf("failed refresh exited 0: %s", out)
	}
	if out, code = r.cli("policy", "show", "-json", "ex.test"); code != 0 || json.Unmarshal([]byte(out), &one) != nil || one["mode"] != "testing" {
		t.Errorf("after a failed refresh: exit %d: %s", code, out)
	}
	pol.SetPolicy(stsPolicy("enforce", "mx1.ex.test"))

	// forget drops it (memory and disk); the next delivery fetches again.
	out, code = r.cli("policy", "forget", "ex.test")
	if code != 0 {
		t.Fatalf("policy forget: exit %d: %s", code, out)
	}
	out, _ = r.cli("policy", "list", "-json")
	if json.Unmarshal([]byte(out), &list) != nil || len(list) != 0 {
		t.Errorf("policy list after forget: %s", out)
	}
	if _, err := os.Stat(filepath.Join(r.cfg.DataDir, "mtasts", "ex.test.json")); !os.IsNotExist(err) {
		t.Errorf("policy file still on disk after forget: %v", err)
	}
	gets := len(policyGETs(pol))
	r.send("u3@ex.test", "cli3")
	checkFields(t, "after forget", r.waitResult("u3@ex.test", "delivered", stsWait), map[string]any{"sts_mode": "enforce", "sts_policy_id": "a1"})
	if n := len(policyGETs(pol)); n != gets+1 {
		t.Errorf("policy GETs after forget and a delivery = %d, want %d", n, gets+1)
	}
	if out, code = r.cli("policy", "forget", "nothing.test"); code != 1 {
		t.Errorf("forget of an unknown domain: exit %d, want 1: %s", code, out)
	}
}

// The refresher fetches cached policies before they expire, without any
// traffic (here: refresh_before_expiry 48h > max_age, so every policy is
// due on the refresher's first pass, about a minute after start); a failed
// refresh of an enforce policy raises a warning, that of a mode none
// policy does not. STS-3.3-j, STS-3.3-k.
func TestE2EMTASTSProactiveRefresh(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	pols := map[string]*testworld.PolicyServer{}
	for d, mode := range map[string]string{"ok.test": "enforce", "bad.test": "enforce", "none.test": "none"} {
		simpleDomain(w, d)
		pols[d] = stsDomain(w, d, "a1", stsPolicy(mode, "mx1."+d))
	}
	cfg := testConfig(t, w)
	cfg.MTASTS.RefreshBeforeExpiry.Duration = 48 * time.Hour
	r := startRelay(t, cfg)
	for d := range pols {
		r.send("u@"+d, "pr-"+strings.TrimSuffix(d, ".test"))
		r.waitResult("u@"+d, "delivered", stsWait)
	}
	var before map[string]any
	out, _ := r.cli("policy", "show", "-json", "ok.test")
	if err := json.Unmarshal([]byte(out), &before); err != nil {
		t.Fatalf("policy show: %s", out)
	}
	pols["bad.test"].SetResponse(http.StatusInternalServerError, "text/plain", "down\n", nil)
	pols["none.test"].SetResponse(http.StatusInternalServerError, "text/plain", "down\n", nil)

	warn := r.waitLog("mtasts_refresh_failed", 1, 100*time.Second, nil)
	checkFields(t, "warning", warn[0], map[string]any{"domain": "bad.test", "mode": "enforce"})
	if warn[0]["level"] != "warn" {
		t.Errorf("refresh failure logged at level %v, want warn", warn[0]["level"])
	}
	r.waitLog("mtasts_fetch", 2, 20*time.Second, func(l map[string]any) bool { return l["domain"] == "none.test" })
	r.waitLog("mtasts_fetch", 2, 20*time.Second, func(l map[string]any) bool { return l["domain"] == "ok.test" && l["result"] == "ok" })
	for d, p := range pols {
		if n := len(policyGETs(p)); n < 2 {
			t.Errorf("%s: %d policy GETs, want a refresh", d, n)
		}
	}
	if ws := r.logs("mtasts_refresh_failed", func(l map[string]any) bool { return l["domain"] == "none.test" }); len(ws) != 0 {
		t.Errorf("warning for a mode none policy: %v", ws)
	}
	var after map[string]any
	out, _ = r.cli("policy", "show", "-json", "ok.test")
	if err := json.Unmarshal([]byte(out), &after); err != nil {
		t.Fatalf("policy show: %s", out)
	}
	if after["fetched"] == before["fetched"] || after["expires"] == before["expires"] {
		t.Errorf("refreshed policy keeps fetched %v / expires %v: max_age does not restart from the refresh", after["fetched"], after["expires"])
	}
	// The enforce policy whose refresh failed is still in force.
	out, _ = r.cli("policy", "show", "-json", "bad.test")
	if !strings.Contains(out, `"enforce"`) {
		t.Errorf("bad.test policy after a failed refresh: %s", out)
	}
}

// tlsrptPending reads `stsrelay tlsrpt pending -json` for domain: the
// failure counts by result type and the policy types seen.
func tlsrptPending(t *testing.T, r *relayProc, domain string) (failures map[string]int64, policyTypes []string, successes int64) {
	t.Helper()
	out, code := r.cli("tlsrpt", "pending", "-json")
	var pending []struct {
		PolicyDomain string `json:"policy_domain"`
		Policies     []struct {
			Policy struct {
				PolicyType string `json:"policy-type"`
			} `json:"policy"`
			Summary struct {
				Success int64 `json:"total-successful-session-count"`
			} `json:"summary"`
			FailureDetails []struct {
				ResultType string `json:"result-type"`
				Count      int64  `json:"failed-session-count"`
			} `json:"failure-details"`
		} `json:"policies"`
	}
	if code != 0 || json.Unmarshal([]byte(out), &pending) != nil {
		t.Fatalf("tlsrpt pending -json: exit %d: %s", code, out)
	}
	failures = map[string]int64{}
	for _, p := range pending {
		if p.PolicyDomain != domain {
			continue
		}
		for _, pol := range p.Policies {
			policyTypes = append(policyTypes, pol.Policy.PolicyType)
			successes += pol.Summary.Success
			for _, fd := range pol.FailureDetails {
				failures[fd.ResultType] += fd.Count
			}
		}
	}
	return failures, policyTypes, successes
}

// The events RFC 8461 §6 makes reportable reach the TLS-RPT counts: a
// fetch failure while a valid TXT record exists (nothing cached, or a
// cached enforce policy), and an MX without STARTTLS or with a bad
// certificate or outside the policy; mode none reports none of them.
// STS-6-a, STS-5-b (report side), STS-5-c (no STS failures reported).
func TestE2EMTASTSReportableEvents(t *testing.T) {
	t.Parallel()
	start := func(t *testing.T, w *testworld.World) *relayProc {
		cfg := testConfig(t, w)
		cfg.TLSRPT.Enabled = true
		return startRelay(t, cfg)
	}
	// waitFailure polls the pending counts until result type rt shows.
	waitFailure := func(t *testing.T, r *relayProc, rt string) (map[string]int64, []string) {
		t.Helper()
		deadline := time.Now().Add(stsWait)
		for {
			f, types, _ := tlsrptPending(t, r, "ex.test")
			if f[rt] > 0 {
				return f, types
			}
			if time.Now().After(deadline) {
				t.Fatalf("no %s in the pending TLS-RPT counts for ex.test: %v %v", rt, f, types)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	t.Run("fetch-failure-no-cache", func(t *testing.T) {
		t.Parallel()
		w := testworld.New(t)
		simpleDomain(w, "ex.test")
		pol := w.PolicyHost("ex.test", testworld.CertValid)
		pol.SetResponse(http.StatusNotFound, "text/plain", "no\n", nil)
		w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=a1"})
		r := start(t, w)
		r.send("u@ex.test", "rep1")
		r.waitResult("u@ex.test", "delivered", stsWait)
		waitFailure(t, r, "sts-policy-fetch-error")
	})
	t.Run("fetch-failure-cached-enforce", func(t *testing.T) {
		t.Parallel()
		w := testworld.New(t)
		simpleDomain(w, "ex.test")
		pol := stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "mx1.ex.test"))
		r := start(t, w)
		r.send("u1@ex.test", "rep2a")
		r.waitResult("u1@ex.test", "delivered", stsWait)
		pol.SetResponse(http.StatusInternalServerError, "text/plain", "down\n", nil)
		w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=b2"})
		r.restart()
		r.send("u2@ex.test", "rep2b")
		checkFields(t, "u2", r.waitResult("u2@ex.test", "delivered", stsWait), map[string]any{"sts_mode": "enforce", "sts_policy_id": "a1"})
		_, types := waitFailure(t, r, "sts-policy-fetch-error")
		if !slices.Contains(types, "sts") {
			t.Errorf("policy types %v, want sts (the cached policy)", types)
		}
	})
	for _, tc := range []struct {
		name, mode string
		mx         func(w *testworld.World) (*testworld.MXServer, string)
		rt         string
	}{
		{"enforce-no-starttls", "enforce", func(w *testworld.World) (*testworld.MXServer, string) {
			return mxHost(w, "mx1.ex.test", testworld.MXOptions{}), "mx1.ex.test"
		}, "starttls-not-supported"},
		{"testing-self-signed", "testing", func(w *testworld.World) (*testworld.MXServer, string) {
			return mxWithCert(w, "mx1.ex.test", testworld.CertSelfSigned), "mx1.ex.test"
		}, "certificate-not-trusted"},
		{"testing-mx-not-in-policy", "testing", func(w *testworld.World) (*testworld.MXServer, string) {
			return mxWithCert(w, "mx1.ex.test", testworld.CertValid), "mx9.ex.test"
		}, "validation-failure"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			w := testworld.New(t)
			_, pattern := tc.mx(w)
			w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
			stsDomain(w, "ex.test", "a1", stsPolicy(tc.mode, pattern))
			r := start(t, w)
			r.send("u@ex.test", "rep3")
			r.waitLog("delivery", 1, stsWait, func(l map[string]any) bool { return l["rcpt"] == "u@ex.test" })
			_, types := waitFailure(t, r, tc.rt)
			if !slices.Contains(types, "sts") {
				t.Errorf("policy types %v, want sts", types)
			}
		})
	}
	t.Run("mode-none-reports-no-sts-failure", func(t *testing.T) {
		t.Parallel()
		w := testworld.New(t)
		badCertDomain(w, "ex.test")
		stsDomain(w, "ex.test", "n1", stsPolicy("none", "mx9.ex.test"))
		r := start(t, w)
		r.send("u@ex.test", "rep4")
		r.waitResult("u@ex.test", "delivered", stsWait)
		deadline := time.Now().Add(stsWait)
		for {
			f, types, ok := tlsrptPending(t, r, "ex.test")
			if len(f) > 0 || slices.Contains(types, "sts") {
				t.Fatalf("mode none reported %v under policy types %v", f, types)
			}
			if ok > 0 || time.Now().After(deadline) {
				if ok == 0 {
					t.Fatalf("the session was never counted")
				}
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
	})
}

// RFC 8460 §4.2: in testing mode a session to an MX the policy does not
// list is one session, counted once, as the mismatch failure — not a
// failure plus a success.
func TestE2EMTASTSTestingMismatchCountedOnce(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := simpleDomain(w, "ex.test") // valid certificate for mx1.ex.test
	stsDomain(w, "ex.test", "a1", stsPolicy("testing", "other.ex.test"))
	cfg := testConfig(t, w)
	cfg.TLSRPT.Enabled = true
	cfg.Delivery.ConnectionReuseLimit = 1
	r := startRelay(t, cfg)
	r.send("u@ex.test", "mismatch1")
	r.waitResult("u@ex.test", "delivered", stsWait)
	mx.WaitMessages(t, 1, stsWait)
	deadline := time.Now().Add(stsWait)
	for {
		f, _, succ := tlsrptPending(t, r, "ex.test")
		if f["validation-failure"] > 0 {
			if f["validation-failure"] != 1 || succ != 0 || len(f) != 1 {
				t.Fatalf("one testing-mode session to an unlisted MX counted as failures %v and %d successes, want validation-failure=1 only", f, succ)
			}
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no validation-failure counted: %v %d", f, succ)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
