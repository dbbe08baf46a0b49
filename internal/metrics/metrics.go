// Package metrics holds stsrelay's Prometheus metrics (names per
// interface.md) in a registry of their own, and serves them with
// /healthz and /readyz.
package metrics

import (
	"context"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// Metrics are the relay's counters and gauges.
type Metrics struct {
	Registry         *prometheus.Registry
	MessagesAccepted prometheus.Counter
	Deliveries       *prometheus.CounterVec
	// DeliveryLatency is stsrelay_delivery_latency_seconds: from the 250
	// at submission to the recipient's delivery.
	DeliveryLatency prometheus.Histogram
	MTASTSFetches   *prometheus.CounterVec
	TLSSessions     *prometheus.CounterVec
	TLSRPTReports   *prometheus.CounterVec
	policiesByMode  *prometheus.GaugeVec
	ready           atomic.Bool
	readyCheck      atomic.Pointer[func() (bool, string)]

	// SubmissionRejected is stsrelay_submission_connections_rejected_total{reason}.
	SubmissionRejected *prometheus.CounterVec
	// ForecastRefusals is stsrelay_mtasts_forecast_refusals_total{reason}.
	ForecastRefusals *prometheus.CounterVec
	// ConfigReloads is stsrelay_config_reloads_total{result}: SIGHUP
	// reloads, "ok" or "failed" (the old configuration stays).
	ConfigReloads *prometheus.CounterVec
}

// New creates the metrics. queueLen and oldest feed the queue gauges
// (read at scrape time); policies feeds stsrelay_mtasts_policies.
func New(queueLen, oldestSeconds func() float64) *Metrics {
	m := &Metrics{Registry: prometheus.NewRegistry()}
	m.MessagesAccepted = prometheus.NewCounter(prometheus.CounterOpts{Name: "stsrelay_messages_accepted_total", Help: "Messages accepted at submission (250 sent)."})
	m.Deliveries = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "stsrelay_deliveries_total", Help: "Per-recipient delivery attempt outcomes."}, []string{"result"})
	m.DeliveryLatency = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "stsrelay_delivery_latency_seconds",
		Help:    "Time from acceptance at submission to delivery, per delivered recipient.",
		Buckets: []float64{0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600}})
	m.MTASTSFetches = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "stsrelay_mtasts_fetches_total", Help: "MTA-STS policy fetches by result."}, []string{"result"})
	m.TLSSessions = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "stsrelay_tls_sessions_total", Help: "Delivery sessions by TLS-RPT result type (success for compliant sessions)."}, []string{"result_type"})
	m.TLSRPTReports = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "stsrelay_tlsrpt_reports_total", Help: "TLS-RPT reports sent by result."}, []string{"result"})
	m.SubmissionRejected = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "stsrelay_submission_connections_rejected_total", Help: "Submission connections refused at accept (over a connection cap, or a failed accept)."}, []string{"reason"})
	for _, r := range []string{"max_connections", "max_connections_per_ip", "accept_error"} {
		m.SubmissionRejected.WithLabelValues(r)
	}
	m.policiesByMode = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "stsrelay_mtasts_policies", Help: "Cached MTA-STS policies by mode."}, []string{"mode"})
	queueGauge := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "stsrelay_queue_messages", Help: "Messages in the queue."}, queueLen)
	oldestGauge := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "stsrelay_queue_oldest_seconds", Help: "Age of the oldest queued message."}, oldestSeconds)
	// Start the known series at zero so that rates and alerts work from
	// the first scrape.
	for _, r := range []string{"delivered", "deferred", "bounced"} {
		m.Deliveries.WithLabelValues(r)
	}
	for _, r := range []string{"ok", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid"} {
		m.MTASTSFetches.WithLabelValues(r)
	}
	for _, r := range []string{"ok", "failed", "dropped"} {
		m.TLSRPTReports.WithLabelValues(r)
	}
	m.Registry.MustRegister(m.SubmissionRejected)
	// The reasons are a closed set (mx-not-in-policy and the RFC 8460
	// result types), so the label is bounded; no domain label.
	m.ForecastRefusals = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "stsrelay_mtasts_forecast_refusals_total",
		Help: "Sessions to MTA-STS testing-mode domains that enforce would have refused, by reason."}, []string{"reason"})
	// mx-not-in-policy (forecast.ReasonMXNotInPolicy) at zero: the series
	// exists from the first scrape, for the dashboard and alerts.
	m.ForecastRefusals.WithLabelValues("mx-not-in-policy")
	m.Registry.MustRegister(m.ForecastRefusals)
	m.ConfigReloads = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "stsrelay_config_reloads_total",
		Help: "Configuration reloads (SIGHUP) by result: ok, or failed (the old configuration stays in force)."}, []string{"result"})
	for _, r := range []string{"ok", "failed"} {
		m.ConfigReloads.WithLabelValues(r)
	}
	m.Registry.MustRegister(m.ConfigReloads)
	m.Registry.MustRegister(m.MessagesAccepted, m.Deliveries, m.DeliveryLatency, m.MTASTSFetches, m.TLSSessions, m.TLSRPTReports,
		m.policiesByMode, queueGauge, oldestGauge,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Delivery counts one recipient outcome.
func (m *Metrics) Delivery(result string) { m.Deliveries.WithLabelValues(result).Inc() }

// Delivered observes how long a delivered recipient's message waited.
func (m *Metrics) Delivered(latency time.Duration) { m.DeliveryLatency.Observe(latency.Seconds()) }

// SubmissionConnectionRejected counts one submission connection refused
// at accept; it is relay.Options.ConnectionsRejected.
func (m *Metrics) SubmissionConnectionRejected(reason string) {
	m.SubmissionRejected.WithLabelValues(reason).Inc()
}

// ForecastRefusal counts one session enforce would have refused in a
// testing-mode domain (forecast.Options.OnRefusal).
func (m *Metrics) ForecastRefusal(reason string) { m.ForecastRefusals.WithLabelValues(reason).Inc() }

// TLSSession counts one delivery session's TLS outcome.
func (m *Metrics) TLSSession(resultType string) { m.TLSSessions.WithLabelValues(resultType).Inc() }

// SetPolicies sets the cached-policy gauge.
func (m *Metrics) SetPolicies(byMode map[string]int) {
	for _, mode := range []string{"enforce", "testing", "none"} {
		m.policiesByMode.WithLabelValues(mode).Set(float64(byMode[mode]))
	}
}

// SetReady flips /readyz.
func (m *Metrics) SetReady(ok bool) { m.ready.Store(ok) }

// SetReadyCheck adds a condition /readyz asks on every request (fleet
// mode: the NATS connection is up); it returns false and why when the
// relay cannot take mail now.
func (m *Metrics) SetReadyCheck(check func() (bool, string)) { m.readyCheck.Store(&check) }

// FleetStats is what ObserveFleet reads at scrape time.
type FleetStats struct {
	Connected    bool
	Reporter     bool
	Redeliveries uint64
	Disconnects  uint64
}

// ObserveFleet exports stsrelay_fleet_connected, stsrelay_fleet_reporter
// (1 on the node that sends the fleet's TLS-RPT reports),
// stsrelay_fleet_redeliveries_total (queue messages handed to this node
// again after another's lease ran out) and
// stsrelay_fleet_disconnects_total, and returns the histogram
// stsrelay_fleet_publish_seconds for the queue to observe each
// acknowledged publish in. Call it once, in fleet mode only.
func (m *Metrics) ObserveFleet(stats func() FleetStats) prometheus.Observer {
	b2f := func(b bool) float64 {
		if b {
			return 1
		}
		return 0
	}
	h := prometheus.NewHistogram(prometheus.HistogramOpts{Name: "stsrelay_fleet_publish_seconds",
		Help:    "Time from publishing a queue message to JetStream's acknowledgement (stored on a quorum).",
		Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5}})
	m.Registry.MustRegister(h,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "stsrelay_fleet_connected", Help: "1 while the NATS connection is up."},
			func() float64 { return b2f(stats().Connected) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "stsrelay_fleet_reporter", Help: "1 on the node elected to send the fleet's TLS-RPT reports."},
			func() float64 { return b2f(stats().Reporter) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "stsrelay_fleet_redeliveries_total", Help: "Queue messages redelivered to this node after a lease ran out."},
			func() float64 { return float64(stats().Redeliveries) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "stsrelay_fleet_disconnects_total", Help: "NATS connections lost."},
			func() float64 { return float64(stats().Disconnects) }),
	)
	return h
}

// ObserveDNSCache exports stsrelay_dns_cache_lookups_total{result="hit|miss"},
// read from lookups at scrape time (dnsclient.Resolver.CacheLookups), so
// the lookups themselves pay nothing for it. Call it once.
func (m *Metrics) ObserveDNSCache(lookups func() (hits, misses uint64)) {
	const name, help = "stsrelay_dns_cache_lookups_total", "DNS lookups by whether the resolver's cache answered them."
	hit := prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help, ConstLabels: prometheus.Labels{"result": "hit"}},
		func() float64 { h, _ := lookups(); return float64(h) })
	miss := prometheus.NewCounterFunc(prometheus.CounterOpts{Name: name, Help: help, ConstLabels: prometheus.Labels{"result": "miss"}},
		func() float64 { _, n := lookups(); return float64(n) })
	m.Registry.MustRegister(hit, miss)
}

// QueueDisk is what ObserveQueueDisk reads at scrape time.
type QueueDisk struct {
	DiskBytes, LiveBytes, MaxDiskBytes int64
	Segments                           int
	Compactions                        uint64
}

// ObserveQueueDisk exports stsrelay_queue_disk_bytes,
// stsrelay_queue_live_bytes, stsrelay_queue_max_disk_bytes,
// stsrelay_queue_segments and stsrelay_queue_compactions_total, read from stats at scrape time
// (queue.Store.Stats). Call it once.
func (m *Metrics) ObserveQueueDisk(stats func() QueueDisk) {
	m.Registry.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "stsrelay_queue_disk_bytes", Help: "Bytes the queue's log takes on disk."},
			func() float64 { return float64(stats().DiskBytes) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "stsrelay_queue_live_bytes", Help: "Bytes of the queue's log that queued messages still need."},
			func() float64 { return float64(stats().LiveBytes) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "stsrelay_queue_max_disk_bytes", Help: "queue.max_disk_bytes (0: no limit)."},
			func() float64 { return float64(stats().MaxDiskBytes) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "stsrelay_queue_segments", Help: "Segment files of the queue's log."},
			func() float64 { return float64(stats().Segments) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "stsrelay_queue_compactions_total", Help: "Log segments emptied by copying their live messages forward."},
			func() float64 { return float64(stats().Compactions) }),
	)
}

// Serve listens on addr until ctx ends.
func (m *Metrics) Serve(ctx context.Context, addr string) (net.Addr, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok\n")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if !m.ready.Load() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		if c := m.readyCheck.Load(); c != nil {
			if ok, why := (*c)(); !ok {
				http.Error(w, "not ready: "+why, http.StatusServiceUnavailable)
				return
			}
		}
		w.Write([]byte("ready\n"))
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(ln)
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	return ln.Addr(), nil
}
