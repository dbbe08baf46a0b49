package dnssec

import (
	"context"
	"crypto"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// TTL is the TTL of the records the kit makes itself (SOA, NS, glue,
// DNSKEY, DS); NegTTL is the SOA minimum and the TTL of NSEC records.
const (
	TTL    = 300
	NegTTL = 60
)

// shutdownTimeout bounds how long the server may take to stop.
const shutdownTimeout = 5 * time.Second

// Zone is one zone of a Server's tree.
type Zone struct {
	name   string
	signed bool
	key    crypto.Signer // nil when unsigned
	dnskey *dns.DNSKEY   // nil when unsigned
}

// Name is the zone's apex, lower case and fully qualified.
func (z *Zone) Name() string { return z.name }

// Signed reports whether the zone is signed.
func (z *Zone) Signed() bool { return z.signed }

// DNSKEY is a copy of the zone's key (nil when unsigned).
func (z *Zone) DNSKEY() *dns.DNSKEY {
	if z.dnskey == nil {
		return nil
	}
	return dns.Copy(z.dnskey).(*dns.DNSKEY)
}

// DS is the SHA-256 DS record of the zone's key, as published in the parent
// (nil when unsigned).
func (z *Zone) DS() *dns.DS {
	if z.dnskey == nil {
		return nil
	}
	return z.dnskey.ToDS(dns.SHA256)
}

// Server is an authoritative server for a tree of zones rooted at ".", on UDP
// and TCP at one loopback address and port. Its data may change while it
// runs; all methods are safe for concurrent use.
type Server struct {
	tb   testing.TB
	ip   string
	port int
	udp  *dns.Server
	tcp  *dns.Server
	once sync.Once

	mu       sync.Mutex
	zones    map[string]*Zone
	rrs      map[string]map[uint16][]dns.RR // owner → type → records
	broken   map[string]map[uint16]bool
	servfail map[string]map[uint16]bool
}

// NewServer starts a server on a free port of ip (a 127.0.0.0/8 address)
// with a signed root zone, and stops it when the test ends.
func NewServer(tb testing.TB, ip string) *Server {
	tb.Helper()
	s := &Server{
		tb:       tb,
		ip:       ip,
		zones:    map[string]*Zone{},
		rrs:      map[string]map[uint16][]dns.RR{},
		broken:   map[string]map[uint16]bool{},
		servfail: map[string]map[uint16]bool{},
	}
	if net.ParseIP(ip).To4() == nil {
		tb.Fatalf("dnssec: NewServer: %q is not an IPv4 address", ip)
	}
	if err := s.listen(); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(s.Close)
	s.addZone(".", true)
	return s
}

func (s *Server) listen() error {
	// UDP and TCP must share the port: take a free UDP port, then the same
	// TCP port, and start over if TCP has it taken.
	var pc net.PacketConn
	var l net.Listener
	for tries := 0; ; tries++ {
		var err error
		pc, err = net.ListenPacket("udp", net.JoinHostPort(s.ip, "0"))
		if err != nil {
			return fmt.Errorf("dnssec: listen udp: %w", err)
		}
		s.port = pc.LocalAddr().(*net.UDPAddr).Port
		l, err = net.Listen("tcp", net.JoinHostPort(s.ip, fmt.Sprint(s.port)))
		if err == nil {
			break
		}
		pc.Close()
		if !errors.Is(err, syscall.EADDRINUSE) || tries >= 20 {
			return fmt.Errorf("dnssec: listen tcp: %w", err)
		}
	}
	var started sync.WaitGroup
	started.Add(2)
	s.udp = &dns.Server{PacketConn: pc, Handler: s, NotifyStartedFunc: started.Done}
	s.tcp = &dns.Server{Listener: l, Handler: s, NotifyStartedFunc: started.Done}
	errc := make(chan error, 2)
	for _, srv := range []*dns.Server{s.udp, s.tcp} {
		go func() { errc <- srv.ActivateAndServe() }()
	}
	ready := make(chan struct{})
	go func() { started.Wait(); close(ready) }()
	select {
	case <-ready:
		return nil
	case err := <-errc:
		s.Close()
		return fmt.Errorf("dnssec: serve: %w", err)
	case <-time.After(shutdownTimeout):
		s.Close()
		return errors.New("dnssec: server did not start")
	}
}

// Close stops the server; it is called when the test ends.
func (s *Server) Close() {
	s.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
		defer cancel()
		s.udp.ShutdownContext(ctx)
		s.tcp.ShutdownContext(ctx)
	})
}

// Addr is the server's "ip:port", for UDP and TCP alike.
func (s *Server) Addr() string { return net.JoinHostPort(s.ip, fmt.Sprint(s.port)) }

// IP is the server's address.
func (s *Server) IP() string { return s.ip }

// Port is the server's port, for UDP and TCP alike.
func (s *Server) Port() int { return s.port }

// Root is the root zone.
func (s *Server) Root() *Zone { return s.Zone(".") }

// Zone is the zone with apex name, or nil.
func (s *Server) Zone(name string) *Zone {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.zones[canon(name)]
}

// Zones lists the zones, parents before children.
func (s *Server) Zones() []*Zone {
	s.mu.Lock()
	defer s.mu.Unlock()
	var zs []*Zone
	for _, z := range s.zones {
		zs = append(zs, z)
	}
	slices.SortFunc(zs, func(a, b *Zone) int {
		if c := dns.CountLabel(a.name) - dns.CountLabel(b.name); c != 0 {
			return c
		}
		return strings.Compare(a.name, b.name)
	})
	return zs
}

// TrustAnchor is the root zone's DNSKEY in presentation form, the one trust
// anchor of a validator for this tree.
func (s *Server) TrustAnchor() string { return s.Root().DNSKEY().String() }

// AddZone creates the zone name below the closest enclosing zone and
// delegates it there: NS ns.<name> with glue pointing to this server, plus a
// DS if the zone is signed. Without a DS the parent's signed NSEC proves the
// zone insecure.
func (s *Server) AddZone(name string, signed bool) *Zone {
	s.tb.Helper()
	name = canon(name)
	if _, ok := dns.IsDomainName(name); !ok || name == "." {
		s.tb.Fatalf("dnssec: AddZone(%q): not a zone name", name)
	}
	s.mu.Lock()
	_, dup := s.zones[name]
	s.mu.Unlock()
	if dup {
		s.tb.Fatalf("dnssec: AddZone(%q): zone exists", name)
	}
	return s.addZone(name, signed)
}

func (s *Server) addZone(name string, signed bool) *Zone {
	z := &Zone{name: name, signed: signed}
	if signed {
		k := &dns.DNSKEY{
			Hdr:       dns.RR_Header{Name: name, Rrtype: dns.TypeDNSKEY, Class: dns.ClassINET, Ttl: TTL},
			Flags:     dns.ZONE | dns.SEP,
			Protocol:  3,
			Algorithm: dns.ECDSAP256SHA256,
		}
		priv, err := k.Generate(256)
		if err != nil {
			s.tb.Fatalf("dnssec: AddZone(%q): %v", name, err)
		}
		z.key, z.dnskey = priv.(crypto.Signer), k
	}
	ns := "ns." + name
	if name == "." {
		ns = "ns."
	}
	hdr := func(owner string, t uint16, ttl uint32) dns.RR_Header {
		return dns.RR_Header{Name: owner, Rrtype: t, Class: dns.ClassINET, Ttl: ttl}
	}
	rrs := []dns.RR{
		&dns.SOA{Hdr: hdr(name, dns.TypeSOA, NegTTL), Ns: ns, Mbox: "hostmaster." + strings.TrimPrefix(name, "."),
			Serial: 1, Refresh: 3600, Retry: 600, Expire: 86400, Minttl: NegTTL},
		&dns.NS{Hdr: hdr(name, dns.TypeNS, TTL), Ns: ns},
		&dns.A{Hdr: hdr(ns, dns.TypeA, TTL), A: net.ParseIP(s.ip).To4()},
	}
	if signed {
		rrs = append(rrs, z.dnskey)
		if name != "." {
			ds := z.dnskey.ToDS(dns.SHA256)
			ds.Hdr.Ttl = TTL
			rrs = append(rrs, ds)
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.zones[name] = z
	for _, rr := range rrs {
		s.addLocked(rr)
	}
	return z
}

// Add adds one record given in presentation form, such as
// "mx1.secure.test. 300 IN A 127.0.0.5".
func (s *Server) Add(rr string) {
	s.tb.Helper()
	r, err := dns.NewRR(rr)
	if err != nil || r == nil {
		s.tb.Fatalf("dnssec: Add(%q): bad record: %v", rr, err)
	}
	s.AddRR(r)
}

// AddRR adds records to those already at their owner names. A DS at a zone
// apex goes to the parent's side of the delegation, as the kit's own does.
func (s *Server) AddRR(rrs ...dns.RR) {
	s.tb.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, rr := range rrs {
		if rr.Header().Rrtype == 0 {
			s.tb.Fatalf("dnssec: AddRR: record without type: %v", rr)
		}
		s.addLocked(dns.Copy(rr))
	}
}

func (s *Server) addLocked(rr dns.RR) {
	h := rr.Header()
	h.Name = canon(h.Name)
	if h.Class == 0 {
		h.Class = dns.ClassINET
	}
	if s.rrs[h.Name] == nil {
		s.rrs[h.Name] = map[uint16][]dns.RR{}
	}
	s.rrs[h.Name][h.Rrtype] = append(s.rrs[h.Name][h.Rrtype], rr)
}

// Remove deletes the records of one type at name (dns.TypeANY: all of
// them). Removing the DS of a signed zone makes it provably insecure.
func (s *Server) Remove(name string, qtype uint16) {
	s.mu.Lock()
	defer s.mu.Unlock()
	name = canon(name)
	if qtype == dns.TypeANY {
		delete(s.rrs, name)
		return
	}
	delete(s.rrs[name], qtype)
	if len(s.rrs[name]) == 0 {
		delete(s.rrs, name)
	}
}

// Break makes the signatures over the RRset name/qtype invalid, or, when
// there is no such RRset, those over the denial answering name/qtype, so a
// validator finds the answer bogus (SERVFAIL). dns.TypeANY breaks every type
// at name. It has no effect in an unsigned zone.
func (s *Server) Break(name string, qtype uint16) { s.set(s.broken, name, qtype, true) }

// ServFail makes the server answer SERVFAIL to questions for name and qtype
// (dns.TypeANY: all types), also when a CNAME chain passes through name.
func (s *Server) ServFail(name string, qtype uint16) { s.set(s.servfail, name, qtype, true) }

// Restore undoes Break and ServFail for name and qtype.
func (s *Server) Restore(name string, qtype uint16) {
	s.set(s.broken, name, qtype, false)
	s.set(s.servfail, name, qtype, false)
}

func (s *Server) set(m map[string]map[uint16]bool, name string, qtype uint16, on bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	name = canon(name)
	if !on {
		delete(m[name], qtype)
		return
	}
	if m[name] == nil {
		m[name] = map[uint16]bool{}
	}
	m[name][qtype] = true
}

func flagged(m map[string]map[uint16]bool, name string, qtype uint16) bool {
	return m[name][qtype] || m[name][dns.TypeANY]
}

// canon is the key a name is stored under: lower case, fully qualified.
func canon(name string) string { return strings.ToLower(dns.Fqdn(name)) }

// parentName is name minus its first label ("." for a top-level name).
func parentName(name string) string {
	if i, end := dns.NextLabel(name, 0); !end {
		return name[i:]
	}
	return "."
}

// zoneOfLocked is the zone name belongs to: the deepest apex at or above it.
func (s *Server) zoneOfLocked(name string) *Zone {
	for n := name; ; n = parentName(n) {
		if z := s.zones[n]; z != nil {
			return z
		}
		if n == "." {
			return nil // unreachable: the root zone always exists
		}
	}
}

// visibleLocked reports whether records of type t at name are data of zone
// z: at a delegation z only has NS and DS, and a child apex has no DS.
func (s *Server) visibleLocked(z *Zone, name string, t uint16) bool {
	if name != z.name && s.zones[name] != nil { // a cut, seen from the parent
		return t == dns.TypeNS || t == dns.TypeDS
	}
	return !(name == z.name && t == dns.TypeDS && name != ".")
}

func (s *Server) getLocked(z *Zone, name string, t uint16) []dns.RR {
	if !s.visibleLocked(z, name, t) {
		return nil
	}
	return s.rrs[name][t]
}

// typesLocked lists the types zone z has at name, for an NSEC bitmap.
func (s *Server) typesLocked(z *Zone, name string) []uint16 {
	var ts []uint16
	for t, rrs := range s.rrs[name] {
		if len(rrs) > 0 && s.visibleLocked(z, name, t) {
			ts = append(ts, t)
		}
	}
	ts = append(ts, dns.TypeRRSIG, dns.TypeNSEC)
	slices.Sort(ts)
	return ts
}

// existsLocked reports whether name exists in z: it has records there or
// names below it (an empty non-terminal exists too).
func (s *Server) existsLocked(z *Zone, name string) bool {
	if name == z.name {
		return true
	}
	for t, rrs := range s.rrs[name] {
		if len(rrs) > 0 && s.visibleLocked(z, name, t) {
			return true
		}
	}
	for n := range s.rrs {
		if dns.IsSubDomain(name, n) && n != name {
			return true
		}
	}
	return false
}

// ServeDNS answers one query. It implements dns.Handler.
func (s *Server) ServeDNS(rw dns.ResponseWriter, req *dns.Msg) {
	m := new(dns.Msg)
	if len(req.Question) != 1 || req.Opcode != dns.OpcodeQuery {
		m.SetRcode(req, dns.RcodeFormatError)
		rw.WriteMsg(m)
		return
	}
	m.SetReply(req)
	m.Authoritative = true
	opt := req.IsEdns0()
	do := opt != nil && opt.Do()

	s.mu.Lock()
	s.answerLocked(m, req.Question[0], do)
	s.mu.Unlock()

	size := dns.MinMsgSize
	if opt != nil {
		size = int(max(opt.UDPSize(), dns.MinMsgSize))
		m.SetEdns0(uint16(size), do)
	}
	if _, udp := rw.RemoteAddr().(*net.UDPAddr); udp {
		m.Truncate(size)
	}
	rw.WriteMsg(m)
}

// answerLocked fills m with the answer to q; do is the DNSSEC OK bit.
func (s *Server) answerLocked(m *dns.Msg, q dns.Question, do bool) {
	name := canon(q.Name)
	z := s.zoneOfLocked(name)
	if q.Qtype == dns.TypeDS && name == z.name && name != "." {
		z = s.zoneOfLocked(parentName(name)) // DS is the parent's data
	}
	for hop := 0; ; hop++ {
		if flagged(s.servfail, name, q.Qtype) {
			m.Answer, m.Ns = nil, nil
			m.Rcode = dns.RcodeServerFailure
			return
		}
		if c := s.getLocked(z, name, dns.TypeCNAME); len(c) > 0 && q.Qtype != dns.TypeCNAME {
			m.Answer = append(m.Answer, s.signedLocked(z, c[:1], do, flagged(s.broken, name, dns.TypeCNAME))...)
			target := canon(c[0].(*dns.CNAME).Target)
			if hop >= 8 || s.zoneOfLocked(target) != z {
				return // out of zone: the resolver follows it itself
			}
			name = target
			continue
		}
		if rrs := s.getLocked(z, name, q.Qtype); len(rrs) > 0 {
			m.Answer = append(m.Answer, s.signedLocked(z, rrs, do, flagged(s.broken, name, q.Qtype))...)
			return
		}
		if q.Qtype == dns.TypeANY && s.existsLocked(z, name) {
			for _, t := range s.typesLocked(z, name) {
				if rrs := s.getLocked(z, name, t); len(rrs) > 0 {
					m.Answer = append(m.Answer, s.signedLocked(z, rrs, do, flagged(s.broken, name, t))...)
				}
			}
			return
		}
		s.denyLocked(m, z, name, do, flagged(s.broken, name, q.Qtype))
		return
	}
}

// denyLocked adds a negative answer for name in z: the SOA and, in a signed
// zone, minimally covering NSEC records (see the package comment).
func (s *Server) denyLocked(m *dns.Msg, z *Zone, name string, do, broken bool) {
	m.Ns = append(m.Ns, s.signedLocked(z, s.rrs[z.name][dns.TypeSOA], do, broken)...)
	var nsecs []*dns.NSEC
	if s.existsLocked(z, name) {
		nsecs = append(nsecs, &dns.NSEC{NextDomain: `\000.` + strings.TrimPrefix(name, "."),
			TypeBitMap: s.typesLocked(z, name)})
		nsecs[0].Hdr.Name = name
	} else {
		m.Rcode = dns.RcodeNameError
		ce, nc := name, name
		for !s.existsLocked(z, ce) {
			nc, ce = ce, parentName(ce)
		}
		nsecs = append(nsecs, cover(nc, ce))
		if wild := "*." + strings.TrimPrefix(ce, "."); wild != nc {
			nsecs = append(nsecs, cover(wild, ce))
		}
	}
	if !z.signed || !do {
		return
	}
	for _, n := range nsecs {
		n.Hdr.Rrtype, n.Hdr.Class, n.Hdr.Ttl = dns.TypeNSEC, dns.ClassINET, NegTTL
		m.Ns = append(m.Ns, s.signedLocked(z, []dns.RR{n}, do, broken)...)
	}
}

// signedLocked copies rrset and, in a signed zone when the client set DO,
// appends its RRSIG; broken corrupts the signature.
func (s *Server) signedLocked(z *Zone, rrset []dns.RR, do, broken bool) []dns.RR {
	out := make([]dns.RR, 0, len(rrset)+1)
	for _, rr := range rrset {
		out = append(out, dns.Copy(rr))
	}
	if !z.signed || !do || len(rrset) == 0 {
		return out
	}
	now := time.Now()
	sig := &dns.RRSIG{
		Hdr:        dns.RR_Header{Ttl: rrset[0].Header().Ttl},
		Algorithm:  z.dnskey.Algorithm,
		KeyTag:     z.dnskey.KeyTag(),
		SignerName: z.name,
		Inception:  uint32(now.Add(-time.Hour).Unix()),
		Expiration: uint32(now.Add(24 * time.Hour).Unix()),
	}
	if err := sig.Sign(z.key, out[:len(rrset)]); err != nil {
		// Only a programming error gets here (and the test may be over,
		// so no t.Errorf): answer without the RRSIG, which a validator
		// rejects as bogus.
		return out
	}
	if broken {
		b, _ := base64.StdEncoding.DecodeString(sig.Signature)
		b[len(b)/2] ^= 0xff
		sig.Signature = base64.StdEncoding.EncodeToString(b)
	}
	return append(out, sig)
}
