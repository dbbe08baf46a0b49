package metrics

import (
	"context"
	"io"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}

func serve(t *testing.T, m *Metrics) string {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	addr, err := m.Serve(ctx, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return "http://" + addr.String()
}

func TestServeMetrics(t *testing.T) {
	var queueLen atomic.Int64
	queueLen.Store(7)
	m := New(func() float64 { return float64(queueLen.Load()) }, func() float64 { return 42 })
	m.ObserveDNSCache(func() (uint64, uint64) { return 5, 2 })
	m.ObserveQueueDisk(func() QueueDisk { return QueueDisk{DiskBytes: 1 << 20, Segments: 3, Compactions: 9} })
	m.Delivery("delivered")
	m.Delivery("delivered")
	m.Delivered(1500 * time.Millisecond)
	m.MessagesAccepted.Inc()
	m.SubmissionConnectionRejected("max_connections")
	m.ForecastRefusal("mx-not-in-policy")
	m.TLSSession("success")
	m.SetPolicies(map[string]int{"enforce": 2, "testing": 1})
	base := serve(t, m)

	code, body := get(t, base+"/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d", code)
	}
	for _, want := range []string{
		"stsrelay_queue_messages 7\n",
		"stsrelay_queue_oldest_seconds 42\n",
		`stsrelay_deliveries_total{result="delivered"} 2` + "\n",
		`stsrelay_deliveries_total{result="bounced"} 0` + "\n", // known series start at zero
		"stsrelay_messages_accepted_total 1\n",
		"stsrelay_delivery_latency_seconds_count 1\n",
		`stsrelay_delivery_latency_seconds_bucket{le="2.5"} 1` + "\n",
		`stsrelay_delivery_latency_seconds_bucket{le="1"} 0` + "\n",
		`stsrelay_submission_connections_rejected_total{reason="max_connections"} 1` + "\n",
		`stsrelay_submission_connections_rejected_total{reason="accept_error"} 0` + "\n",
		`stsrelay_mtasts_forecast_refusals_total{reason="mx-not-in-policy"} 1` + "\n",
		`stsrelay_tls_sessions_total{result_type="success"} 1` + "\n",
		`stsrelay_mtasts_policies{mode="enforce"} 2` + "\n",
		`stsrelay_dns_cache_lookups_total{result="hit"} 5` + "\n",
		`stsrelay_dns_cache_lookups_total{result="miss"} 2` + "\n",
		"stsrelay_queue_disk_bytes 1.048576e+06\n",
		"stsrelay_queue_segments 3\n",
		"stsrelay_queue_compactions_total 9\n",
		"go_goroutines ",
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", strings.TrimSpace(want))
		}
	}
	// Gauges are read at scrape time.
	queueLen.Store(8)
	if _, body := get(t, base+"/metrics"); !strings.Contains(body, "stsrelay_queue_messages 8\n") {
		t.Error("queue gauge not read at scrape time")
	}
	if code, body := get(t, base+"/healthz"); code != http.StatusOK || body != "ok\n" {
		t.Errorf("/healthz = %d %q", code, body)
	}
}

func TestReadyz(t *testing.T) {
	m := New(func() float64 { return 0 }, func() float64 { return 0 })
	base := serve(t, m)
	if code, _ := get(t, base+"/readyz"); code != http.StatusServiceUnavailable {
		t.Fatalf("/readyz before SetReady = %d, want 503", code)
	}
	m.SetReady(true)
	if code, body := get(t, base+"/readyz"); code != http.StatusOK || body != "ready\n" {
		t.Fatalf("/readyz = %d %q", code, body)
	}
	var up atomic.Bool
	m.SetReadyCheck(func() (bool, string) { return up.Load(), "nats down" })
	if code, body := get(t, base+"/readyz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "nats down") {
		t.Fatalf("/readyz with a failing check = %d %q", code, body)
	}
	up.Store(true)
	if code, _ := get(t, base+"/readyz"); code != http.StatusOK {
		t.Fatalf("/readyz with a passing check = %d", code)
	}
}

func TestObserveFleet(t *testing.T) {
	m := New(func() float64 { return 0 }, func() float64 { return 0 })
	h := m.ObserveFleet(func() FleetStats { return FleetStats{Connected: true, Redeliveries: 4} })
	h.Observe(0.003)
	_, body := get(t, serve(t, m)+"/metrics")
	for _, want := range []string{"stsrelay_fleet_connected 1\n", "stsrelay_fleet_reporter 0\n",
		"stsrelay_fleet_redeliveries_total 4\n", "stsrelay_fleet_publish_seconds_count 1\n"} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", strings.TrimSpace(want))
		}
	}
}

// Serve stops listening when its context ends.
func TestServeStops(t *testing.T) {
	m := New(func() float64 { return 0 }, func() float64 { return 0 })
	ctx, cancel := context.WithCancel(context.Background())
	addr, err := m.Serve(ctx, "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	deadline := time.Now().Add(5 * time.Second)
	for {
		c := &http.Client{Timeout: time.Second}
		resp, err := c.Get("http://" + addr.String() + "/healthz")
		if err != nil {
			return
		}
		resp.Body.Close()
		if time.Now().After(deadline) {
			t.Fatal("still serving 5s after the context ended")
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestServeBadAddr(t *testing.T) {
	m := New(func() float64 { return 0 }, func() float64 { return 0 })
	if _, err := m.Serve(context.Background(), "127.0.0.1:notaport"); err == nil {
		t.Fatal("Serve on a bad address succeeded")
	}
}
