package server

import (
	"crypto/x509"
	"fmt"
	"os"
	"path/filepath"

	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/delivery"
	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/mtasts"
	"github.com/stsrelay/stsrelay/mtasts/mtastsdb"
	"github.com/stsrelay/stsrelay/queue"
)

// The relay's parts built from its configuration, for Run and for the
// CLI commands that act on a stopped relay's files or check a domain.

// QueueOptions are the disk queue's options under cfg (data_dir/queue,
// the retry schedule, the disk limits).
func QueueOptions(cfg *config.Config) queue.Options {
	return queue.Options{Dir: filepath.Join(cfg.DataDir, "queue"), Schedule: delivery.RetrySchedule(&cfg.Queue),
		MaxDiskBytes: cfg.Queue.MaxDiskBytes, MinFreeBytes: cfg.Queue.MinFreeDiskBytes}
}

// TrustRoots reads tls.extra_root_ca_file once and returns the full
// pool (system roots plus the extra ones: the Web PKI for MX certificates,
// policy hosts and report endpoints) and the extra roots alone (nil when
// none), which the policy fetcher adds to the system roots itself.
func TrustRoots(cfg *config.Config) (full, extra *x509.CertPool, err error) {
	full, err = x509.SystemCertPool()
	if err != nil || full == nil {
		full = x509.NewCertPool()
	}
	f := cfg.TLS.ExtraRootCAFile
	if f == "" {
		return full, nil, nil
	}
	pem, err := os.ReadFile(f)
	if err != nil {
		return nil, nil, fmt.Errorf("config %s: key \"tls.extra_root_ca_file\": %w", cfg.Path, err)
	}
	extra = x509.NewCertPool()
	if !extra.AppendCertsFromPEM(pem) {
		return nil, nil, fmt.Errorf("config %s: key \"tls.extra_root_ca_file\": no PEM certificate in %s", cfg.Path, f)
	}
	full.AppendCertsFromPEM(pem)
	return full, extra, nil
}

// NewResolver is the DNS resolver of [dns].
func NewResolver(cfg *config.Config) (*dnsclient.Resolver, error) {
	r, err := dnsclient.NewWithOptions(dnsclient.Options{
		Servers:      cfg.DNS.Servers,
		Timeout:      cfg.DNS.Timeout.Duration,
		CacheEntries: cfg.DNS.CacheEntries,
		CacheMaxTTL:  cfg.DNS.CacheMaxTTL.Duration,
		// The AD bit of answers counts only from a resolver trusted to
		// validate (RFC 6840 §5.8); DANE (RFC 7672) depends on it.
		TrustAD: cfg.DNS.TrustAD,
	})
	if err != nil {
		return nil, fmt.Errorf("dns: %w", err)
	}
	return r, nil
}

// PolicyFetcher is the MTA-STS policy fetcher of [mtasts]; extra are the
// roots added to the system's (TrustRoots).
func PolicyFetcher(cfg *config.Config, res *dnsclient.Resolver, extra *x509.CertPool) *mtasts.Fetcher {
	return &mtasts.Fetcher{
		HTTPSPort: cfg.MTASTS.HTTPSPort,
		Timeout:   cfg.MTASTS.FetchTimeout.Duration,
		MaxBytes:  cfg.MTASTS.MaxPolicyBytes,
		RootCAs:   extra,
		DialAddr:  res.DialContext,
	}
}

// NewPolicyCache opens the MTA-STS policy cache under data_dir/mtasts
// (shared with the fleet when shared is not nil). log and onFetch may be
// nil.
func NewPolicyCache(cfg *config.Config, res *dnsclient.Resolver, extra *x509.CertPool, shared mtastsdb.Shared, log *zap.Logger, onFetch func(domain, id string, mode mtasts.Mode, result string)) (*mtastsdb.Cache, error) {
	return mtastsdb.New(mtastsdb.Options{
		Shared:              shared,
		Resolver:            res,
		Fetcher:             PolicyFetcher(cfg, res, extra),
		Dir:                 filepath.Join(cfg.DataDir, "mtasts"),
		Logger:              log,
		RefreshBeforeExpiry: cfg.MTASTS.RefreshBeforeExpiry.Duration,
		OnFetch:             onFetch,
	})
}
