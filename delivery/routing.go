package delivery

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"

	"github.com/stsrelay/stsrelay/delivery/policy"
	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/internal/domain"
	"github.com/stsrelay/stsrelay/queue"
)

// Routing is the [[route]] and [[tls_policy]] tables in force. The
// engine holds one behind an atomic pointer; SetRouting replaces it (a
// configuration reload) without stopping deliveries: an attempt uses the
// tables it started with.
type Routing struct {
	routes   map[string]*Route
	wildcard *Route
	tls      map[string]config.TLSPolicy
}

// Route is one [[route]] in force: mail for its domains goes to a fixed
// next hop instead of the MX hosts.
type Route struct {
	// NextHop is next_hop as configured: the log line's route field.
	NextHop string
	Host    string
	Port    int
	IP      net.IP // set for "[IP]:port"
	// Username and Password for AUTH PLAIN; PasswordErr when the
	// password file could not be read (the route's mail waits).
	Username, Password string
	PasswordErr        error
	RequireTLS         bool
}

// PolicyDomain is the MTA-STS policy domain of mail sent on this route.
//
// RFC 8461 §3.4: "When sending mail via a 'smart host' ... compliant
// senders MUST treat the smart host domain as the policy domain for the
// purposes of policy discovery and application." We read "the smart host
// domain" as the next hop's host name itself (no public-suffix guess at
// a parent domain, which could apply an unrelated party's policy): the
// policy is looked up at _mta-sts.<next hop>, its mx patterns are matched
// against the next hop name, and TLS-RPT records the sessions under it.
// An "[IP]:port" next hop has no policy domain ("").
func (r *Route) PolicyDomain() string {
	if r.IP != nil {
		return ""
	}
	return r.Host
}

// NewRouting builds the tables from the configuration, reading the
// routes' password files. An unreadable file is an error; the Routing
// returned then still holds everything else, with that route's mail
// waiting (PasswordErr).
func NewRouting(routes []config.Route, tlsPolicies []config.TLSPolicy, defaultPort int) (*Routing, error) {
	rt := &Routing{routes: map[string]*Route{}, tls: map[string]config.TLSPolicy{}}
	var errs []error
	for i := range routes {
		c := &routes[i]
		host, port, ip, err := config.ParseNextHop(c.NextHop, defaultPort)
		if err != nil {
			return nil, fmt.Errorf("route[%d]: %w", i, err)
		}
		r := &Route{NextHop: c.NextHop, Host: host, Port: port, IP: ip, Username: c.AuthUsername, RequireTLS: c.TLSRequired()}
		if c.AuthPasswordFile != "" {
			b, err := os.ReadFile(c.AuthPasswordFile)
			if err != nil {
				r.PasswordErr = fmt.Errorf("route[%d] auth_password_file: %w", i, err)
				errs = append(errs, r.PasswordErr)
			}
			r.Password = strings.TrimRight(string(b), "\r\n")
		}
		for _, d := range c.Domains {
			d = domain.Key(d)
			if d == "*" {
				rt.wildcard = r
			} else {
				rt.routes[d] = r
			}
		}
	}
	for _, p := range tlsPolicies {
		for _, d := range p.Domains {
			rt.tls[domain.Key(d)] = p
		}
	}
	return rt, errors.Join(errs...)
}

// route returns the route for a recipient domain, nil for its MX hosts.
func (rt *Routing) route(domain string) *Route {
	if rt == nil {
		return nil
	}
	if r, ok := rt.routes[strings.ToLower(domain)]; ok {
		return r
	}
	return rt.wildcard
}

// override returns the TLS override for a recipient domain: its
// [[tls_policy]], or else "verify" for a route with require_tls.
func (rt *Routing) override(domain string, r *Route) (policy.Security, bool) {
	if rt != nil {
		if p, ok := rt.tls[strings.ToLower(domain)]; ok {
			return policy.Security(p.Security), p.OverridePolicy
		}
	}
	if r != nil && r.RequireTLS {
		return policy.SecurityVerify, false
	}
	return "", false
}

// SetRouting makes routes and tlsPolicies the tables used by attempts
// that start from now on (at start and on reload). On error (a password
// file that cannot be read, a bad next hop) the tables in force are
// kept.
func (e *Engine) SetRouting(routes []config.Route, tlsPolicies []config.TLSPolicy) error {
	rt, err := NewRouting(routes, tlsPolicies, e.cfg.Delivery.Port)
	if err != nil {
		return err
	}
	e.routing.Store(rt)
	return nil
}

// hosts resolves the route's next hop: its address, or the host name's
// A/AAAA records. Every failure is temporary: a smart host that does not
// resolve is a local problem, never the recipient's.
func (r *Route) hosts(ctx context.Context, res Resolver, wantV6 bool) ([]Host, error) {
	if r.IP != nil {
		return []Host{{Name: r.Host, IPs: []net.IP{r.IP}}}, nil
	}
	ips, err := res.LookupIP(ctx, r.Host, wantV6)
	if len(ips) > maxIPsPerHost {
		ips = ips[:maxIPsPerHost]
	}
	if len(ips) == 0 {
		if err == nil {
			err = fmt.Errorf("no address reachable from here: %w", dnsclient.ErrTemporary)
		}
		return nil, &routeError{Enhanced: "4.4.3", Msg: fmt.Sprintf("next hop %s: address lookup failed: %v", r.Host, err)}
	}
	return []Host{{Name: r.Host, IPs: ips}}, nil
}

// RetrySchedule is the queue.Schedule that the [queue] section describes:
// the one place the configured retry intervals and lifetime become a
// schedule (queue.Schedule.Delay computes the waits).
func RetrySchedule(q *config.Queue) queue.Schedule {
	s := queue.Schedule{MaxQueueTime: q.MaxQueueTime.Duration}
	for _, d := range q.RetrySchedule {
		s.Retry = append(s.Retry, d.Duration)
	}
	return s
}
