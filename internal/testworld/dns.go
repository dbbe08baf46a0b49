package testworld

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/miekg/dns"
)

// DefaultTTL is the TTL of records the DNSServer hands out unless SetTTL
// changes it.
const DefaultTTL = 300

// MX is one MX record: preference and target host. Host "." is a null MX
// (RFC 7505).
type MX struct {
	Pref uint16
	Host string
}

// Query is one question the DNS server received.
type Query struct {
	Name  string // as the client sent it (case and all)
	Type  uint16 // dns.TypeMX, dns.TypeTXT, ...
	Proto string // "udp" or "tcp"
	Time  time.Time
}

// DNSServer is an authoritative DNS server for every name, on UDP and TCP at
// the same loopback address and port. Its data can be changed while it runs;
// all methods are safe for concurrent use.
//
// It answers like a real authoritative server so that the relay's resolver
// code meets the cases it meets on the Internet: names are case-insensitive
// and may be given with or without the trailing dot; a name that holds other
// types (or is an empty non-terminal, RFC 8020) answers NOERROR with no
// answers and an SOA in the authority section (NODATA); a name that does not
// exist answers NXDOMAIN; a CNAME is followed inside the data, up to 8 links,
// and the rcode is that of the last name (RFC 6604). UDP answers larger than
// 512 bytes (or the client's EDNS0 size) are truncated, as a real server
// would.
type DNSServer struct {
	addr string
	udp  *dns.Server
	tcp  *dns.Server
	done chan struct{}
	once sync.Once

	mu       sync.Mutex
	ttl      uint32
	rrs      map[string]map[uint16][]dns.RR // canonical name → type → records
	servfail map[string]map[uint16]bool
	truncate map[string]bool
	delay    map[string]time.Duration
	ad       map[string]bool
	queries  []Query
}

// NewDNSServer starts a DNSServer outside a World, on UDP and TCP at addr
// (host:port; port 0 picks a free one for both), for programs such as the
// benchmark's loopback world. Stop it with Close.
func NewDNSServer(addr string) (*DNSServer, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("testworld: dns: %w", err)
	}
	if port == "0" {
		return newDNSServer(host)
	}
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return nil, fmt.Errorf("testworld: dns: listen udp: %w", err)
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		pc.Close()
		return nil, fmt.Errorf("testworld: dns: listen tcp: %w", err)
	}
	return serveDNS(pc, l)
}

func newDNSServer(ip string) (*DNSServer, error) {
	// UDP and TCP must share the port: take a free UDP port, then the same
	// TCP port, and start over if TCP has it taken.
	var pc net.PacketConn
	var l net.Listener
	for tries := 0; ; tries++ {
		var err error
		pc, err = net.ListenPacket("udp", net.JoinHostPort(ip, "0"))
		if err != nil {
			return nil, fmt.Errorf("testworld: dns: listen udp: %w", err)
		}
		port := pc.LocalAddr().(*net.UDPAddr).Port
		l, err = net.Listen("tcp", net.JoinHostPort(ip, fmt.Sprint(port)))
		if err == nil {
			break
		}
		pc.Close()
		if !errors.Is(err, syscall.EADDRINUSE) || tries >= 20 {
			return nil, fmt.Errorf("testworld: dns: listen tcp: %w", err)
		}
	}
	return serveDNS(pc, l)
}

// serveDNS serves on pc and l (the same address) until Close.
func serveDNS(pc net.PacketConn, l net.Listener) (*DNSServer, error) {
	d := &DNSServer{
		done:     make(chan struct{}),
		ttl:      DefaultTTL,
		rrs:      map[string]map[uint16][]dns.RR{},
		servfail: map[string]map[uint16]bool{},
		truncate: map[string]bool{},
		delay:    map[string]time.Duration{},
		ad:       map[string]bool{},
	}
	d.addr = pc.LocalAddr().String()

	var started sync.WaitGroup
	started.Add(2)
	d.udp = &dns.Server{PacketConn: pc, Handler: d, NotifyStartedFunc: started.Done}
	d.tcp = &dns.Server{Listener: l, Handler: d, NotifyStartedFunc: started.Done}
	errc := make(chan error, 2)
	for _, s := range []*dns.Server{d.udp, d.tcp} {
		go func() { errc <- s.ActivateAndServe() }()
	}
	ready := make(chan struct{})
	go func() { started.Wait(); close(ready) }()
	select {
	case <-ready:
	case err := <-errc:
		d.Close()
		return nil, fmt.Errorf("testworld: dns: serve: %w", err)
	case <-time.After(shutdownTimeout):
		d.Close()
		return nil, errors.New("testworld: dns: server did not start")
	}
	return d, nil
}

// Close stops the server. It is called when the world stops.
func (d *DNSServer) Close() {
	d.once.Do(func() {
		close(d.done) // releases handlers sleeping in SetDelay
		ctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
		defer cancel()
		d.udp.ShutdownContext(ctx)
		d.tcp.ShutdownContext(ctx)
	})
}

// Addr is the server's "ip:port", for UDP and TCP alike.
func (d *DNSServer) Addr() string { return d.addr }

// canon is the key a name is stored under: lower case, fully qualified.
func canon(name string) string { return strings.ToLower(dns.Fqdn(name)) }

func (d *DNSServer) hdr(name string, t uint16) dns.RR_Header {
	return dns.RR_Header{Name: canon(name), Rrtype: t, Class: dns.ClassINET, Ttl: d.ttl}
}

// setLocked replaces the records of one name and type; no records removes
// the type.
func (d *DNSServer) setLocked(name string, t uint16, rrs []dns.RR) {
	name = canon(name)
	if len(rrs) == 0 {
		delete(d.rrs[name], t)
		if len(d.rrs[name]) == 0 {
			delete(d.rrs, name)
		}
		return
	}
	if d.rrs[name] == nil {
		d.rrs[name] = map[uint16][]dns.RR{}
	}
	d.rrs[name][t] = rrs
}

// SetTTL sets the TTL of the records set from now on (default DefaultTTL).
func (d *DNSServer) SetTTL(ttl uint32) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.ttl = ttl
}

// SetMX replaces the MX records of domain. No records removes them.
func (d *DNSServer) SetMX(domain string, mx ...MX) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var rrs []dns.RR
	for _, m := range mx {
		rrs = append(rrs, &dns.MX{Hdr: d.hdr(domain, dns.TypeMX), Preference: m.Pref, Mx: dns.Fqdn(m.Host)})
	}
	d.setLocked(domain, dns.TypeMX, rrs)
}

// SetNullMX makes domain publish the null MX "0 ." (RFC 7505): it accepts no
// mail.
func (d *DNSServer) SetNullMX(domain string) { d.SetMX(domain, MX{Pref: 0, Host: "."}) }

// SetA replaces the A records of name.
func (d *DNSServer) SetA(name string, ips ...string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var rrs []dns.RR
	for _, s := range ips {
		ip := net.ParseIP(s).To4()
		if ip == nil {
			panic(fmt.Sprintf("testworld: SetA(%q): %q is not an IPv4 address", name, s))
		}
		rrs = append(rrs, &dns.A{Hdr: d.hdr(name, dns.TypeA), A: ip})
	}
	d.setLocked(name, dns.TypeA, rrs)
}

// SetAAAA replaces the AAAA records of name.
func (d *DNSServer) SetAAAA(name string, ips ...string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var rrs []dns.RR
	for _, s := range ips {
		ip := net.ParseIP(s)
		if ip == nil || ip.To4() != nil {
			panic(fmt.Sprintf("testworld: SetAAAA(%q): %q is not an IPv6 address", name, s))
		}
		rrs = append(rrs, &dns.AAAA{Hdr: d.hdr(name, dns.TypeAAAA), AAAA: ip})
	}
	d.setLocked(name, dns.TypeAAAA, rrs)
}

// SetTXT replaces the TXT records of name. Each record is a list of
// character-strings, kept apart on the wire, so that a test can publish
// `"v=STSv1; id=ab" "cd"` as SetTXT(name, []string{"v=STSv1; id=ab", "cd"}).
func (d *DNSServer) SetTXT(name string, records ...[]string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var rrs []dns.RR
	for _, r := range records {
		rrs = append(rrs, &dns.TXT{Hdr: d.hdr(name, dns.TypeTXT), Txt: append([]string(nil), r...)})
	}
	d.setLocked(name, dns.TypeTXT, rrs)
}

// SetCNAME makes name an alias of target. While the CNAME is there, other
// types at name are hidden, as RFC 1034 §3.6.2 requires.
func (d *DNSServer) SetCNAME(name, target string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.setLocked(name, dns.TypeCNAME, []dns.RR{&dns.CNAME{Hdr: d.hdr(name, dns.TypeCNAME), Target: dns.Fqdn(target)}})
}

// AddRR adds records of any type (TLSA, for instance) to those already at
// their owner names.
func (d *DNSServer) AddRR(rrs ...dns.RR) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, rr := range rrs {
		rr = dns.Copy(rr)
		h := rr.Header()
		h.Name = canon(h.Name)
		if h.Class == 0 {
			h.Class = dns.ClassINET
		}
		if h.Rrtype == 0 {
			panic("testworld: AddRR: record without type")
		}
		d.setLocked(h.Name, h.Rrtype, append(append([]dns.RR(nil), d.rrs[h.Name][h.Rrtype]...), rr))
	}
}

// Remove deletes the records of one type at name.
func (d *DNSServer) Remove(name string, qtype uint16) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.setLocked(name, qtype, nil)
}

// RemoveName deletes every record at name, so that it answers NXDOMAIN
// (unless it has names below it).
func (d *DNSServer) RemoveName(name string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.rrs, canon(name))
}

// SetServFail makes questions for name and qtype answer SERVFAIL while on;
// qtype dns.TypeANY covers all types. This is also the answer when a CNAME
// chain passes through such a name.
func (d *DNSServer) SetServFail(name string, qtype uint16, on bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	name = canon(name)
	if on {
		if d.servfail[name] == nil {
			d.servfail[name] = map[uint16]bool{}
		}
		d.servfail[name][qtype] = true
	} else {
		delete(d.servfail[name], qtype)
	}
}

// SetTruncate makes UDP answers for name carry TC and no records while on,
// so a client has to ask again over TCP, where the full answer is given.
func (d *DNSServer) SetTruncate(name string, on bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.truncate[canon(name)] = on
}

// SetDelay holds answers for name for delay (0 turns it off), to test the
// client's timeouts. A delay is cut short when the server stops.
func (d *DNSServer) SetDelay(name string, delay time.Duration) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.delay[canon(name)] = delay
}

// SetAD sets the AD (authenticated data) bit in answers for name while on,
// as a validating resolver would for DNSSEC-secure data (for DANE tests).
func (d *DNSServer) SetAD(name string, on bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.ad[canon(name)] = on
}

// Queries is the log of every question received, oldest first.
func (d *DNSServer) Queries() []Query {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]Query(nil), d.queries...)
}

// ResetQueries empties the query log.
func (d *DNSServer) ResetQueries() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.queries = nil
}

// CountQueries counts the logged questions for name (any case, with or
// without trailing dot) and qtype; dns.TypeANY counts all types.
func (d *DNSServer) CountQueries(name string, qtype uint16) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	name = canon(name)
	n := 0
	for _, q := range d.queries {
		if canon(q.Name) == name && (qtype == dns.TypeANY || q.Type == qtype) {
			n++
		}
	}
	return n
}

// ServeDNS answers one query. It implements dns.Handler.
func (d *DNSServer) ServeDNS(rw dns.ResponseWriter, req *dns.Msg) {
	proto := "udp"
	if _, ok := rw.RemoteAddr().(*net.TCPAddr); ok {
		proto = "tcp"
	}
	m := new(dns.Msg)
	if len(req.Question) != 1 || req.Opcode != dns.OpcodeQuery {
		m.SetRcode(req, dns.RcodeFormatError)
		rw.WriteMsg(m)
		return
	}
	q := req.Question[0]

	d.mu.Lock()
	d.queries = append(d.queries, Query{Name: q.Name, Type: q.Qtype, Proto: proto, Time: time.Now()})
	delay := d.delay[canon(q.Name)]
	d.mu.Unlock()
	if !sleepOrDone(delay, d.done) {
		return
	}

	m.SetReply(req)
	m.Authoritative = true
	m.RecursionAvailable = true
	d.mu.Lock()
	d.answerLocked(m, q, proto == "udp")
	d.mu.Unlock()

	if opt := req.IsEdns0(); opt != nil {
		m.SetEdns0(max(opt.UDPSize(), dns.MinMsgSize), opt.Do())
	}
	if proto == "udp" {
		size := dns.MinMsgSize
		if opt := req.IsEdns0(); opt != nil {
			size = int(max(opt.UDPSize(), dns.MinMsgSize))
		}
		m.Truncate(size)
	}
	rw.WriteMsg(m)
}

func (d *DNSServer) servFailLocked(name string, qtype uint16) bool {
	return d.servfail[name][qtype] || d.servfail[name][dns.TypeANY]
}

// existsLocked reports whether name has records or names below it (an empty
// non-terminal exists too: RFC 8020).
func (d *DNSServer) existsLocked(name string) bool {
	if name == "." || len(d.rrs[name]) > 0 {
		return true
	}
	for n := range d.rrs {
		if strings.HasSuffix(n, "."+name) {
			return true
		}
	}
	return false
}

// answerLocked fills m with the answer to q.
func (d *DNSServer) answerLocked(m *dns.Msg, q dns.Question, udp bool) {
	name := canon(q.Name)
	if d.ad[name] {
		m.AuthenticatedData = true
	}
	if udp && d.truncate[name] {
		m.Truncated = true
		return
	}
	owner := q.Name // echo the question's spelling, as servers do
	for hop := 0; ; hop++ {
		if d.servFailLocked(name, q.Qtype) {
			m.Answer = nil
			m.Rcode = dns.RcodeServerFailure
			return
		}
		set := d.rrs[name]
		if c := set[dns.TypeCNAME]; len(c) > 0 && q.Qtype != dns.TypeCNAME {
			if hop >= 8 {
				m.Answer = nil
				m.Rcode = dns.RcodeServerFailure
				return
			}
			m.Answer = append(m.Answer, withOwner(c[0], owner))
			owner = c[0].(*dns.CNAME).Target
			name = canon(owner)
			continue
		}
		var rrs []dns.RR
		if q.Qtype == dns.TypeANY {
			for _, s := range set {
				rrs = append(rrs, s...)
			}
		} else {
			rrs = set[q.Qtype]
		}
		for _, rr := range rrs {
			m.Answer = append(m.Answer, withOwner(rr, owner))
		}
		if len(rrs) == 0 {
			if !d.existsLocked(name) {
				m.Rcode = dns.RcodeNameError
			}
			m.Ns = []dns.RR{d.soa()}
		}
		return
	}
}

// soa is the SOA put in the authority section of negative answers; its
// minimum TTL is the negative-caching TTL (RFC 2308).
func (d *DNSServer) soa() dns.RR {
	return &dns.SOA{
		Hdr:     dns.RR_Header{Name: ".", Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: d.ttl},
		Ns:      "ns.testworld.invalid.",
		Mbox:    "hostmaster.testworld.invalid.",
		Serial:  1,
		Refresh: 3600,
		Retry:   600,
		Expire:  86400,
		Minttl:  min(d.ttl, 60),
	}
}

func withOwner(rr dns.RR, owner string) dns.RR {
	rr = dns.Copy(rr)
	rr.Header().Name = owner
	return rr
}
