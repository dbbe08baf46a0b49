// Package dnsclient is the one DNS client every stsrelay package uses: a
// small stub resolver on github.com/miekg/dns that keeps apart the three
// answers a mail sender must treat differently (RFC 5321 §5.1):
//
//   - the name does not exist (NXDOMAIN): a permanent failure;
//   - the name exists but has no record of the type asked (NODATA);
//   - the server could not answer (SERVFAIL, timeout, refused): temporary.
package dnsclient

import (
	"bufio"
	"context"
	"errors"
	"fmt"
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

// Resolver sends queries to a list of recursive servers, in order.
type Resolver struct {
	servers []string
	timeout time.Duration
}

// New returns a resolver for servers ("host:port"); with none given it
// reads the nameservers of /etc/resolv.conf. timeout bounds each query
// exchange with one server.
func New(servers []string, timeout time.Duration) (*Resolver, error) {
	if len(servers) == 0 {
		var err error
		servers, err = systemServers("/etc/resolv.conf")
		if err != nil {
			return nil, err
		}
	}
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	return &Resolver{servers: servers, timeout: timeout}, nil
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

// Answer is the outcome of one lookup after CNAMEs were followed.
type Answer struct {
	// Name is the owner of the records in RRs: the queried name, or the
	// last target of the CNAME chain.
	Name string
	// RRs holds the records of the type asked.
	RRs []dns.RR
	// Authentic is the AD bit of the final response.
	Authentic bool
}

// Lookup queries name for qtype, following CNAMEs (RFC 5321 §5.1: the
// result is processed as if it were the original name) up to a bound.
// Errors wrap ErrNotFound, ErrNoData or ErrTemporary.
func (r *Resolver) Lookup(ctx context.Context, name string, qtype uint16) (*Answer, error) {
	name = dns.Fqdn(strings.ToLower(name))
	seen := map[string]bool{}
	for range maxCNAMEChain + 1 {
		// A name asked again was reached through a CNAME, and the walk
		// below already checked it against the chain for a loop.
		seen[name] = true
		msg, err := r.exchange(ctx, name, qtype)
		if err != nil {
			return nil, err
		}
		switch msg.Rcode {
		case dns.RcodeSuccess:
		case dns.RcodeNameError:
			// An NXDOMAIN at the end of a CNAME chain still means the
			// target does not exist.
			return nil, fmt.Errorf("%s %s: %w", name, dns.TypeToString[qtype], ErrNotFound)
		default:
			return nil, fmt.Errorf("%s %s: server answered %s: %w", name, dns.TypeToString[qtype], dns.RcodeToString[msg.Rcode], ErrTemporary)
		}
		ans := &Answer{Name: name, Authentic: msg.AuthenticatedData}
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
						return nil, fmt.Errorf("%s %s: CNAME loop: %w", name, dns.TypeToString[qtype], ErrTemporary)
					}
					seen[next] = true
					cur = next
					changed = true
					break
				}
			}
		}
		for _, rr := range msg.Answer {
			if rr.Header().Rrtype == qtype && strings.EqualFold(rr.Header().Name, cur) {
				ans.RRs = append(ans.RRs, rr)
			}
		}
		if len(ans.RRs) > 0 {
			ans.Name = cur
			return ans, nil
		}
		if cur != name {
			// The chain continued to a name whose records were not in
			// this response: ask for the target itself.
			name = cur
			continue
		}
		return nil, fmt.Errorf("%s %s: %w", name, dns.TypeToString[qtype], ErrNoData)
	}
	return nil, fmt.Errorf("%s %s: CNAME chain longer than %d: %w", name, dns.TypeToString[qtype], maxCNAMEChain, ErrTemporary)
}

// exchange asks each server in turn, over UDP and then TCP when the
// answer was truncated; the first server that answers (with any rcode but
// SERVFAIL/REFUSED) wins.
func (r *Resolver) exchange(ctx context.Context, name string, qtype uint16) (*dns.Msg, error) {
	q := new(dns.Msg)
	q.SetQuestion(name, qtype)
	q.RecursionDesired = true
	q.SetEdns0(1232, false)
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
// without spaces; the caller decides).
func (r *Resolver) LookupTXT(ctx context.Context, name string) ([][]string, error) {
	ans, err := r.Lookup(ctx, name, dns.TypeTXT)
	if err != nil {
		return nil, err
	}
	out := make([][]string, 0, len(ans.RRs))
	for _, rr := range ans.RRs {
		out = append(out, append([]string(nil), rr.(*dns.TXT).Txt...))
	}
	return out, nil
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
	ans, err := r.Lookup(ctx, domain, dns.TypeMX)
	if err != nil {
		return nil, err
	}
	out := make([]MX, 0, len(ans.RRs))
	for _, rr := range ans.RRs {
		mx := rr.(*dns.MX)
		host := strings.ToLower(mx.Mx)
		if host != "." {
			host = strings.TrimSuffix(host, ".")
		}
		out = append(out, MX{Host: host, Pref: mx.Preference})
	}
	rand.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	sort.SliceStable(out, func(i, j int) bool { return out[i].Pref < out[j].Pref })
	return out, nil
}

// LookupIP returns the IPv4 addresses of host and, when wantV6, its IPv6
// addresses after them, each family in the order the server gave them. A name with neither kind
// returns an error wrapping ErrNoData or ErrNotFound; if one family fails
// temporarily and the other answers, the answer is returned.
func (r *Resolver) LookupIP(ctx context.Context, host string, wantV6 bool) ([]net.IP, error) {
	var ips []net.IP
	var errs []error
	types := []uint16{dns.TypeA}
	if wantV6 {
		types = append(types, dns.TypeAAAA)
	}
	for _, t := range types {
		ans, err := r.Lookup(ctx, host, t)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, rr := range ans.RRs {
			switch v := rr.(type) {
			case *dns.A:
				ips = append(ips, v.A)
			case *dns.AAAA:
				ips = append(ips, v.AAAA)
			}
		}
	}
	if len(ips) > 0 {
		return ips, nil
	}
	for _, err := range errs {
		if IsTemporary(err) {
			return nil, err
		}
	}
	for _, err := range errs {
		if errors.Is(err, ErrNotFound) {
			return nil, err
		}
	}
	if len(errs) > 0 {
		return nil, errs[0]
	}
	return nil, fmt.Errorf("%s: %w", host, ErrNoData)
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
