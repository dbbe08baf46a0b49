package main

import (
	"context"
	"errors"
	"sync"

	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/delivery"
	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/internal/metrics"
	"github.com/stsrelay/stsrelay/queue"
)

// startTLSRPT starts the TLS-RPT recorder and reporter (not yet wired).
func startTLSRPT(ctx context.Context, cfg *config.Config, res *dnsclient.Resolver, st *queue.Store, log *zap.Logger, met *metrics.Metrics, bg *sync.WaitGroup) (delivery.TLSRecorder, func(), error) {
	return nil, func() {}, nil
}

func tlsrecPending(rec delivery.TLSRecorder) func() any { return nil }

func cmdTLSRPT(args []string) error {
	return errors.New("tlsrpt: not available yet")
}
