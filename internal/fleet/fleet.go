// Package fleet connects a relay to the NATS JetStream cluster of its
// fleet ([cluster] in the configuration): several relays that share one
// replicated queue (internal/fleet/jsqueue), one MTA-STS policy cache
// (internal/fleet/kvcache) and one elected TLS-RPT reporter
// (internal/fleet/rptfleet). A relay with no nats_urls runs standalone
// and never imports NATS state at all.
//
// NATS is an existing, proven engine: streams and key-value buckets are
// Raft-replicated over `replicas` servers, and an acknowledged publish is
// stored on a quorum of them. This package only opens the connection and
// says whether it is up (for /readyz).
package fleet

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/internal/config"
)

// Fleet is a connection to the fleet's NATS cluster.
type Fleet struct {
	NC   *nats.Conn
	JS   jetstream.JetStream
	Node string
	// Replicas and Prefix are [cluster] replicas and stream_prefix.
	Replicas int
	Prefix   string

	disconnects atomic.Uint64
}

// Connect opens the connection and waits (bounded by ctx) until it is
// up. Reconnects go on for ever in the background: a NATS server that
// dies is replaced by another of nats_urls.
func Connect(ctx context.Context, c config.Cluster, log *zap.Logger) (*Fleet, error) {
	if len(c.NATSURLs) == 0 {
		return nil, errors.New("fleet: no cluster.nats_urls")
	}
	f := &Fleet{Node: c.NodeName, Replicas: c.Replicas, Prefix: c.StreamPrefix}
	opts := []nats.Option{
		nats.Name("stsrelay " + c.NodeName),
		nats.MaxReconnects(-1),
		nats.ReconnectWait(250 * time.Millisecond),
		nats.RetryOnFailedConnect(true),
		nats.DisconnectErrHandler(func(nc *nats.Conn, err error) {
			if nc.IsClosed() || err == nil {
				return // our own Close at shutdown
			}
			f.disconnects.Add(1)
			log.Warn("nats disconnected", zap.Error(err))
		}),
		nats.ReconnectHandler(func(nc *nats.Conn) {
			log.Info("nats reconnected", zap.String("server", nc.ConnectedUrlRedacted()))
		}),
	}
	if c.CredentialsFile != "" {
		opts = append(opts, nats.UserCredentials(c.CredentialsFile))
	}
	nc, err := nats.Connect(strings.Join(c.NATSURLs, ","), opts...)
	if err != nil {
		return nil, fmt.Errorf("fleet: connect to %v: %w", c.NATSURLs, err)
	}
	for !nc.IsConnected() {
		select {
		case <-ctx.Done():
			nc.Close()
			return nil, fmt.Errorf("fleet: no NATS server of %v answered: %w", c.NATSURLs, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("fleet: %w", err)
	}
	f.NC, f.JS = nc, js
	log.Info("fleet connected", zap.String("node", c.NodeName), zap.String("server", nc.ConnectedUrlRedacted()),
		zap.Int("replicas", c.Replicas), zap.String("prefix", c.StreamPrefix))
	return f, nil
}

// Connected reports whether the connection is up now.
func (f *Fleet) Connected() bool { return f.NC != nil && f.NC.IsConnected() }

// Disconnects counts lost connections since Connect.
func (f *Fleet) Disconnects() uint64 { return f.disconnects.Load() }

// Close drains and closes the connection.
func (f *Fleet) Close() {
	if f.NC != nil {
		_ = f.NC.Drain()
		f.NC.Close()
	}
}
