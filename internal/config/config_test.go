package config

import (
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// writeConfig writes content to a file in a fresh directory and returns
// its path.
func writeConfig(t *testing.T, content string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "stsrelay.toml")
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// touch creates an empty file and returns its path.
func touch(t *testing.T, name string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte("-----BEGIN-----\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestLoadErrorsNameFileKeyAndLine(t *testing.T) {
	cert := touch(t, "cert.pem")
	key := touch(t, "key.pem")
	missing := filepath.Join(t.TempDir(), "no-such-cert.pem")
	r := strings.NewReplacer("CERT", cert, "KEY", key, "MISSING", missing)

	tests := []struct {
		name    string
		content string
		// key and line must appear in the message; line 0 means the
		// problem has no single line (the message still names the key).
		key  string
		line int
		// more is a further fragment the message must hold.
		more string
	}{
		{"unknown top-level key", "hostname = \"relay.test\"\nhostnamez = \"x\"\n", "hostnamez", 2, "unknown key"},
		{"unknown key in a table", "[queue]\nworkerz = 3\n", "queue.workerz", 2, "unknown key"},
		{"unknown key in a later table", "[queue]\nworkers = 3\n\n[dns]\ntimeout = \"5s\"\nserver = []\n", "dns.server", 6, "unknown key"},
		{"unknown table", "[queues]\nworkers = 3\n", "queues", 1, "unknown key"},
		{"unknown key in the second user", "[[submission.users]]\nusername = \"a\"\npassword_hash = \"$2a$10$x\"\n[[submission.users]]\nusernamez = \"b\"\n", "usernamez", 5, "unknown key"},
		{"bad duration", "[queue]\nworkers = 3\nmax_queue_time = \"5x\"\n", "queue.max_queue_time", 3, `"5x"`},
		{"bad duration in the retry schedule", "[queue]\nretry_schedule = [\"5m\", \"soon\"]\n", "queue.retry_schedule", 2, `"soon"`},
		{"negative duration", "[dns]\ntimeout = \"-5s\"\n", "dns.timeout", 2, "negative"},
		{"duration given as a number", "[delivery]\nconnect_timeout = 30\n", "delivery.connect_timeout", 2, ""},
		{"string where an integer belongs", "[queue]\nworkers = \"many\"\n", "queue.workers", 2, ""},
		{"string where a list belongs", "[submission]\nlisten = \"127.0.0.1:587\"\n", "submission.listen", 2, ""},
		{"integer where a boolean belongs", "[mtasts]\nenabled = 1\n", "mtasts.enabled", 2, ""},
		{"syntax error", "hostname = \"relay.test\"\n\n[queue\nworkers = 3\n", "", 3, ""},
		{"listen address without port", "[submission]\nlisten = [\"127.0.0.1\"]\n", "submission.listen", 2, "127.0.0.1"},
		{"listen address with a host name", "[submission]\nlisten = [\"mail.example.net:587\"]\n", "submission.listen", 2, "mail.example.net:587"},
		{"listen port out of range", "[submission]\nlisten = [\"127.0.0.1:70000\"]\n", "submission.listen", 2, "70000"},
		{"implicit TLS listen address bad", "[submission]\ntls_cert_file = \"CERT\"\ntls_key_file = \"KEY\"\nimplicit_tls_listen = [\":x\"]\n", "submission.implicit_tls_listen", 4, ""},
		{"no listener at all", "[submission]\nlisten = []\n", "submission.listen", 2, ""},
		{"missing certificate file", "[submission]\ntls_cert_file = \"MISSING\"\ntls_key_file = \"KEY\"\n", "submission.tls_cert_file", 2, missing},
		{"missing key file", "[submission]\ntls_cert_file = \"CERT\"\ntls_key_file = \"MISSING\"\n", "submission.tls_key_file", 3, missing},
		{"certificate without key", "[submission]\nlisten = [\"127.0.0.1:587\"]\ntls_cert_file = \"CERT\"\n", "submission.tls_cert_file", 3, "together"},
		{"implicit TLS without certificate", "[submission]\nimplicit_tls_listen = [\"127.0.0.1:465\"]\n", "submission.implicit_tls_listen", 2, "tls_cert_file"},
		{"bad CIDR in trusted networks", "[submission]\ntrusted_networks = [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n", "submission.trusted_networks", 2, "10.0.0.0/33"},
		{"trusted network that is a name", "[submission]\ntrusted_networks = [\"localhost\"]\n", "submission.trusted_networks", 2, "localhost"},
		{"IPv4-mapped trusted network", "[submission]\nmax_recipients = 10\ntrusted_networks = [\"::ffff:192.0.2.2/128\"]\n", "submission.trusted_networks", 3, "192.0.2.2/32"},
		{"IPv4-mapped trusted address", "[submission]\ntrusted_networks = [\"10.0.0.0/8\", \"::ffff:10.1.2.3\"]\n", "submission.trusted_networks", 2, "IPv4-mapped"},
		{"zero max connections", "[submission]\nmax_connections = 0\n", "submission.max_connections", 2, ""},
		{"per-IP cap above the total", "[submission]\nmax_connections = 10\nmax_connections_per_ip = 11\n", "submission.max_connections_per_ip", 3, "max_connections"},
		{"zero data timeout", "[submission]\ndata_timeout = \"0s\"\n", "submission.data_timeout", 2, ""},
		{"user with a plain password", "[[submission.users]]\nusername = \"app\"\npassword_hash = \"secret\"\n", "submission.users[0].password_hash", 3, "bcrypt"},
		{"second user without a password hash", "[[submission.users]]\nusername = \"a\"\npassword_hash = \"$2a$10$abc\"\n\n[[submission.users]]\nusername = \"b\"\n", "submission.users[1].password_hash", 5, "bcrypt"},
		{"user without a name", "[[submission.users]]\npassword_hash = \"$2a$10$abc\"\n", "submission.users[0].username", 1, ""},
		{"duplicate user", "[[submission.users]]\nusername = \"a\"\npassword_hash = \"$2a$10$abc\"\n[[submission.users]]\nusername = \"a\"\npassword_hash = \"$2a$10$abc\"\n", "submission.users[1].username", 5, "duplicate"},
		{"DKIM domain without selector and key", "[tlsrpt]\ndkim_domain = \"example.net\"\n", "tlsrpt.dkim_domain", 2, "together"},
		{"DKIM key file that does not exist", "[tlsrpt]\ndkim_domain = \"example.net\"\ndkim_selector = \"s1\"\ndkim_key_file = \"MISSING\"\n", "tlsrpt.dkim_key_file", 4, missing},
		{"extra root CA file that does not exist", "[tls]\nextra_root_ca_file = \"MISSING\"\n", "tls.extra_root_ca_file", 2, missing},
		{"unknown log level", "[log]\nformat = \"json\"\nlevel = \"loud\"\n", "log.level", 3, `"loud"`},
		{"unknown log format", "[log]\nformat = \"xml\"\n", "log.format", 2, `"xml"`},
		{"empty log output", "[log]\noutput = \"\"\n", "log.output", 2, ""},
		{"DNS server without port", "[dns]\nservers = [\"192.0.2.53\"]\n", "dns.servers", 2, "192.0.2.53"},
		{"unknown trust_ad mode", "[dns]\ntimeout = \"5s\"\ntrust_ad = \"sometimes\"\n", "dns.trust_ad", 3, `"sometimes"`},
		{"dane.enabled not a boolean", "[dane]\nenabled = \"yes\"\n", "dane.enabled", 2, ""},
		{"zero workers", "[queue]\nworkers = 0\n", "queue.workers", 2, ""},
		{"empty retry schedule", "[queue]\nretry_schedule = []\n", "queue.retry_schedule", 2, ""},
		{"zero retry interval", "[queue]\nretry_schedule = [\"5m\", \"0s\"]\n", "queue.retry_schedule", 2, ""},
		{"delivery port out of range", "[delivery]\nport = 65536\n", "delivery.port", 2, "65536"},
		{"zero shutdown timeout", "[delivery]\nshutdown_timeout = \"0s\"\n", "delivery.shutdown_timeout", 2, ""},
		{"local address that is not an IP", "[delivery]\nlocal_addresses = [\"eth0\"]\n", "delivery.local_addresses", 2, "eth0"},
		{"policy HTTPS port zero", "[mtasts]\nhttps_port = 0\n", "mtasts.https_port", 2, ""},
		{"zero report interval", "[tlsrpt]\ninterval = \"0s\"\n", "tlsrpt.interval", 2, ""},
		{"bad metrics listen address", "[metrics]\nlisten = \"9464\"\n", "metrics.listen", 2, "9464"},
		{"host name with a space", "hostname = \"relay example\"\n", "hostname", 1, ""},
		{"host name with a control character", "hostname = \"relay\\rexample\"\n", "hostname", 1, ""},
		{"empty data dir", "data_dir = \"\"\n", "data_dir", 1, ""},
		{"route without domains", "[[route]]\nnext_hop = \"smtp.example.net\"\n", "route[0].domains", 1, "at least one"},
		{"route with a bad next hop", "[[route]]\ndomains = [\"a.example\"]\nnext_hop = \"smtp.example.net:99999\"\n", "route[0].next_hop", 3, "99999"},
		{"route to a bare IP", "[[route]]\ndomains = [\"a.example\"]\nnext_hop = \"192.0.2.1:25\"\n", "route[0].next_hop", 3, "[IP]:port"},
		{"second route names a domain again", "[[route]]\ndomains = [\"a.example\"]\nnext_hop = \"x.example\"\n[[route]]\ndomains = [\"A.example\"]\nnext_hop = \"y.example\"\n", "route[1].domains", 5, "more than once"},
		{"route password file missing", "[[route]]\ndomains = [\"a.example\"]\nnext_hop = \"x.example\"\nauth_username = \"u\"\nauth_password_file = \"MISSING\"\n", "route[0].auth_password_file", 5, missing},
		{"route user without password file", "[[route]]\ndomains = [\"a.example\"]\nnext_hop = \"x.example\"\nauth_username = \"u\"\n", "route[0].auth_username", 4, "together"},
		{"tls_policy with an unknown level", "[[tls_policy]]\ndomains = [\"a.example\"]\nsecurity = \"secure\"\n", "tls_policy[0].security", 3, "secure"},
		{"tls_policy for every domain", "[[tls_policy]]\ndomains = [\"*\"]\nsecurity = \"may\"\n", "tls_policy[0].domains", 2, "not allowed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := writeConfig(t, r.Replace(tt.content))
			cfg, err := Load(path)
			if err == nil {
				t.Fatalf("Load succeeded (%+v), want an error", cfg)
			}
			msg := err.Error()
			if strings.Contains(msg, "\n") {
				t.Errorf("message spans lines: %q", msg)
			}
			where := path + ":"
			if tt.line > 0 {
				where = path + ":" + strconv.Itoa(tt.line) + ":"
			}
			if !strings.Contains(msg, where) {
				t.Errorf("message %q does not say where (%q)", msg, where)
			}
			if tt.key != "" && !strings.Contains(msg, tt.key) {
				t.Errorf("message %q does not name the key %q", msg, tt.key)
			}
			if tt.more != "" && !strings.Contains(msg, tt.more) {
				t.Errorf("message %q does not contain %q", msg, tt.more)
			}
		})
	}
}

func TestLoadMissingFileNamesIt(t *testing.T) {
	path := filepath.Join(t.TempDir(), "absent.toml")
	_, err := Load(path)
	if err == nil || !strings.Contains(err.Error(), path) {
		t.Fatalf("Load of a missing file: err = %v, want one naming %s", err, path)
	}
}

// TestDefaults checks every default against interface.md.
func TestDefaults(t *testing.T) {
	cfg, err := Load(writeConfig(t, ""))
	if err != nil {
		t.Fatalf("empty file: %v", err)
	}
	host, _ := os.Hostname()
	if host == "" {
		host = "localhost"
	}
	dur := func(ss ...string) []Duration {
		var out []Duration
		for _, s := range ss {
			d, err := time.ParseDuration(s)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, Duration{d})
		}
		return out
	}
	d := func(s string) Duration { return dur(s)[0] }
	tests := []struct {
		key       string
		got, want any
	}{
		{"hostname", cfg.Hostname, host},
		{"data_dir", cfg.DataDir, "/var/lib/stsrelay"},
		{"submission.listen", cfg.Submission.Listen, []string{"127.0.0.1:587"}},
		{"submission.implicit_tls_listen", len(cfg.Submission.ImplicitTLSListen), 0},
		{"submission.tls_cert_file", cfg.Submission.TLSCertFile, ""},
		{"submission.tls_key_file", cfg.Submission.TLSKeyFile, ""},
		{"submission.require_tls_for_auth", cfg.Submission.RequireTLSForAuth, true},
		{"submission.max_message_bytes", cfg.Submission.MaxMessageBytes, int64(26214400)},
		{"submission.max_recipients", cfg.Submission.MaxRecipients, 100},
		{"submission.allowed_senders", len(cfg.Submission.AllowedSenders), 0},
		{"submission.trusted_networks", len(cfg.Submission.TrustedNetworks) + len(cfg.Submission.TrustedPrefixes), 0},
		{"submission.max_connections", cfg.Submission.MaxConnections, 1000},
		{"submission.max_connections_per_ip", cfg.Submission.MaxConnectionsPerIP, 20},
		{"submission.data_timeout", cfg.Submission.DataTimeout, d("3m")},
		{"submission.users", len(cfg.Submission.Users), 0},
		{"queue.workers", cfg.Queue.Workers, 32},
		{"queue.per_domain_concurrency", cfg.Queue.PerDomainConcurrency, 20},
		{"queue.retry_schedule", cfg.Queue.RetrySchedule, dur("5m", "10m", "30m", "1h", "2h", "4h")},
		{"queue.max_queue_time", cfg.Queue.MaxQueueTime, d("120h")},
		{"queue.delay_notice_after", cfg.Queue.DelayNoticeAfter, d("4h")},
		{"dns.servers", len(cfg.DNS.Servers), 0},
		{"dns.timeout", cfg.DNS.Timeout, d("5s")},
		{"dns.trust_ad", cfg.DNS.TrustAD, "loopback"},
		{"dane.enabled", cfg.DANE.Enabled, true},
		{"delivery.port", cfg.Delivery.Port, 25},
		{"delivery.connect_timeout", cfg.Delivery.ConnectTimeout, d("30s")},
		{"delivery.command_timeout", cfg.Delivery.CommandTimeout, d("5m")},
		{"delivery.local_addresses", len(cfg.Delivery.LocalAddresses), 0},
		{"delivery.shutdown_timeout", cfg.Delivery.ShutdownTimeout, d("30s")},
		{"tls.extra_root_ca_file", cfg.TLS.ExtraRootCAFile, ""},
		{"mtasts.enabled", cfg.MTASTS.Enabled, true},
		{"mtasts.https_port", cfg.MTASTS.HTTPSPort, 443},
		{"mtasts.fetch_timeout", cfg.MTASTS.FetchTimeout, d("10s")},
		{"mtasts.max_policy_bytes", cfg.MTASTS.MaxPolicyBytes, int64(65536)},
		{"mtasts.refresh_before_expiry", cfg.MTASTS.RefreshBeforeExpiry, d("1h")},
		{"tlsrpt.enabled", cfg.TLSRPT.Enabled, true},
		{"tlsrpt.dkim_domain", cfg.TLSRPT.DKIMDomain, ""},
		{"tlsrpt.dkim_selector", cfg.TLSRPT.DKIMSelector, ""},
		{"tlsrpt.dkim_key_file", cfg.TLSRPT.DKIMKeyFile, ""},
		{"tlsrpt.organization_name", cfg.TLSRPT.OrganizationName, "Example Org"},
		{"tlsrpt.contact_info", cfg.TLSRPT.ContactInfo, "mailto:postmaster@example.net"},
		{"tlsrpt.from", cfg.TLSRPT.From, "tlsrpt-noreply@example.net"},
		{"tlsrpt.interval", cfg.TLSRPT.Interval, d("24h")},
		{"tlsrpt.allow_private_rua", cfg.TLSRPT.AllowPrivateRUA, false},
		{"log.level", cfg.Log.Level, "info"},
		{"log.format", cfg.Log.Format, "json"},
		{"log.output", cfg.Log.Output, "stderr"},
		{"metrics.listen", cfg.Metrics.Listen, ""},
	}
	for _, tt := range tests {
		if !reflect.DeepEqual(tt.got, tt.want) {
			t.Errorf("default %s = %v, want %v (interface.md)", tt.key, tt.got, tt.want)
		}
	}
	if cfg.Path == "" {
		t.Error("Path not set")
	}
}

// TestLoadValid checks values that must be accepted and how they are
// read.
func TestLoadValid(t *testing.T) {
	cert := touch(t, "cert.pem")
	key := touch(t, "key.pem")
	content := strings.NewReplacer("CERT", cert, "KEY", key).Replace(`
hostname = "relay.example.net"   # a comment
data_dir = "/srv/stsrelay"

[submission]
listen = ["127.0.0.1:587", "[::1]:587", ":2525"]
implicit_tls_listen = ["0.0.0.0:465"]
tls_cert_file = "CERT"
tls_key_file = "KEY"
trusted_networks = ["10.1.2.3/8", "192.0.2.7", "2001:db8::/32"]

[[submission.users]]
username = "app"
password_hash = "$2a$10$abcdefghijklmnopqrstuv"

[[submission.users]]
username = "other"
password_hash = "$2b$12$abcdefghijklmnopqrstuv"

[queue]
retry_schedule = ["1s", "2s"]
delay_notice_after = "0s"       # turns the notice off

[tlsrpt]
dkim_domain = "example.net"
dkim_selector = "s1"
dkim_key_file = "KEY"
interval = "10s"
`)
	cfg, err := Load(writeConfig(t, content))
	if err != nil {
		t.Fatal(err)
	}
	wantPrefixes := []netip.Prefix{
		netip.MustParsePrefix("10.0.0.0/8"),   // masked
		netip.MustParsePrefix("192.0.2.7/32"), // a bare address is a host
		netip.MustParsePrefix("2001:db8::/32"),
	}
	if !reflect.DeepEqual(cfg.Submission.TrustedPrefixes, wantPrefixes) {
		t.Errorf("TrustedPrefixes = %v, want %v", cfg.Submission.TrustedPrefixes, wantPrefixes)
	}
	if len(cfg.Submission.Users) != 2 || cfg.Submission.Users[1].Username != "other" {
		t.Errorf("Users = %+v", cfg.Submission.Users)
	}
	if cfg.Queue.DelayNoticeAfter.Duration != 0 {
		t.Errorf("delay_notice_after = %v, want 0 (off)", cfg.Queue.DelayNoticeAfter)
	}
	if cfg.TLSRPT.Interval.Duration != 10*time.Second {
		t.Errorf("interval = %v", cfg.TLSRPT.Interval)
	}
	// Keys not in the file keep their defaults.
	if cfg.Queue.Workers != 32 || cfg.Log.Level != "info" || cfg.MTASTS.HTTPSPort != 443 {
		t.Errorf("defaults lost when other keys are set: %+v", cfg)
	}
}

func TestDurationRoundTrip(t *testing.T) {
	d := Duration{90 * time.Minute}
	b, err := d.MarshalText()
	if err != nil {
		t.Fatal(err)
	}
	var back Duration
	if err := back.UnmarshalText(b); err != nil || back != d {
		t.Fatalf("round trip of %v: %v, %v", d, back, err)
	}
}

// TestExampleConfig loads the documented example shipped at the top of
// the repository: it must load, and it must document every key.
func TestExampleConfig(t *testing.T) {
	const path = "../../config.example.toml"
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("config.example.toml must exist at the repository root (interface.md): %v", err)
	}
	if _, err := Parse(path, data); err != nil {
		t.Fatalf("the example configuration does not load: %v", err)
	}
	// A key is documented when it appears, set or commented out, in its
	// table.
	text := regexp.MustCompile(`(?m)^[ \t]*#[ \t]*`).ReplaceAllString(string(data), "")
	for _, key := range configKeys(reflect.TypeOf(Config{}), "") {
		table, leaf := "", key
		if i := strings.LastIndexByte(key, '.'); i >= 0 {
			table, leaf = key[:i], key[i+1:]
		}
		if !keyInTable(text, table, leaf) {
			t.Errorf("config.example.toml does not document %s", key)
		}
	}
}

// configKeys lists the dotted TOML keys of the leaf values of t.
func configKeys(t reflect.Type, prefix string) []string {
	var out []string
	for i := range t.NumField() {
		f := t.Field(i)
		tag := f.Tag.Get("toml")
		if tag == "" || tag == "-" {
			continue
		}
		key := tag
		if prefix != "" {
			key = prefix + "." + tag
		}
		ft := f.Type
		if ft.Kind() == reflect.Slice && ft.Elem().Kind() == reflect.Struct && ft.Elem() != reflect.TypeOf(Duration{}) {
			ft = ft.Elem()
		}
		if ft.Kind() == reflect.Struct && ft != reflect.TypeOf(Duration{}) {
			out = append(out, configKeys(ft, key)...)
			continue
		}
		out = append(out, key)
	}
	return out
}

// keyInTable reports whether "leaf =" appears under the header of table
// ("" is the top level, before any header).
func keyInTable(text, table, leaf string) bool {
	cur := ""
	for _, line := range strings.Split(text, "\n") {
		l := strings.TrimSpace(line)
		if strings.HasPrefix(l, "[") {
			cur = strings.Trim(l, "[] \t")
			if i := strings.IndexAny(cur, "]#"); i >= 0 {
				cur = strings.TrimSpace(cur[:i])
			}
			continue
		}
		if name, _, ok := strings.Cut(l, "="); ok && cur == table && strings.TrimSpace(name) == leaf {
			return true
		}
	}
	return false
}

// TestParseNextHop: a route's next_hop forms, the port defaulting to
// delivery.port.
func TestParseNextHop(t *testing.T) {
	for _, c := range []struct {
		in   string
		host string
		port int
		ip   bool
	}{
		{"smtp.example.net", "smtp.example.net", 25, false},
		{"SMTP.example.net.:587", "smtp.example.net", 587, false},
		{"[192.0.2.1]:2525", "192.0.2.1", 2525, true},
		{"[IPv6:2001:db8::1]", "2001:db8::1", 25, true},
	} {
		host, port, ip, err := ParseNextHop(c.in, 25)
		if err != nil || host != c.host || port != c.port || (ip != nil) != c.ip {
			t.Errorf("ParseNextHop(%q) = %q %d %v %v, want %q %d ip=%v", c.in, host, port, ip, err, c.host, c.port, c.ip)
		}
	}
	cfg, err := Parse("t.toml", []byte("[[route]]\ndomains = [\"a.example\"]\nnext_hop = \"x.example\"\n[[route]]\ndomains = [\"*\"]\nnext_hop = \"y.example\"\nrequire_tls = false\n"))
	if err != nil {
		t.Fatal(err)
	}
	if !cfg.Routes[0].TLSRequired() || cfg.Routes[1].TLSRequired() {
		t.Errorf("require_tls: got %v %v, want the default true and the explicit false", cfg.Routes[0].TLSRequired(), cfg.Routes[1].TLSRequired())
	}
}

func TestKeyLine(t *testing.T) {
	data := []byte(`hostname = "a"
# listen = ["x"]
[submission]
"listen" = ["127.0.0.1:587"]

[[submission.users]]
username = "a"
[[submission.users]]
username = "b"
[queue]
`)
	tests := []struct {
		name string
		key  string
		want int
	}{
		{"top-level key", "hostname", 1},
		{"quoted key in a table, not the comment above", "submission.listen", 4},
		{"key of the second array element", "submission.users[1].username", 9},
		{"absent key falls back to its table", "queue.workers", 10},
		{"absent key of an array element falls back to its header", "submission.users[1].password_hash", 8},
		{"absent key and table", "metrics.listen", 0},
		{"absent top-level key", "data_dir", 0},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := keyLine(data, tt.key); got != tt.want {
				t.Fatalf("keyLine(%q) = %d, want %d", tt.key, got, tt.want)
			}
		})
	}
}

// dns.trust_ad is read as dnsclient.ParseTrustAD reads it: any case, in
// canonical form after Load; [dane] enabled can be turned off.
func TestTrustADAndDANE(t *testing.T) {
	cfg, err := Load(writeConfig(t, "[dns]\ntrust_ad = \"Always\"\n\n[dane]\nenabled = false\n"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.DNS.TrustAD != "always" || cfg.DANE.Enabled {
		t.Errorf("trust_ad %q, dane.enabled %v; want always, false", cfg.DNS.TrustAD, cfg.DANE.Enabled)
	}
}
