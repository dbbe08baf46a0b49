package relay

import (
	"crypto/rand"
	"crypto/tls"
	"fmt"
	"net/netip"
	"strings"

	"golang.org/x/crypto/bcrypt"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/domain"
)

// access is the part of the [submission] configuration that Reload
// replaces while the server runs: who may log in, who may relay without
// logging in, which senders are allowed, and the certificate. It is never
// modified once built; a reload swaps the whole value, so a session sees
// either the old or the new one, never a mix.
type access struct {
	users     map[string][]byte
	dummyHash []byte // compared against for unknown users (timing)

	requireTLSForAuth bool
	trusted           []netip.Prefix

	allowedAddrs   map[string]bool // lower-cased
	allowedDomains map[string]bool // lower-cased, no trailing dot

	cert *tls.Certificate // nil when no certificate is configured
}

// newAccess reads the reloadable part of sub: it parses the password
// hashes and loads the certificate files.
func newAccess(sub config.Submission) (*access, error) {
	a := &access{
		users:             map[string][]byte{},
		requireTLSForAuth: sub.RequireTLSForAuth,
		trusted:           append([]netip.Prefix(nil), sub.TrustedPrefixes...),
		allowedAddrs:      map[string]bool{},
		allowedDomains:    map[string]bool{},
	}
	if sub.TLSCertFile != "" || sub.TLSKeyFile != "" {
		cert, err := tls.LoadX509KeyPair(sub.TLSCertFile, sub.TLSKeyFile)
		if err != nil {
			return nil, fmt.Errorf("relay: load submission.tls_cert_file %s: %w", sub.TLSCertFile, err)
		}
		a.cert = &cert
	}
	cost := bcrypt.MinCost
	for _, u := range sub.Users {
		c, err := bcrypt.Cost([]byte(u.PasswordHash))
		if err != nil {
			return nil, fmt.Errorf("relay: submission.users %q: password_hash: %w", u.Username, err)
		}
		cost = max(cost, c)
		a.users[u.Username] = []byte(u.PasswordHash)
	}
	if len(a.users) > 0 {
		// A hash of a random password at the users' cost: an unknown
		// user costs as much time as a wrong password.
		pw := make([]byte, 18)
		_, _ = rand.Read(pw)
		h, err := bcrypt.GenerateFromPassword(pw, cost)
		if err != nil {
			return nil, fmt.Errorf("relay: dummy hash: %w", err)
		}
		a.dummyHash = h
	}
	for _, s := range sub.AllowedSenders {
		s = strings.ToLower(strings.TrimSpace(s))
		switch {
		case s == "":
		case strings.HasPrefix(s, "@"):
			a.allowedDomains[domain.Key(s[1:])] = true
		case strings.Contains(s, "@"):
			a.allowedAddrs[s] = true
		default:
			a.allowedDomains[domain.Key(s)] = true
		}
	}
	return a, nil
}

// Reload replaces the users, the certificate (re-read from
// submission.tls_cert_file and tls_key_file), trusted_networks,
// allowed_senders and require_tls_for_auth with those of cfg. Sessions in
// progress keep their state: a client already logged in stays logged in;
// the next AUTH, MAIL or TLS handshake uses the new values. On error
// nothing changes.
//
// Listeners, limits and the presence of a certificate (STARTTLS offered or
// not) are fixed at New: restart lists the keys of cfg that differ there
// and take effect only after a restart.
func (s *Server) Reload(cfg *config.Config) (restart []string, err error) {
	if cfg == nil {
		return nil, fmt.Errorf("relay: reload: no configuration")
	}
	sub := cfg.Submission
	a, err := newAccess(sub)
	if err != nil {
		return nil, err
	}
	old := s.acc.Load()
	if (a.cert == nil) != (s.tlsConfig == nil) {
		// go-smtp's TLSConfig decides whether STARTTLS is offered at
		// all; it is set once. Keep the old certificate (or none).
		restart = append(restart, "submission.tls_cert_file")
		a.cert = old.cert
	}
	if cfg.Hostname != s.hostname {
		restart = append(restart, "hostname")
	}
	if !equalStrings(sub.Listen, s.sub.Listen) {
		restart = append(restart, "submission.listen")
	}
	if !equalStrings(sub.ImplicitTLSListen, s.sub.ImplicitTLSListen) {
		restart = append(restart, "submission.implicit_tls_listen")
	}
	for _, k := range []struct {
		key     string
		changed bool
	}{
		{"submission.max_message_bytes", sub.MaxMessageBytes != s.sub.MaxMessageBytes},
		{"submission.max_recipients", sub.MaxRecipients != s.sub.MaxRecipients},
		{"submission.max_connections", sub.MaxConnections != s.sub.MaxConnections},
		{"submission.max_connections_per_ip", sub.MaxConnectionsPerIP != s.sub.MaxConnectionsPerIP},
		{"submission.data_timeout", sub.DataTimeout != s.sub.DataTimeout},
	} {
		if k.changed {
			restart = append(restart, k.key)
		}
	}
	s.acc.Store(a)
	if len(a.users) > 0 && s.tlsConfig == nil && a.requireTLSForAuth {
		s.log.Warn("submission users configured but AUTH is impossible: no TLS certificate and require_tls_for_auth is set")
	}
	return restart, nil
}

func equalStrings(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
