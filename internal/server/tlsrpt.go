package server

import (
	"context"
	"crypto/x509"
	"fmt"
	"path/filepath"
	"sync"

	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/internal/fleet"
	"github.com/stsrelay/stsrelay/internal/fleet/rptfleet"
	"github.com/stsrelay/stsrelay/internal/metrics"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/tlsrpt"
	"github.com/stsrelay/stsrelay/tlsrpt/tlsrptdb"
	"github.com/stsrelay/stsrelay/tlsrpt/tlsrptsend"
)

// TLSRPTDir is where the TLS-RPT counts and report jobs are kept.
func TLSRPTDir(cfg *config.Config) string { return filepath.Join(cfg.DataDir, "tlsrpt") }

// startTLSRPT starts the recorder (counts flushed to disk every second)
// and the reporter (reports after each period). It returns the recorder
// for delivery (nil when TLS-RPT is off), the reporter (for reloading its
// DKIM key; nil when off) and a function that flushes the counts at
// shutdown. In fleet mode (fl not nil) the node hands its counts to the
// fleet, and only the elected node sends the fleet's reports
// (internal/fleet/rptfleet); isReporter says whether this node is it.
func startTLSRPT(ctx context.Context, cfg *config.Config, res *dnsclient.Resolver, roots *x509.CertPool, st queue.Queue, fl *fleet.Fleet, log *zap.Logger, met *metrics.Metrics, bg *sync.WaitGroup) (rec *tlsrptdb.Recorder, rep *tlsrptsend.Reporter, stop func(), isReporter func() bool, err error) {
	isReporter = func() bool { return false }
	if !cfg.TLSRPT.Enabled {
		return nil, nil, func() {}, isReporter, nil
	}
	rec, err = tlsrptdb.NewRecorder(TLSRPTDir(cfg), nil, log, tlsrptdb.WithInterval(cfg.TLSRPT.Interval.Duration))
	if err != nil {
		return nil, nil, nil, nil, fmt.Errorf("tlsrpt: %w", err)
	}
	var dkim *tlsrpt.DKIMOptions
	if cfg.TLSRPT.DKIMKeyFile != "" {
		signer, err := tlsrpt.LoadDKIMKey(cfg.TLSRPT.DKIMKeyFile)
		if err != nil {
			return nil, nil, nil, nil, fmt.Errorf("config %s: key \"tlsrpt.dkim_key_file\": %w", cfg.Path, err)
		}
		dkim = &tlsrpt.DKIMOptions{Domain: cfg.TLSRPT.DKIMDomain, Selector: cfg.TLSRPT.DKIMSelector,
			KeyFile: cfg.TLSRPT.DKIMKeyFile, Signer: signer}
	}
	var fn *rptfleet.Node
	if fl != nil {
		fn, err = rptfleet.Open(ctx, rptfleet.Config{JS: fl.JS, Prefix: fl.Prefix, Node: fl.Node, Replicas: fl.Replicas,
			Interval: cfg.TLSRPT.Interval.Duration, Logger: log})
		if err != nil {
			return nil, nil, nil, nil, fmt.Errorf("tlsrpt: %w", err)
		}
		isReporter = fn.IsReporter
	}
	opts := tlsrptsend.Options{
		Recorder:         rec,
		Resolver:         res,
		RootCAs:          roots,
		AllowPrivateRUA:  cfg.TLSRPT.AllowPrivateRUA,
		Hostname:         cfg.Hostname,
		OrganizationName: cfg.TLSRPT.OrganizationName,
		ContactInfo:      cfg.TLSRPT.ContactInfo,
		From:             cfg.TLSRPT.From,
		Interval:         cfg.TLSRPT.Interval.Duration,
		DKIM:             dkim,
		Logger:           log,
		OnReport:         func(result string) { met.TLSRPTReports.WithLabelValues(result).Inc() },
		SendDelay:        tlsrptsend.DefaultSendDelay(cfg.TLSRPT.Interval.Duration),
	}
	if st != nil {
		opts.Enqueue = st.EnqueueReport
	}
	if fn != nil {
		opts.Source, opts.Jobs, opts.Active = fn, fn, fn.IsReporter
	}
	rep, err = tlsrptsend.NewReporter(opts)
	if err != nil {
		return nil, nil, nil, nil, fmt.Errorf("tlsrpt: %w", err)
	}
	recCtx, stopRec := context.WithCancel(context.Background())
	fnDone := make(chan struct{})
	bg.Add(2)
	go func() { defer bg.Done(); rec.Run(recCtx) }()
	go func() { defer bg.Done(); rep.Run(ctx) }()
	if fn != nil {
		// Hands the node's counts to the fleet, snapshots the open
		// period, holds or seeks the reporter lease.
		bg.Add(1)
		go func() { defer bg.Done(); defer close(fnDone); fn.Run(recCtx, rec) }()
	} else {
		close(fnDone)
	}
	stop = func() {
		stopRec()
		<-fnDone // the last snapshot is written and the lease released
		if err := rec.Close(); err != nil {
			log.Error("tlsrpt: flushing counts", zap.Error(err))
		}
	}
	return rec, rep, stop, isReporter, nil
}
