package server

import (
	"fmt"
	"reflect"
	"slices"
	"strings"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/logging"
	"github.com/stsrelay/stsrelay/internal/metrics"
	"github.com/stsrelay/stsrelay/relay"
	"github.com/stsrelay/stsrelay/tlsrpt"
	"github.com/stsrelay/stsrelay/tlsrpt/tlsrptsend"
)

// reloader applies a configuration file read again on SIGHUP to the
// running relay, without dropping connections or queued mail: submission
// users, certificate, trusted_networks, allowed_senders and
// require_tls_for_auth (relay.Server.Reload), log.level, and the TLS-RPT
// DKIM key. A file that does not load is refused with the errors it would
// give at start and the old configuration stays in force. Keys that only
// take effect at a restart are named in a warning.
type reloader struct {
	path     string
	cur      *config.Config // in force
	log      *zap.Logger
	level    *zap.AtomicLevel // nil: fixed
	srv      *relay.Server
	reporter *tlsrptsend.Reporter // nil when TLS-RPT is off
	met      *metrics.Metrics
	// delivery, when set, applies the [[route]] and [[tls_policy]]
	// tables (and whatever else delivery can take at run time) and
	// returns an error, changing nothing, when it cannot.
	//
	// serve sets it to the delivery engine's SetRouting. While it is
	// nil, route and tls_policy are named
	// as needing a restart.
	delivery func(*config.Config) error
}

// reloadedKeys are the keys a reload applies (beside submission's, which
// relay.Server.Reload sorts out).
var reloadedKeys = []string{"log.level", "tlsrpt.dkim_domain", "tlsrpt.dkim_selector", "tlsrpt.dkim_key_file"}

// deliveryKeys are applied by the delivery hook when it is wired.
var deliveryKeys = []string{"route", "tls_policy"}

// reload reads the file again and applies it; it logs one "reload" line
// and counts stsrelay_config_reloads_total{result}.
func (r *reloader) reload() {
	result, restart, err := r.apply()
	fields := []zap.Field{zap.String("result", result), zap.String("config", r.path)}
	if err != nil {
		fields = append(fields, zap.String("error", err.Error()))
	}
	if len(restart) > 0 {
		fields = append(fields, zap.Strings("restart_needed", restart))
	}
	if r.met != nil {
		r.met.ConfigReloads.WithLabelValues(result).Inc()
	}
	if result == "ok" {
		r.log.Info("reload", fields...)
	} else {
		r.log.Error("reload", fields...)
	}
	if len(restart) > 0 {
		r.log.Warn("reload: keys changed that take effect only after a restart", zap.Strings("keys", restart))
	}
}

// apply returns "ok", "failed" (nothing changed) or "partial" (the
// submission side changed, delivery refused its part).
func (r *reloader) apply() (result string, restart []string, err error) {
	cfg, err := config.Load(r.path)
	if err != nil {
		return "failed", nil, err
	}
	// Everything that can fail is read before anything changes.
	level, err := logging.ParseLevel(cfg.Log.Level)
	if err != nil {
		return "failed", nil, fmt.Errorf("config %s: key \"log.level\": %w", cfg.Path, err)
	}
	var dkim *tlsrpt.DKIMOptions
	if r.reporter != nil && cfg.TLSRPT.DKIMKeyFile != "" {
		signer, err := tlsrpt.LoadDKIMKey(cfg.TLSRPT.DKIMKeyFile)
		if err != nil {
			return "failed", nil, fmt.Errorf("config %s: key \"tlsrpt.dkim_key_file\": %w", cfg.Path, err)
		}
		dkim = &tlsrpt.DKIMOptions{Domain: cfg.TLSRPT.DKIMDomain, Selector: cfg.TLSRPT.DKIMSelector,
			KeyFile: cfg.TLSRPT.DKIMKeyFile, Signer: signer}
		if dkim.Domain == "" || dkim.Selector == "" {
			return "failed", nil, fmt.Errorf("config %s: key \"tlsrpt.dkim_key_file\": DKIM needs dkim_domain and dkim_selector", cfg.Path)
		}
	}
	subRestart, err := r.srv.Reload(cfg)
	if err != nil {
		return "failed", nil, fmt.Errorf("config %s: %w", cfg.Path, err)
	}
	result = "ok"
	if r.delivery != nil {
		if derr := r.delivery(cfg); derr != nil {
			result = "partial"
			err = fmt.Errorf("config %s: delivery kept its old settings: %w", cfg.Path, derr)
		}
	}
	restart = restartKeys(r.cur, cfg, subRestart, r.delivery != nil)
	r.finish(cfg, level, dkim)
	return result, restart, err
}

// finish applies what cannot fail any more.
func (r *reloader) finish(cfg *config.Config, level zapcore.Level, dkim *tlsrpt.DKIMOptions) {
	if r.level != nil {
		r.level.SetLevel(level)
	}
	if r.reporter != nil && !reflect.DeepEqual(dkimKeys(r.cur), dkimKeys(cfg)) {
		// Only an error for options checked above.
		if err := r.reporter.SetDKIM(dkim); err != nil {
			r.log.Error("reload: tlsrpt dkim", zap.Error(err))
		}
	}
	r.cur = cfg
}

func dkimKeys(c *config.Config) [3]string {
	return [3]string{c.TLSRPT.DKIMDomain, c.TLSRPT.DKIMSelector, c.TLSRPT.DKIMKeyFile}
}

// restartKeys names the keys that differ between old and new and are not
// applied by a reload, as "section.key" (or the top-level key). sub are
// those relay.Server.Reload found in [submission]; that section is
// otherwise left to it.
func restartKeys(old, cur *config.Config, sub []string, deliveryHook bool) []string {
	applied := slices.Clone(reloadedKeys)
	if deliveryHook {
		applied = append(applied, deliveryKeys...)
	}
	var out []string
	ov, nv := reflect.ValueOf(old).Elem(), reflect.ValueOf(cur).Elem()
	t := ov.Type()
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
		if name == "" || name == "-" || name == "submission" {
			continue
		}
		a, b := ov.Field(i), nv.Field(i)
		if f.Type.Kind() != reflect.Struct {
			if !reflect.DeepEqual(a.Interface(), b.Interface()) && !slices.Contains(applied, name) {
				out = append(out, name)
			}
			continue
		}
		for j := range f.Type.NumField() {
			sf := f.Type.Field(j)
			sname, _, _ := strings.Cut(sf.Tag.Get("toml"), ",")
			if sname == "" || sname == "-" {
				continue
			}
			key := name + "." + sname
			if !reflect.DeepEqual(a.Field(j).Interface(), b.Field(j).Interface()) && !slices.Contains(applied, key) {
				out = append(out, key)
			}
		}
	}
	// relay.Server.Reload does not know hostname is compared here too.
	for _, k := range sub {
		if !slices.Contains(out, k) {
			out = append(out, k)
		}
	}
	return out
}
