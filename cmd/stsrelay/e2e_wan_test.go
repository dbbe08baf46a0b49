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
