// Package config loads and checks stsrelay's TOML configuration. The keys
// are the contract in interface.md; config.example.toml documents each one
// with its default.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/internal/domain"
)

// Duration is a time.Duration written in TOML as a Go duration string
// ("30s", "5m", "120h").
type Duration struct{ time.Duration }

// UnmarshalText parses a Go duration string.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("bad duration %q (want a Go duration like \"30s\", \"5m\", \"120h\")", string(b))
	}
	if v < 0 {
		return fmt.Errorf("bad duration %q: negative", string(b))
	}
	d.Duration = v
	return nil
}

// MarshalText writes the duration as a Go duration string.
func (d Duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// Config is the whole configuration file.
type Config struct {
	Hostname   string     `toml:"hostname"`
	DataDir    string     `toml:"data_dir"`
	Submission Submission `toml:"submission"`
	Queue      Queue      `toml:"queue"`
	DNS        DNS        `toml:"dns"`
	Delivery   Delivery   `toml:"delivery"`
	TLS        TLS        `toml:"tls"`
	MTASTS     MTASTS     `toml:"mtasts"`
	TLSRPT     TLSRPT     `toml:"tlsrpt"`
	DANE       DANE       `toml:"dane"`
	Cluster    Cluster    `toml:"cluster"`
	Log        Log        `toml:"log"`
	Metrics    Metrics    `toml:"metrics"`
	// Routes send chosen domains to a fixed next hop instead of their
	// MX; TLSPolicies override the TLS requirements of chosen domains.
	Routes      []Route     `toml:"route"`
	TLSPolicies []TLSPolicy `toml:"tls_policy"`

	// Path is the file the configuration was read from.
	Path string `toml:"-"`
}

// Submission configures the listeners applications send to.
type Submission struct {
	Listen            []string `toml:"listen"`
	ImplicitTLSListen []string `toml:"implicit_tls_listen"`
	TLSCertFile       string   `toml:"tls_cert_file"`
	TLSKeyFile        string   `toml:"tls_key_file"`
	RequireTLSForAuth bool     `toml:"require_tls_for_auth"`
	MaxMessageBytes   int64    `toml:"max_message_bytes"`
	MaxRecipients     int      `toml:"max_recipients"`
	AllowedSenders    []string `toml:"allowed_senders"`
	TrustedNetworks   []string `toml:"trusted_networks"`
	// MaxConnections bounds the open submission connections in all;
	// MaxConnectionsPerIP those from one client address (an IPv6
	// client's /64). Beyond either a client gets 421 4.7.0.
	MaxConnections      int `toml:"max_connections"`
	MaxConnectionsPerIP int `toml:"max_connections_per_ip"`
	// DataTimeout is how long DATA or BDAT may go without progress
	// (RFC 5321 §4.5.3.2.5 and .6); every read that brings bytes
	// starts it again.
	DataTimeout Duration `toml:"data_timeout"`
	Users       []User   `toml:"users"`

	// TrustedPrefixes is TrustedNetworks parsed.
	TrustedPrefixes []netip.Prefix `toml:"-"`
}

// User is one account that may AUTH at submission.
type User struct {
	Username     string `toml:"username"`
	PasswordHash string `toml:"password_hash"`
}

// Queue configures the delivery schedule.
type Queue struct {
	Workers              int        `toml:"workers"`
	PerDomainConcurrency int        `toml:"per_domain_concurrency"`
	RetrySchedule        []Duration `toml:"retry_schedule"`
	MaxQueueTime         Duration   `toml:"max_queue_time"`
	DelayNoticeAfter     Duration   `toml:"delay_notice_after"`
	// MaxDiskBytes is the queue's high-water mark on disk (0: none);
	// MinFreeDiskBytes a floor on its file system's free space (0:
	// none). Beyond either, submission answers 452 4.3.1.
	MaxDiskBytes     int64 `toml:"max_disk_bytes"`
	MinFreeDiskBytes int64 `toml:"min_free_disk_bytes"`
}

// DNS configures the resolver.
type DNS struct {
	Servers []string `toml:"servers"`
	Timeout Duration `toml:"timeout"`
	// CacheMaxTTL caps how long an answer is cached (and the TTL reported
	// to callers); answers are otherwise kept for their own TTL.
	CacheMaxTTL Duration `toml:"cache_max_ttl"`
	// CacheEntries bounds the answer cache (LRU); 0 disables it.
	CacheEntries int `toml:"cache_entries"`
	// TrustAD says when the AD bit of answers is believed, which DANE
	// needs (RFC 6840 §5.8): "loopback" (only when every server is on a
	// loopback address: a validating resolver on this host), "always" or
	// "never" (dnsclient.ParseTrustAD).
	TrustAD string `toml:"trust_ad"`
}

// Delivery configures outbound SMTP sessions.
type Delivery struct {
	Port           int      `toml:"port"`
	ConnectTimeout Duration `toml:"connect_timeout"`
	CommandTimeout Duration `toml:"command_timeout"`
	LocalAddresses []string `toml:"local_addresses"`
	// ConnectionReuseLimit is how many messages one SMTP session may carry.
	ConnectionReuseLimit int `toml:"connection_reuse_limit"`
	// ConnectionIdleTimeout is how long an idle session is kept for reuse.
	ConnectionIdleTimeout Duration `toml:"connection_idle_timeout"`
	// DataTimeout bounds each body write that makes no progress (RFC
	// 5321 §4.5.3.2.5): a stalled MX frees its worker after it.
	DataTimeout Duration `toml:"data_timeout"`
	// ShutdownTimeout is how long deliveries in flight at SIGTERM may
	// take to finish; then their connections are cut and their jobs
	// requeued without counting an attempt.
	ShutdownTimeout Duration `toml:"shutdown_timeout"`
}

// TLS holds trust settings shared by MX and policy-host checks.
type TLS struct {
	ExtraRootCAFile string `toml:"extra_root_ca_file"`
}

// MTASTS configures RFC 8461 policy handling.
type MTASTS struct {
	Enabled             bool     `toml:"enabled"`
	HTTPSPort           int      `toml:"https_port"`
	FetchTimeout        Duration `toml:"fetch_timeout"`
	MaxPolicyBytes      int64    `toml:"max_policy_bytes"`
	RefreshBeforeExpiry Duration `toml:"refresh_before_expiry"`
}

// TLSRPT configures RFC 8460 reporting.
type TLSRPT struct {
	Enabled          bool     `toml:"enabled"`
	DKIMDomain       string   `toml:"dkim_domain"`
	DKIMSelector     string   `toml:"dkim_selector"`
	DKIMKeyFile      string   `toml:"dkim_key_file"`
	OrganizationName string   `toml:"organization_name"`
	ContactInfo      string   `toml:"contact_info"`
	From             string   `toml:"from"`
	Interval         Duration `toml:"interval"`
	// AllowPrivateRUA lets https: report endpoints be on loopback,
	// private (RFC 1918, fc00::/7), link-local and other non-public
	// addresses; off by default, since a domain's DNS chooses the rua.
	AllowPrivateRUA bool `toml:"allow_private_rua"`
}

// DANE configures DANE for SMTP (RFC 7672).
type DANE struct {
	// Enabled authenticates MX hosts by their DNSSEC-signed TLSA records.
	// It takes effect only where dns.trust_ad trusts the resolver.
	Enabled bool `toml:"enabled"`
}

// Cluster configures fleet mode: several relays sharing one queue, one
// MTA-STS cache and one TLS-RPT reporter on NATS JetStream. An empty
// NATSURLs means standalone.
type Cluster struct {
	NATSURLs        []string `toml:"nats_urls"`
	CredentialsFile string   `toml:"credentials_file"`
	// NodeName names this relay in the fleet (default: hostname).
	NodeName string `toml:"node_name"`
	// Replicas is how many NATS servers store each message (a 250 waits
	// for a quorum of them).
	Replicas int `toml:"replicas"`
	// StreamPrefix names the fleet's streams, buckets and subjects.
	StreamPrefix string `toml:"stream_prefix"`
	// LeaseTime is how long a node holds a message it delivers without
	// renewing the lease (it renews every third of it): when a node
	// dies, its messages go to another node this long after.
	LeaseTime Duration `toml:"lease_time"`
}

// Enabled reports whether fleet mode is on.
func (c Cluster) Enabled() bool { return len(c.NATSURLs) > 0 }

// Log configures the zap logger.
type Log struct {
	Level  string `toml:"level"`
	Format string `toml:"format"`
	Output string `toml:"output"`
}

// Metrics configures the Prometheus endpoint.
type Metrics struct {
	Listen string `toml:"listen"`
}

// Route is one [[route]]: mail for Domains goes to NextHop instead of
// the domains' MX hosts.
type Route struct {
	// Domains are recipient domains (A-labels, exact match); "*" is
	// every domain no other route names.
	Domains []string `toml:"domains"`
	// NextHop is "host", "host:port" or "[IP]:port"; the port defaults
	// to delivery.port.
	NextHop string `toml:"next_hop"`
	// AuthUsername and AuthPasswordFile: AUTH PLAIN at the next hop,
	// only after STARTTLS with a verified certificate.
	AuthUsername     string `toml:"auth_username"`
	AuthPasswordFile string `toml:"auth_password_file"`
	// RequireTLS: STARTTLS and a certificate verified for the next hop's
	// name, or no delivery (unless a [[tls_policy]] for the domain says
	// otherwise). Default true; see TLSRequired.
	RequireTLS *bool `toml:"require_tls"`

	// Host and Port are NextHop parsed; IP is set for "[IP]:port".
	Host string `toml:"-"`
	Port int    `toml:"-"`
	IP   net.IP `toml:"-"`
}

// TLSRequired is require_tls with its default (true).
func (r *Route) TLSRequired() bool { return r.RequireTLS == nil || *r.RequireTLS }

// TLSPolicy is one [[tls_policy]]: a per-domain TLS override, like
// Postfix's smtp_tls_policy_maps.
type TLSPolicy struct {
	Domains []string `toml:"domains"`
	// Security is "dane", "verify", "encrypt", "may" or "none".
	Security string `toml:"security"`
	// OverridePolicy lets a Security weaker than verify set aside an
	// enforce MTA-STS policy (logged as a warning at every use).
	OverridePolicy bool `toml:"override_policy"`
}

// Default returns the configuration with every default filled in.
func Default() *Config {
	host, _ := os.Hostname()
	if host == "" {
		host = "localhost"
	}
	return &Config{
		Hostname: host,
		DataDir:  "/var/lib/stsrelay",
		Submission: Submission{
			Listen:              []string{"127.0.0.1:587"},
			RequireTLSForAuth:   true,
			MaxMessageBytes:     26214400,
			MaxRecipients:       100,
			MaxConnections:      1000,
			MaxConnectionsPerIP: 20,
			DataTimeout:         Duration{3 * time.Minute},
		},
		Queue: Queue{
			Workers:              32,
			PerDomainConcurrency: 20,
			RetrySchedule: []Duration{{5 * time.Minute}, {10 * time.Minute}, {30 * time.Minute},
				{time.Hour}, {2 * time.Hour}, {4 * time.Hour}},
			MaxQueueTime:     Duration{120 * time.Hour},
			DelayNoticeAfter: Duration{4 * time.Hour},
		},
		DNS: DNS{Timeout: Duration{5 * time.Second}, CacheMaxTTL: Duration{time.Hour}, CacheEntries: 100000,
			TrustAD: dnsclient.TrustADLoopback},
		Delivery: Delivery{
			Port:                  25,
			ConnectTimeout:        Duration{30 * time.Second},
			CommandTimeout:        Duration{5 * time.Minute},
			ConnectionReuseLimit:  100,
			ConnectionIdleTimeout: Duration{30 * time.Second},
			DataTimeout:           Duration{3 * time.Minute},
			ShutdownTimeout:       Duration{30 * time.Second},
		},
		MTASTS: MTASTS{
			Enabled:             true,
			HTTPSPort:           443,
			FetchTimeout:        Duration{10 * time.Second},
			MaxPolicyBytes:      65536,
			RefreshBeforeExpiry: Duration{time.Hour},
		},
		TLSRPT: TLSRPT{
			Enabled:          true,
			OrganizationName: "Example Org",
			ContactInfo:      "mailto:postmaster@example.net",
			From:             "tlsrpt-noreply@example.net",
			Interval:         Duration{24 * time.Hour},
		},
		DANE:    DANE{Enabled: true},
		Cluster: Cluster{Replicas: 3, StreamPrefix: "stsrelay", LeaseTime: Duration{2 * time.Minute}},
		Log:     Log{Level: "info", Format: "json", Output: "stderr"},
	}
}

// Load reads path strictly: an unknown key, a value of the wrong type or a
// value that fails validation is an error naming the file, the key and,
// where known, the line.
func Load(path string) (*Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("config: %w", err)
	}
	return Parse(path, data)
}

// Parse is Load on bytes already read; path is used in messages only.
func Parse(path string, data []byte) (*Config, error) {
	cfg := Default()
	dec := toml.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(cfg); err != nil {
		var strict *toml.StrictMissingError
		if errors.As(err, &strict) && len(strict.Errors) > 0 {
			e := strict.Errors[0]
			line, _ := e.Position()
			return nil, fmt.Errorf("config %s:%d: unknown key %q", path, line, strings.Join(e.Key(), "."))
		}
		var de *toml.DecodeError
		if errors.As(err, &de) {
			line, _ := de.Position()
			key := strings.Join(de.Key(), ".")
			msg := strings.TrimPrefix(de.Error(), "toml: ")
			if key != "" {
				return nil, fmt.Errorf("config %s:%d: key %q: %s", path, line, key, msg)
			}
			return nil, fmt.Errorf("config %s:%d: %s", path, line, msg)
		}
		// go-toml hands the raw text of a number or boolean to a
		// TextUnmarshaler (Duration) and returns its error without key or
		// position: find the key ourselves.
		if kerr := checkDurationKinds(data); kerr != nil {
			err = kerr
		}
		var ke *keyError
		if errors.As(err, &ke) {
			if line := keyLine(data, ke.key); line > 0 {
				return nil, fmt.Errorf("config %s:%d: %w", path, line, err)
			}
		}
		return nil, fmt.Errorf("config %s: %v", path, err)
	}
	cfg.Path = path
	if err := cfg.validate(); err != nil {
		var ke *keyError
		if errors.As(err, &ke) {
			if line := keyLine(data, ke.key); line > 0 {
				return nil, fmt.Errorf("config %s:%d: %w", path, line, err)
			}
		}
		return nil, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

var durationType = reflect.TypeOf(Duration{})

// checkDurationKinds returns a keyError for the first Duration key of data
// whose value is not a string.
func checkDurationKinds(data []byte) error {
	var raw map[string]any
	if toml.Unmarshal(data, &raw) != nil {
		return nil
	}
	return walkDurationKinds(raw, reflect.TypeOf(Config{}), "")
}

func walkDurationKinds(raw map[string]any, t reflect.Type, prefix string) error {
	for i := range t.NumField() {
		f := t.Field(i)
		tag := f.Tag.Get("toml")
		v, ok := raw[tag]
		if tag == "" || tag == "-" || !ok {
			continue
		}
		key := tag
		if prefix != "" {
			key = prefix + "." + tag
		}
		switch {
		case f.Type == durationType:
			if _, ok := v.(string); !ok {
				return keyErr(key, "want a duration string like \"30s\", got %v", v)
			}
		case f.Type == reflect.SliceOf(durationType):
			vs, _ := v.([]any)
			for _, e := range vs {
				if _, ok := e.(string); !ok {
					return keyErr(key, "want duration strings like \"30s\", got %v", e)
				}
			}
		case f.Type.Kind() == reflect.Struct:
			if m, ok := v.(map[string]any); ok {
				if err := walkDurationKinds(m, f.Type, key); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// mappedAsIPv4 suggests, for the error message, the IPv4 form of an
// IPv4-mapped prefix (::ffff:192.0.2.0/120 is 192.0.2.0/24); "" when it
// has none (fewer than 96 bits).
func mappedAsIPv4(p netip.Prefix) string {
	if p.Bits() < 96 {
		return ""
	}
	return fmt.Sprintf(" (%s)", netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96).Masked())
}

// keyError is a value that failed validation; key is its dotted name.
type keyError struct{ key, msg string }

func (e *keyError) Error() string { return fmt.Sprintf("key %q: %s", e.key, e.msg) }

func keyErr(key, format string, args ...any) error {
	return &keyError{key: key, msg: fmt.Sprintf(format, args...)}
}

// keyLine returns the 1-based line of data where key ("queue.workers",
// "submission.users[1].password_hash") is set or, when it is not written
// there (a default that conflicts with another key), the line of its
// table header; 0 when neither is found. It reads the plain
// "[table]" / "[[array]]" / "key = value" layout of config files; dotted
// keys and inline tables give 0 or the table line.
func keyLine(data []byte, key string) int {
	table, leaf := "", key
	if i := strings.LastIndexByte(key, '.'); i >= 0 {
		table, leaf = key[:i], key[i+1:]
	}
	idx := -1 // submission.users[1] is the second [[submission.users]]
	if i := strings.IndexByte(table, '['); i >= 0 && strings.HasSuffix(table, "]") {
		if n, err := strconv.Atoi(table[i+1 : len(table)-1]); err == nil {
			idx = n
		}
		table = table[:i]
	}
	cur, curIdx, tableLine := "", -1, 0
	seen := map[string]int{}
	for i, line := range strings.Split(string(data), "\n") {
		l := strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(l, "[["):
			end := strings.Index(l, "]]")
			if end < 0 {
				continue
			}
			cur = strings.TrimSpace(l[2:end])
			curIdx = seen[cur]
			seen[cur]++
		case strings.HasPrefix(l, "["):
			end := strings.IndexByte(l, ']')
			if end < 0 {
				continue
			}
			cur, curIdx = strings.TrimSpace(l[1:end]), -1
		default:
			if cur == table && curIdx == idx {
				if name, _, ok := strings.Cut(l, "="); ok && strings.Trim(strings.TrimSpace(name), `"'`) == leaf {
					return i + 1
				}
			}
			continue
		}
		if cur == table && curIdx == idx && tableLine == 0 {
			tableLine = i + 1
		}
	}
	return tableLine
}

// validate checks the loaded configuration one section after another, in
// a fixed order so that a file with several mistakes always reports the
// same first one, and fills in the values derived from it (trusted
// prefixes, the normalised dns.trust_ad, the cluster node name).
func (c *Config) validate() error {
	for _, check := range []func() error{
		c.validateIdentity,
		c.validateSubmissionListeners,
		c.validateFiles,
		c.validateSubmissionLimits,
		c.validateTrustedNetworks,
		c.validateSubmissionSessions,
		c.validateUsers,
		c.validateQueue,
		c.validateDNS,
		c.validateDelivery,
		c.validateMTASTS,
		c.validateTLSRPT,
		c.validateLog,
		c.validateMetrics,
		c.validateCluster,
		c.validateRouting,
	} {
		if err := check(); err != nil {
			return err
		}
	}
	return nil
}

// validateIdentity checks the top-level hostname and data_dir.
func (c *Config) validateIdentity() error {
	if c.Hostname == "" || strings.ContainsFunc(c.Hostname, func(r rune) bool { return r <= ' ' || r >= 0x7f || r == '/' }) {
		return keyErr("hostname", "must be a host name, got %q", c.Hostname)
	}
	if c.DataDir == "" {
		return keyErr("data_dir", "must not be empty")
	}
	return nil
}

// validateSubmissionListeners checks the [submission] listen addresses and
// that implicit TLS has a certificate and key to serve.
func (c *Config) validateSubmissionListeners() error {
	s := &c.Submission
	if len(s.Listen) == 0 && len(s.ImplicitTLSListen) == 0 {
		return keyErr("submission.listen", "no listener configured (set submission.listen or submission.implicit_tls_listen)")
	}
	for _, l := range s.Listen {
		if err := checkListen(l); err != nil {
			return keyErr("submission.listen", "%v", err)
		}
	}
	for _, l := range s.ImplicitTLSListen {
		if err := checkListen(l); err != nil {
			return keyErr("submission.implicit_tls_listen", "%v", err)
		}
	}
	if (s.TLSCertFile == "") != (s.TLSKeyFile == "") {
		return keyErr("submission.tls_cert_file", "tls_cert_file and tls_key_file must be set together")
	}
	if len(s.ImplicitTLSListen) > 0 && s.TLSCertFile == "" {
		return keyErr("submission.implicit_tls_listen", "needs submission.tls_cert_file and tls_key_file")
	}
	return nil
}

// validateFiles checks that each file named by [submission], [tls] and
// [tlsrpt] can be read; an empty name is left alone.
func (c *Config) validateFiles() error {
	s := &c.Submission
	for _, kf := range []struct{ key, file string }{
		{"submission.tls_cert_file", s.TLSCertFile}, {"submission.tls_key_file", s.TLSKeyFile},
		{"tls.extra_root_ca_file", c.TLS.ExtraRootCAFile}, {"tlsrpt.dkim_key_file", c.TLSRPT.DKIMKeyFile},
	} {
		if kf.file == "" {
			continue
		}
		if _, err := os.Stat(kf.file); err != nil {
			return keyErr(kf.key, "cannot read file: %v", err)
		}
	}
	return nil
}

// validateSubmissionLimits checks the [submission] message size and
// recipient limits.
func (c *Config) validateSubmissionLimits() error {
	s := &c.Submission
	if s.MaxMessageBytes <= 0 {
		return keyErr("submission.max_message_bytes", "must be positive, got %d", s.MaxMessageBytes)
	}
	if s.MaxRecipients <= 0 {
		return keyErr("submission.max_recipients", "must be positive, got %d", s.MaxRecipients)
	}
	return nil
}

// validateTrustedNetworks parses submission.trusted_networks (CIDR
// prefixes or bare addresses) into Submission.TrustedPrefixes.
func (c *Config) validateTrustedNetworks() error {
	s := &c.Submission
	s.TrustedPrefixes = nil
	for _, n := range s.TrustedNetworks {
		p, err := netip.ParsePrefix(n)
		if err != nil {
			a, err2 := netip.ParseAddr(n)
			if err2 != nil {
				return keyErr("submission.trusted_networks", "bad CIDR %q", n)
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		// Client addresses are unmapped before they are compared
		// (::ffff:192.0.2.2 is 192.0.2.2), so a mapped prefix would
		// never match: refuse it rather than trust nobody silently.
		if p.Addr().Is4In6() {
			return keyErr("submission.trusted_networks", "%q is an IPv4-mapped IPv6 prefix, which never matches: client addresses are compared unmapped; write it as IPv4%s", n, mappedAsIPv4(p))
		}
		s.TrustedPrefixes = append(s.TrustedPrefixes, p.Masked())
	}
	return nil
}

// validateSubmissionSessions checks the [submission] connection limits
// and the DATA timeout.
func (c *Config) validateSubmissionSessions() error {
	s := &c.Submission
	if s.MaxConnections <= 0 {
		return keyErr("submission.max_connections", "must be positive, got %d", s.MaxConnections)
	}
	if s.MaxConnectionsPerIP <= 0 {
		return keyErr("submission.max_connections_per_ip", "must be positive, got %d", s.MaxConnectionsPerIP)
	}
	if s.MaxConnectionsPerIP > s.MaxConnections {
		return keyErr("submission.max_connections_per_ip", "must not exceed submission.max_connections (%d), got %d", s.MaxConnections, s.MaxConnectionsPerIP)
	}
	if s.DataTimeout.Duration <= 0 {
		return keyErr("submission.data_timeout", "must be positive, got %s", s.DataTimeout.Duration)
	}
	return nil
}

// validateUsers checks [[submission.users]]: a name given once, a bcrypt
// password hash.
func (c *Config) validateUsers() error {
	seen := map[string]bool{}
	for i, u := range c.Submission.Users {
		if u.Username == "" {
			return keyErr(fmt.Sprintf("submission.users[%d].username", i), "must not be empty")
		}
		if seen[u.Username] {
			return keyErr(fmt.Sprintf("submission.users[%d].username", i), "duplicate user %q", u.Username)
		}
		seen[u.Username] = true
		if !strings.HasPrefix(u.PasswordHash, "$2") {
			return keyErr(fmt.Sprintf("submission.users[%d].password_hash", i), "must be a bcrypt hash (use `stsrelay hash-password`)")
		}
	}
	return nil
}

// validateQueue checks [queue]: workers, the retry schedule and the disk
// limits.
func (c *Config) validateQueue() error {
	q := &c.Queue
	if q.Workers <= 0 {
		return keyErr("queue.workers", "must be positive, got %d", q.Workers)
	}
	if q.PerDomainConcurrency <= 0 {
		return keyErr("queue.per_domain_concurrency", "must be positive, got %d", q.PerDomainConcurrency)
	}
	if len(q.RetrySchedule) == 0 {
		return keyErr("queue.retry_schedule", "must list at least one interval")
	}
	for _, d := range q.RetrySchedule {
		if d.Duration <= 0 {
			return keyErr("queue.retry_schedule", "intervals must be positive")
		}
	}
	if q.MaxQueueTime.Duration <= 0 {
		return keyErr("queue.max_queue_time", "must be positive")
	}
	if q.MaxDiskBytes < 0 {
		return keyErr("queue.max_disk_bytes", "must not be negative (0 means no limit), got %d", q.MaxDiskBytes)
	}
	if q.MaxDiskBytes > 0 && q.MaxDiskBytes < 16<<20 {
		return keyErr("queue.max_disk_bytes", "must be at least 16 MiB (16777216) when set, got %d", q.MaxDiskBytes)
	}
	if q.MinFreeDiskBytes < 0 {
		return keyErr("queue.min_free_disk_bytes", "must not be negative (0 means no floor), got %d", q.MinFreeDiskBytes)
	}
	return nil
}

// validateDNS checks [dns] and normalises dns.trust_ad.
func (c *Config) validateDNS() error {
	for _, srv := range c.DNS.Servers {
		if _, _, err := net.SplitHostPort(srv); err != nil {
			return keyErr("dns.servers", "want host:port, got %q", srv)
		}
	}
	if c.DNS.Timeout.Duration <= 0 {
		return keyErr("dns.timeout", "must be positive")
	}
	if c.DNS.CacheMaxTTL.Duration <= 0 {
		return keyErr("dns.cache_max_ttl", "must be positive")
	}
	if c.DNS.CacheEntries < 0 {
		return keyErr("dns.cache_entries", "must not be negative (0 disables the cache), got %d", c.DNS.CacheEntries)
	}
	trust, err := dnsclient.ParseTrustAD(c.DNS.TrustAD)
	if err != nil {
		return keyErr("dns.trust_ad", "must be %q, %q or %q, got %q", dnsclient.TrustADLoopback, dnsclient.TrustADAlways, dnsclient.TrustADNever, c.DNS.TrustAD)
	}
	c.DNS.TrustAD = trust
	return nil
}

// validateDelivery checks [delivery]: the port, timeouts, local addresses
// and connection reuse.
func (c *Config) validateDelivery() error {
	d := &c.Delivery
	if d.Port <= 0 || d.Port > 65535 {
		return keyErr("delivery.port", "must be 1-65535, got %d", d.Port)
	}
	if d.ConnectTimeout.Duration <= 0 || d.CommandTimeout.Duration <= 0 {
		return keyErr("delivery.connect_timeout", "timeouts must be positive")
	}
	for _, a := range d.LocalAddresses {
		if net.ParseIP(a) == nil {
			return keyErr("delivery.local_addresses", "not an IP address: %q", a)
		}
	}
	if d.ConnectionReuseLimit <= 0 {
		return keyErr("delivery.connection_reuse_limit", "must be positive")
	}
	if d.DataTimeout.Duration <= 0 {
		return keyErr("delivery.data_timeout", "must be positive")
	}
	if d.ShutdownTimeout.Duration <= 0 {
		return keyErr("delivery.shutdown_timeout", "must be positive")
	}
	return nil
}

// validateMTASTS checks [mtasts]: the HTTPS port and the fetch limits.
func (c *Config) validateMTASTS() error {
	m := &c.MTASTS
	if m.HTTPSPort <= 0 || m.HTTPSPort > 65535 {
		return keyErr("mtasts.https_port", "must be 1-65535, got %d", m.HTTPSPort)
	}
	if m.FetchTimeout.Duration <= 0 {
		return keyErr("mtasts.fetch_timeout", "must be positive")
	}
	if m.MaxPolicyBytes <= 0 {
		return keyErr("mtasts.max_policy_bytes", "must be positive")
	}
	return nil
}

// validateTLSRPT checks [tlsrpt]: the report interval and that the DKIM
// settings come as a set.
func (c *Config) validateTLSRPT() error {
	r := &c.TLSRPT
	if r.Interval.Duration <= 0 {
		return keyErr("tlsrpt.interval", "must be positive")
	}
	if n := countSet(r.DKIMDomain, r.DKIMSelector, r.DKIMKeyFile); n != 0 && n != 3 {
		return keyErr("tlsrpt.dkim_domain", "dkim_domain, dkim_selector and dkim_key_file must be set together")
	}
	return nil
}

// validateLog checks [log]: a known level and format, and an output.
func (c *Config) validateLog() error {
	switch c.Log.Level {
	case "debug", "info", "warn", "error":
	default:
		return keyErr("log.level", "must be debug, info, warn or error, got %q", c.Log.Level)
	}
	switch c.Log.Format {
	case "json", "console":
	default:
		return keyErr("log.format", "must be json or console, got %q", c.Log.Format)
	}
	if c.Log.Output == "" {
		return keyErr("log.output", "must be stderr, stdout or a file path")
	}
	return nil
}

// validateMetrics checks [metrics]: the listen address, when set.
func (c *Config) validateMetrics() error {
	if c.Metrics.Listen != "" {
		if err := checkListen(c.Metrics.Listen); err != nil {
			return keyErr("metrics.listen", "%v", err)
		}
	}
	return nil
}

// validateCluster checks [cluster].
func (c *Config) validateCluster() error {
	cl := &c.Cluster
	for _, u := range cl.NATSURLs {
		if !strings.Contains(u, "://") {
			return keyErr("cluster.nats_urls", "want URLs such as nats://host:4222, got %q", u)
		}
	}
	if cl.Replicas < 1 || cl.Replicas > 5 {
		return keyErr("cluster.replicas", "must be 1 to 5 (JetStream's limit), got %d", cl.Replicas)
	}
	if cl.StreamPrefix == "" {
		return keyErr("cluster.stream_prefix", "must not be empty")
	}
	if cl.LeaseTime.Duration < time.Second {
		return keyErr("cluster.lease_time", "must be at least 1s, got %s", cl.LeaseTime.Duration)
	}
	for _, r := range cl.StreamPrefix {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-') {
			return keyErr("cluster.stream_prefix", "may hold letters, digits, '-' and '_' only, got %q", cl.StreamPrefix)
		}
	}
	if cl.CredentialsFile != "" {
		if _, err := os.Stat(cl.CredentialsFile); err != nil {
			return keyErr("cluster.credentials_file", "%v", err)
		}
	}
	if cl.NodeName == "" {
		cl.NodeName = c.Hostname
	}
	return nil
}

// validateRouting checks [[route]] and [[tls_policy]]: each domain named
// once per table, next hops that parse, password files that exist.
func (c *Config) validateRouting() error {
	seen := map[string]bool{}
	for i := range c.Routes {
		r := &c.Routes[i]
		key := func(k string) string { return fmt.Sprintf("route[%d].%s", i, k) }
		if err := checkDomains(r.Domains, seen, true); err != nil {
			return keyErr(key("domains"), "%v", err)
		}
		host, port, ip, err := ParseNextHop(r.NextHop, c.Delivery.Port)
		if err != nil {
			return keyErr(key("next_hop"), "%v", err)
		}
		r.Host, r.Port, r.IP = host, port, ip
		if (r.AuthUsername == "") != (r.AuthPasswordFile == "") {
			return keyErr(key("auth_username"), "auth_username and auth_password_file must be set together")
		}
		if r.AuthPasswordFile != "" {
			if _, err := os.Stat(r.AuthPasswordFile); err != nil {
				return keyErr(key("auth_password_file"), "cannot read file: %v", err)
			}
		}
	}
	seen = map[string]bool{}
	for i := range c.TLSPolicies {
		p := &c.TLSPolicies[i]
		if err := checkDomains(p.Domains, seen, false); err != nil {
			return keyErr(fmt.Sprintf("tls_policy[%d].domains", i), "%v", err)
		}
		switch p.Security {
		case "dane", "verify", "encrypt", "may", "none":
		default:
			return keyErr(fmt.Sprintf("tls_policy[%d].security", i), "must be dane, verify, encrypt, may or none, got %q", p.Security)
		}
	}
	return nil
}

// checkDomains checks one table's domains: lower-case names, each at
// most once across the table, "*" only where allowed. Names are stored
// lower-cased.
func checkDomains(ds []string, seen map[string]bool, wildcard bool) error {
	if len(ds) == 0 {
		return errors.New("must list at least one domain")
	}
	for i, d := range ds {
		d = domain.Key(strings.TrimSpace(d))
		switch {
		case d == "*" && !wildcard:
			return errors.New(`"*" is not allowed here`)
		case d == "":
			return errors.New("empty domain")
		case d != "*" && (strings.ContainsAny(d, " \t/@:[]*") || strings.HasPrefix(d, ".") || strings.Contains(d, "..")):
			return fmt.Errorf("bad domain %q", ds[i])
		case seen[d]:
			return fmt.Errorf("domain %q is named more than once", d)
		}
		seen[d] = true
		ds[i] = d
	}
	return nil
}

// ParseNextHop splits a route's next_hop: "host", "host:port" or
// "[IP]:port" (also "[IP]"); the port defaults to defPort.
func ParseNextHop(s string, defPort int) (host string, port int, ip net.IP, err error) {
	port = defPort
	switch {
	case s == "":
		return "", 0, nil, errors.New(`must be "host[:port]" or "[IP]:port"`)
	case strings.HasPrefix(s, "["):
		end := strings.IndexByte(s, ']')
		if end < 0 {
			return "", 0, nil, fmt.Errorf("bad next hop %q: no closing ]", s)
		}
		host, rest := s[1:end], s[end+1:]
		if ip = net.ParseIP(strings.TrimPrefix(host, "IPv6:")); ip == nil {
			return "", 0, nil, fmt.Errorf("bad next hop %q: %q is not an IP address", s, host)
		}
		host = ip.String()
		if rest != "" {
			if !strings.HasPrefix(rest, ":") {
				return "", 0, nil, fmt.Errorf("bad next hop %q", s)
			}
			if port, err = parsePort(rest[1:]); err != nil {
				return "", 0, nil, fmt.Errorf("bad next hop %q: %v", s, err)
			}
		}
		return host, port, ip, nil
	}
	host = s
	if h, p, ok := strings.Cut(s, ":"); ok {
		host = h
		if port, err = parsePort(p); err != nil {
			return "", 0, nil, fmt.Errorf("bad next hop %q: %v", s, err)
		}
	}
	host = domain.Key(host)
	if net.ParseIP(host) != nil {
		return "", 0, nil, fmt.Errorf("bad next hop %q: write an IP address as [IP]:port", s)
	}
	if host == "" || strings.ContainsAny(host, " \t/@[]*") || strings.Contains(host, "..") || strings.HasPrefix(host, ".") {
		return "", 0, nil, fmt.Errorf("bad next hop %q: bad host name", s)
	}
	return host, port, nil, nil
}

func parsePort(s string) (int, error) {
	p, err := strconv.Atoi(s)
	if err != nil || p <= 0 || p > 65535 || strconv.Itoa(p) != s {
		return 0, fmt.Errorf("bad port %q", s)
	}
	return p, nil
}

func countSet(vals ...string) int {
	n := 0
	for _, v := range vals {
		if v != "" {
			n++
		}
	}
	return n
}

func checkListen(addr string) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("bad listen address %q: want host:port", addr)
	}
	if host != "" && net.ParseIP(host) == nil && host != "localhost" {
		return fmt.Errorf("bad listen address %q: host must be an IP address", addr)
	}
	var p int
	if _, err := fmt.Sscanf(port, "%d", &p); err != nil || p < 0 || p > 65535 || fmt.Sprint(p) != port {
		return fmt.Errorf("bad listen address %q: bad port", addr)
	}
	return nil
}
