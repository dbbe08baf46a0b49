package main

import (
	"crypto/tls"
	"flag"
	"fmt"
	"os"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/server"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// cmdConfig is `stsrelay config check -config FILE`: validate a
// configuration without starting anything, like `postfix check`. It reads
// the files the configuration names (certificate, DKIM key, extra roots),
// so that what serve would refuse at start is refused here, and prints the
// warnings serve would log at start without failing on them.
func cmdConfig(args []string) error {
	if len(args) == 0 || args[0] != "check" {
		return &usageError{"config: want check"}
	}
	fs := flag.NewFlagSet("config check", flag.ContinueOnError)
	cfgPath := fs.String("config", defaultConfig, "configuration file")
	if err := fs.Parse(args[1:]); err != nil {
		return &usageError{err.Error()}
	}
	if fs.NArg() > 0 {
		return &usageError{"config check: unexpected argument " + fs.Arg(0)}
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		return err
	}
	if err := checkConfigFiles(cfg); err != nil {
		return err
	}
	for _, w := range configWarnings(cfg) {
		fmt.Fprintf(os.Stderr, "warning: config %s: %s\n", cfg.Path, w)
	}
	fmt.Printf("config OK: %s\n", cfg.Path)
	return nil
}

// checkConfigFiles reads the files serve reads at start.
func checkConfigFiles(cfg *config.Config) error {
	sub := cfg.Submission
	if sub.TLSCertFile != "" || sub.TLSKeyFile != "" {
		if _, err := tls.LoadX509KeyPair(sub.TLSCertFile, sub.TLSKeyFile); err != nil {
			return fmt.Errorf("config %s: key \"submission.tls_cert_file\": %w", cfg.Path, err)
		}
	}
	if _, _, err := server.TrustRoots(cfg); err != nil {
		return err
	}
	if cfg.TLSRPT.Enabled && cfg.TLSRPT.DKIMKeyFile != "" {
		if _, err := tlsrpt.LoadDKIMKey(cfg.TLSRPT.DKIMKeyFile); err != nil {
			return fmt.Errorf("config %s: key \"tlsrpt.dkim_key_file\": %w", cfg.Path, err)
		}
	}
	return nil
}

// configWarnings are the warnings serve logs at start for cfg
// (tlsrpt_no_dkim, tlsrpt_contact_domain, AUTH impossible), in words.
func configWarnings(cfg *config.Config) []string {
	var out []string
	sub := cfg.Submission
	if len(sub.Users) > 0 && sub.TLSCertFile == "" && sub.RequireTLSForAuth {
		out = append(out, `key "submission.users": AUTH is impossible: no submission.tls_cert_file and require_tls_for_auth is set`)
	}
	if cfg.TLSRPT.Enabled {
		if cfg.TLSRPT.DKIMKeyFile == "" {
			out = append(out, `key "tlsrpt.dkim_key_file": mailed TLS reports are sent without a DKIM signature; RFC 8460 §3 lets receivers ignore them`)
		}
		if !tlsrpt.ContactMatchesSubmitter(cfg.TLSRPT.ContactInfo, cfg.Hostname) {
			out = append(out, fmt.Sprintf(`key "tlsrpt.contact_info": %q is not in the hostname's domain %q or its organisational parent (RFC 8460 §5.3)`,
				cfg.TLSRPT.ContactInfo, cfg.Hostname))
		}
	}
	return out
}
