// Package dnsclient is the one DNS client every stsrelay package uses: a
// small stub resolver on github.com/miekg/dns that keeps apart the three
// answers a mail sender must treat differently (RFC 5321 §5.1):
//
//   - the name does not exist (NXDOMAIN): a permanent failure;
//   - the name exists but has no record of the type asked (NODATA);
//   - the server could not answer (SERVFAIL, timeout, refused): temporary.
//
// A Resolver made with NewWithOptions keeps the outcomes in a cache shared
// by all its users: answers for their TTL (capped), negative answers for
// the TTL RFC 2308 §5 gives them, failures for two seconds; and concurrent
// lookups of one question send one query. Lookups report how long their
// answer stays valid (Answer.TTL, TXTAnswer.TTL), so that a caller can act
// when a record's TTL runs out (RFC 8461 §3.1).
//
// For DANE (RFC 7672) a lookup also says whether its answer is
// DNSSEC-secure. The client does not validate: it sets the DO and AD bits
// in its queries (RFC 3225, RFC 6840 §5.7) and believes the AD bit of the
// answer (Answer.Authentic) only from servers it may trust (RFC 6840 §5.8:
// a stub resolver must know the path to its validating resolver is safe).
// Options.TrustAD says which: by default only when every server is on a
// loopback address. Answer.Secure is the AD bit so judged.
package dnsclient

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"os"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// maxCNAMEChain bounds how many CNAMEs are followed for one lookup.
const maxCNAMEChain = 8

// Errors returned (wrapped) by Resolver lookups. Use errors.Is.
var (
	// ErrNotFound: the name does not exist (NXDOMAIN).
	ErrNotFound = errors.New("no such domain (NXDOMAIN)")
	// ErrNoData: the name exists but has no record of the type asked.
	ErrNoData = errors.New("no record of that type (NODATA)")
	// ErrTemporary: no usable answer now (SERVFAIL, REFUSED, timeout,
	// network error, CNAME loop); the caller should retry later.
	ErrTemporary = errors.New("temporary DNS failure")
)

// IsNotFound reports whether err says the name or the record does not
// exist (NXDOMAIN or NODATA): an authoritative "no".
func IsNotFound(err error) bool {
	return errors.Is(err, ErrNotFound) || errors.Is(err, ErrNoData)
}

// IsTemporary reports whether err is a temporary DNS failure.
func IsTemporary(err error) bool { return errors.Is(err, ErrTemporary) }

// Values of Options.TrustAD (config dns.trust_ad): when the AD bit of an
// answer is believed, making it Secure.
const (
	// TrustADLoopback believes the AD bit only when every server queried
	// is on a loopback address (127.0.0.0/8 or ::1), where no one on the
	// network can forge or strip it: a validating resolver on this host.
	// It is the default.
	TrustADLoopback = "loopback"
	// TrustADAlways believes the AD bit from any server: for a validating
	// resolver reached over a network path the operator trusts.
	TrustADAlways = "always"
	// TrustADNever never believes it: no answer is Secure, DANE is off.
	TrustADNever = "never"
)

// ParseTrustAD checks a dns.trust_ad value and returns it in canonical
// form: "" is TrustADLoopback, and case does not matter.
func ParseTrustAD(s string) (string, error) {
	switch v := strings.ToLower(s); v {
	case "":
		return TrustADLoopback, nil
	case TrustADLoopback, TrustADAlways, TrustADNever:
		return v, nil
	}
	return "", fmt.Errorf("dns trust_ad must be %q, %q or %q, got %q", TrustADLoopback, TrustADAlways, TrustADNever, s)
}

// trusts reports whether the AD bit of answers from servers ("host:port")
// is believed under mode (a value ParseTrustAD returned). In loopback mode
// every server must be an IP literal on a loopback address; a host name
// (even "localhost") or an empty list is not trusted.
func trusts(servers []string, mode string) bool {
	switch mode {
	case TrustADAlways:
		return true
	case TrustADLoopback:
	default:
		return false
	}
	if len(servers) == 0 {
		return false
	}
	for _, s := range servers {
		host, _, err := net.SplitHostPort(s)
		if err != nil {
			host = strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")
		}
		ip := net.ParseIP(host)
		if ip == nil || !ip.IsLoopback() {
			return false
		}
	}
	return true
}

// TXTResolver looks up TXT records, each returned as its list of
// character-strings: the one interface the MTA-STS and TLSRPT record
// lookups take. *Resolver implements it; errors should wrap ErrNotFound /
// ErrNoData for an authoritative "no" and ErrTemporary for anything that
// may succeed later.
type TXTResolver interface {
	LookupTXT(ctx context.Context, name string) ([][]string, error)
}

// Resolver sends queries to a list of recursive servers, in order, and
// keeps their answers in its cache. It is safe for concurrent use.
type Resolver struct {
	servers []string
	trustAD bool // the AD bit of answers is believed: see Options.TrustAD
	timeout time.Duration
	maxTTL  time.Duration
	now     func() time.Time
	cache   *cache
}

// Options configure a Resolver.
type Options struct {
	// Servers are the recursive resolvers, "host:port"; empty reads the
	// nameservers of /etc/resolv.conf.
	Servers []string
	// Timeout bounds each query exchange with one server; 0 means 5s.
	Timeout time.Duration
	// CacheEntries bounds the cache: beyond it the least recently used
	// answers are dropped. 0 disables the cache (config dns.cache_entries).
	CacheEntries int
	// CacheMaxTTL caps the TTL of every answer, cached or not;
	// 0 means DefaultCacheMaxTTL (config dns.cache_max_ttl).
	CacheMaxTTL time.Duration
	// Now is the clock TTLs are measured with; nil means time.Now.
	Now func() time.Time
	// TrustAD says when the AD bit of answers is believed (config
	// dns.trust_ad): TrustADLoopback (the default when empty), only when
	// every server, configured or from resolv.conf, is a loopback address;
	// TrustADAlways; or TrustADNever. Other values are an error.
	TrustAD string
}

// New returns a resolver for servers ("host:port") without a cache; with
// no servers given it reads the nameservers of /etc/resolv.conf. timeout
// bounds each query exchange with one server. It is NewWithOptions with
// only Servers and Timeout set.
func New(servers []string, timeout time.Duration) (*Resolver, error) {
	return NewWithOptions(Options{Servers: servers, Timeout: timeout})
}

// NewWithOptions returns a resolver configured by opts.
func NewWithOptions(opts Options) (*Resolver, error) {
	servers := opts.Servers
	if len(servers) == 0 {
		var err error
		servers, err = systemServers("/etc/resolv.conf")
		if err != nil {
			return nil, err
		}
	}
	if opts.CacheEntries < 0 {
		return nil, fmt.Errorf("dns cache entries must not be negative, got %d", opts.CacheEntries)
	}
	mode, err := ParseTrustAD(opts.TrustAD)
	if err != nil {
		return nil, err
	}
	r := &Resolver{
		servers: servers,
		trustAD: trusts(servers, mode),
		timeout: opts.Timeout,
		maxTTL:  opts.CacheMaxTTL,
		now:     opts.Now,
		cache:   newCache(opts.CacheEntries),
	}
	if r.timeout <= 0 {
		r.timeout = 5 * time.Second
	}
	if r.maxTTL <= 0 {
		r.maxTTL = DefaultCacheMaxTTL
	}
	if r.now == nil {
		r.now = time.Now
	}
	return r, nil
}

func systemServers(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read DNS servers: %w", err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "nameserver" {
			out = append(out, net.JoinHostPort(fields[1], "53"))
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no nameserver in %s", path)
	}
	return out, nil
}

// Servers returns the servers queried, in order.
func (r *Resolver) Servers() []string { return append([]string(nil), r.servers...) }

// TrustsAD reports whether this resolver believes the AD bit of its
// servers' answers (Options.TrustAD): when false, no answer is Secure.
func (r *Resolver) TrustsAD() bool { return r.trustAD }

// Answer is the outcome of one lookup after CNAMEs were followed.
type Answer struct {
	// Name is the owner of the records in RRs: the queried name, or the
	// last target of the CNAME chain.
	Name string
	// RRs holds the records of the type asked. They are shared with the
	// cache and other callers: do not modify them.
	RRs []dns.RR
	// Authentic is the AD bit of the final response, whether or not the
	// server is trusted to set it.
	Authentic bool
	// Secure says the answer is DNSSEC-secure: the resolver trusts the AD
	// bit (Resolver.TrustsAD) and every response the lookup used had it
	// set, those that led through a CNAME chain included.
	Secure bool
	// TTL is how long the answer stays valid from the lookup on: the
	// smallest TTL of the records used, the CNAMEs of the chain included,
	// capped by Options.CacheMaxTTL, less the time it has spent in the
	// cache.
	TTL time.Duration
	// Expires is when the answer stops being valid (and leaves the
	// cache): the lookup's time, by Options.Now, plus TTL.
	Expires time.Time
}

// Lookup queries name for qtype, following CNAMEs (RFC 5321 §5.1: the
// result is processed as if it were the original name) up to a bound.
// Errors wrap ErrNotFound, ErrNoData or ErrTemporary.
func (r *Resolver) Lookup(ctx context.Context, name string, qtype uint16) (*Answer, error) {
	e, now, err := r.resolve(ctx, name, qtype, false)
	if err != nil {
		return nil, err
	}
	if e.err != nil {
		return nil, e.err
	}
	ans := *e.ans
	ans.TTL, ans.Expires = e.remaining(now), e.expires
	return &ans, nil
}

// lookup is Lookup without the cache. It also returns how long its
// outcome may be cached, before the cap: the smallest TTL of the records
// used for an answer, the RFC 2308 TTL for a negative one, failureTTL for
// a failure; and whether the outcome is DNSSEC-secure: for an answer its
// Secure, for NXDOMAIN or NODATA whether the denial is (every response
// used had the AD bit, and the resolver trusts it), for a failure false.
func (r *Resolver) lookup(ctx context.Context, name string, qtype uint16) (*Answer, time.Duration, bool, error) {
	seen := map[string]bool{}
	// chain is the smallest TTL, in seconds, of the CNAMEs followed so far.
	chain := uint32(math.MaxUint32)
	// secure is whether every response so far carried a trusted AD bit:
	// a CNAME chain spread over several responses is only as secure as
	// its least secure link.
	secure := r.trustAD
	for range maxCNAMEChain + 1 {
		// A name asked again was reached through a CNAME, and the walk
		// below already checked it against the chain for a loop.
		seen[name] = true
		msg, err := r.exchange(ctx, name, qtype)
		if err != nil {
			return nil, failureTTL, false, err
		}
		secure = secure && msg.AuthenticatedData
		switch msg.Rcode {
		case dns.RcodeSuccess:
		case dns.RcodeNameError:
			// An NXDOMAIN at the end of a CNAME chain still means the
			// target does not exist.
			return nil, negativeTTL(msg, chain), secure, fmt.Errorf("%s %s: %w", name, dns.TypeToString[qtype], ErrNotFound)
		default:
			return nil, failureTTL, false, fmt.Errorf("%s %s: server answered %s: %w", name, dns.TypeToString[qtype], dns.RcodeToString[msg.Rcode], ErrTemporary)
		}
		ans := &Answer{Name: name, Authentic: msg.AuthenticatedData, Secure: secure}
		// Walk the answer section: the server may have put the whole
		// CNAME chain and the target's records in one response.
		cur := name
		for changed := true; changed; {
			changed = false
			for _, rr := range msg.Answer {
				h := rr.Header()
				if !strings.EqualFold(h.Name, cur) {
					continue
				}
				if c, ok := rr.(*dns.CNAME); ok && qtype != dns.TypeCNAME {
					next := strings.ToLower(dns.Fqdn(c.Target))
					if seen[next] {
						return nil, failureTTL, false, fmt.Errorf("%s %s: CNAME loop: %w", name, dns.TypeToString[qtype], ErrTemporary)
					}
					seen[next] = true
					chain = min(chain, ttlOf(h.Ttl))
					cur = next
					changed = true
					break
				}
			}
		}
		ttl := chain
		for _, rr := range msg.Answer {
			if rr.Header().Rrtype == qtype && strings.EqualFold(rr.Header().Name, cur) {
				ans.RRs = append(ans.RRs, rr)
				// RFC 2181 §5.2: the TTLs of an RRset should be equal;
				// when they are not, the smallest is used.
				ttl = min(ttl, ttlOf(rr.Header().Ttl))
			}
		}
		if len(ans.RRs) > 0 {
			ans.Name = cur
			return ans, time.Duration(ttl) * time.Second, secure, nil
		}
		if cur != name {
			// The chain continued to a name whose records were not in
			// this response: ask for the target itself.
			name = cur
			continue
		}
		return nil, negativeTTL(msg, chain), secure, fmt.Errorf("%s %s: %w", name, dns.TypeToString[qtype], ErrNoData)
	}
	return nil, failureTTL, false, fmt.Errorf("%s %s: CNAME chain longer than %d: %w", name, dns.TypeToString[qtype], maxCNAMEChain, ErrTemporary)
}

// exchange asks each server in turn, over UDP and then TCP when the
// answer was truncated; the first server that answers (with any rcode but
// SERVFAIL/REFUSED) wins. The query sets the EDNS0 DO bit (RFC 3225: a
// validating resolver then returns what it validated, and sets AD on it)
// and the AD bit (RFC 6840 §5.7: the client understands AD); CD stays
// clear, so that the server validates and answers SERVFAIL when the data
// is bogus. DNSSEC records make answers larger, hence the TCP retry.
func (r *Resolver) exchange(ctx context.Context, name string, qtype uint16) (*dns.Msg, error) {
	q := new(dns.Msg)
	q.SetQuestion(name, qtype)
	q.RecursionDesired = true
	q.SetEdns0(1232, true)
	q.AuthenticatedData = true
	var lastErr error
	for _, server := range r.servers {
		if err := ctx.Err(); err != nil {
			return nil, fmt.Errorf("%s %s: %v: %w", name, dns.TypeToString[qtype], err, ErrTemporary)
		}
		msg, err := r.exchangeOne(ctx, "udp", server, q)
		if err == nil && msg.Truncated {
			msg, err = r.exchangeOne(ctx, "tcp", server, q)
		}
		if err != nil {
			lastErr = err
			continue
		}
		if msg.Rcode == dns.RcodeServerFailure || msg.Rcode == dns.RcodeRefused {
			lastErr = fmt.Errorf("server %s answered %s", server, dns.RcodeToString[msg.Rcode])
			if msg.Rcode == dns.RcodeServerFailure && server == r.servers[len(r.servers)-1] {
				return msg, nil
			}
			continue
		}
		return msg, nil
	}
	return nil, fmt.Errorf("%s %s: %v: %w", name, dns.TypeToString[qtype], lastErr, ErrTemporary)
}

func (r *Resolver) exchangeOne(ctx context.Context, proto, server string, q *dns.Msg) (*dns.Msg, error) {
	c := &dns.Client{Net: proto, Timeout: r.timeout}
	ctx, cancel := context.WithTimeout(ctx, r.timeout)
	defer cancel()
	m := q.Copy()
	m.Id = dns.Id()
	resp, _, err := c.ExchangeContext(ctx, m, server)
	if err != nil {
		return nil, fmt.Errorf("query %s over %s: %w", server, proto, err)
	}
	return resp, nil
}

// LookupTXT returns the TXT records at name, each as its list of
// character-strings (RFC 8461 §3.1 and RFC 8460 §3 concatenate them
// without spaces; the caller decides). The slices are shared with the
// cache and other callers: do not modify them.
func (r *Resolver) LookupTXT(ctx context.Context, name string) ([][]string, error) {
	a, err := r.LookupTXTAnswer(ctx, name)
	return a.Records, err
}

// TXTAnswer is the outcome of a TXT lookup with its lifetime.
type TXTAnswer struct {
	// Records holds one []string, its character-strings, per TXT record.
	// The slices are shared with the cache and other callers: do not
	// modify them.
	Records [][]string
	// TTL is how long the outcome stays valid from the lookup on, as
	// Answer.TTL; with an error, how long that error is cached (the RFC
	// 2308 §5 TTL for NXDOMAIN and NODATA, zero when the server gave no
	// SOA, a few seconds for a temporary failure).
	TTL time.Duration
	// Expires is the lookup's time, by Options.Now, plus TTL.
	Expires time.Time
}

// LookupTXTAnswer returns the TXT records at name, as LookupTXT, and how
// long they stay valid: a caller that keeps something derived from them
// (an MTA-STS policy id) should look again once TTL has run out (RFC 8461
// §3.1). TTL and Expires are set with errors wrapping ErrNotFound,
// ErrNoData or ErrTemporary too, but not when ctx ended first. A cached
// answer costs no allocation.
func (r *Resolver) LookupTXTAnswer(ctx context.Context, name string) (TXTAnswer, error) {
	return r.lookupTXT(ctx, name, false)
}

// LookupTXTFresh is LookupTXTAnswer that does not take its answer from the
// cache: it asks the server (or waits for a query already sent) and caches
// what it gets. It is for the rare lookup that must see a change before
// the TTL runs out, such as the policy check before a message fails
// because of an enforce policy (RFC 8461 §5.1).
func (r *Resolver) LookupTXTFresh(ctx context.Context, name string) (TXTAnswer, error) {
	return r.lookupTXT(ctx, name, true)
}

func (r *Resolver) lookupTXT(ctx context.Context, name string, fresh bool) (TXTAnswer, error) {
	e, now, err := r.resolve(ctx, name, dns.TypeTXT, fresh)
	if err != nil {
		return TXTAnswer{}, err
	}
	return TXTAnswer{Records: e.txt, TTL: e.remaining(now), Expires: e.expires}, e.err
}

// MX is one mail exchanger: a host name without trailing dot, lower case.
type MX struct {
	Host string
	Pref uint16
}

// LookupMX returns the MX records of domain sorted by preference, with
// the order of records of equal preference shuffled (RFC 5321 §5.1: the
// sender MUST randomize them). The host names are those of the MX
// records (not of any CNAME target), lower-cased, without trailing dot;
// a null MX (RFC 7505) shows as Host ".".
func (r *Resolver) LookupMX(ctx context.Context, domain string) ([]MX, error) {
	mxs, _, err := r.LookupMXSecure(ctx, domain)
	return mxs, err
}

// LookupMXSecure is LookupMX that also reports whether the MX RRset is
// DNSSEC-secure (Answer.Secure: the CNAMEs leading to it included), as
// RFC 7672 §2.2.1 needs. With an error wrapping ErrNotFound or ErrNoData
// the bool says whether that denial was secure; with any other error it
// is false.
func (r *Resolver) LookupMXSecure(ctx context.Context, domain string) ([]MX, bool, error) {
	e, _, err := r.resolve(ctx, domain, dns.TypeMX, false)
	if err != nil {
		return nil, false, err
	}
	if e.err != nil {
		return nil, e.secure, e.err
	}
	out := make([]MX, 0, len(e.ans.RRs))
	for _, rr := range e.ans.RRs {
		mx, ok := rr.(*dns.MX)
		if !ok {
			continue
		}
		host := strings.ToLower(mx.Mx)
		if host != "." {
			host = strings.TrimSuffix(host, ".")
		}
		out = append(out, MX{Host: host, Pref: mx.Preference})
	}
	rand.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	sort.SliceStable(out, func(i, j int) bool { return out[i].Pref < out[j].Pref })
	return out, e.secure, nil
}

// LookupIP returns the IPv4 addresses of host and, when wantV6, its IPv6
// addresses after them, each family in the order the server gave them. A name with neither kind
// returns an error wrapping ErrNoData or ErrNotFound; if one family fails
// temporarily and the other answers, the answer is returned.
func (r *Resolver) LookupIP(ctx context.Context, host string, wantV6 bool) ([]net.IP, error) {
	ips, _, _, err := r.LookupIPSecure(ctx, host, wantV6)
	return ips, err
}

// LookupIPSecure is LookupIP that also reports whether the addresses are
// DNSSEC-secure, and the name that holds them. secure is true only when
// every address RRset returned is (Answer.Secure, CNAMEs included); a
// family that has no records or failed, and so gives no address, does
// not count. name is the owner of the addresses after CNAME expansion
// (of the first family that answered), lower case without trailing dot:
// when secure and not host itself, it is the candidate TLSA base domain
// of RFC 7672 §2.2.2. With an error, secure is false and name empty.
func (r *Resolver) LookupIPSecure(ctx context.Context, host string, wantV6 bool) ([]net.IP, bool, string, error) {
	var ips []net.IP
	var errs []error
	secure, name := true, ""
	types := []uint16{dns.TypeA}
	if wantV6 {
		types = append(types, dns.TypeAAAA)
	}
	for _, t := range types {
		e, _, err := r.resolve(ctx, host, t, false)
		if err == nil {
			err = e.err
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if len(e.ans.RRs) == 0 {
			continue
		}
		if name == "" {
			name = canonicalName(e.ans.Name)
		}
		secure = secure && e.ans.Secure
		// Copies: the records are shared with the cache.
		for _, rr := range e.ans.RRs {
			switch v := rr.(type) {
			case *dns.A:
				ips = append(ips, append(net.IP(nil), v.A...))
			case *dns.AAAA:
				ips = append(ips, append(net.IP(nil), v.AAAA...))
			}
		}
	}
	if len(ips) > 0 {
		return ips, secure, name, nil
	}
	for _, err := range errs {
		if IsTemporary(err) {
			return nil, false, "", err
		}
	}
	for _, err := range errs {
		if errors.Is(err, ErrNotFound) {
			return nil, false, "", err
		}
	}
	if len(errs) > 0 {
		return nil, false, "", errs[0]
	}
	return nil, false, "", fmt.Errorf("%s: %w", host, ErrNoData)
}

// DialContext connects to addr ("host:port") resolving host with this
// resolver rather than the system's, trying its addresses in order. The
// HTTPS clients (policy fetch, TLS-RPT upload) use it so that every name
// the relay looks up goes through the configured DNS servers.
func (r *Resolver) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	var d net.Dialer
	if ip := net.ParseIP(host); ip != nil {
		return d.DialContext(ctx, network, addr)
	}
	ips, err := r.LookupIP(ctx, host, HasIPv6Route())
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", addr, err)
	}
	var lastErr error
	for _, ip := range ips {
		c, err := d.DialContext(ctx, network, net.JoinHostPort(ip.String(), port))
		if err == nil {
			return c, nil
		}
		lastErr = err
	}
	return nil, lastErr
}

// HasIPv6Route reports whether this host has a route to the IPv6
// Internet, so AAAA records are worth trying. It is worked out once per
// process (a UDP "connect" only consults the routing table; no packet is
// sent).
var HasIPv6Route = sync.OnceValue(func() bool {
	c, err := net.Dial("udp6", "[2001:db8::1]:53")
	if err != nil {
		return false
	}
	c.Close()
	return true
})
