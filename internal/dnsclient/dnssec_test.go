package dnsclient

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/internal/testworld"
)

// signedZone serves rrs as a validating resolver in front of them would:
// the AD bit of a response is set when ad holds its question's name or
// its name and type ("a.test." or "a.test. AAAA"). A CNAME is answered one
// hop per response, unless chase is set: then the whole chain goes into
// one response, whose AD bit is the question's. A name without records of
// the type asked answers NODATA, a name without any NXDOMAIN, both with an
// SOA (so that they are cached); a name in servfail answers SERVFAIL, as a
// validating resolver does for bogus data.
type signedZone struct {
	rrs      []dns.RR
	ad       []string
	servfail []string
	chase    bool
}

func (s signedZone) start(t *testing.T) *zoneServer {
	return startZone(t, func(q dns.Question, m *dns.Msg) {
		m.AuthenticatedData = slices.Contains(s.ad, q.Name) || slices.Contains(s.ad, q.Name+" "+dns.TypeToString[q.Qtype])
		if slices.Contains(s.servfail, q.Name) {
			m.Rcode = dns.RcodeServerFailure
			return
		}
		name := q.Name
		for range maxCNAMEChain {
			var cname *dns.CNAME
			found, exists := false, false
			for _, rr := range s.rrs {
				h := rr.Header()
				if h.Name != name {
					continue
				}
				exists = true
				if c, ok := rr.(*dns.CNAME); ok && q.Qtype != dns.TypeCNAME {
					cname = c
				} else if h.Rrtype == q.Qtype {
					m.Answer = append(m.Answer, dns.Copy(rr))
					found = true
				}
			}
			if cname != nil {
				m.Answer = append(m.Answer, dns.Copy(cname))
				if !s.chase {
					return
				}
				name = cname.Target
				continue
			}
			if !found {
				if !exists {
					m.Rcode = dns.RcodeNameError
				}
				m.Ns = append(m.Ns, soaRR("test.", 300, 300))
			}
			return
		}
	})
}

func cnameRR(name, target string) dns.RR {
	return &dns.CNAME{Hdr: hdr(name, dns.TypeCNAME, 300), Target: target}
}

func tlsaRR(name string, usage uint8) dns.RR {
	return &dns.TLSA{Hdr: hdr(name, dns.TypeTLSA, 300), Usage: usage, Selector: 1, MatchingType: 1,
		Certificate: strings.Repeat("ab", 32)}
}

func aRR(name, ip string) dns.RR {
	return &dns.A{Hdr: hdr(name, dns.TypeA, 300), A: net.ParseIP(ip).To4()}
}

func aaaaRR(name, ip string) dns.RR {
	return &dns.AAAA{Hdr: hdr(name, dns.TypeAAAA, 300), AAAA: net.ParseIP(ip)}
}

func mxRR(name, host string) dns.RR {
	return &dns.MX{Hdr: hdr(name, dns.TypeMX, 300), Preference: 10, Mx: host}
}

// newTrustResolver returns an uncached resolver for servers with the
// given trust_ad mode.
func newTrustResolver(t *testing.T, mode string, servers ...string) *Resolver {
	t.Helper()
	r, err := NewWithOptions(Options{Servers: servers, Timeout: 2 * time.Second, TrustAD: mode})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestTrusts: in loopback mode every server must be a loopback IP
// address; "always" and "never" do not look at the servers.
func TestTrusts(t *testing.T) {
	tests := []struct {
		mode    string
		servers []string
		want    bool
	}{
		{TrustADLoopback, []string{"127.0.0.1:53"}, true},
		{TrustADLoopback, []string{"127.0.0.53:53"}, true},
		{TrustADLoopback, []string{"127.255.1.2:5353"}, true},
		{TrustADLoopback, []string{"[::1]:53"}, true},
		{TrustADLoopback, []string{"127.0.0.1:53", "[::1]:53"}, true},
		{TrustADLoopback, []string{"[::ffff:127.0.0.1]:53"}, true},
		{TrustADLoopback, []string{"192.0.2.1:53"}, false},
		{TrustADLoopback, []string{"[2001:db8::53]:53"}, false},
		{TrustADLoopback, []string{"127.0.0.1:53", "192.0.2.1:53"}, false},
		{TrustADLoopback, []string{"192.0.2.1:53", "127.0.0.1:53"}, false},
		{TrustADLoopback, []string{"128.0.0.1:53"}, false},
		{TrustADLoopback, []string{"0.0.0.0:53"}, false},
		{TrustADLoopback, []string{"[::]:53"}, false},
		{TrustADLoopback, []string{"[::ffff:192.0.2.1]:53"}, false},
		{TrustADLoopback, []string{"localhost:53"}, false},
		{TrustADLoopback, []string{"dns.example:53"}, false},
		{TrustADLoopback, []string{"[fe80::1%lo]:53"}, false},
		{TrustADLoopback, []string{"127.0.0.1"}, true}, // without a port
		{TrustADLoopback, []string{"192.0.2.1"}, false},
		{TrustADLoopback, nil, false},
		{TrustADAlways, []string{"192.0.2.1:53"}, true},
		{TrustADAlways, []string{"127.0.0.1:53", "[2001:db8::53]:53"}, true},
		{TrustADNever, []string{"127.0.0.1:53"}, false},
		{TrustADNever, []string{"[::1]:53"}, false},
		{"", []string{"127.0.0.1:53"}, false}, // not a canonical mode
	}
	for _, tt := range tests {
		if got := trusts(tt.servers, tt.mode); got != tt.want {
			t.Errorf("trusts(%q, %q) = %v, want %v", tt.servers, tt.mode, got, tt.want)
		}
	}
}

// TestTrustsResolvConfServers: servers read from resolv.conf are judged
// alike.
func TestTrustsResolvConfServers(t *testing.T) {
	dir := t.TempDir()
	for i, tt := range []struct {
		content string
		want    bool
	}{
		{"nameserver 127.0.0.53\n", true},
		{"nameserver ::1\nnameserver 127.0.0.1\n", true},
		{"nameserver 127.0.0.53\nnameserver 192.0.2.53\n", false},
		{"nameserver 2001:db8::53\n", false},
	} {
		path := filepath.Join(dir, "resolv"+string(rune('0'+i)))
		if err := os.WriteFile(path, []byte(tt.content), 0o600); err != nil {
			t.Fatal(err)
		}
		servers, err := systemServers(path)
		if err != nil {
			t.Fatal(err)
		}
		if got := trusts(servers, TrustADLoopback); got != tt.want {
			t.Errorf("resolv.conf %q: trusted %v, want %v", tt.content, got, tt.want)
		}
	}
}

func TestParseTrustAD(t *testing.T) {
	for in, want := range map[string]string{
		"": TrustADLoopback, "loopback": TrustADLoopback, "always": TrustADAlways,
		"never": TrustADNever, "Always": TrustADAlways, "NEVER": TrustADNever,
	} {
		if got, err := ParseTrustAD(in); err != nil || got != want {
			t.Errorf("ParseTrustAD(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, in := range []string{"yes", "true", "loopback ", "local"} {
		if got, err := ParseTrustAD(in); err == nil {
			t.Errorf("ParseTrustAD(%q) = %q, want an error", in, got)
		}
	}
	if _, err := NewWithOptions(Options{Servers: []string{"127.0.0.1:53"}, TrustAD: "sometimes"}); err == nil {
		t.Error("NewWithOptions accepted TrustAD \"sometimes\"")
	}
}

// TestTrustsAD: a resolver whose server is not on loopback does not
// believe the AD bit unless told to; no query is needed to know it.
func TestTrustsAD(t *testing.T) {
	tests := []struct {
		servers []string
		mode    string
		want    bool
	}{
		{[]string{"192.0.2.1:53"}, "", false},
		{[]string{"192.0.2.1:53"}, TrustADLoopback, false},
		{[]string{"127.0.0.1:53", "192.0.2.1:53"}, TrustADLoopback, false},
		{[]string{"192.0.2.1:53"}, TrustADAlways, true},
		{[]string{"127.0.0.1:53"}, "", true},
		{[]string{"[::1]:53"}, TrustADLoopback, true},
		{[]string{"127.0.0.1:53"}, TrustADNever, false},
	}
	for _, tt := range tests {
		r, err := NewWithOptions(Options{Servers: tt.servers, TrustAD: tt.mode})
		if err != nil {
			t.Fatal(err)
		}
		if got := r.TrustsAD(); got != tt.want {
			t.Errorf("servers %q, TrustAD %q: TrustsAD() = %v, want %v", tt.servers, tt.mode, got, tt.want)
		}
	}
	// New (no options) is the loopback default.
	if r, err := New([]string{"192.0.2.1:53"}, time.Second); err != nil || r.TrustsAD() {
		t.Errorf("New with a non-loopback server: TrustsAD() = %v, %v; want false", r.TrustsAD(), err)
	}
}

// TestADBitByTrustMode: the AD bit from the loopback test server makes an
// answer Secure in "loopback" and "always" mode, never in "never" mode;
// Authentic is the bit whatever the mode.
func TestADBitByTrustMode(t *testing.T) {
	w := testworld.New(t)
	w.DNS.SetMX("signed.test", testworld.MX{Pref: 10, Host: "mx.signed.test"})
	w.DNS.SetMX("plain.test", testworld.MX{Pref: 10, Host: "mx.plain.test"})
	w.DNS.SetAD("signed.test", true)
	if ip := net.ParseIP(strings.Split(w.DNS.Addr(), ":")[0]); ip == nil || !ip.IsLoopback() {
		t.Fatalf("test server at %s, not on loopback", w.DNS.Addr())
	}
	for _, mode := range []string{"", TrustADLoopback, TrustADAlways, TrustADNever} {
		t.Run("mode "+mode, func(t *testing.T) {
			r := newTrustResolver(t, mode, w.DNS.Addr())
			trusted := mode != TrustADNever
			if r.TrustsAD() != trusted {
				t.Fatalf("TrustsAD() = %v, want %v", r.TrustsAD(), trusted)
			}
			for name, ad := range map[string]bool{"signed.test": true, "plain.test": false} {
				ans, err := r.Lookup(testCtx(t), name, dns.TypeMX)
				if err != nil {
					t.Fatal(err)
				}
				if ans.Authentic != ad || ans.Secure != (ad && trusted) {
					t.Errorf("%s: Authentic %v, Secure %v; want %v, %v", name, ans.Authentic, ans.Secure, ad, ad && trusted)
				}
				mxs, secure, err := r.LookupMXSecure(testCtx(t), name)
				if err != nil || len(mxs) != 1 || secure != (ad && trusted) {
					t.Errorf("LookupMXSecure(%s) = %v, %v, %v; want one MX, secure %v", name, mxs, secure, err, ad && trusted)
				}
			}
		})
	}
}

// TestQueriesAskForDNSSEC: every query, over UDP and over TCP after a
// truncated answer, has the EDNS0 DO bit with the 1232-byte size, the AD
// bit, and not the CD bit.
func TestQueriesAskForDNSSEC(t *testing.T) {
	type query struct {
		proto      string
		edns, do   bool
		size       uint16
		ad, cd, rd bool
	}
	var mu sync.Mutex
	var got []query
	addr := startServer(t, func(w dns.ResponseWriter, req *dns.Msg) {
		q := query{proto: "udp", ad: req.AuthenticatedData, cd: req.CheckingDisabled, rd: req.RecursionDesired}
		if _, ok := w.RemoteAddr().(*net.TCPAddr); ok {
			q.proto = "tcp"
		}
		if opt := req.IsEdns0(); opt != nil {
			q.edns, q.do, q.size = true, opt.Do(), opt.UDPSize()
		}
		mu.Lock()
		got = append(got, q)
		mu.Unlock()
		m := new(dns.Msg)
		m.SetReply(req)
		m.AuthenticatedData = true
		if q.proto == "udp" {
			m.Truncated = true // make the client ask again over TCP
		} else {
			m.Answer = append(m.Answer, tlsaRR(req.Question[0].Name, 3))
		}
		w.WriteMsg(m)
	})
	r := newResolver(t, 2*time.Second, addr)
	res, err := r.LookupTLSA(testCtx(t), "mx.ex.test")
	if err != nil || len(res.Records) != 1 || !res.Secure {
		t.Fatalf("LookupTLSA = %+v, %v; want one secure record", res, err)
	}
	mu.Lock()
	defer mu.Unlock()
	want := []query{
		{proto: "udp", edns: true, do: true, size: 1232, ad: true, rd: true},
		{proto: "tcp", edns: true, do: true, size: 1232, ad: true, rd: true},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("queries received:\n%+v\nwant\n%+v", got, want)
	}
}

// TestCNAMEChainSecurity: an answer reached through CNAMEs is Secure only
// when every response of the chain had the AD bit.
func TestCNAMEChainSecurity(t *testing.T) {
	rrs := []dns.RR{
		cnameRR("all.test.", "all-target.test."), txtRR("all-target.test.", 300, "x"),
		cnameRR("first.test.", "first-target.test."), txtRR("first-target.test.", 300, "x"),
		cnameRR("last.test.", "last-target.test."), txtRR("last-target.test.", 300, "x"),
		cnameRR("mid.test.", "mid2.test."), cnameRR("mid2.test.", "mid-target.test."), txtRR("mid-target.test.", 300, "x"),
		cnameRR("mx.test.", "mx-target.test."), mxRR("mx-target.test.", "mail.test."),
	}
	z := signedZone{rrs: rrs, ad: []string{
		"all.test.", "all-target.test.",
		"first-target.test.", // the first hop has no AD
		"last.test.",         // the target has no AD
		"mid.test.", "mid-target.test.",
		"mx-target.test.",
	}}.start(t)
	r := newResolver(t, 2*time.Second, z.addr)
	tests := []struct {
		qname             string
		authentic, secure bool
	}{
		{"all.test", true, true},
		{"first.test", true, false},
		{"last.test", false, false},
		{"mid.test", true, false},
	}
	for _, tt := range tests {
		ans, err := r.Lookup(testCtx(t), tt.qname, dns.TypeTXT)
		if err != nil {
			t.Fatalf("%s: %v", tt.qname, err)
		}
		if ans.Authentic != tt.authentic || ans.Secure != tt.secure {
			t.Errorf("%s: Authentic %v, Secure %v; want %v, %v", tt.qname, ans.Authentic, ans.Secure, tt.authentic, tt.secure)
		}
	}
	if mxs, secure, err := r.LookupMXSecure(testCtx(t), "mx.test"); err != nil || len(mxs) != 1 || secure {
		t.Errorf("LookupMXSecure through a CNAME without AD = %v, %v, %v; want one MX, not secure", mxs, secure, err)
	}
	// A denial at the end of a chain is no more secure than the chain.
	z2 := signedZone{rrs: []dns.RR{cnameRR("a.test.", "gone.test.")}, ad: []string{"gone.test."}}.start(t)
	r2 := newResolver(t, 2*time.Second, z2.addr)
	if _, secure, err := r2.LookupMXSecure(testCtx(t), "a.test"); !errors.Is(err, ErrNotFound) || secure {
		t.Errorf("NXDOMAIN after a CNAME without AD: secure %v, %v; want not secure, ErrNotFound", secure, err)
	}
	if _, secure, err := r2.LookupMXSecure(testCtx(t), "gone.test"); !errors.Is(err, ErrNotFound) || !secure {
		t.Errorf("NXDOMAIN with AD: secure %v, %v; want secure, ErrNotFound", secure, err)
	}
}

// TestLookupTLSA covers the outcomes RFC 7672 §2.2 tells apart.
func TestLookupTLSA(t *testing.T) {
	z := signedZone{
		rrs: []dns.RR{
			tlsaRR("_25._tcp.mx.secure.test.", 3), tlsaRR("_25._tcp.mx.secure.test.", 2),
			tlsaRR("_25._tcp.mx.insecure.test.", 3),
			aRR("_25._tcp.mx.nodata-ad.test.", "192.0.2.1"),
			aRR("_25._tcp.mx.nodata.test.", "192.0.2.1"),
			cnameRR("_25._tcp.mx.alias.test.", "_25._tcp.mx.real.test."), tlsaRR("_25._tcp.mx.real.test.", 3),
		},
		ad: []string{
			"_25._tcp.mx.secure.test. TLSA",
			"_25._tcp.mx.nodata-ad.test.",
			"_25._tcp.mx.nx-ad.test.",
			"_25._tcp.mx.alias.test.",
			"_25._tcp.mx.servfail.test.",
		},
		servfail: []string{"_25._tcp.mx.servfail.test."},
		chase:    true,
	}.start(t)
	r := newResolver(t, 2*time.Second, z.addr)
	tests := []struct {
		host    string
		records int
		secure  bool
		name    string
		err     error
	}{
		{"mx.secure.test", 2, true, "_25._tcp.mx.secure.test", nil},
		{"MX.Secure.Test.", 2, true, "_25._tcp.mx.secure.test", nil},
		{"mx.insecure.test", 1, false, "_25._tcp.mx.insecure.test", nil},
		{"mx.alias.test", 1, true, "_25._tcp.mx.real.test", nil},
		{"mx.nodata-ad.test", 0, true, "_25._tcp.mx.nodata-ad.test", ErrNoData},
		{"mx.nodata.test", 0, false, "_25._tcp.mx.nodata.test", ErrNoData},
		{"mx.nx-ad.test", 0, true, "_25._tcp.mx.nx-ad.test", ErrNotFound},
		{"mx.nx.test", 0, false, "_25._tcp.mx.nx.test", ErrNotFound},
		{"mx.servfail.test", 0, false, "_25._tcp.mx.servfail.test", ErrTemporary},
	}
	for _, tt := range tests {
		t.Run(tt.host, func(t *testing.T) {
			res, err := r.LookupTLSA(testCtx(t), tt.host)
			if tt.err == nil && err != nil || tt.err != nil && !errors.Is(err, tt.err) {
				t.Fatalf("LookupTLSA(%s): err %v, want %v", tt.host, err, tt.err)
			}
			if len(res.Records) != tt.records || res.Secure != tt.secure || res.Name != tt.name {
				t.Fatalf("LookupTLSA(%s) = %d records, secure %v, name %q; want %d, %v, %q",
					tt.host, len(res.Records), res.Secure, res.Name, tt.records, tt.secure, tt.name)
			}
			for _, rec := range res.Records {
				if rec.MatchingType != 1 || rec.Selector != 1 || rec.Certificate != strings.Repeat("ab", 32) {
					t.Fatalf("record %v", rec)
				}
			}
		})
	}
	if n := z.count("_25._tcp.mx.secure.test.", dns.TypeTLSA); n != 2 {
		t.Errorf("_25._tcp.mx.secure.test. TLSA asked %d times, want 2 (no cache)", n)
	}

	t.Run("not secure when AD is not trusted", func(t *testing.T) {
		r := newTrustResolver(t, TrustADNever, z.addr)
		res, err := r.LookupTLSA(testCtx(t), "mx.secure.test")
		if err != nil || len(res.Records) != 2 || res.Secure {
			t.Fatalf("LookupTLSA = %d records, secure %v, %v; want 2 records, not secure", len(res.Records), res.Secure, err)
		}
		if _, err := r.LookupTLSA(testCtx(t), "mx.nodata-ad.test"); !errors.Is(err, ErrNoData) {
			t.Fatal(err)
		}
	})
	t.Run("timeout is temporary", func(t *testing.T) {
		r := newResolver(t, 200*time.Millisecond, silentServer(t))
		start := time.Now()
		res, err := r.LookupTLSA(testCtx(t), "mx.ex.test")
		if !IsTemporary(err) || res.Secure || res.Records != nil {
			t.Fatalf("LookupTLSA from a silent server = %+v, %v; want temporary", res, err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("took %v", d)
		}
	})
}

// TestSecureSurvivesCache: a cached outcome, answer or denial, keeps
// whether it was secure.
func TestSecureSurvivesCache(t *testing.T) {
	z := signedZone{
		rrs: []dns.RR{
			tlsaRR("_25._tcp.secure.test.", 3),
			tlsaRR("_25._tcp.plain.test.", 3),
			aRR("_25._tcp.nodata-ad.test.", "192.0.2.1"),
			aRR("_25._tcp.nodata.test.", "192.0.2.1"),
			mxRR("secure.test.", "mx.secure.test."),
			aRR("nomx.test.", "192.0.2.1"),
		},
		ad: []string{"_25._tcp.secure.test.", "_25._tcp.nodata-ad.test.", "_25._tcp.nx-ad.test.", "secure.test.", "nomx.test."},
	}.start(t)
	clock := newFakeClock()
	r := newCachedResolver(t, clock, 100, time.Hour, z.addr)
	if !r.TrustsAD() {
		t.Fatal("resolver for a loopback server does not trust AD")
	}
	tests := []struct {
		host    string
		records int
		secure  bool
		err     error
	}{
		{"secure.test", 1, true, nil},
		{"plain.test", 1, false, nil},
		{"nodata-ad.test", 0, true, ErrNoData},
		{"nodata.test", 0, false, ErrNoData},
		{"nx-ad.test", 0, true, ErrNotFound},
		{"nx.test", 0, false, ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.host, func(t *testing.T) {
			for i := range 2 {
				res, err := r.LookupTLSA(testCtx(t), tt.host)
				if tt.err == nil && err != nil || tt.err != nil && !errors.Is(err, tt.err) {
					t.Fatalf("lookup %d: err %v, want %v", i+1, err, tt.err)
				}
				if len(res.Records) != tt.records || res.Secure != tt.secure {
					t.Fatalf("lookup %d: %d records, secure %v; want %d, %v", i+1, len(res.Records), res.Secure, tt.records, tt.secure)
				}
				if len(res.Records) > 0 {
					res.Records[0] = nil // the slice is the caller's
				}
				clock.Advance(time.Minute)
			}
			if n := z.count("_25._tcp."+tt.host+".", dns.TypeTLSA); n != 1 {
				t.Fatalf("server asked %d times, want once (the second from the cache)", n)
			}
		})
	}
	t.Run("MX", func(t *testing.T) {
		for range 2 {
			if mxs, secure, err := r.LookupMXSecure(testCtx(t), "secure.test"); err != nil || len(mxs) != 1 || !secure {
				t.Fatalf("LookupMXSecure = %v, %v, %v; want one secure MX", mxs, secure, err)
			}
			if _, secure, err := r.LookupMXSecure(testCtx(t), "nomx.test"); !errors.Is(err, ErrNoData) || !secure {
				t.Fatalf("LookupMXSecure of a secure NODATA = %v, %v", secure, err)
			}
			// Lookup of the same question is answered from the same entry.
			if ans, err := r.Lookup(testCtx(t), "secure.test", dns.TypeMX); err != nil || !ans.Secure || !ans.Authentic {
				t.Fatalf("Lookup = %+v, %v; want secure", ans, err)
			}
		}
		if n := z.count("secure.test.", dns.TypeMX) + z.count("nomx.test.", dns.TypeMX); n != 2 {
			t.Fatalf("server asked %d times, want 2", n)
		}
	})
}

// TestLookupIPSecure: the addresses are secure when every address RRset
// is; the name is the owner after CNAMEs.
func TestLookupIPSecure(t *testing.T) {
	w := testworld.New(t)
	w.DNS.SetCNAME("mx.alias.test", "Real.Host.Test.")
	w.DNS.SetA("real.host.test", "192.0.2.1")
	w.DNS.SetAD("mx.alias.test", true)
	w.DNS.SetA("plain.host.test", "192.0.2.2")
	w.DNS.SetAD("plain.host.test", true)
	w.DNS.SetCNAME("unsigned.alias.test", "real.host.test")

	z := signedZone{
		rrs: []dns.RR{
			aRR("mixed.test.", "192.0.2.3"), aaaaRR("mixed.test.", "2001:db8::3"),
			aRR("v4.test.", "192.0.2.4"),
			cnameRR("hop.test.", "hop-target.test."), aRR("hop-target.test.", "192.0.2.5"),
			cnameRR("hop-ok.test.", "hop-target.test."),
		},
		ad: []string{"mixed.test. A", "v4.test.", "hop-target.test.", "hop-ok.test."},
	}.start(t)

	tests := []struct {
		server string
		host   string
		wantV6 bool
		ips    []string
		secure bool
		name   string
		err    error
	}{
		{w.DNS.Addr(), "mx.alias.test", false, []string{"192.0.2.1"}, true, "real.host.test", nil},
		{w.DNS.Addr(), "MX.Alias.Test.", false, []string{"192.0.2.1"}, true, "real.host.test", nil},
		{w.DNS.Addr(), "unsigned.alias.test", false, []string{"192.0.2.1"}, false, "real.host.test", nil},
		{w.DNS.Addr(), "Plain.Host.Test.", false, []string{"192.0.2.2"}, true, "plain.host.test", nil},
		{w.DNS.Addr(), "absent.test", true, nil, false, "", ErrNotFound},
		{z.addr, "mixed.test", false, []string{"192.0.2.3"}, true, "mixed.test", nil},
		{z.addr, "mixed.test", true, []string{"192.0.2.3", "2001:db8::3"}, false, "mixed.test", nil},
		{z.addr, "v4.test", true, []string{"192.0.2.4"}, true, "v4.test", nil}, // AAAA NODATA does not count
		{z.addr, "hop.test", false, []string{"192.0.2.5"}, false, "hop-target.test", nil},
		{z.addr, "hop-ok.test", false, []string{"192.0.2.5"}, true, "hop-target.test", nil},
	}
	for _, tt := range tests {
		r := newResolver(t, 2*time.Second, tt.server)
		ips, secure, name, err := r.LookupIPSecure(testCtx(t), tt.host, tt.wantV6)
		if tt.err != nil {
			if !errors.Is(err, tt.err) || ips != nil || secure || name != "" {
				t.Errorf("LookupIPSecure(%s) = %v, %v, %q, %v; want %v", tt.host, ips, secure, name, err, tt.err)
			}
			continue
		}
		var got []string
		for _, ip := range ips {
			got = append(got, ip.String())
		}
		if err != nil || !reflect.DeepEqual(got, tt.ips) || secure != tt.secure || name != tt.name {
			t.Errorf("LookupIPSecure(%s, v6 %v) = %v, %v, %q, %v; want %v, %v, %q", tt.host, tt.wantV6, got, secure, name, err, tt.ips, tt.secure, tt.name)
		}
	}
}
