package dnssec

import (
	"bytes"
	"crypto"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

const tlsaHash = "8d02536c887482bc34ff54e41d2ba659bf85b341a0a20afadb5813dcfbcf286d"

// newTree builds the tree the tests share:
//
//	.  test.  secure.test. (signed)  insecure.test. (unsigned)
//	   other.example. (signed, "example." an empty non-terminal of the root)
func newTree(t *testing.T) *Server {
	s := NewServer(t, "127.0.53.1")
	s.AddZone("test.", true)
	s.AddZone("secure.test.", true)
	s.AddZone("insecure.test.", false)
	s.AddZone("other.example.", true)
	s.AddZone("nods.test.", true)
	s.AddZone("wrongds.test.", true)
	s.AddZone("badkey.test.", true)
	for _, rr := range []string{
		"secure.test. 300 IN MX 10 mx1.secure.test.",
		"mx1.secure.test. 300 IN A 127.0.0.5",
		"_25._tcp.mx1.secure.test. 300 IN TLSA 3 1 1 " + tlsaHash,
		"alias.secure.test. 300 IN CNAME mx1.secure.test.",
		"cross.secure.test. 300 IN CNAME mx.other.example.",
		"dangling.secure.test. 300 IN CNAME gone.secure.test.",
		"broken.secure.test. 300 IN A 127.0.0.8",
		"badproof.secure.test. 300 IN A 127.0.0.9",
		"sf.secure.test. 300 IN A 127.0.0.10",
		"healed.secure.test. 300 IN A 127.0.0.11",
		"mx.insecure.test. 300 IN A 127.0.0.6",
		"_25._tcp.mx.insecure.test. 300 IN TLSA 3 1 1 " + tlsaHash,
		"mx.other.example. 300 IN A 127.0.0.7",
		"www.nods.test. 300 IN A 127.0.0.12",
		"www.wrongds.test. 300 IN A 127.0.0.13",
		"www.badkey.test. 300 IN A 127.0.0.14",
	} {
		s.Add(rr)
	}
	s.Break("broken.secure.test.", dns.TypeA)
	s.Break("badproof.secure.test.", dns.TypeTLSA)
	s.ServFail("sf.secure.test.", dns.TypeA)
	s.Break("badkey.test.", dns.TypeDNSKEY)
	// nods.test. is signed but its DS is withdrawn: provably insecure.
	s.Remove("nods.test.", dns.TypeDS)
	// wrongds.test. has a DS for a key it does not use: bogus.
	s.Remove("wrongds.test.", dns.TypeDS)
	other := &dns.DNSKEY{Hdr: dns.RR_Header{Name: "wrongds.test.", Rrtype: dns.TypeDNSKEY, Class: dns.ClassINET, Ttl: TTL},
		Flags: 257, Protocol: 3, Algorithm: dns.ECDSAP256SHA256}
	if _, err := other.Generate(256); err != nil {
		t.Fatal(err)
	}
	s.AddRR(other.ToDS(dns.SHA256))
	return s
}

func TestUnboundValidates(t *testing.T) {
	s := newTree(t)
	u := StartUnbound(t, s)

	tests := []struct {
		name    string
		qname   string
		qtype   uint16
		rcode   int
		ad      bool
		answers int // records in the answer section, RRSIGs not counted
	}{
		{"signed A", "mx1.secure.test.", dns.TypeA, dns.RcodeSuccess, true, 1},
		{"signed MX", "secure.test.", dns.TypeMX, dns.RcodeSuccess, true, 1},
		{"mixed case", "MX1.Secure.TEST.", dns.TypeA, dns.RcodeSuccess, true, 1},
		{"signed TLSA", "_25._tcp.mx1.secure.test.", dns.TypeTLSA, dns.RcodeSuccess, true, 1},
		{"TLSA NODATA", "mx1.secure.test.", dns.TypeTLSA, dns.RcodeSuccess, true, 0},
		{"TLSA NODATA at empty non-terminal", "_tcp.mx1.secure.test.", dns.TypeTLSA, dns.RcodeSuccess, true, 0},
		{"NXDOMAIN", "nope.secure.test.", dns.TypeA, dns.RcodeNameError, true, 0},
		{"NXDOMAIN deep", "_25._tcp.nope.secure.test.", dns.TypeTLSA, dns.RcodeNameError, true, 0},
		{"NXDOMAIN sorting first", "0.secure.test.", dns.TypeA, dns.RcodeNameError, true, 0},
		{"NXDOMAIN sorting last", "zzzz.secure.test.", dns.TypeA, dns.RcodeNameError, true, 0},
		{"NXDOMAIN under root", "nosuchtld.", dns.TypeA, dns.RcodeNameError, true, 0},
		{"CNAME in zone", "alias.secure.test.", dns.TypeA, dns.RcodeSuccess, true, 2},
		{"CNAME across zones", "cross.secure.test.", dns.TypeA, dns.RcodeSuccess, true, 2},
		{"CNAME to NXDOMAIN", "dangling.secure.test.", dns.TypeA, dns.RcodeNameError, true, 1},
		{"zone under empty non-terminal", "mx.other.example.", dns.TypeA, dns.RcodeSuccess, true, 1},
		{"insecure child", "mx.insecure.test.", dns.TypeA, dns.RcodeSuccess, false, 1},
		{"insecure TLSA", "_25._tcp.mx.insecure.test.", dns.TypeTLSA, dns.RcodeSuccess, false, 1},
		{"insecure NXDOMAIN", "nope.insecure.test.", dns.TypeA, dns.RcodeNameError, false, 0},
		{"DS withdrawn", "www.nods.test.", dns.TypeA, dns.RcodeSuccess, false, 1},
		{"wrong DS", "www.wrongds.test.", dns.TypeA, dns.RcodeServerFailure, false, 0},
		{"Break", "broken.secure.test.", dns.TypeA, dns.RcodeServerFailure, false, 0},
		{"Break DNSKEY", "www.badkey.test.", dns.TypeA, dns.RcodeServerFailure, false, 0},
		{"Break denial", "badproof.secure.test.", dns.TypeTLSA, dns.RcodeServerFailure, false, 0},
		{"ServFail", "sf.secure.test.", dns.TypeA, dns.RcodeServerFailure, false, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := query(t, u, tc.qname, tc.qtype)
			if r.Rcode != tc.rcode || r.AuthenticatedData != tc.ad || countAnswers(r) != tc.answers {
				t.Errorf("%s %s: rcode %s AD=%v %d answers, want %s AD=%v %d answers\n%v",
					tc.qname, dns.TypeToString[tc.qtype], dns.RcodeToString[r.Rcode], r.AuthenticatedData,
					countAnswers(r), dns.RcodeToString[tc.rcode], tc.ad, tc.answers, r)
			}
		})
	}

	t.Run("TLSA data", func(t *testing.T) {
		r := query(t, u, "_25._tcp.mx1.secure.test.", dns.TypeTLSA)
		var got []string
		for _, rr := range r.Answer {
			if tl, ok := rr.(*dns.TLSA); ok {
				got = append(got, tl.Certificate)
			}
		}
		if !slices.Equal(got, []string{tlsaHash}) {
			t.Errorf("TLSA certificate data %v, want [%s]", got, tlsaHash)
		}
	})

	// Nothing is cached: a change shows at the next query.
	t.Run("Break then Restore", func(t *testing.T) {
		if r := query(t, u, "healed.secure.test.", dns.TypeA); r.Rcode != dns.RcodeSuccess || !r.AuthenticatedData {
			t.Fatalf("before Break: %v", r)
		}
		s.Break("healed.secure.test.", dns.TypeA)
		if r := query(t, u, "healed.secure.test.", dns.TypeA); r.Rcode != dns.RcodeServerFailure {
			t.Fatalf("after Break: %v", r)
		}
		s.Restore("healed.secure.test.", dns.TypeA)
		if r := query(t, u, "healed.secure.test.", dns.TypeA); r.Rcode != dns.RcodeSuccess || !r.AuthenticatedData {
			t.Fatalf("after Restore: %v", r)
		}
	})
}

func query(t *testing.T, u *Unbound, name string, qtype uint16) *dns.Msg {
	t.Helper()
	r, err := u.Query(name, qtype)
	if err != nil {
		t.Fatalf("query %s %s: %v", name, dns.TypeToString[qtype], err)
	}
	return r
}

func countAnswers(r *dns.Msg) int {
	n := 0
	for _, rr := range r.Answer {
		if rr.Header().Rrtype != dns.TypeRRSIG {
			n++
		}
	}
	return n
}

// ask queries the authoritative server directly, with DO set.
func ask(t *testing.T, s *Server, name string, qtype uint16) *dns.Msg {
	t.Helper()
	m := new(dns.Msg)
	m.SetQuestion(name, qtype)
	m.SetEdns0(4096, true)
	r, _, err := (&dns.Client{Net: "tcp", Timeout: 5 * time.Second}).Exchange(m, s.Addr())
	if err != nil {
		t.Fatalf("ask %s %s: %v", name, dns.TypeToString[qtype], err)
	}
	return r
}

// verifyAll checks every RRSIG in the answer and authority sections against
// the signer zone's key, and that no RRset is left unsigned.
func verifyAll(t *testing.T, s *Server, r *dns.Msg) {
	t.Helper()
	for _, sec := range [][]dns.RR{r.Answer, r.Ns} {
		sets := map[[2]string][]dns.RR{}
		var sigs []*dns.RRSIG
		for _, rr := range sec {
			if sig, ok := rr.(*dns.RRSIG); ok {
				sigs = append(sigs, sig)
				continue
			}
			k := [2]string{rr.Header().Name, dns.TypeToString[rr.Header().Rrtype]}
			sets[k] = append(sets[k], rr)
		}
		for _, sig := range sigs {
			k := [2]string{sig.Hdr.Name, dns.TypeToString[sig.TypeCovered]}
			z := s.Zone(sig.SignerName)
			if z == nil {
				t.Fatalf("RRSIG by unknown signer %s", sig.SignerName)
			}
			if err := sig.Verify(z.DNSKEY(), sets[k]); err != nil {
				t.Errorf("RRSIG over %v does not verify: %v", k, err)
			}
			delete(sets, k)
		}
		for k := range sets {
			t.Errorf("RRset %v is not signed", k)
		}
	}
}

func TestAuthoritativeAnswers(t *testing.T) {
	s := newTree(t)

	t.Run("DS comes from the parent", func(t *testing.T) {
		r := ask(t, s, "secure.test.", dns.TypeDS)
		verifyAll(t, s, r)
		if len(r.Answer) != 2 || r.Answer[1].(*dns.RRSIG).SignerName != "test." {
			t.Fatalf("DS answer:\n%v", r)
		}
		if got, want := r.Answer[0].(*dns.DS).Digest, s.Zone("secure.test.").DS().Digest; got != want {
			t.Errorf("DS digest %s, want %s", got, want)
		}
	})

	t.Run("no DS for an unsigned child", func(t *testing.T) {
		r := ask(t, s, "insecure.test.", dns.TypeDS)
		verifyAll(t, s, r)
		nsec := findNSEC(r, "insecure.test.")
		if r.Rcode != dns.RcodeSuccess || nsec == nil ||
			!slices.Equal(nsec.TypeBitMap, []uint16{dns.TypeNS, dns.TypeRRSIG, dns.TypeNSEC}) {
			t.Fatalf("DS denial:\n%v", r)
		}
	})

	t.Run("unsigned zone has no RRSIG", func(t *testing.T) {
		r := ask(t, s, "mx.insecure.test.", dns.TypeA)
		if len(r.Answer) != 1 {
			t.Fatalf("answer:\n%v", r)
		}
	})

	t.Run("NODATA", func(t *testing.T) {
		r := ask(t, s, "mx1.secure.test.", dns.TypeTLSA)
		verifyAll(t, s, r)
		nsec := findNSEC(r, "mx1.secure.test.")
		if r.Rcode != dns.RcodeSuccess || nsec == nil || nsec.NextDomain != `\000.mx1.secure.test.` ||
			!slices.Equal(nsec.TypeBitMap, []uint16{dns.TypeA, dns.TypeRRSIG, dns.TypeNSEC}) {
			t.Fatalf("NODATA:\n%v", r)
		}
	})

	t.Run("NXDOMAIN covers the name and the wildcard", func(t *testing.T) {
		for _, q := range []string{"nope.secure.test.", "a.b.nope.secure.test.", "0.secure.test.", "_26._tcp.mx1.secure.test."} {
			r := ask(t, s, q, dns.TypeA)
			verifyAll(t, s, r)
			if r.Rcode != dns.RcodeNameError {
				t.Fatalf("%s: rcode %s", q, dns.RcodeToString[r.Rcode])
			}
			ce := "secure.test."
			if strings.HasSuffix(q, "_tcp.mx1.secure.test.") {
				ce = "_tcp.mx1.secure.test."
			}
			var coversQ, coversWild bool
			for _, rr := range r.Ns {
				if n, ok := rr.(*dns.NSEC); ok {
					coversQ = coversQ || covers(n, q)
					coversWild = coversWild || covers(n, "*."+ce)
					for _, existing := range []string{"secure.test.", "mx1.secure.test.", "_25._tcp.mx1.secure.test.", "alias.secure.test."} {
						if covers(n, existing) {
							t.Errorf("%s: %v covers existing %s", q, n, existing)
						}
					}
				}
			}
			if !coversQ || !coversWild {
				t.Errorf("%s: covers name %v, wildcard *.%s %v:\n%v", q, coversQ, ce, coversWild, r)
			}
		}
	})

	t.Run("Break corrupts the signature", func(t *testing.T) {
		r := ask(t, s, "broken.secure.test.", dns.TypeA)
		sig := r.Answer[1].(*dns.RRSIG)
		if err := sig.Verify(s.Zone("secure.test.").DNSKEY(), r.Answer[:1]); err == nil {
			t.Fatal("broken signature verifies")
		}
	})

	t.Run("ServFail", func(t *testing.T) {
		if r := ask(t, s, "sf.secure.test.", dns.TypeA); r.Rcode != dns.RcodeServerFailure {
			t.Fatalf("rcode %s", dns.RcodeToString[r.Rcode])
		}
	})
}

func findNSEC(r *dns.Msg, owner string) *dns.NSEC {
	for _, rr := range r.Ns {
		if n, ok := rr.(*dns.NSEC); ok && n.Hdr.Name == owner {
			return n
		}
	}
	return nil
}

// covers reports whether name sorts strictly between the NSEC's owner and
// next name (RFC 4034 §6.1 canonical order).
func covers(n *dns.NSEC, name string) bool {
	return canonicalCompare(n.Hdr.Name, name) < 0 && canonicalCompare(name, n.NextDomain) < 0
}

func canonicalCompare(a, b string) int {
	la, lb := rawLabels(strings.ToLower(a)), rawLabels(strings.ToLower(b))
	for i := 1; i <= min(len(la), len(lb)); i++ {
		if c := bytes.Compare(bytes.ToLower(la[len(la)-i]), bytes.ToLower(lb[len(lb)-i])); c != 0 {
			return c
		}
	}
	return len(la) - len(lb)
}

func TestCanonicalCover(t *testing.T) {
	for _, l := range []string{"a", "nope", "0", "_25", "zzzz", "*", `a\000`, "x-y"} {
		name := l + ".ex.test."
		n := cover(name, "ex.test.")
		if !covers(n, name) || !covers(n, "deep.below."+name) {
			t.Errorf("%v does not cover %s and below", n, name)
		}
		if covers(n, "ex.test.") {
			t.Errorf("%v covers its parent", n)
		}
		for _, other := range []string{"a", "b", "nopf", "1", "_24", "_26", "zzzy", "zzzza", "-", "a0"} {
			if o := other + ".ex.test."; o != name && covers(n, o) {
				t.Errorf("%v covers %s, which is not %s", n, o, name)
			}
		}
	}
}

func TestUnboundPath(t *testing.T) {
	p, err := UnboundPath()
	if err != nil {
		t.Fatal(err) // CI installs unbound; a missing one is a failure, not a skip
	}
	t.Log("unbound:", p)
}

// TestAnchorMatters shows the AD bit is earned: once the root signs with a
// key other than unbound's trust anchor, nothing validates any more.
func TestAnchorMatters(t *testing.T) {
	s := newTree(t)
	u := StartUnbound(t, s)
	if r := query(t, u, "mx1.secure.test.", dns.TypeA); r.Rcode != dns.RcodeSuccess || !r.AuthenticatedData {
		t.Fatalf("before the root key changed: %v", r)
	}

	k := &dns.DNSKEY{Hdr: dns.RR_Header{Name: ".", Rrtype: dns.TypeDNSKEY, Class: dns.ClassINET, Ttl: TTL},
		Flags: 257, Protocol: 3, Algorithm: dns.ECDSAP256SHA256}
	priv, err := k.Generate(256)
	if err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	root := s.zones["."]
	root.key, root.dnskey = priv.(crypto.Signer), k
	s.rrs["."][dns.TypeDNSKEY] = []dns.RR{k}
	s.mu.Unlock()
	// Unbound keeps validated keys until the end of the current second,
	// even at TTL 0 (its clock has whole seconds).
	time.Sleep(1100 * time.Millisecond)

	for _, q := range []string{"mx1.secure.test.", "mx.insecure.test."} {
		if r := query(t, u, q, dns.TypeA); r.Rcode != dns.RcodeServerFailure {
			t.Errorf("%s with an unknown root key: %v", q, r)
		}
	}
}
