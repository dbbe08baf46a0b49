package delivery

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"

	"github.com/stsrelay/stsrelay/delivery/policy"
	"github.com/stsrelay/stsrelay/internal/dnsclient"
	dom "github.com/stsrelay/stsrelay/internal/domain"
)

// Limits on what one attempt tries (RFC 5321 §5.1: a sender SHOULD try at
// least two addresses; bounds keep a broken domain from eating a worker).
const (
	maxHostsPerAttempt = 5
	maxIPsPerHost      = 2
)

// Host is one destination host: the name from the MX record (or the
// domain itself for an implicit MX), which is the name MTA-STS matches and
// the certificate must carry, and its addresses.
type Host struct {
	Name string
	Pref uint16
	IPs  []net.IP
	// Err is why the host has no addresses (skipped).
	Err error
	// Implicit is set for the domain used as its own MX (RFC 5321 §5.1).
	Implicit bool
	// DANE is what TLSA discovery found for the host (RFC 7672 §2.2):
	// the zero value (no DANE) when it is off or does not apply.
	DANE policy.DANE
}

// routeError is a failure to find where mail for a domain goes.
type routeError struct {
	Permanent bool
	Enhanced  string
	Msg       string
}

func (e *routeError) Error() string { return e.Msg }

// Resolver is the part of the DNS client (a *dnsclient.Resolver)
// delivery needs: MX and address lookups that say whether their answers
// are DNSSEC-secure, and TLSA lookups, for DANE (RFC 7672 §2.2).
type Resolver interface {
	LookupMXSecure(ctx context.Context, domain string) ([]dnsclient.MX, bool, error)
	LookupIP(ctx context.Context, host string, wantV6 bool) ([]net.IP, error)
	LookupIPSecure(ctx context.Context, host string, wantV6 bool) ([]net.IP, bool, string, error)
	LookupTLSA(ctx context.Context, host string) (dnsclient.TLSAResult, error)
	// TrustsAD reports whether any answer can be secure at all
	// (dns.trust_ad).
	TrustsAD() bool
}

// route finds the hosts to try for domain, in order, with their
// addresses (RFC 5321 §5.1, RFC 7505), so that the order and the failure
// classes are decided in one place. With dane, it also finds each host's
// TLSA records where DANE applies (discoverDANE).
func route(ctx context.Context, r Resolver, domain, self string, wantV6, dane bool) ([]Host, error) {
	// RFC 5321 §4.1.3: an address literal names the host itself; no DNS.
	if strings.HasPrefix(domain, "[") && strings.HasSuffix(domain, "]") {
		lit := strings.TrimPrefix(strings.TrimPrefix(domain[1:len(domain)-1], "IPv6:"), "ipv6:")
		ip := net.ParseIP(lit)
		if ip == nil {
			return nil, &routeError{Permanent: true, Enhanced: "5.1.2", Msg: fmt.Sprintf("bad address literal %s", domain)}
		}
		return []Host{{Name: lit, IPs: []net.IP{ip}, Implicit: true}}, nil
	}
	if _, err := dom.Parse(domain); err != nil {
		// Not a name DNS can hold: no lookup, no days of retries.
		return nil, &routeError{Permanent: true, Enhanced: "5.1.2", Msg: fmt.Sprintf("bad destination domain: %v", err)}
	}
	// RFC 7672 §2.2.1: DANE only for MX hosts from a secure MX RRset
	// (or, for an implicit MX, a secure denial of MX records, §2.2.2).
	mxs, mxSecure, err := r.LookupMXSecure(ctx, domain)
	tlsa := dane && mxSecure
	switch {
	case err == nil:
	case errors.Is(err, dnsclient.ErrNoData):
		// RFC 5321 §5.1: no MX records → the domain itself is the
		// implicit MX, with preference 0.
		mxs = []dnsclient.MX{{Host: dom.Key(domain), Pref: 0}}
		hosts, err := resolveHosts(ctx, r, mxs, self, wantV6, tlsa)
		for i := range hosts {
			hosts[i].Implicit = true
		}
		if err != nil {
			if re, ok := err.(*routeError); ok && re.Permanent {
				return nil, &routeError{Permanent: true, Enhanced: "5.1.2", Msg: fmt.Sprintf("domain %s has no MX and no address records", domain)}
			}
		}
		return hosts, err
	case errors.Is(err, dnsclient.ErrNotFound):
		// RFC 5321 §5.1: a domain that does not exist is a permanent
		// error.
		return nil, &routeError{Permanent: true, Enhanced: "5.1.2", Msg: fmt.Sprintf("domain %s does not exist (NXDOMAIN)", domain)}
	default:
		return nil, &routeError{Enhanced: "4.4.3", Msg: fmt.Sprintf("MX lookup for %s failed: %v", domain, err)}
	}
	// RFC 7505 §3: a lone "0 ." says the domain accepts no mail. A null
	// MX mixed with real MX records is a publisher error; like mox we
	// ignore the "." and use the others (NULLMX-3-b).
	var real []dnsclient.MX
	for _, mx := range mxs {
		if mx.Host != "." && mx.Host != "" {
			real = append(real, mx)
		}
	}
	if len(real) == 0 {
		return nil, &routeError{Permanent: true, Enhanced: "5.1.10", Msg: fmt.Sprintf("domain %s publishes a null MX: it accepts no mail (RFC 7505)", domain)}
	}
	return resolveHosts(ctx, r, real, self, wantV6, tlsa)
}

// resolveHosts resolves the addresses of the MX hosts, in parallel, and
// classifies the outcome: none resolvable and all NXDOMAIN → permanent
// (RFC 5321 §5.1: MX records present but none usable); any temporary
// failure → temporary. With tlsa (DANE on, the MX RRset secure), a host
// whose address records are secure gets its TLSA records looked up too,
// in the same goroutine.
func resolveHosts(ctx context.Context, r Resolver, mxs []dnsclient.MX, self string, wantV6, tlsa bool) ([]Host, error) {
	self = dom.Key(self)
	hosts := make([]Host, 0, len(mxs))
	for _, mx := range mxs {
		// The relay's own name is never a destination: that would loop
		// (RFC 5321 §5.1).
		if mx.Host == self {
			continue
		}
		hosts = append(hosts, Host{Name: mx.Host, Pref: mx.Pref})
		if len(hosts) == maxHostsPerAttempt {
			break
		}
	}
	if len(hosts) == 0 {
		return nil, &routeError{Permanent: true, Enhanced: "5.4.6", Msg: "the only MX is this relay itself (mail loop)"}
	}
	var wg sync.WaitGroup
	for i := range hosts {
		wg.Add(1)
		go func(h *Host) {
			defer wg.Done()
			ips, secure, name, err := r.LookupIPSecure(ctx, h.Name, wantV6)
			if tlsa && secure && len(ips) > 0 {
				h.DANE = discoverDANE(ctx, r, h.Name, name)
			}
			if len(ips) > maxIPsPerHost {
				ips = ips[:maxIPsPerHost]
			}
			h.IPs, h.Err = ips, err
		}(&hosts[i])
	}
	wg.Wait()
	usable, temp := 0, 0
	var lastErr error
	for i := range hosts {
		h := &hosts[i]
		if len(h.IPs) == 0 && h.Err == nil {
			// Addresses of a family this host cannot reach (an
			// AAAA-only MX without IPv6): try again later.
			h.Err = fmt.Errorf("%s has no address reachable from here: %w", h.Name, dnsclient.ErrTemporary)
		}
		if len(h.IPs) > 0 {
			usable++
		} else if h.Err != nil {
			lastErr = h.Err
			if dnsclient.IsTemporary(h.Err) {
				temp++
			}
		}
	}
	if usable == 0 {
		if temp > 0 {
			return hosts, &routeError{Enhanced: "4.4.3", Msg: fmt.Sprintf("MX host address lookup failed: %v", lastErr)}
		}
		return hosts, &routeError{Permanent: true, Enhanced: "5.4.4", Msg: fmt.Sprintf("no MX host has an address: %v", lastErr)}
	}
	return hosts, nil
}
