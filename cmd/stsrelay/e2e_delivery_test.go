package main

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/testworld"
)

// A message submitted over STARTTLS+AUTH reaches the MX byte-exact (dot-
// stuffed lines, 8-bit bytes), over verified TLS with SNI = MX name, and
// the delivery log line carries the contract's fields.
func TestE2EDeliveryByteExact(t *testing.T) {
	w := testworld.New(t)
	mx := simpleDomain(w, "ex.test")
	r := startRelay(t, testConfig(t, w))

	body := []byte("From: <s@client.test>\r\nTo: <u@ex.test>\r\nSubject: bytes\r\n\r\n" +
		".leading dot\r\n..two dots\r\n.\r\nnot the end\r\n" +
		"8-bit: \xc3\xa9t\xc3\xa9 \xff\xfe\r\n")
	id := r.mustSubmit("s@client.test", []string{"u@ex.test"}, body)
	got := mx.WaitMessages(t, 1, 15*time.Second)
	if !bytes.Equal(afterReceived(t, got[0].Data), body) {
		t.Fatalf("delivered body differs:\n got %q\nwant %q", afterReceived(t, got[0].Data), body)
	}
	if got[0].SNI != "mx1.ex.test" || !got[0].TLS {
		t.Errorf("TLS %v SNI %q, want TLS with SNI mx1.ex.test", got[0].TLS, got[0].SNI)
	}
	if got[0].Helo != "relay.stsrelay.test" {
		t.Errorf("EHLO name %q", got[0].Helo)
	}
	l := r.waitResult("u@ex.test", "delivered", 10*time.Second)
	for k, want := range map[string]any{"queue_id": id, "from": "s@client.test", "domain": "ex.test",
		"mx": "mx1.ex.test", "ip": mx.IP(), "attempt": float64(1), "code": float64(250),
		"tls_verified": true, "sts_mode": "", "tlsrpt_result": ""} {
		if l[k] != want {
			t.Errorf("delivery log %s = %v, want %v", k, l[k], want)
		}
	}
	for _, k := range []string{"enhanced_code", "reason", "tls", "sts_policy_id"} {
		if _, ok := l[k]; !ok {
			t.Errorf("delivery log lacks %s", k)
		}
	}
	if !strings.HasPrefix(l["tls"].(string), "TLS1.") {
		t.Errorf("tls = %v", l["tls"])
	}
}
