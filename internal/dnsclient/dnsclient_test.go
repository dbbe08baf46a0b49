package dnsclient

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/internal/testworld"
)

// newResolver returns a resolver for servers with a timeout short enough
// for tests.
func newResolver(t *testing.T, timeout time.Duration, servers ...string) *Resolver {
	t.Helper()
	r, err := New(servers, timeout)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// startServer runs h on a UDP and a TCP dns.Server on 127.0.0.1 (one port)
// for the test's lifetime: for the answers the testworld server, being a
// well-behaved authoritative one, never gives.
func startServer(t testing.TB, h dns.HandlerFunc) string {
	t.Helper()
	var pc net.PacketConn
	var l net.Listener
	for tries := 0; ; tries++ {
		var err error
		pc, err = net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		l, err = net.Listen("tcp", pc.LocalAddr().String())
		if err == nil {
			break
		}
		pc.Close()
		if tries > 20 {
			t.Fatal(err)
		}
	}
	udpStarted, tcpStarted := make(chan struct{}), make(chan struct{})
	udp := &dns.Server{PacketConn: pc, Handler: h, NotifyStartedFunc: func() { close(udpStarted) }}
	tcp := &dns.Server{Listener: l, Handler: h, NotifyStartedFunc: func() { close(tcpStarted) }}
	go udp.ActivateAndServe()
	go tcp.ActivateAndServe()
	for _, c := range []chan struct{}{udpStarted, tcpStarted} {
		select {
		case <-c:
		case <-time.After(5 * time.Second):
			t.Fatal("test DNS server did not start")
		}
	}
	t.Cleanup(func() {
		udp.Shutdown()
		tcp.Shutdown()
	})
	return pc.LocalAddr().String()
}

// silentServer is a UDP socket that reads queries and never answers.
func silentServer(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			if _, _, err := pc.ReadFrom(buf); err != nil {
				return
			}
		}
	}()
	return pc.LocalAddr().String()
}

// closedPort is a UDP address nobody listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := pc.LocalAddr().String()
	pc.Close()
	return addr
}

func rcodeServer(t *testing.T, rcode int) string {
	return startServer(t, func(w dns.ResponseWriter, q *dns.Msg) {
		m := new(dns.Msg)
		m.SetRcode(q, rcode)
		w.WriteMsg(m)
	})
}

func TestLookupMXSortedByPreference(t *testing.T) {
	w := testworld.New(t)
	w.DNS.SetMX("ex.test",
		testworld.MX{Pref: 30, Host: "backup.ex.test"},
		testworld.MX{Pref: 10, Host: "MX1.Ex.Test."},
		testworld.MX{Pref: 20, Host: "mx2.ex.test"},
	)
	r := newResolver(t, 2*time.Second, w.DNS.Addr())
	// Upper case and the trailing dot in the question make no difference.
	for _, name := range []string{"ex.test", "EX.Test."} {
		got, err := r.LookupMX(testCtx(t), name)
		if err != nil {
			t.Fatalf("LookupMX(%q): %v", name, err)
		}
		want := []MX{{"mx1.ex.test", 10}, {"mx2.ex.test", 20}, {"backup.ex.test", 30}}
		if !reflect.DeepEqual(got, want) {
			t.Fatalf("LookupMX(%q) = %v, want %v (by preference, lower case, no trailing dot)", name, got, want)
		}
	}
}

func TestLookupMXShufflesEqualPreferences(t *testing.T) {
	w := testworld.New(t)
	w.DNS.SetMX("ex.test",
		testworld.MX{Pref: 10, Host: "a.ex.test"},
		testworld.MX{Pref: 10, Host: "b.ex.test"},
		testworld.MX{Pref: 5, Host: "first.ex.test"},
		testworld.MX{Pref: 20, Host: "last.ex.test"},
	)
	r := newResolver(t, 2*time.Second, w.DNS.Addr())
	orders := map[string]int{}
	for range 200 {
		got, err := r.LookupMX(testCtx(t), "ex.test")
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 4 || got[0].Host != "first.ex.test" || got[3].Host != "last.ex.test" {
			t.Fatalf("LookupMX = %v: preference order broken", got)
		}
		orders[got[1].Host+","+got[2].Host]++
	}
	// RFC 5321 §5.1: equal preferences MUST be randomized. Each order has
	// probability 1/2; both appear in 200 draws but for 2^-199.
	if len(orders) != 2 || orders["a.ex.test,b.ex.test"] == 0 || orders["b.ex.test,a.ex.test"] == 0 {
		t.Fatalf("orders of two equal-preference MX over 200 lookups: %v, want both", orders)
	}
}

func TestLookupMXNull(t *testing.T) {
	w := testworld.New(t)
	w.DNS.SetNullMX("nomail.test")
	r := newResolver(t, 2*time.Second, w.DNS.Addr())
	got, err := r.LookupMX(testCtx(t), "nomail.test")
	if err != nil {
		t.Fatal(err)
	}
	if want := []MX{{".", 0}}; !reflect.DeepEqual(got, want) {
		t.Fatalf("null MX = %v, want %v (RFC 7505)", got, want)
	}
}

func TestLookupErrorKinds(t *testing.T) {
	w := testworld.New(t)
	w.DNS.SetA("host.ex.test", "192.0.2.1")
	w.DNS.SetA("deep.below.empty.test", "192.0.2.2")
	w.DNS.SetMX("broken.test", testworld.MX{Pref: 10, Host: "mx.broken.test"})
	w.DNS.SetServFail("broken.test", dns.TypeANY, true)
	w.DNS.SetCNAME("alias.test", "missing.test")
	r := newResolver(t, 2*time.Second, w.DNS.Addr())

	tests := []struct {
		name      string
		qname     string
		qtype     uint16
		want      error
		notFound  bool
		temporary bool
	}{
		{"NXDOMAIN is ErrNotFound, not temporary", "absent.test", dns.TypeMX, ErrNotFound, true, false},
		{"NODATA is ErrNoData, not temporary", "host.ex.test", dns.TypeMX, ErrNoData, true, false},
		{"empty non-terminal is NODATA (RFC 8020)", "below.empty.test", dns.TypeA, ErrNoData, true, false},
		{"SERVFAIL is temporary", "broken.test", dns.TypeMX, ErrTemporary, false, true},
		{"CNAME to a missing name is NXDOMAIN", "alias.test", dns.TypeTXT, ErrNotFound, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ans, err := r.Lookup(testCtx(t), tt.qname, tt.qtype)
			if !errors.Is(err, tt.want) {
				t.Fatalf("Lookup(%s, %s) = %v, %v; want %v", tt.qname, dns.TypeToString[tt.qtype], ans, err, tt.want)
			}
			if IsNotFound(err) != tt.notFound || IsTemporary(err) != tt.temporary {
				t.Fatalf("%v: IsNotFound = %v, IsTemporary = %v; want %v, %v", err, IsNotFound(err), IsTemporary(err), tt.notFound, tt.temporary)
			}
			if !strings.Contains(err.Error(), tt.qname) {
				t.Errorf("error %q does not name %s", err, tt.qname)
			}
		})
	}
}

func TestTimeoutIsTemporaryAndBounded(t *testing.T) {
	const timeout = 300 * time.Millisecond
	w := testworld.New(t)
	w.DNS.SetMX("slow.test", testworld.MX{Pref: 10, Host: "mx.slow.test"})
	w.DNS.SetDelay("slow.test", 10*time.Second)
	tests := []struct {
		name   string
		server string
	}{
		{"server that never answers", silentServer(t)},
		{"server that answers too late", w.DNS.Addr()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newResolver(t, timeout, tt.server)
			start := time.Now()
			_, err := r.LookupMX(testCtx(t), "slow.test")
			elapsed := time.Since(start)
			if !IsTemporary(err) || IsNotFound(err) {
				t.Fatalf("err = %v, want a temporary error", err)
			}
			if elapsed < timeout/2 || elapsed > 4*timeout {
				t.Fatalf("gave up after %v, want about the timeout %v", elapsed, timeout)
			}
		})
	}
}

func TestContextDeadlineBoundsLookup(t *testing.T) {
	r := newResolver(t, 10*time.Second, silentServer(t), silentServer(t))
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	start := time.Now()
	_, err := r.LookupMX(ctx, "slow.test")
	if !IsTemporary(err) {
		t.Fatalf("err = %v, want temporary", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("lookup took %v past a 200ms context deadline", d)
	}
}

func TestTruncatedUDPRetriedOverTCP(t *testing.T) {
	w := testworld.New(t)
	w.DNS.SetTXT("tc.test", []string{"v=TLSRPTv1; rua=mailto:r@tc.test"})
	w.DNS.SetTruncate("tc.test", true)
	// Many records: larger than the 1232-byte EDNS0 size, truncated by
	// the server itself.
	var big [][]string
	for i := range 40 {
		big = append(big, []string{strings.Repeat(string(rune('a'+i%26)), 60)})
	}
	w.DNS.SetTXT("big.test", big...)
	r := newResolver(t, 2*time.Second, w.DNS.Addr())

	tests := []struct {
		name  string
		qname string
		n     int
	}{
		{"TC bit with no records", "tc.test", 1},
		{"answer larger than the UDP size", "big.test", 40},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w.DNS.ResetQueries()
			got, err := r.LookupTXT(testCtx(t), tt.qname)
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != tt.n {
				t.Fatalf("got %d TXT records, want %d", len(got), tt.n)
			}
			var protos []string
			for _, q := range w.DNS.Queries() {
				protos = append(protos, q.Proto)
			}
			if !reflect.DeepEqual(protos, []string{"udp", "tcp"}) {
				t.Fatalf("queries went over %v, want udp then tcp", protos)
			}
		})
	}
}

func TestCNAMEFollowed(t *testing.T) {
	w := testworld.New(t)
	w.DNS.SetCNAME("www.ex.test", "Mid.Ex.Test")
	w.DNS.SetCNAME("mid.ex.test", "target.other.test")
	w.DNS.SetMX("target.other.test",
		testworld.MX{Pref: 20, Host: "mx2.other.test"},
		testworld.MX{Pref: 10, Host: "mx1.other.test"})
	w.DNS.SetTXT("target.other.test", []string{"hello"})
	w.DNS.SetA("mx1.other.test", "192.0.2.10")
	w.DNS.SetCNAME("mxalias.ex.test", "mx1.other.test")
	r := newResolver(t, 2*time.Second, w.DNS.Addr())

	mx, err := r.LookupMX(testCtx(t), "www.ex.test")
	if err != nil {
		t.Fatal(err)
	}
	// The MX host names are the MX records' targets, not CNAME names.
	if want := []MX{{"mx1.other.test", 10}, {"mx2.other.test", 20}}; !reflect.DeepEqual(mx, want) {
		t.Fatalf("LookupMX through a CNAME chain = %v, want %v", mx, want)
	}
	ans, err := r.Lookup(testCtx(t), "www.ex.test", dns.TypeTXT)
	if err != nil {
		t.Fatal(err)
	}
	if ans.Name != "target.other.test." || len(ans.RRs) != 1 {
		t.Fatalf("Lookup through CNAMEs: Name %q, %d records; want the target's one record", ans.Name, len(ans.RRs))
	}
	ips, err := r.LookupIP(testCtx(t), "mxalias.ex.test", true)
	if err != nil || len(ips) != 1 || !ips[0].Equal(net.ParseIP("192.0.2.10")) {
		t.Fatalf("LookupIP through a CNAME = %v, %v", ips, err)
	}
	// Asking for the CNAME itself does not follow it.
	ans, err = r.Lookup(testCtx(t), "www.ex.test", dns.TypeCNAME)
	if err != nil || len(ans.RRs) != 1 || !strings.EqualFold(ans.RRs[0].(*dns.CNAME).Target, "mid.ex.test.") {
		t.Fatalf("Lookup CNAME = %v, %v; want the record itself", ans, err)
	}
}

// chainServer answers each question with one CNAME hop only, like a
// server authoritative for the alias but not for its target, so the
// client must ask again for the target.
func chainServer(t *testing.T, cnames map[string]string, txt map[string]string) string {
	return startServer(t, func(w dns.ResponseWriter, q *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(q)
		name := strings.ToLower(q.Question[0].Name)
		if target, ok := cnames[name]; ok {
			m.Answer = append(m.Answer, &dns.CNAME{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeCNAME, Class: dns.ClassINET, Ttl: 60}, Target: target})
		} else if v, ok := txt[name]; ok && q.Question[0].Qtype == dns.TypeTXT {
			m.Answer = append(m.Answer, &dns.TXT{Hdr: dns.RR_Header{Name: q.Question[0].Name, Rrtype: dns.TypeTXT, Class: dns.ClassINET, Ttl: 60}, Txt: []string{v}})
		} else if !ok {
			m.Rcode = dns.RcodeNameError
		}
		w.WriteMsg(m)
	})
}

func TestCNAMEChainAcrossResponses(t *testing.T) {
	addr := chainServer(t,
		map[string]string{"a.test.": "b.test.", "b.test.": "c.test."},
		map[string]string{"c.test.": "at the end"})
	r := newResolver(t, 2*time.Second, addr)
	got, err := r.LookupTXT(testCtx(t), "a.test")
	if err != nil {
		t.Fatalf("CNAME chain a → b → c answered one hop per response: %v", err)
	}
	if want := [][]string{{"at the end"}}; !reflect.DeepEqual(got, want) {
		t.Fatalf("LookupTXT = %q, want %q", got, want)
	}
}

func TestCNAMELoopIsTemporary(t *testing.T) {
	w := testworld.New(t)
	w.DNS.SetCNAME("loop1.test", "loop2.test")
	w.DNS.SetCNAME("loop2.test", "loop1.test")
	tests := []struct {
		name   string
		server string
	}{
		{"loop resolved by the server (SERVFAIL)", w.DNS.Addr()},
		{"loop seen by the client one hop at a time", chainServer(t,
			map[string]string{"loop1.test.": "loop2.test.", "loop2.test.": "loop3.test.", "loop3.test.": "loop1.test."}, nil)},
		{"self loop", chainServer(t, map[string]string{"loop1.test.": "LOOP1.test."}, nil)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newResolver(t, 2*time.Second, tt.server)
			_, err := r.LookupMX(testCtx(t), "loop1.test")
			if !IsTemporary(err) || IsNotFound(err) {
				t.Fatalf("CNAME loop: err = %v, want temporary", err)
			}
		})
	}
}

func TestCNAMEChainTooLongIsTemporary(t *testing.T) {
	cnames := map[string]string{}
	for i := range 20 {
		cnames["c"+string(rune('a'+i))+".test."] = "c" + string(rune('a'+i+1)) + ".test."
	}
	r := newResolver(t, 2*time.Second, chainServer(t, cnames, nil))
	_, err := r.LookupTXT(testCtx(t), "ca.test")
	if !IsTemporary(err) {
		t.Fatalf("20-link CNAME chain: err = %v, want temporary", err)
	}
}

func TestLookupTXTKeepsStringsApart(t *testing.T) {
	w := testworld.New(t)
	w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=ab", "cd"}, []string{"other"})
	r := newResolver(t, 2*time.Second, w.DNS.Addr())
	got, err := r.LookupTXT(testCtx(t), "_mta-sts.ex.test")
	if err != nil {
		t.Fatal(err)
	}
	sortRecords(got)
	if want := [][]string{{"other"}, {"v=STSv1; id=ab", "cd"}}; !reflect.DeepEqual(got, want) {
		t.Fatalf("LookupTXT = %q, want %q", got, want)
	}
}

func sortRecords(recs [][]string) {
	for i := range recs {
		for j := i + 1; j < len(recs); j++ {
			if strings.Join(recs[j], "") < strings.Join(recs[i], "") {
				recs[i], recs[j] = recs[j], recs[i]
			}
		}
	}
}

func TestLookupIP(t *testing.T) {
	w := testworld.New(t)
	w.DNS.SetA("dual.test", "192.0.2.1", "192.0.2.2")
	w.DNS.SetAAAA("dual.test", "2001:db8::1")
	w.DNS.SetAAAA("v6only.test", "2001:db8::6")
	w.DNS.SetA("v4.halfbroken.test", "192.0.2.4")
	w.DNS.SetServFail("v4.halfbroken.test", dns.TypeAAAA, true)
	w.DNS.SetA("allbroken.test", "192.0.2.5")
	w.DNS.SetServFail("allbroken.test", dns.TypeANY, true)
	r := newResolver(t, 2*time.Second, w.DNS.Addr())

	tests := []struct {
		name   string
		host   string
		wantV6 bool
		want   []string
		err    error
	}{
		{"A then AAAA", "dual.test", true, []string{"192.0.2.1", "192.0.2.2", "2001:db8::1"}, nil},
		{"A only when IPv6 is not wanted", "dual.test", false, []string{"192.0.2.1", "192.0.2.2"}, nil},
		{"AAAA only", "v6only.test", true, []string{"2001:db8::6"}, nil},
		{"AAAA only without IPv6 is NODATA", "v6only.test", false, nil, ErrNoData},
		{"one family failing temporarily does not hide the other", "v4.halfbroken.test", true, []string{"192.0.2.4"}, nil},
		{"both families failing is temporary", "allbroken.test", true, nil, ErrTemporary},
		{"missing name is NXDOMAIN", "absent.test", true, nil, ErrNotFound},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ips, err := r.LookupIP(testCtx(t), tt.host, tt.wantV6)
			if tt.err != nil {
				if !errors.Is(err, tt.err) {
					t.Fatalf("LookupIP(%s) = %v, %v; want %v", tt.host, ips, err, tt.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, ip := range ips {
				got = append(got, ip.String())
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("LookupIP(%s) = %v, want %v", tt.host, got, tt.want)
			}
		})
	}
}

func TestSecondServerUsedWhenFirstFails(t *testing.T) {
	w := testworld.New(t)
	w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx.ex.test"})
	tests := []struct {
		name  string
		first string
	}{
		{"first server answers SERVFAIL", rcodeServer(t, dns.RcodeServerFailure)},
		{"first server answers REFUSED", rcodeServer(t, dns.RcodeRefused)},
		{"first server never answers", silentServer(t)},
		{"nobody listens at the first address", closedPort(t)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newResolver(t, 300*time.Millisecond, tt.first, w.DNS.Addr())
			got, err := r.LookupMX(testCtx(t), "ex.test")
			if err != nil {
				t.Fatalf("LookupMX with a failing first server: %v", err)
			}
			if want := []MX{{"mx.ex.test", 10}}; !reflect.DeepEqual(got, want) {
				t.Fatalf("LookupMX = %v, want %v", got, want)
			}
		})
	}
}

func TestNXDOMAINFromFirstServerIsFinal(t *testing.T) {
	// An authoritative "no" is an answer: the next server is not asked.
	w := testworld.New(t)
	w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx.ex.test"})
	r := newResolver(t, time.Second, rcodeServer(t, dns.RcodeNameError), w.DNS.Addr())
	if _, err := r.LookupMX(testCtx(t), "ex.test"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("err = %v, want the first server's NXDOMAIN", err)
	}
	if n := w.DNS.CountQueries("ex.test", dns.TypeANY); n != 0 {
		t.Fatalf("second server asked %d times after an NXDOMAIN", n)
	}
}

func TestAllServersFailingIsTemporary(t *testing.T) {
	r := newResolver(t, 300*time.Millisecond, rcodeServer(t, dns.RcodeServerFailure), rcodeServer(t, dns.RcodeRefused), closedPort(t))
	_, err := r.LookupMX(testCtx(t), "ex.test")
	if !IsTemporary(err) {
		t.Fatalf("err = %v, want temporary", err)
	}
}

func TestAuthenticDataBit(t *testing.T) {
	w := testworld.New(t)
	w.DNS.SetMX("signed.test", testworld.MX{Pref: 10, Host: "mx.signed.test"})
	w.DNS.SetMX("plain.test", testworld.MX{Pref: 10, Host: "mx.plain.test"})
	w.DNS.SetAD("signed.test", true)
	r := newResolver(t, 2*time.Second, w.DNS.Addr())
	for name, want := range map[string]bool{"signed.test": true, "plain.test": false} {
		ans, err := r.Lookup(testCtx(t), name, dns.TypeMX)
		if err != nil {
			t.Fatal(err)
		}
		if ans.Authentic != want {
			t.Errorf("%s: Authentic = %v, want %v", name, ans.Authentic, want)
		}
	}
}

func TestSystemServers(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name    string
		content string
		want    []string
	}{
		{"nameserver lines in order with port 53", "# comment\nsearch ex.test\nnameserver 192.0.2.53\nnameserver 2001:db8::53\noptions ndots:1\n",
			[]string{"192.0.2.53:53", "[2001:db8::53]:53"}},
		{"no nameserver is an error", "search ex.test\n", nil},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(dir, "resolv"+string(rune('0'+i)))
			if err := os.WriteFile(path, []byte(tt.content), 0o600); err != nil {
				t.Fatal(err)
			}
			got, err := systemServers(path)
			if tt.want == nil {
				if err == nil {
					t.Fatalf("systemServers = %v, want an error", got)
				}
				return
			}
			if err != nil || !reflect.DeepEqual(got, tt.want) {
				t.Fatalf("systemServers = %v, %v; want %v", got, err, tt.want)
			}
		})
	}
}

func TestNewDefaults(t *testing.T) {
	r, err := New([]string{"192.0.2.1:53", "192.0.2.2:5353"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	if got := r.Servers(); !reflect.DeepEqual(got, []string{"192.0.2.1:53", "192.0.2.2:5353"}) {
		t.Fatalf("Servers = %v", got)
	}
	if r.timeout != 5*time.Second {
		t.Fatalf("timeout = %v, want the 5s default", r.timeout)
	}
}
