package testworld

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// ask sends one question to the world's DNS server over netw ("udp"/"tcp").
func ask(t *testing.T, w *World, netw, name string, qtype uint16) *dns.Msg {
	t.Helper()
	m, err := askErr(w, netw, name, qtype, 2*time.Second)
	if err != nil {
		t.Fatalf("query %s %s over %s: %v", name, dns.TypeToString[qtype], netw, err)
	}
	return m
}

func askErr(w *World, netw, name string, qtype uint16, timeout time.Duration) (*dns.Msg, error) {
	c := &dns.Client{Net: netw, Timeout: timeout}
	q := new(dns.Msg)
	q.SetQuestion(name, qtype)
	r, _, err := c.Exchange(q, w.DNS.Addr())
	return r, err
}

func TestDNSAnswers(t *testing.T) {
	t.Parallel()
	w := New(t)
	d := w.DNS
	d.SetMX("ex.test", MX{Pref: 20, Host: "mx2.ex.test"}, MX{Pref: 10, Host: "mx1.ex.test."})
	d.SetA("mx1.ex.test", "127.0.0.10")
	d.SetAAAA("mx1.ex.test", "::1")
	d.SetTXT("_smtp._tls.ex.test", []string{"v=TLSRPTv1; rua=https://rua.test/r"})
	d.SetNullMX("null.test")

	t.Run("MX records in the order set, names fully qualified", func(t *testing.T) {
		r := ask(t, w, "udp", "ex.test.", dns.TypeMX)
		if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 2 {
			t.Fatalf("rcode %s, %d answers, want NOERROR with 2", dns.RcodeToString[r.Rcode], len(r.Answer))
		}
		got := fmt.Sprintf("%d %s %d %s", r.Answer[0].(*dns.MX).Preference, r.Answer[0].(*dns.MX).Mx, r.Answer[1].(*dns.MX).Preference, r.Answer[1].(*dns.MX).Mx)
		if got != "20 mx2.ex.test. 10 mx1.ex.test." {
			t.Errorf("answer %q", got)
		}
		if !r.Authoritative {
			t.Errorf("AA not set")
		}
	})
	t.Run("names are case-insensitive and the question's case is echoed", func(t *testing.T) {
		r := ask(t, w, "udp", "MX1.Ex.TEST.", dns.TypeA)
		if len(r.Answer) != 1 || r.Answer[0].(*dns.A).A.String() != "127.0.0.10" {
			t.Fatalf("answer %v", r.Answer)
		}
		if r.Answer[0].Header().Name != "MX1.Ex.TEST." {
			t.Errorf("owner %q, want the question's spelling", r.Answer[0].Header().Name)
		}
		r = ask(t, w, "tcp", "mx1.ex.test.", dns.TypeAAAA)
		if len(r.Answer) != 1 || r.Answer[0].(*dns.AAAA).AAAA.String() != "::1" {
			t.Errorf("AAAA answer %v", r.Answer)
		}
	})
	t.Run("other types at the name answer NODATA with an SOA", func(t *testing.T) {
		r := ask(t, w, "udp", "mx1.ex.test.", dns.TypeTXT)
		if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 0 || len(r.Ns) != 1 || r.Ns[0].Header().Rrtype != dns.TypeSOA {
			t.Errorf("rcode %s answer %v ns %v, want NOERROR, none, SOA", dns.RcodeToString[r.Rcode], r.Answer, r.Ns)
		}
	})
	t.Run("empty non-terminal answers NODATA", func(t *testing.T) {
		r := ask(t, w, "udp", "_tls.ex.test.", dns.TypeTXT)
		if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 0 {
			t.Errorf("rcode %s, answers %v, want NOERROR and none", dns.RcodeToString[r.Rcode], r.Answer)
		}
	})
	t.Run("unknown name answers NXDOMAIN with an SOA", func(t *testing.T) {
		r := ask(t, w, "udp", "nope.ex.test.", dns.TypeMX)
		if r.Rcode != dns.RcodeNameError || len(r.Ns) != 1 {
			t.Errorf("rcode %s ns %v, want NXDOMAIN and SOA", dns.RcodeToString[r.Rcode], r.Ns)
		}
	})
	t.Run("null MX", func(t *testing.T) {
		r := ask(t, w, "udp", "null.test.", dns.TypeMX)
		if len(r.Answer) != 1 || r.Answer[0].(*dns.MX).Mx != "." || r.Answer[0].(*dns.MX).Preference != 0 {
			t.Errorf("answer %v, want 0 .", r.Answer)
		}
	})
}

func TestDNSMultiStringTXT(t *testing.T) {
	t.Parallel()
	w := New(t)
	w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=ab", "cd"}, []string{"v=spf1 -all"})
	r := ask(t, w, "udp", "_mta-sts.ex.test.", dns.TypeTXT)
	if len(r.Answer) != 2 {
		t.Fatalf("%d answers, want 2", len(r.Answer))
	}
	if got := r.Answer[0].(*dns.TXT).Txt; len(got) != 2 || got[0] != "v=STSv1; id=ab" || got[1] != "cd" {
		t.Errorf("first TXT %q, want the two strings kept apart", got)
	}
	if got := r.Answer[1].(*dns.TXT).Txt; len(got) != 1 || got[0] != "v=spf1 -all" {
		t.Errorf("second TXT %q", got)
	}
}

func TestDNSCNAME(t *testing.T) {
	t.Parallel()
	w := New(t)
	d := w.DNS
	d.SetCNAME("_mta-sts.ex.test", "_mta-sts.mid.test")
	d.SetCNAME("_mta-sts.mid.test", "_mta-sts.prov.test")
	d.SetTXT("_mta-sts.prov.test", []string{"v=STSv1; id=a1"})
	d.SetCNAME("dangling.test", "gone.test")
	d.SetCNAME("loop1.test", "loop2.test")
	d.SetCNAME("loop2.test", "loop1.test")

	t.Run("chain is followed to the target's records", func(t *testing.T) {
		r := ask(t, w, "udp", "_mta-sts.ex.test.", dns.TypeTXT)
		if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 3 {
			t.Fatalf("rcode %s, answers %v", dns.RcodeToString[r.Rcode], r.Answer)
		}
		if c := r.Answer[0].(*dns.CNAME); c.Hdr.Name != "_mta-sts.ex.test." || c.Target != "_mta-sts.mid.test." {
			t.Errorf("first answer %v", c)
		}
		if c := r.Answer[1].(*dns.CNAME); c.Hdr.Name != "_mta-sts.mid.test." || c.Target != "_mta-sts.prov.test." {
			t.Errorf("second answer %v", c)
		}
		if txt := r.Answer[2].(*dns.TXT); txt.Hdr.Name != "_mta-sts.prov.test." || txt.Txt[0] != "v=STSv1; id=a1" {
			t.Errorf("third answer %v", txt)
		}
	})
	t.Run("asking for the CNAME itself does not chase it", func(t *testing.T) {
		r := ask(t, w, "udp", "_mta-sts.ex.test.", dns.TypeCNAME)
		if len(r.Answer) != 1 {
			t.Errorf("answers %v, want the CNAME only", r.Answer)
		}
	})
	t.Run("dangling CNAME answers NXDOMAIN with the CNAME", func(t *testing.T) {
		r := ask(t, w, "udp", "dangling.test.", dns.TypeA)
		if r.Rcode != dns.RcodeNameError || len(r.Answer) != 1 {
			t.Errorf("rcode %s answers %v", dns.RcodeToString[r.Rcode], r.Answer)
		}
	})
	t.Run("CNAME loop answers SERVFAIL", func(t *testing.T) {
		r := ask(t, w, "udp", "loop1.test.", dns.TypeA)
		if r.Rcode != dns.RcodeServerFailure {
			t.Errorf("rcode %s, want SERVFAIL", dns.RcodeToString[r.Rcode])
		}
	})
}

func TestDNSServFail(t *testing.T) {
	t.Parallel()
	w := New(t)
	d := w.DNS
	d.SetMX("ex.test", MX{Pref: 10, Host: "mx1.ex.test"})
	d.SetA("ex.test", "127.0.0.1")
	d.SetServFail("ex.test", dns.TypeMX, true)
	if r := ask(t, w, "udp", "ex.test.", dns.TypeMX); r.Rcode != dns.RcodeServerFailure {
		t.Errorf("MX rcode %s, want SERVFAIL", dns.RcodeToString[r.Rcode])
	}
	if r := ask(t, w, "udp", "ex.test.", dns.TypeA); r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
		t.Errorf("A rcode %s: SERVFAIL on MX must leave A alone", dns.RcodeToString[r.Rcode])
	}
	d.SetServFail("ex.test", dns.TypeMX, false)
	d.SetServFail("EX.test.", dns.TypeANY, true)
	if r := ask(t, w, "tcp", "ex.test.", dns.TypeA); r.Rcode != dns.RcodeServerFailure {
		t.Errorf("A rcode %s with TypeANY SERVFAIL, want SERVFAIL", dns.RcodeToString[r.Rcode])
	}
	d.SetServFail("ex.test", dns.TypeANY, false)
	if r := ask(t, w, "udp", "ex.test.", dns.TypeMX); r.Rcode != dns.RcodeSuccess {
		t.Errorf("MX rcode %s after SERVFAIL off", dns.RcodeToString[r.Rcode])
	}
}

func TestDNSTruncateThenTCP(t *testing.T) {
	t.Parallel()
	w := New(t)
	w.DNS.SetTXT("big.test", []string{"v=STSv1; id=a1"})
	w.DNS.SetTruncate("big.test", true)
	r := ask(t, w, "udp", "big.test.", dns.TypeTXT)
	if !r.Truncated || len(r.Answer) != 0 {
		t.Fatalf("UDP: TC=%v answers=%v, want TC and none", r.Truncated, r.Answer)
	}
	r = ask(t, w, "tcp", "big.test.", dns.TypeTXT)
	if r.Truncated || len(r.Answer) != 1 {
		t.Fatalf("TCP: TC=%v answers=%v, want the answer", r.Truncated, r.Answer)
	}
	var protos []string
	for _, q := range w.DNS.Queries() {
		protos = append(protos, q.Proto)
	}
	if strings.Join(protos, ",") != "udp,tcp" {
		t.Errorf("query log protocols %v, want udp then tcp", protos)
	}
}

func TestDNSOversizedUDPAnswerIsTruncated(t *testing.T) {
	t.Parallel()
	w := New(t)
	var recs [][]string
	for i := range 40 {
		recs = append(recs, []string{fmt.Sprintf("record %02d %s", i, strings.Repeat("x", 40))})
	}
	w.DNS.SetTXT("many.test", recs...)
	if r := ask(t, w, "udp", "many.test.", dns.TypeTXT); !r.Truncated {
		t.Errorf("a %d-record answer over plain UDP should be truncated", len(recs))
	}
	if r := ask(t, w, "tcp", "many.test.", dns.TypeTXT); r.Truncated || len(r.Answer) != len(recs) {
		t.Errorf("TCP: TC=%v, %d answers, want all %d", r.Truncated, len(r.Answer), len(recs))
	}
}

func TestDNSDelayAndQueryLog(t *testing.T) {
	t.Parallel()
	w := New(t)
	w.DNS.SetA("slow.test", "127.0.0.1")
	w.DNS.SetDelay("slow.test", 2*time.Second)
	_, err := askErr(w, "udp", "slow.test.", dns.TypeA, 200*time.Millisecond)
	var ne net.Error
	if !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("delayed query: err %v, want a timeout", err)
	}
	w.DNS.SetDelay("slow.test", 0)
	ask(t, w, "udp", "SLOW.test.", dns.TypeA)
	ask(t, w, "udp", "slow.test.", dns.TypeMX)
	if n := w.DNS.CountQueries("slow.test", dns.TypeA); n != 2 {
		t.Errorf("CountQueries(A) = %d, want 2", n)
	}
	if n := w.DNS.CountQueries("Slow.Test.", dns.TypeANY); n != 3 {
		t.Errorf("CountQueries(ANY) = %d, want 3", n)
	}
	if q := w.DNS.Queries(); q[1].Name != "SLOW.test." || q[1].Type != dns.TypeA || q[1].Proto != "udp" {
		t.Errorf("logged query %+v", q[1])
	}
	w.DNS.ResetQueries()
	if n := len(w.DNS.Queries()); n != 0 {
		t.Errorf("%d queries after reset", n)
	}
}

func TestDNSRemove(t *testing.T) {
	t.Parallel()
	w := New(t)
	d := w.DNS
	d.SetA("h.test", "127.0.0.1")
	d.SetTXT("h.test", []string{"x"})
	d.Remove("h.test", dns.TypeA)
	if r := ask(t, w, "udp", "h.test.", dns.TypeA); r.Rcode != dns.RcodeSuccess || len(r.Answer) != 0 {
		t.Errorf("after Remove(A): rcode %s answers %v, want NODATA", dns.RcodeToString[r.Rcode], r.Answer)
	}
	d.RemoveName("h.test")
	if r := ask(t, w, "udp", "h.test.", dns.TypeTXT); r.Rcode != dns.RcodeNameError {
		t.Errorf("after RemoveName: rcode %s, want NXDOMAIN", dns.RcodeToString[r.Rcode])
	}
	tlsa, err := dns.NewRR("_25._tcp.mx1.ex.test. 300 IN TLSA 3 1 1 0123456789abcdef")
	if err != nil {
		t.Fatal(err)
	}
	d.AddRR(tlsa)
	d.SetAD("_25._tcp.mx1.ex.test", true)
	r := ask(t, w, "udp", "_25._tcp.mx1.ex.test.", dns.TypeTLSA)
	if len(r.Answer) != 1 || !r.AuthenticatedData {
		t.Errorf("TLSA: answers %v AD=%v, want one record with AD", r.Answer, r.AuthenticatedData)
	}
}

// NewDNSServer serves outside a World, at a fixed address when one is
// given (benchworld's use), on UDP and TCP alike.
func TestNewDNSServerFixedAddr(t *testing.T) {
	free, err := NewDNSServer("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := free.Addr()
	free.Close()
	d, err := NewDNSServer(addr)
	if err != nil {
		t.Skipf("port %s taken again meanwhile: %v", addr, err)
	}
	defer d.Close()
	if d.Addr() != addr {
		t.Fatalf("Addr = %s, want %s", d.Addr(), addr)
	}
	d.SetA("mx.bench.test", "127.0.0.9")
	for _, netw := range []string{"udp", "tcp"} {
		m := new(dns.Msg)
		m.SetQuestion("MX.Bench.Test.", dns.TypeA)
		c := &dns.Client{Net: netw, Timeout: 2 * time.Second}
		r, _, err := c.Exchange(m, addr)
		if err != nil {
			t.Fatalf("%s: %v", netw, err)
		}
		if len(r.Answer) != 1 || r.Answer[0].(*dns.A).A.String() != "127.0.0.9" {
			t.Fatalf("%s: answer %v", netw, r.Answer)
		}
	}
	if _, err := NewDNSServer(addr); err == nil {
		t.Fatal("a second server on the same address started")
	}
	if _, err := NewDNSServer("no-port"); err == nil {
		t.Fatal("an address without a port was accepted")
	}
}
