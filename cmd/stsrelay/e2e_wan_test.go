package main

import (
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/testworld"
)

// Issue #10: a new connection to a known MX resumes its TLS session (TLS
// 1.3 ticket) instead of a full handshake, and a resumed session is
// checked as a full one: after the MX changed its certificate (and so its
// ticket key) to an expired one, enforce refuses it.
func TestE2ETLSResumptionKeepsChecks(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := mxWithCert(w, "mx1.ex.test", testworld.CertValid)
	w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
	stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "mx1.ex.test"))
	cfg := testConfig(t, w)
	cfg.Delivery.ConnectionReuseLimit = 1 // every message on a new connection
	r := startRelay(t, cfg)

	r.send("u1@ex.test", "resume1")
	first := r.waitResult("u1@ex.test", "delivered", stsWait)
	r.send("u2@ex.test", "resume2")
	second := r.waitResult("u2@ex.test", "delivered", stsWait)
	if first["tls_resumed"] != false || second["tls_resumed"] != true || second["tls_verified"] != true {
		t.Errorf("tls_resumed %v then %v (tls_verified %v), want false then true, verified", first["tls_resumed"], second["tls_resumed"], second["tls_verified"])
	}
	got := mx.WaitMessages(t, 2, stsWait)
	if got[0].DidResume || !got[1].DidResume || mx.Resumed() != 1 {
		t.Errorf("MX saw resumption %v, %v (%d resumed), want the second only", got[0].DidResume, got[1].DidResume, mx.Resumed())
	}

	mx.SetCert(w.CA.Issue(testworld.CertExpired, "mx1.ex.test"))
	r.send("u3@ex.test", "resume3")
	l := r.waitResult("u3@ex.test", "deferred", stsWait)
	if l["tlsrpt_result"] != "certificate-expired" || l["tls_resumed"] == true {
		t.Errorf("after the certificate changed: %v, want deferred with certificate-expired on a full handshake", l)
	}
	time.Sleep(200 * time.Millisecond)
	if n := len(mx.Messages()); n != 2 {
		t.Errorf("the MX with the expired certificate got %d messages in all, want 2", n)
	}
}

// Issue #10, as a user would try it: with TTL 1 s on _mta-sts, a policy
// change made 1.5 s before the next message moves that message to the new
// MX (RFC 8461 §3.1, §5.1: the TXT id is looked at again once its TTL
// runs out, through the relay's DNS cache), although the relay's cache
// would keep answers up to dns.cache_max_ttl.
func TestE2EMTASTSTXTTTLHonoured(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	w.DNS.SetTTL(1)
	mx1 := mxWithCert(w, "mx1.ex.test", testworld.CertValid)
	mx2 := mxWithCert(w, "mx2.ex.test", testworld.CertValid)
	w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"}, testworld.MX{Pref: 20, Host: "mx2.ex.test"})
	pol := stsDomain(w, "ex.test", "a1", stsPolicy("enforce", "mx1.ex.test"))
	cfg := testConfig(t, w)
	cfg.DNS.CacheMaxTTL.Duration = time.Hour
	r := startRelay(t, cfg)

	r.send("u1@ex.test", "ttl1")
	checkFields(t, "u1", r.waitResult("u1@ex.test", "delivered", stsWait), map[string]any{"mx": "mx1.ex.test", "sts_policy_id": "a1"})

	pol.SetPolicy(stsPolicy("enforce", "mx2.ex.test"))
	w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=b2"})
	time.Sleep(1500 * time.Millisecond)
	r.send("u2@ex.test", "ttl2")
	checkFields(t, "u2", r.waitResult("u2@ex.test", "delivered", stsWait), map[string]any{"mx": "mx2.ex.test", "sts_policy_id": "b2"})
	if n := len(mx1.Messages()); n != 1 {
		t.Errorf("mx1 got %d messages, want 1", n)
	}
	mx2.WaitMessages(t, 1, stsWait)
}
