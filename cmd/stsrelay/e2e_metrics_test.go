package main

import (
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/testworld"
)

// The metrics endpoint serves every metric name of the contract, with
// counts that follow what happened, plus /healthz and /readyz.
func TestE2EMetrics(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := simpleDomain(w, "ex.test")
	cfg := testConfig(t, w)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	cfg.Metrics.Listen = addr
	cfg.TLSRPT.Enabled = true
	r := startRelay(t, cfg)
	r.mustSubmit("s@client.test", []string{"u@ex.test"}, simpleMessage("metrics"))
	mx.WaitMessages(t, 1, 15*time.Second)
	r.waitResult("u@ex.test", "delivered", 10*time.Second)

	client := &http.Client{Timeout: 5 * time.Second}
	get := func(path string) (int, string) {
		resp, err := client.Get("http://" + addr + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for _, p := range []string{"/healthz", "/readyz"} {
		if code, _ := get(p); code != 200 {
			t.Errorf("%s: %d", p, code)
		}
	}
	// The delivery line is logged before the queue's removal record is
	// durable: the queue is empty a moment later.
	code, body := get("/metrics")
	for wait := time.Now().Add(10 * time.Second); code == 200 && !strings.Contains(body, "stsrelay_queue_messages 0") && time.Now().Before(wait); {
		time.Sleep(50 * time.Millisecond)
		code, body = get("/metrics")
	}
	if code != 200 {
		t.Fatalf("/metrics: %d", code)
	}
	for _, want := range []string{
		"stsrelay_messages_accepted_total 1",
		`stsrelay_deliveries_total{result="delivered"} 1`,
		"stsrelay_queue_messages 0",
		"stsrelay_queue_oldest_seconds",
		`stsrelay_tls_sessions_total{result_type="success"} 1`,
		"stsrelay_mtasts_policies{mode=",
		"# TYPE stsrelay_mtasts_fetches_total counter",
		"# TYPE stsrelay_tlsrpt_reports_total counter",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}
