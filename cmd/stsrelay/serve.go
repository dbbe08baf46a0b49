package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/pprof"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/delivery"
	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/control"
	"github.com/stsrelay/stsrelay/internal/fleet"
	"github.com/stsrelay/stsrelay/internal/fleet/jsqueue"
	"github.com/stsrelay/stsrelay/internal/fleet/kvcache"
	"github.com/stsrelay/stsrelay/internal/logging"
	"github.com/stsrelay/stsrelay/internal/metrics"
	"github.com/stsrelay/stsrelay/internal/sdnotify"
	"github.com/stsrelay/stsrelay/internal/server"
	"github.com/stsrelay/stsrelay/mtasts"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/relay"
)

// fleetConnectTimeout bounds the wait for a first NATS server at start.
const fleetConnectTimeout = 30 * time.Second

// lockDataDir takes data_dir/lock for this process (fleet mode: the
// local disk queue's lock is not there to prove that the control socket
// and the spool are ours alone).
func lockDataDir(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR, 0o640)
	if err != nil {
		return nil, fmt.Errorf("data_dir: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("data_dir %s is in use by another process (is stsrelay serve running?)", dir)
	}
	return f, nil
}

// shutdownGrace bounds how long in-flight SMTP transactions may take to
// finish after SIGINT/SIGTERM before they are cut with 421.
const shutdownGrace = 30 * time.Second

func cmdServe(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	cfgPath := fs.String("config", defaultConfig, "configuration file")
	if err := fs.Parse(args); err != nil {
		return &usageError{err.Error()}
	}
	if fs.NArg() > 0 {
		return &usageError{"serve: unexpected argument " + fs.Arg(0)}
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		return err
	}
	log, level, closeLog, err := logging.NewLeveled(cfg.Log)
	if err != nil {
		return fmt.Errorf("config %s: %w", cfg.Path, err)
	}
	defer closeLog()
	ctx, stop := stopOnSignal(log)
	defer stop()
	// SIGHUP reloads the configuration (reload.go). Registered before
	// anything starts: unhandled, SIGHUP would end the process.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	// STSRELAY_CPUPROFILE=FILE writes a CPU profile of the whole run, for
	// `go tool pprof` (benchmarks; not an operator setting).
	if path := os.Getenv("STSRELAY_CPUPROFILE"); path != "" {
		f, err := os.Create(path)
		if err != nil {
			return fmt.Errorf("STSRELAY_CPUPROFILE: %w", err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("STSRELAY_CPUPROFILE: %w", err)
		}
		defer func() { pprof.StopCPUProfile(); f.Close() }()
	}
	if err := serveWith(ctx, cfg, log, serveHooks{reload: hup, level: &level}); err != nil {
		log.Error("stopped with error", zap.Error(err))
		return err
	}
	return nil
}

// stopOnSignal returns a context that ends on the first SIGINT or
// SIGTERM (the clean shutdown: in-flight deliveries get
// delivery.shutdown_timeout). A second signal exits at once with status
// 2, after one log line: every acknowledged message is already on disk,
// so nothing accepted is lost, though an attempt in flight may be
// repeated after the restart. stop releases the signals.
func stopOnSignal(log *zap.Logger) (context.Context, func()) {
	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	returned := make(chan struct{})
	go func() {
		select {
		case s := <-sigs:
			log.Info("signal", zap.String("signal", s.String()))
			cancel()
		case <-returned:
			return
		}
		select {
		case s := <-sigs:
			log.Error("second signal: exiting at once", zap.String("signal", s.String()))
			_ = log.Sync()
			os.Exit(exitProblem)
		case <-returned:
		}
	}()
	var once sync.Once
	return ctx, func() {
		once.Do(func() {
			signal.Stop(sigs)
			close(returned)
			cancel()
		})
	}
}

// serveHooks are what `serve` adds to a relay run in process (demo): the
// reload signal and the log level it may change.
type serveHooks struct {
	reload <-chan os.Signal // SIGHUP; nil: no reloads
	level  *zap.AtomicLevel
}

func serve(ctx context.Context, cfg *config.Config, log *zap.Logger) error {
	return serveWith(ctx, cfg, log, serveHooks{})
}

func serveWith(ctx context.Context, cfg *config.Config, log *zap.Logger, hooks serveHooks) error {
	if err := os.MkdirAll(cfg.DataDir, 0o750); err != nil {
		return fmt.Errorf("data_dir: %w", err)
	}
	var fl *fleet.Fleet
	var store queue.Queue
	if cfg.Cluster.Enabled() {
		// Fleet mode: the queue, the policy cache and TLS-RPT live in
		// the fleet's NATS JetStream (docs/fleet.md).
		lock, err := lockDataDir(cfg.DataDir)
		if err != nil {
			return err
		}
		defer lock.Close()
		cctx, cancel := context.WithTimeout(ctx, fleetConnectTimeout)
		fl, err = fleet.Connect(cctx, cfg.Cluster, log)
		cancel()
		if err != nil {
			return err
		}
		defer fl.Close()
		if err := os.MkdirAll(filepath.Join(cfg.DataDir, "spool"), 0o750); err != nil {
			return fmt.Errorf("data_dir: %w", err)
		}
		jq, err := jsqueue.New(ctx, fl.NC, jsqueue.Options{Prefix: fl.Prefix, Replicas: fl.Replicas, NodeName: fl.Node,
			Schedule: server.QueueOptions(cfg).Schedule, TempDir: filepath.Join(cfg.DataDir, "spool"), AckWait: cfg.Cluster.LeaseTime.Duration})
		if err != nil {
			return fmt.Errorf("fleet queue: %w", err)
		}
		store = jq
		defer store.Close()
		log.Info("queue opened", zap.String("fleet", fl.Prefix), zap.Int("messages", store.Len()))
	} else {
		st, err := queue.Open(server.QueueOptions(cfg))
		if err != nil {
			return err
		}
		store = st
		defer store.Close()
		log.Info("queue opened", zap.String("dir", filepath.Join(cfg.DataDir, "queue")), zap.Int("messages", store.Len()))
	}

	met := metrics.New(
		func() float64 { return float64(store.Len()) },
		func() float64 {
			if t, ok := store.Oldest(); ok {
				return time.Since(t).Seconds()
			}
			return 0
		})
	met.ObserveQueueDisk(func() metrics.QueueDisk {
		st := store.Stats()
		return metrics.QueueDisk{DiskBytes: st.DiskBytes, LiveBytes: st.LiveBytes, MaxDiskBytes: cfg.Queue.MaxDiskBytes,
			Segments: st.Segments, Compactions: st.Compactions}
	})
	resolver, err := server.NewResolver(cfg)
	if err != nil {
		return err
	}
	met.ObserveDNSCache(resolver.CacheLookups)
	roots, extra, err := server.TrustRoots(cfg)
	if err != nil {
		return err
	}

	runCtx, cancelRun := context.WithCancel(context.Background())
	defer cancelRun()
	var bg sync.WaitGroup

	var policies delivery.PolicySource
	var cache *mtasts.Cache
	if cfg.MTASTS.Enabled {
		var shared mtasts.Shared
		if fl != nil {
			sh, err := kvcache.New(ctx, fl.JS, kvcache.Options{Prefix: fl.Prefix, Replicas: fl.Replicas, Node: fl.Node, Logger: log})
			if err != nil {
				return fmt.Errorf("fleet policy cache: %w", err)
			}
			defer sh.Close()
			shared = sh
		}
		cache, err = server.NewPolicyCache(cfg, resolver, extra, shared, log, func(domain, id string, mode mtasts.Mode, result string) {
			met.MTASTSFetches.WithLabelValues(result).Inc()
		})
		if err != nil {
			return fmt.Errorf("mtasts cache: %w", err)
		}
		policies = cache
		bg.Add(2)
		go func() { defer bg.Done(); cache.Run(runCtx) }()
		go func() {
			defer bg.Done()
			t := time.NewTicker(15 * time.Second)
			defer t.Stop()
			for {
				byMode := map[string]int{}
				for _, e := range cache.Entries() {
					if !e.Expired {
						byMode[string(e.Mode)]++
					}
				}
				met.SetPolicies(byMode)
				select {
				case <-runCtx.Done():
					return
				case <-t.C:
				}
			}
		}()
	}

	tlsrec, reporter, stopReports, isReporter, err := startTLSRPT(runCtx, cfg, resolver, roots, store, fl, log, met, &bg)
	if err != nil {
		cancelRun()
		bg.Wait()
		return err
	}
	if fl != nil {
		jq := store.(*jsqueue.Queue)
		jq.ObservePublish(met.ObserveFleet(func() metrics.FleetStats {
			return metrics.FleetStats{Connected: fl.Connected(), Reporter: isReporter(), Redeliveries: jq.Redeliveries(), Disconnects: fl.Disconnects()}
		}).Observe)
		met.SetReadyCheck(func() (bool, string) {
			if !fl.Connected() {
				return false, "no connection to the fleet's NATS servers"
			}
			return true, ""
		})
	}

	var recorder delivery.TLSRecorder // no typed nil in the interface
	if tlsrec != nil {
		recorder = tlsrec
	}
	fc, err := startForecast(runCtx, cfg, met, &bg)
	if err != nil {
		stopReports()
		cancelRun()
		bg.Wait()
		return err
	}
	var forecastRec delivery.ForecastRecorder // no typed nil in the interface
	if fc != nil {
		forecastRec = fc
	}
	eng := delivery.New(delivery.Options{
		Config:   cfg,
		Store:    store,
		Resolver: resolver,
		Policies: policies,
		TLSRPT:   recorder,
		Forecast: forecastRec,
		Counters: met,
		Roots:    roots,
		Logger:   log,
	})
	engCtx, cancelEng := context.WithCancel(context.Background())
	engDone := make(chan struct{})
	// stopBackground runs on every way out once delivery has started, in
	// this order: in-flight deliveries finish (bounded by their SMTP
	// timeouts) and record their outcomes, the TLS-RPT counts are
	// flushed, the background loops end — all before the store closes
	// (deferred above).
	stopBackground := func() {
		cancelEng()
		<-engDone
		stopReports()
		cancelRun()
		bg.Wait()
	}

	stopEarly := func() {
		close(engDone) // delivery never started
		stopBackground()
	}
	srv, err := relay.New(relay.Options{Config: cfg, Queue: store, Logger: log, Accepted: met.MessagesAccepted,
		ConnectionsRejected: met.SubmissionConnectionRejected})
	if err != nil {
		stopEarly()
		return err
	}
	if err := srv.Start(); err != nil {
		stopEarly()
		return err
	}
	// Delivery starts once submission listens: after a restart with a
	// large queue, applications can hand in mail again at once.
	go func() { eng.Run(engCtx); close(engDone) }()
	var addrs []string
	for _, a := range srv.Addrs() {
		addrs = append(addrs, a.String())
	}
	// A listener that cannot start is a configuration error (exit 2),
	// not something to run without.
	fail := func(err error) error {
		sctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
		defer cancel()
		_ = srv.Shutdown(sctx)
		stopBackground()
		return err
	}
	svc := &control.Service{Queue: store, Bounce: eng.Bounce, Forecasts: fc}
	if cache != nil {
		svc.Policies = cache
	}
	if tlsrec != nil {
		svc.Pending = tlsrec.Pending
	}
	ctl, err := control.Serve(cfg.DataDir, svc)
	if err != nil {
		return fail(err)
	}
	defer ctl.Close()
	if cfg.Metrics.Listen != "" {
		if _, err := met.Serve(runCtx, cfg.Metrics.Listen); err != nil {
			return fail(fmt.Errorf("config %s: key \"metrics.listen\": %w", cfg.Path, err))
		}
	}
	met.SetReady(true)
	log.Info("started", zap.Strings("listen", addrs), zap.String("hostname", cfg.Hostname), zap.String("version", version))
	// systemd Type=notify (contrib/stsrelay.service): ready once
	// submission listens. Without NOTIFY_SOCKET this does nothing.
	_ = sdnotify.Notify(sdnotify.Ready)

	rl := &reloader{path: cfg.Path, cur: cfg, log: log, level: hooks.level, srv: srv, reporter: reporter, met: met}
	// Routes and TLS overrides are swapped in the running engine; a
	// table it refuses (an unreadable password file) keeps the old one.
	rl.delivery = func(c *config.Config) error { return eng.SetRouting(c.Routes, c.TLSPolicies) }
wait:
	for {
		select {
		case <-ctx.Done():
			break wait
		case <-hooks.reload:
			_ = sdnotify.Notify(sdnotify.Reloading)
			rl.reload()
			_ = sdnotify.Notify(sdnotify.Ready)
		}
	}
	_ = sdnotify.Notify(sdnotify.Stopping)
	log.Info("stopping")
	met.SetReady(false)
	// Deliveries start their shutdown_timeout now, beside the
	// submission listener's shutdown rather than after it.
	cancelEng()
	sctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	if err := srv.Shutdown(sctx); err != nil && !errors.Is(err, context.DeadlineExceeded) {
		log.Warn("submission shutdown", zap.Error(err))
	}
	cancel()
	ctl.Close()
	stopBackground()
	log.Info("stopped")
	return nil
}
