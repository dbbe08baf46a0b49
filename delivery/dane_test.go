package delivery

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/stsrelay/stsrelay/delivery/policy"
	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/dane"
	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/internal/testworld"
	"github.com/stsrelay/stsrelay/mtasts"
	"github.com/stsrelay/stsrelay/mtasts/mtastsdb"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// DANE (RFC 7672) in delivery, against the test world's DNS server. It
// is on loopback, so the resolver trusts its AD bit (dns.trust_ad
// "loopback"), and SetAD marks the names a validating resolver would
// have found secure: the MX RRset, the MX host's address records and
// its TLSA RRset. The end-to-end test in cmd/stsrelay earns the AD bit
// from a real validating resolver instead.

const daneDomain = "ex.test"

// sessionLog collects the TLS-RPT sessions the engine records.
type sessionLog struct {
	mu   sync.Mutex
	sess []tlsrpt.Session
}

func (l *sessionLog) Record(s tlsrpt.Session) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.sess = append(l.sess, s)
}

func (l *sessionLog) all() []tlsrpt.Session {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.sess)
}

// staticPolicy is a PolicySource with one policy for every domain.
type staticPolicy struct{ p *mtasts.Policy }

func (s staticPolicy) Get(context.Context, string) (mtastsdb.Result, error) {
	return mtastsdb.Result{Policy: s.p, ID: "d1"}, nil
}

func (s staticPolicy) Recheck(ctx context.Context, d string) (mtastsdb.Result, error) {
	return s.Get(ctx, d)
}

func enforcePolicy(t *testing.T, mx ...string) PolicySource {
	t.Helper()
	text := "version: STSv1\nmode: enforce\n"
	for _, m := range mx {
		text += "mx: " + m + "\n"
	}
	p, err := mtasts.ParsePolicy([]byte(text + "max_age: 86400\n"))
	if err != nil {
		t.Fatal(err)
	}
	return staticPolicy{p}
}

// daneWorld is a world with the domain ex.test, whose MX RRset is
// DNSSEC-secure (AD), and an engine delivering into it.
type daneWorld struct {
	t    *testing.T
	w    *testworld.World
	pol  PolicySource
	tune func(*config.Config)
	res  *dnsclient.Resolver
	rec  *sessionLog
	logs *observer.ObservedLogs
}

func newDANEWorld(t *testing.T) *daneWorld {
	w := testworld.New(t)
	w.DNS.SetAD(daneDomain, true)
	return &daneWorld{t: t, w: w, rec: &sessionLog{}}
}

// mx starts MX host name (a secure A record) with opts.
func (d *daneWorld) mx(name string, opts testworld.MXOptions) *testworld.MXServer {
	opts.Hostname = name
	s := d.w.NewMX(opts)
	d.w.DNS.SetA(name, s.IP())
	d.w.DNS.SetAD(name, true)
	return s
}

// tlsa publishes records at _25._tcp.host, secure or not.
func (d *daneWorld) tlsa(host string, secure bool, rrs ...*dns.TLSA) {
	name := "_25._tcp." + host + "."
	for _, r := range rrs {
		r.Hdr = dns.RR_Header{Name: name, Rrtype: dns.TypeTLSA, Class: dns.ClassINET, Ttl: 300}
		d.w.DNS.AddRR(r)
	}
	d.w.DNS.SetAD(name, secure)
}

// deliver runs an engine on the world until the message to rcpt has
// had one attempt, and returns the delivery line's fields.
func (d *daneWorld) deliver(rcpt string, env queue.Envelope) map[string]any {
	t := d.t
	t.Helper()
	cfg := config.Default()
	cfg.Hostname = "relay.test"
	cfg.Delivery.Port = d.w.MXPort()
	cfg.Delivery.ConnectTimeout.Duration = 5 * time.Second
	cfg.Delivery.CommandTimeout.Duration = 10 * time.Second
	if d.tune != nil {
		d.tune(cfg)
	}
	st, err := queue.Open(queue.Options{Dir: t.TempDir(), Schedule: queue.Schedule{
		Retry: []time.Duration{time.Hour}, MaxQueueTime: cfg.Queue.MaxQueueTime.Duration}})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	res := d.res
	if res == nil {
		res = worldResolver(t, d.w)
	}
	core, logs := observer.New(zap.DebugLevel)
	d.logs = logs
	e := New(Options{Config: cfg, Store: st, Resolver: res, Policies: d.pol, TLSRPT: d.rec,
		Roots: d.w.CA.Pool(), Logger: zap.New(core)})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { e.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	env.Rcpts = []queue.RcptSpec{{Addr: rcpt}}
	if _, err := st.Enqueue(env, strings.NewReader("Subject: dane\r\n\r\nhello\r\n")); err != nil {
		t.Fatal(err)
	}
	var line map[string]any
	waitFor(t, "the delivery line of "+rcpt, func() bool {
		for _, l := range logs.FilterMessage("delivery").All() {
			if f := l.ContextMap(); f["rcpt"] == rcpt {
				line = f
				return true
			}
		}
		return false
	})
	return line
}

func (d *daneWorld) expect(line map[string]any, want map[string]any) {
	d.t.Helper()
	for k, v := range want {
		if line[k] != v {
			d.t.Errorf("delivery line %s = %#v, want %#v\n%v", k, line[k], v, line)
		}
	}
}

// tlsaSessions are the recorded sessions of policy-type tlsa.
func (d *daneWorld) sessions(pt tlsrpt.PolicyType) []tlsrpt.Session {
	var out []tlsrpt.Session
	for _, s := range d.rec.all() {
		if s.PolicyType == pt {
			out = append(out, s)
		}
	}
	return out
}

// withChain returns c presenting its issuer's certificate (PEM) too, as
// a DANE-TA(2) server must (RFC 7671 §5.2.2).
func withChain(t *testing.T, c *testworld.Cert, issuerPEM []byte) (*testworld.Cert, *x509.Certificate) {
	t.Helper()
	b, _ := pem.Decode(issuerPEM)
	if b == nil {
		t.Fatal("no PEM issuer")
	}
	issuer, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	cc := *c
	cc.TLS.Certificate = [][]byte{c.TLS.Certificate[0], issuer.Raw}
	return &cc, issuer
}

func record311(c *testworld.Cert) *dns.TLSA { return dane.Record(3, 1, 1, c.Leaf) }

// RFC 7672 §3.1.1: a 3 1 1 record authenticates the MX's certificate,
// self-signed as it is, with SNI the TLSA base domain; TLS-RPT counts a
// success under policy-type tlsa for the base domain, with the record
// as policy-string (RFC 8460 §4.4, checklist RPT-3-a, DANE-d).
func TestDANEEEMatch(t *testing.T) {
	d := newDANEWorld(t)
	cert := d.w.CA.Issue(testworld.CertSelfSigned, "mx1.ex.test")
	mx := d.mx("mx1.ex.test", testworld.MXOptions{Cert: cert})
	d.w.DNS.SetMX(daneDomain, testworld.MX{Pref: 10, Host: "mx1.ex.test"})
	d.tlsa("mx1.ex.test", true, record311(cert))

	line := d.deliver("u@ex.test", queue.Envelope{})
	d.expect(line, map[string]any{"result": "delivered", "dane": "authenticated", "tls_verified": false, "tlsrpt_result": ""})
	if n := len(mx.Messages()); n != 1 {
		t.Errorf("MX got %d messages, want 1", n)
	}
	if snis := mx.SNIs(); len(snis) != 1 || snis[0] != "mx1.ex.test" {
		t.Errorf("SNI %q, want the TLSA base domain mx1.ex.test", snis)
	}
	ss := d.sessions(tlsrpt.PolicyTypeTLSA)
	want := dane.PolicyStrings([]*dns.TLSA{record311(cert)})
	if len(ss) != 1 || !ss[0].Success || ss[0].PolicyDomain != "mx1.ex.test" || !slices.Equal(ss[0].PolicyString, want) {
		t.Errorf("TLS-RPT sessions %+v, want one tlsa success for mx1.ex.test with %q", d.rec.all(), want)
	}
}

// RFC 7672 §2.2, §3: a record that matches nothing fails the handshake;
// the message waits, never sent in plaintext.
func TestDANEEEMismatch(t *testing.T) {
	d := newDANEWorld(t)
	mx := d.mx("mx1.ex.test", testworld.MXOptions{Cert: d.w.CA.Issue(testworld.CertValid, "mx1.ex.test")})
	d.w.DNS.SetMX(daneDomain, testworld.MX{Pref: 10, Host: "mx1.ex.test"})
	d.tlsa("mx1.ex.test", true, record311(d.w.CA.Issue(testworld.CertValid, "mx1.ex.test")))

	line := d.deliver("u@ex.test", queue.Envelope{})
	d.expect(line, map[string]any{"result": "deferred", "dane": "failed", "tlsrpt_result": "tlsa-invalid",
		"code": int64(451), "enhanced_code": "4.7.5", "mx": "mx1.ex.test"})
	if n, c := len(mx.Messages()), mx.Connections(); n != 0 || c != 1 {
		t.Errorf("MX got %d messages on %d connections, want none on 1 (no plaintext retry)", n, c)
	}
	ss := d.sessions(tlsrpt.PolicyTypeTLSA)
	if len(ss) != 1 || ss[0].Success || ss[0].ResultType != tlsrpt.ResultTLSAInvalid || ss[0].FailureReasonCode != "tlsa-no-match" {
		t.Errorf("TLS-RPT sessions %+v, want one tlsa-invalid/tlsa-no-match", d.rec.all())
	}
}

// RFC 7672 §3.1.2, §3.2.2: DANE-TA: the chain must reach the record's
// certificate, here a root the Web PKI does not trust, and the leaf
// must name the MX host.
func TestDANETA(t *testing.T) {
	for _, tc := range []struct {
		name     string
		certName string
		result   string
		dane     string
		reason   string
	}{
		{"good name", "mx1.ex.test", "delivered", "authenticated", ""},
		{"wrong name", "elsewhere.test", "deferred", "failed", "tlsa-name-mismatch"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newDANEWorld(t)
			cert, root := withChain(t, d.w.CA.Issue(testworld.CertUnknownCA, tc.certName), d.w.CA.UnknownRootPEM())
			mx := d.mx("mx1.ex.test", testworld.MXOptions{Cert: cert})
			d.w.DNS.SetMX(daneDomain, testworld.MX{Pref: 10, Host: "mx1.ex.test"})
			d.tlsa("mx1.ex.test", true, dane.Record(2, 0, 1, root))

			line := d.deliver("u@ex.test", queue.Envelope{})
			d.expect(line, map[string]any{"result": tc.result, "dane": tc.dane, "tls_verified": false})
			if want := map[string]int{"delivered": 1}[tc.result]; len(mx.Messages()) != want {
				t.Errorf("MX got %d messages, want %d", len(mx.Messages()), want)
			}
			ss := d.sessions(tlsrpt.PolicyTypeTLSA)
			if len(ss) != 1 || ss[0].FailureReasonCode != tc.reason {
				t.Errorf("TLS-RPT sessions %+v, want one with reason %q", d.rec.all(), tc.reason)
			}
		})
	}
}

// RFC 7672 §2.2, §3.1.3: a secure TLSA RRset with only unusable records
// (PKIX-EE here) demands TLS but cannot authenticate: a self-signed
// certificate goes; an MX without STARTTLS is not used (no plaintext).
func TestDANEUnusableRecords(t *testing.T) {
	unusable := &dns.TLSA{Usage: 1, Selector: 1, MatchingType: 1, Certificate: strings.Repeat("ab", 32)}
	t.Run("TLS without authentication", func(t *testing.T) {
		d := newDANEWorld(t)
		mx := d.mx("mx1.ex.test", testworld.MXOptions{Cert: d.w.CA.Issue(testworld.CertSelfSigned, "mx1.ex.test")})
		d.w.DNS.SetMX(daneDomain, testworld.MX{Pref: 10, Host: "mx1.ex.test"})
		d.tlsa("mx1.ex.test", true, unusable)
		line := d.deliver("u@ex.test", queue.Envelope{})
		d.expect(line, map[string]any{"result": "delivered", "dane": "tls-required", "tls": "TLS1.3", "tls_verified": false})
		if len(mx.Messages()) != 1 {
			t.Errorf("MX got %d messages, want 1", len(mx.Messages()))
		}
		if ss := d.sessions(tlsrpt.PolicyTypeTLSA); len(ss) != 1 || !ss[0].Success || ss[0].PolicyString[0] != "1 1 1 "+strings.Repeat("ab", 32) {
			t.Errorf("TLS-RPT sessions %+v", d.rec.all())
		}
	})
	t.Run("no STARTTLS: not used", func(t *testing.T) {
		d := newDANEWorld(t)
		mx := d.mx("mx1.ex.test", testworld.MXOptions{})
		d.w.DNS.SetMX(daneDomain, testworld.MX{Pref: 10, Host: "mx1.ex.test"})
		d.tlsa("mx1.ex.test", true, unusable)
		line := d.deliver("u@ex.test", queue.Envelope{})
		d.expect(line, map[string]any{"result": "deferred", "dane": "failed", "tlsrpt_result": "starttls-not-supported", "tls": ""})
		if len(mx.Messages()) != 0 {
			t.Errorf("MX without STARTTLS got the message in plaintext")
		}
	})
}

// RFC 7672 §2.2: a TLSA lookup that fails where the host's addresses are
// signed (a validating resolver answers SERVFAIL for bogus data) leaves
// DANE undecided: the MX is not contacted, the message waits
// (dnssec-invalid).
func TestDANELookupFailureDefers(t *testing.T) {
	d := newDANEWorld(t)
	mx := d.mx("mx1.ex.test", testworld.MXOptions{Cert: d.w.CA.Issue(testworld.CertValid, "mx1.ex.test")})
	d.w.DNS.SetMX(daneDomain, testworld.MX{Pref: 10, Host: "mx1.ex.test"})
	d.w.DNS.SetServFail("_25._tcp.mx1.ex.test", dns.TypeTLSA, true)

	line := d.deliver("u@ex.test", queue.Envelope{})
	d.expect(line, map[string]any{"result": "deferred", "dane": "failed", "tlsrpt_result": "dnssec-invalid",
		"code": int64(451), "enhanced_code": "4.4.3"})
	if c := mx.Connections(); c != 0 {
		t.Errorf("MX contacted %d times, want never", c)
	}
	if ss := d.sessions(tlsrpt.PolicyTypeTLSA); len(ss) != 1 || ss[0].ResultType != tlsrpt.ResultDNSSECInvalid || ss[0].ReceivingIP != "" {
		t.Errorf("TLS-RPT sessions %+v, want one dnssec-invalid without a receiving IP", d.rec.all())
	}
}

// RFC 7672 §2.2: TLSA records that are not DNSSEC-secure are ignored;
// so are secure ones below an insecure MX RRset or address (§2.2.1).
// The message goes as without DANE (opportunistic TLS).
func TestDANEInsecureIgnored(t *testing.T) {
	for _, tc := range []struct {
		name           string
		mxAD, aAD, tAD bool
	}{
		{"insecure TLSA", true, true, false},
		{"insecure MX RRset", false, true, true},
		{"insecure address", true, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newDANEWorld(t)
			mx := d.mx("mx1.ex.test", testworld.MXOptions{Cert: d.w.CA.Issue(testworld.CertValid, "mx1.ex.test")})
			d.w.DNS.SetMX(daneDomain, testworld.MX{Pref: 10, Host: "mx1.ex.test"})
			d.w.DNS.SetAD(daneDomain, tc.mxAD)
			d.w.DNS.SetAD("mx1.ex.test", tc.aAD)
			// A record that matches nothing: applied, it would refuse.
			d.tlsa("mx1.ex.test", tc.tAD, record311(d.w.CA.Issue(testworld.CertValid, "other.test")))
			line := d.deliver("u@ex.test", queue.Envelope{})
			d.expect(line, map[string]any{"result": "delivered", "dane": "", "tls_verified": true})
			if len(mx.Messages()) != 1 || len(d.sessions(tlsrpt.PolicyTypeTLSA)) != 0 {
				t.Errorf("MX got %d messages, tlsa sessions %+v", len(mx.Messages()), d.rec.all())
			}
		})
	}
}

// RFC 8461 §2 (checklist STS-2-a): MTA-STS never overrides a failing
// DANE check. The MX's certificate is valid under the Web PKI and listed
// by an enforce policy, but does not match its TLSA record: refused.
func TestDANEFailureNotRescuedByMTASTS(t *testing.T) {
	d := newDANEWorld(t)
	d.pol = enforcePolicy(t, "mx1.ex.test")
	mx := d.mx("mx1.ex.test", testworld.MXOptions{Cert: d.w.CA.Issue(testworld.CertValid, "mx1.ex.test")})
	d.w.DNS.SetMX(daneDomain, testworld.MX{Pref: 10, Host: "mx1.ex.test"})
	d.tlsa("mx1.ex.test", true, record311(d.w.CA.Issue(testworld.CertValid, "mx1.ex.test")))

	line := d.deliver("u@ex.test", queue.Envelope{})
	d.expect(line, map[string]any{"result": "deferred", "dane": "failed", "tlsrpt_result": "tlsa-invalid", "sts_mode": "enforce"})
	if len(mx.Messages()) != 0 {
		t.Errorf("the message went to an MX whose DANE check failed")
	}
	if len(d.sessions(tlsrpt.PolicyTypeSTS)) != 0 {
		t.Errorf("the session was counted under MTA-STS: %+v", d.rec.all())
	}
}

// DANE decides for the MX host with usable TLSA records, MTA-STS for the
// others: mx1 (DANE) fails its check, mx2 (no TLSA) passes the enforce
// policy's; the message goes to mx2, and TLS-RPT has one session of each
// kind, each under its own policy domain.
func TestDANEAndMTASTSOnDifferentHosts(t *testing.T) {
	d := newDANEWorld(t)
	d.pol = enforcePolicy(t, "mx1.ex.test", "mx2.ex.test")
	mx1 := d.mx("mx1.ex.test", testworld.MXOptions{Cert: d.w.CA.Issue(testworld.CertValid, "mx1.ex.test")})
	mx2 := d.mx("mx2.ex.test", testworld.MXOptions{Cert: d.w.CA.Issue(testworld.CertValid, "mx2.ex.test")})
	d.w.DNS.SetMX(daneDomain, testworld.MX{Pref: 10, Host: "mx1.ex.test"}, testworld.MX{Pref: 20, Host: "mx2.ex.test"})
	d.tlsa("mx1.ex.test", true, record311(d.w.CA.Issue(testworld.CertValid, "mx1.ex.test")))
	// mx2's TLSA name is signed, and proved empty.
	d.w.DNS.SetAD("_25._tcp.mx2.ex.test", true)

	line := d.deliver("u@ex.test", queue.Envelope{})
	d.expect(line, map[string]any{"result": "delivered", "mx": "mx2.ex.test", "dane": "", "tls_verified": true, "sts_mode": "enforce"})
	if len(mx1.Messages()) != 0 || len(mx2.Messages()) != 1 {
		t.Errorf("mx1 got %d, mx2 %d messages; want 0 and 1", len(mx1.Messages()), len(mx2.Messages()))
	}
	ta, st := d.sessions(tlsrpt.PolicyTypeTLSA), d.sessions(tlsrpt.PolicyTypeSTS)
	if len(ta) != 1 || ta[0].Success || ta[0].PolicyDomain != "mx1.ex.test" || ta[0].ReceivingMX != "mx1.ex.test" {
		t.Errorf("tlsa sessions %+v, want mx1's failure under mx1.ex.test", ta)
	}
	if len(st) != 1 || !st[0].Success || st[0].PolicyDomain != daneDomain || st[0].ReceivingMX != "mx2.ex.test" {
		t.Errorf("sts sessions %+v, want mx2's success under ex.test", st)
	}
}

// RFC 8689 §4.2.1: a DANE-authenticated MX is validated for REQUIRETLS,
// without MTA-STS and with a certificate the Web PKI refuses.
func TestDANESatisfiesREQUIRETLS(t *testing.T) {
	d := newDANEWorld(t)
	cert := d.w.CA.Issue(testworld.CertSelfSigned, "mx1.ex.test")
	mx := d.mx("mx1.ex.test", testworld.MXOptions{Cert: cert, AdvertiseREQUIRETLS: true})
	d.w.DNS.SetMX(daneDomain, testworld.MX{Pref: 10, Host: "mx1.ex.test"})
	d.tlsa("mx1.ex.test", true, record311(cert))

	line := d.deliver("u@ex.test", queue.Envelope{RequireTLS: true})
	d.expect(line, map[string]any{"result": "delivered", "dane": "authenticated"})
	cmds := mx.Commands()
	if !slices.ContainsFunc(cmds, func(c testworld.Command) bool { return c.Verb == "MAIL" && c.Conn.TLS }) {
		t.Errorf("no MAIL over TLS: %+v", cmds)
	}
}

// RFC 8689 §5: "TLS-Required: No" ignores DANE as it does MTA-STS, but
// STARTTLS is still used when offered.
func TestDANEIgnoredForTLSRequiredNo(t *testing.T) {
	d := newDANEWorld(t)
	mx := d.mx("mx1.ex.test", testworld.MXOptions{Cert: d.w.CA.Issue(testworld.CertSelfSigned, "mx1.ex.test")})
	d.w.DNS.SetMX(daneDomain, testworld.MX{Pref: 10, Host: "mx1.ex.test"})
	d.tlsa("mx1.ex.test", true, record311(d.w.CA.Issue(testworld.CertValid, "mx1.ex.test")))
	cfg := config.Default()
	cfg.Hostname = "relay.test"
	cfg.Delivery.Port = d.w.MXPort()
	st, err := queue.Open(queue.Options{Dir: t.TempDir(), Schedule: queue.Schedule{Retry: []time.Duration{time.Hour}, MaxQueueTime: time.Hour}})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	e := New(Options{Config: cfg, Store: st, Resolver: worldResolver(t, d.w), TLSRPT: d.rec, Roots: d.w.CA.Pool()})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { e.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	if _, err := st.Enqueue(queue.Envelope{Rcpts: []queue.RcptSpec{{Addr: "u@ex.test"}}},
		strings.NewReader("TLS-Required: No\r\nSubject: x\r\n\r\nhello\r\n")); err != nil {
		t.Fatal(err)
	}
	got := mx.WaitMessages(t, 1, 15*time.Second)
	if !got[0].TLS {
		t.Errorf("delivered without STARTTLS, which the MX offers")
	}
	if len(d.rec.all()) != 0 {
		t.Errorf("TLS-Required: No sessions counted: %+v", d.rec.all())
	}
}

// [[tls_policy]] security = "dane": an MX host without secure TLSA
// records is not used (dane-required, RFC 8460 §4.3.2.1); with them, it
// is authenticated by DANE.
func TestDANERequiredByTLSPolicy(t *testing.T) {
	for _, withTLSA := range []bool{false, true} {
		name := map[bool]string{false: "no TLSA", true: "TLSA"}[withTLSA]
		t.Run(name, func(t *testing.T) {
			d := newDANEWorld(t)
			d.tune = func(c *config.Config) {
				c.TLSPolicies = []config.TLSPolicy{{Domains: []string{daneDomain}, Security: "dane"}}
			}
			cert := d.w.CA.Issue(testworld.CertValid, "mx1.ex.test")
			mx := d.mx("mx1.ex.test", testworld.MXOptions{Cert: cert})
			d.w.DNS.SetMX(daneDomain, testworld.MX{Pref: 10, Host: "mx1.ex.test"})
			want := map[string]any{"result": "deferred", "dane": "failed", "tlsrpt_result": "dane-required"}
			if withTLSA {
				d.tlsa("mx1.ex.test", true, record311(cert))
				want = map[string]any{"result": "delivered", "dane": "authenticated", "tlsrpt_result": ""}
			}
			line := d.deliver("u@ex.test", queue.Envelope{})
			d.expect(line, want)
			if !withTLSA && mx.Connections() != 0 {
				t.Errorf("MX without TLSA contacted")
			}
		})
	}
}

// dns.trust_ad = "never": AD bits are not believed, so DANE is off even
// where every answer carries one; a TLSA record that would refuse the MX
// changes nothing.
func TestDANEUntrustedADIgnored(t *testing.T) {
	d := newDANEWorld(t)
	mx := d.mx("mx1.ex.test", testworld.MXOptions{Cert: d.w.CA.Issue(testworld.CertValid, "mx1.ex.test")})
	d.w.DNS.SetMX(daneDomain, testworld.MX{Pref: 10, Host: "mx1.ex.test"})
	d.tlsa("mx1.ex.test", true, record311(d.w.CA.Issue(testworld.CertValid, "other.test")))
	res, err := dnsclient.NewWithOptions(dnsclient.Options{Servers: []string{d.w.DNS.Addr()}, Timeout: 2 * time.Second,
		TrustAD: dnsclient.TrustADNever})
	if err != nil {
		t.Fatal(err)
	}
	d.res = res
	line := d.deliver("u@ex.test", queue.Envelope{})
	d.expect(line, map[string]any{"result": "delivered", "dane": ""})
	if len(mx.Messages()) != 1 {
		t.Errorf("MX got %d messages, want 1", len(mx.Messages()))
	}
	if n := d.w.DNS.CountQueries("_25._tcp.mx1.ex.test", dns.TypeTLSA); n != 0 {
		t.Errorf("%d TLSA queries with DANE off, want none", n)
	}
	if l := d.logs.FilterMessage("dane").All(); len(l) != 1 || l[0].ContextMap()["enabled"] != false {
		t.Errorf("start-up dane line %+v, want one saying it is off", l)
	}
}

// dns.trust_ad = "loopback" (the default) believes the AD bit only from
// servers on loopback addresses: a resolver configured with any other
// server (none can be bound in a test) gets no DANE at all.
func TestDANEOffWithNonLoopbackResolver(t *testing.T) {
	cfg := config.Default()
	for _, tc := range []struct {
		servers []string
		mode    string
		dane    bool
	}{
		{[]string{"127.0.0.53:53"}, "", true},
		{[]string{"[::1]:53"}, dnsclient.TrustADLoopback, true},
		{[]string{"192.0.2.53:53"}, dnsclient.TrustADLoopback, false},
		{[]string{"127.0.0.53:53", "192.0.2.53:53"}, dnsclient.TrustADLoopback, false},
		{[]string{"192.0.2.53:53"}, dnsclient.TrustADAlways, true},
		{[]string{"127.0.0.53:53"}, dnsclient.TrustADNever, false},
	} {
		res, err := dnsclient.NewWithOptions(dnsclient.Options{Servers: tc.servers, Timeout: time.Second, TrustAD: tc.mode})
		if err != nil {
			t.Fatal(err)
		}
		st, err := queue.Open(queue.Options{Dir: t.TempDir(), Schedule: queue.Schedule{Retry: []time.Duration{time.Hour}, MaxQueueTime: time.Hour}})
		if err != nil {
			t.Fatal(err)
		}
		e := New(Options{Config: cfg, Store: st, Resolver: res})
		if e.dane != tc.dane {
			t.Errorf("servers %v, trust_ad %q: DANE on = %v, want %v", tc.servers, tc.mode, e.dane, tc.dane)
		}
		cfg2 := *cfg
		cfg2.DANE.Enabled = false
		if e := New(Options{Config: &cfg2, Store: st, Resolver: res}); e.dane {
			t.Errorf("dane.enabled = false: DANE on")
		}
		st.Close()
	}
}

// RFC 7672 §2.2.2: an MX host that is a (secure) CNAME: the TLSA base
// domain is the expanded name when it has records, else the original
// name; SNI follows it.
func TestDANECNAMEBaseDomain(t *testing.T) {
	for _, tc := range []struct {
		name, at, base string
	}{
		{"records at the expanded name", "real.ex.test", "real.ex.test"},
		{"records at the original name", "mx1.ex.test", "mx1.ex.test"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newDANEWorld(t)
			cert := d.w.CA.Issue(testworld.CertSelfSigned, "real.ex.test")
			mx := d.mx("real.ex.test", testworld.MXOptions{Cert: cert})
			d.w.DNS.SetCNAME("mx1.ex.test", "real.ex.test")
			d.w.DNS.SetAD("mx1.ex.test", true)
			d.w.DNS.SetMX(daneDomain, testworld.MX{Pref: 10, Host: "mx1.ex.test"})
			d.w.DNS.SetAD("_25._tcp.real.ex.test", true)
			d.tlsa(tc.at, true, record311(cert))
			line := d.deliver("u@ex.test", queue.Envelope{})
			d.expect(line, map[string]any{"result": "delivered", "dane": "authenticated", "mx": "mx1.ex.test"})
			if snis := mx.SNIs(); len(snis) != 1 || snis[0] != tc.base {
				t.Errorf("SNI %q, want %s", snis, tc.base)
			}
			if ss := d.sessions(tlsrpt.PolicyTypeTLSA); len(ss) != 1 || ss[0].PolicyDomain != tc.base {
				t.Errorf("TLS-RPT sessions %+v, want policy domain %s", d.rec.all(), tc.base)
			}
		})
	}
}

// A parked session is reused only under the DANE it was checked with: a
// session set up for a "TLS-Required: No" message (DANE set aside) does
// not carry the next message to a DANE host.
func TestDANEReuseNeedsDANESession(t *testing.T) {
	d := policy.DANE{Status: policy.DANEUsable, Base: "mx1.ex.test",
		Records: []*dns.TLSA{{Usage: 3, Selector: 1, MatchingType: 1, Certificate: strings.Repeat("ab", 32)}}}
	e := &Engine{cfg: config.Default()}
	s := &session{host: "mx1.ex.test", dane: d, state: policy.ConnState{STARTTLSOffered: true, TLS: true}}
	if e.sessionFits(s, "", policy.Policy{}) {
		t.Errorf("a session not checked by DANE fits a message to a DANE host")
	}
	if !e.sessionFits(s, "", policy.Policy{TLSRequiredNo: true}) {
		t.Errorf("the session does not fit a TLS-Required: No message")
	}
	s.state.DANE = true
	if !e.sessionFits(s, "", policy.Policy{}) {
		t.Errorf("a DANE-authenticated session does not fit")
	}
}
