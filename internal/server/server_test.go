package server

import (
	"context"
	"errors"
	"net"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/control"
	"github.com/stsrelay/stsrelay/queue"
)

func testConfig(t *testing.T) *config.Config {
	t.Helper()
	cfg := config.Default()
	cfg.Path = "test.toml"
	cfg.DataDir = t.TempDir()
	cfg.Submission.Listen = []string{"127.0.0.1:0"}
	cfg.DNS.Servers = []string{"127.0.0.1:1"}
	return cfg
}

func messages(logs *observer.ObservedLogs) []string {
	var out []string
	for _, e := range logs.All() {
		out = append(out, e.Message)
	}
	return out
}

// Run starts the parts in order, answers the control socket, and on the
// end of its context stops them and closes the queue last.
func TestRunStartsAndStops(t *testing.T) {
	cfg := testConfig(t)
	core, logs := observer.New(zap.InfoLevel)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, Options{Config: cfg, Logger: zap.New(core), Version: "test"}) }()

	cl := control.Client{DataDir: cfg.DataDir}
	deadline := time.Now().Add(20 * time.Second)
	for {
		_, err := cl.QueueSummary(context.Background())
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			cancel()
			t.Fatalf("control socket never answered: %v (log %q)", err, messages(logs))
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := cl.PolicyList(context.Background()); err != nil {
		t.Errorf("policy list: %v", err)
	}
	if _, err := cl.TLSRPTPending(context.Background()); err != nil {
		t.Errorf("tlsrpt pending: %v", err)
	}
	started := logs.FilterMessage("started").All()
	if len(started) != 1 || started[0].ContextMap()["version"] != "test" {
		t.Errorf("started lines: %+v", started)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Run: %v", err)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("Run did not return")
	}
	var order []string
	for _, m := range messages(logs) {
		switch m {
		case "queue opened", "submission listening", "started", "stopping", "stopped":
			order = append(order, m)
		}
	}
	if got, want := strings.Join(order, "|"), "queue opened|submission listening|started|stopping|stopped"; got != want {
		t.Errorf("log lines %q, want %q", got, want)
	}
	if _, err := cl.QueueSummary(context.Background()); !errors.Is(err, control.ErrNoServer) {
		t.Errorf("control socket after stop: %v, want ErrNoServer", err)
	}
	// The queue is closed: its lock is free.
	st, err := queue.Open(QueueOptions(cfg))
	if err != nil {
		t.Fatalf("queue after stop: %v", err)
	}
	st.Close()
}

// A listener that cannot start is an error, and what started is stopped
// and closed.
func TestRunFailsOnBusyMetricsListener(t *testing.T) {
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	cfg := testConfig(t)
	cfg.Metrics.Listen = busy.Addr().String()
	err = Run(context.Background(), Options{Config: cfg, Logger: zap.NewNop()})
	if err == nil || !strings.Contains(err.Error(), `key "metrics.listen"`) {
		t.Fatalf("Run = %v, want a metrics.listen error", err)
	}
	if _, err := (control.Client{DataDir: cfg.DataDir}).QueueSummary(context.Background()); !errors.Is(err, control.ErrNoServer) {
		t.Errorf("control socket after a failed start: %v, want ErrNoServer", err)
	}
	st, err := queue.Open(QueueOptions(cfg))
	if err != nil {
		t.Fatalf("queue after a failed start: %v", err)
	}
	st.Close()
}
