package server

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/delivery"
	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/control"
	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/internal/fleet"
	"github.com/stsrelay/stsrelay/internal/fleet/jsqueue"
	"github.com/stsrelay/stsrelay/internal/fleet/kvcache"
	"github.com/stsrelay/stsrelay/internal/metrics"
	"github.com/stsrelay/stsrelay/internal/sdnotify"
	"github.com/stsrelay/stsrelay/mtasts"
	"github.com/stsrelay/stsrelay/mtasts/forecast"
	"github.com/stsrelay/stsrelay/mtasts/mtastsdb"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/relay"
	"github.com/stsrelay/stsrelay/tlsrpt/tlsrptdb"
	"github.com/stsrelay/stsrelay/tlsrpt/tlsrptsend"
)

// fleetConnectTimeout bounds the wait for a first NATS server at start.
const fleetConnectTimeout = 30 * time.Second

// shutdownGrace bounds how long in-flight SMTP transactions may take to
// finish after SIGINT/SIGTERM before they are cut with 421.
const shutdownGrace = 30 * time.Second

// Options are a relay run's.
type Options struct {
	Config *config.Config
	Logger *zap.Logger
	// Reload delivers the reload signal (SIGHUP); nil: no reloads.
	Reload <-chan os.Signal
	// Level is the log level a reload may change; nil: fixed.
	Level *zap.AtomicLevel
	// Version is logged in the "started" line.
	Version string
}

// Run runs the relay until ctx ends, then stops it. A part that cannot
// start (a listener, say) is an error, not something to run without.
func Run(ctx context.Context, o Options) error {
	s := &server{cfg: o.Config, log: o.Logger, opts: o}
	s.runCtx, s.cancelRun = context.WithCancel(context.Background())
	defer s.close()
	if err := s.start(ctx); err != nil {
		s.stop(false)
		return err
	}
	s.serve(ctx)
	_ = sdnotify.Notify(sdnotify.Stopping)
	s.log.Info("stopping")
	s.met.SetReady(false)
	s.stop(true)
	s.log.Info("stopped")
	return nil
}

// server is one run of the relay: its parts, in the order they start.
type server struct {
	cfg  *config.Config
	log  *zap.Logger
	opts Options

	// closers close the queue and what it depends on (the fleet
	// connection, the data_dir lock), last, in reverse order.
	closers []func()

	fl       *fleet.Fleet // nil unless in fleet mode
	store    queue.Queue
	met      *metrics.Metrics
	resolver *dnsclient.Resolver
	cache    *mtastsdb.Cache // nil when MTA-STS is off

	// runCtx ends the background loops (policy refresh, TLS-RPT reports,
	// the forecast, metrics); bg waits for them.
	runCtx    context.Context
	cancelRun context.CancelFunc
	bg        sync.WaitGroup

	tlsrec      *tlsrptdb.Recorder // nil when TLS-RPT is off
	reporter    *tlsrptsend.Reporter
	stopReports func() // flushes the TLS-RPT counts
	fc          *forecast.Counter

	eng       *delivery.Engine
	cancelEng context.CancelFunc
	engDone   chan struct{} // nil until delivery started

	srv *relay.Server // nil until submission listens
	ctl net.Listener
}

func (s *server) onClose(f func()) { s.closers = append(s.closers, f) }

// close closes the queue, then the fleet connection and the data_dir
// lock: after stop, so that every delivery outcome and TLS-RPT count is
// recorded in it first.
func (s *server) close() {
	for i := len(s.closers) - 1; i >= 0; i-- {
		s.closers[i]()
	}
}

// start starts the parts in order; on error, stop and close undo what it
// did.
func (s *server) start(ctx context.Context) error {
	cfg, log := s.cfg, s.log
	if err := os.MkdirAll(cfg.DataDir, 0o750); err != nil {
		return fmt.Errorf("data_dir: %w", err)
	}
	if err := s.openQueue(ctx); err != nil {
		return err
	}
	s.startMetrics()
	var err error
	if s.resolver, err = NewResolver(cfg); err != nil {
		return err
	}
	s.met.ObserveDNSCache(s.resolver.CacheLookups)
	roots, extra, err := TrustRoots(cfg)
	if err != nil {
		return err
	}
	if err := s.startPolicies(ctx, extra); err != nil {
		return err
	}
	var isReporter func() bool
	s.tlsrec, s.reporter, s.stopReports, isReporter, err = startTLSRPT(s.runCtx, cfg, s.resolver, roots, s.store, s.fl, log, s.met, &s.bg)
	if err != nil {
		return err
	}
	if s.fl != nil {
		s.observeFleet(isReporter)
	}
	if s.fc, err = startForecast(s.runCtx, cfg, s.met, &s.bg); err != nil {
		return err
	}
	s.eng = delivery.New(s.deliveryOptions(roots))
	var engCtx context.Context
	engCtx, s.cancelEng = context.WithCancel(context.Background())

	srv, err := relay.New(relay.Options{Config: cfg, Queue: s.store, Logger: log, Accepted: s.met.MessagesAccepted,
		ConnectionsRejected: s.met.SubmissionConnectionRejected})
	if err != nil {
		return err
	}
	if err := srv.Start(); err != nil {
		return err
	}
	s.srv = srv
	// Delivery starts once submission listens: after a restart with a
	// large queue, applications can hand in mail again at once.
	s.engDone = make(chan struct{})
	go func() { s.eng.Run(engCtx); close(s.engDone) }()

	if s.ctl, err = control.Serve(cfg.DataDir, s.controlService()); err != nil {
		return err
	}
	if cfg.Metrics.Listen != "" {
		if _, err := s.met.Serve(s.runCtx, cfg.Metrics.Listen); err != nil {
			return fmt.Errorf("config %s: key \"metrics.listen\": %w", cfg.Path, err)
		}
	}
	s.met.SetReady(true)
	var addrs []string
	for _, a := range srv.Addrs() {
		addrs = append(addrs, a.String())
	}
	log.Info("started", zap.Strings("listen", addrs), zap.String("hostname", cfg.Hostname), zap.String("version", s.opts.Version))
	// systemd Type=notify (contrib/stsrelay.service): ready once
	// submission listens. Without NOTIFY_SOCKET this does nothing.
	_ = sdnotify.Notify(sdnotify.Ready)
	return nil
}

// stop ends what start started, in this order: deliveries start their
// shutdown_timeout beside the submission listener's shutdown rather than
// after it; the control socket closes; in-flight deliveries finish
// (bounded by their SMTP timeouts) and record their outcomes; the
// TLS-RPT counts are flushed; the background loops end. The queue closes
// after (close). warn logs a submission shutdown that failed.
func (s *server) stop(warn bool) {
	if s.cancelEng != nil {
		s.cancelEng()
	}
	if s.srv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
		if err := s.srv.Shutdown(sctx); warn && err != nil && !errors.Is(err, context.DeadlineExceeded) {
			s.log.Warn("submission shutdown", zap.Error(err))
		}
		cancel()
	}
	if s.ctl != nil {
		s.ctl.Close()
	}
	if s.engDone != nil {
		<-s.engDone
	}
	if s.stopReports != nil {
		s.stopReports()
	}
	s.cancelRun()
	s.bg.Wait()
}

// serve applies reloads until ctx ends.
func (s *server) serve(ctx context.Context) {
	rl := &reloader{path: s.cfg.Path, cur: s.cfg, log: s.log, level: s.opts.Level, srv: s.srv, reporter: s.reporter, met: s.met}
	// Routes and TLS overrides are swapped in the running engine; a
	// table it refuses (an unreadable password file) keeps the old one.
	rl.delivery = func(c *config.Config) error { return s.eng.SetRouting(c.Routes, c.TLSPolicies) }
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.opts.Reload:
			_ = sdnotify.Notify(sdnotify.Reloading)
			rl.reload()
			_ = sdnotify.Notify(sdnotify.Ready)
		}
	}
}

// openQueue opens the disk queue, or in fleet mode connects to the
// fleet and opens its queue: the queue, the policy cache and TLS-RPT
// then live in the fleet's NATS JetStream (docs/fleet.md).
func (s *server) openQueue(ctx context.Context) error {
	cfg, log := s.cfg, s.log
	if !cfg.Cluster.Enabled() {
		st, err := queue.Open(QueueOptions(cfg))
		if err != nil {
			return err
		}
		s.store = st
		s.onClose(func() { st.Close() })
		log.Info("queue opened", zap.String("dir", filepath.Join(cfg.DataDir, "queue")), zap.Int("messages", st.Len()))
		return nil
	}
	lock, err := lockDataDir(cfg.DataDir)
	if err != nil {
		return err
	}
	s.onClose(func() { lock.Close() })
	cctx, cancel := context.WithTimeout(ctx, fleetConnectTimeout)
	fl, err := fleet.Connect(cctx, cfg.Cluster, log)
	cancel()
	if err != nil {
		return err
	}
	s.fl = fl
	s.onClose(fl.Close)
	if err := os.MkdirAll(filepath.Join(cfg.DataDir, "spool"), 0o750); err != nil {
		return fmt.Errorf("data_dir: %w", err)
	}
	jq, err := jsqueue.New(ctx, fl.NC, jsqueue.Options{Prefix: fl.Prefix, Replicas: fl.Replicas, NodeName: fl.Node,
		Schedule: QueueOptions(cfg).Schedule, TempDir: filepath.Join(cfg.DataDir, "spool"), AckWait: cfg.Cluster.LeaseTime.Duration})
	if err != nil {
		return fmt.Errorf("fleet queue: %w", err)
	}
	s.store = jq
	s.onClose(func() { jq.Close() })
	log.Info("queue opened", zap.String("fleet", fl.Prefix), zap.Int("messages", jq.Len()))
	return nil
}

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

// startMetrics creates the metrics with the queue's gauges.
func (s *server) startMetrics() {
	store, cfg := s.store, s.cfg
	s.met = metrics.New(
		func() float64 { return float64(store.Len()) },
		func() float64 {
			if t, ok := store.Oldest(); ok {
				return time.Since(t).Seconds()
			}
			return 0
		})
	s.met.ObserveQueueDisk(func() metrics.QueueDisk {
		st := store.Stats()
		return metrics.QueueDisk{DiskBytes: st.DiskBytes, LiveBytes: st.LiveBytes, MaxDiskBytes: cfg.Queue.MaxDiskBytes,
			Segments: st.Segments, Compactions: st.Compactions}
	})
}

// startPolicies opens the MTA-STS policy cache (shared with the fleet in
// fleet mode) and starts its refresher and the policies gauge.
func (s *server) startPolicies(ctx context.Context, extra *x509.CertPool) error {
	cfg, log, met := s.cfg, s.log, s.met
	if !cfg.MTASTS.Enabled {
		return nil
	}
	var shared mtastsdb.Shared
	if s.fl != nil {
		sh, err := kvcache.New(ctx, s.fl.JS, kvcache.Options{Prefix: s.fl.Prefix, Replicas: s.fl.Replicas, Node: s.fl.Node, Logger: log})
		if err != nil {
			return fmt.Errorf("fleet policy cache: %w", err)
		}
		s.onClose(func() { sh.Close() })
		shared = sh
	}
	cache, err := NewPolicyCache(cfg, s.resolver, extra, shared, log, func(domain, id string, mode mtasts.Mode, result string) {
		met.MTASTSFetches.WithLabelValues(result).Inc()
	})
	if err != nil {
		return fmt.Errorf("mtasts cache: %w", err)
	}
	s.cache = cache
	s.bg.Add(2)
	go func() { defer s.bg.Done(); cache.Run(s.runCtx) }()
	go func() {
		defer s.bg.Done()
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
			case <-s.runCtx.Done():
				return
			case <-t.C:
			}
		}
	}()
	return nil
}

// observeFleet adds the fleet metrics and makes /readyz follow the NATS
// connection.
func (s *server) observeFleet(isReporter func() bool) {
	fl, met := s.fl, s.met
	jq := s.store.(*jsqueue.Queue)
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

func (s *server) deliveryOptions(roots *x509.CertPool) delivery.Options {
	o := delivery.Options{
		Config:   s.cfg,
		Store:    s.store,
		Resolver: s.resolver,
		Counters: s.met,
		Roots:    roots,
		Logger:   s.log,
	}
	// No typed nils in the interfaces.
	if s.cache != nil {
		o.Policies = s.cache
	}
	if s.tlsrec != nil {
		o.TLSRPT = s.tlsrec
	}
	if s.fc != nil {
		o.Forecast = s.fc
	}
	return o
}

// controlService answers the control socket from the running parts.
func (s *server) controlService() *control.Service {
	svc := &control.Service{Queue: s.store, Bounce: s.eng.Bounce, Forecasts: s.fc}
	if s.cache != nil {
		svc.Policies = s.cache
	}
	if s.tlsrec != nil {
		svc.Pending = s.tlsrec.Pending
	}
	return svc
}
