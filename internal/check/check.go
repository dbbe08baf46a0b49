package check

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/stsrelay/stsrelay/delivery"
	"github.com/stsrelay/stsrelay/internal/certexpiry"
	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/mtasts"
	"github.com/stsrelay/stsrelay/mtasts/forecast"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// Options are what a check uses.
type Options struct {
	// Resolver looks up the MTA-STS, MX, address, TLSA and TLS-RPT
	// records; its TrustsAD decides whether DNSSEC can be judged.
	Resolver *dnsclient.Resolver
	// Fetcher fetches the policy (nil: defaults).
	Fetcher *mtasts.Fetcher
	// Probe is how each MX address is probed (HELO name, port,
	// timeouts, roots).
	Probe delivery.ProbeOptions
}

// CertWarnDays: an MX certificate expiring sooner gets an advice (the one
// threshold, certexpiry.WarnDays).
const CertWarnDays = certexpiry.WarnDays

// Report is `stsrelay check DOMAIN -json`: stable field names for
// scripts.
type Report struct {
	Domain   string               `json:"domain"`
	OK       bool                 `json:"ok"`
	MTASTS   *mtasts.PolicyReport `json:"mta_sts"`
	MX       []MX                 `json:"mx"`
	MXError  string               `json:"mx_error,omitempty"`
	Patterns []Pattern            `json:"patterns,omitempty"`
	TLSRPT   TLSRPT               `json:"tls_rpt"`
	// DNSSEC is whether DNSSEC can be judged and the MX RRset is
	// secure; each MX's DANE findings are in its "dane" object.
	DNSSEC   DNSSEC   `json:"dnssec"`
	Problems []string `json:"problems"`
	Advice   []string `json:"advice"`
	// Forecast is the relay's enforce forecast for the domain, with
	// -config, when the relay counted sessions to it.
	Forecast *forecast.Summary `json:"forecast,omitempty"`
}

type MX struct {
	Host string `json:"host"`
	Pref uint16 `json:"preference"`
	// MatchesPolicy is set when a policy with mx patterns was found.
	MatchesPolicy *bool                  `json:"matches_policy,omitempty"`
	Addresses     []delivery.ProbeResult `json:"addresses"`
	Error         string                 `json:"error,omitempty"`
	// DANE is the TLSA assessment of the host (see DANE).
	DANE DANE `json:"dane"`
}

type Pattern struct {
	Pattern   string `json:"pattern"`
	MatchesMX bool   `json:"matches_mx"`
}

type TLSRPT struct {
	Name    string   `json:"name"`
	Present bool     `json:"present"`
	Valid   bool     `json:"valid"`
	Record  string   `json:"record,omitempty"`
	RUA     []string `json:"rua,omitempty"`
	Error   string   `json:"error,omitempty"`
}

// Run gathers the findings about domain: the MTA-STS record and policy,
// the MX hosts and how they align with the policy's patterns, each MX
// address's STARTTLS and certificate, DNSSEC and each MX's DANE TLSA
// records (dane.go), and the TLS-RPT record.
func Run(ctx context.Context, o Options, domain string) *Report {
	rep := &Report{Domain: domain, MX: []MX{}, Problems: []string{}, Advice: []string{}}
	rep.MTASTS = mtasts.CheckPolicy(ctx, o.Resolver, o.Fetcher, domain)
	rep.Problems = append(rep.Problems, rep.MTASTS.Problems...)
	rep.Advice = append(rep.Advice, rep.MTASTS.Advice...)
	policy := rep.MTASTS.Parsed

	mxs := lookupMX(ctx, o.Resolver, domain, rep)
	probeMXs(ctx, o, rep, mxs, policy)
	for i := range rep.MX {
		mx := &rep.MX[i]
		mxFindings(rep, mx)
		daneFindings(rep, mx)
	}
	patternFindings(rep, policy, mxs)
	checkTLSRPT(ctx, o.Resolver, domain, rep)
	rep.OK = len(rep.Problems) == 0
	return rep
}

// lookupMX returns the MX hosts of domain in preference order (the
// domain itself when it has none, nothing for a null MX) and records the
// lookup's DNSSEC status, failure or oddity in rep.
func lookupMX(ctx context.Context, res *dnsclient.Resolver, domain string, rep *Report) []dnsclient.MX {
	mxs, mxSecure, err := res.LookupMXSecure(ctx, domain)
	rep.DNSSEC = DNSSEC{ADTrusted: res.TrustsAD(), Servers: res.Servers(), MXSecure: mxSecure}
	switch {
	case errors.Is(err, dnsclient.ErrNoData):
		mxs = []dnsclient.MX{{Host: domain}}
		rep.Advice = append(rep.Advice, "no MX records: senders use the domain itself (implicit MX, RFC 5321 §5.1)")
	case err != nil:
		rep.MXError = err.Error()
		rep.DNSSEC.MXSecure = false
		rep.Problems = append(rep.Problems, "MX lookup failed: "+err.Error())
	}
	if len(mxs) == 1 && mxs[0].Host == "." {
		rep.Advice = append(rep.Advice, "null MX (RFC 7505): the domain accepts no mail")
		mxs = nil
	}
	return mxs
}

// probeMXs fills rep.MX, one entry per MX host, all at once: whether the
// host matches the policy, a STARTTLS probe of each of its first two
// addresses, and its DANE assessment.
func probeMXs(ctx context.Context, o Options, rep *Report, mxs []dnsclient.MX, policy *mtasts.Policy) {
	res := o.Resolver
	now := time.Now()
	var wg sync.WaitGroup
	rep.MX = make([]MX, len(mxs))
	for i, mx := range mxs {
		rep.MX[i] = MX{Host: mx.Host, Pref: mx.Pref, Addresses: []delivery.ProbeResult{},
			DANE: DANE{Records: []TLSA{}, Certificates: []DANECert{}}}
		if policy != nil && policy.Mode != mtasts.ModeNone {
			m := policy.Matches(mx.Host)
			rep.MX[i].MatchesPolicy = &m
		}
		wg.Add(1)
		go func(c *MX) {
			defer wg.Done()
			ips, secure, name, err := res.LookupIPSecure(ctx, c.Host, false)
			// DANE is assessed even when the addresses are missing: a
			// TLSA lookup that fails in a signed zone is worth knowing.
			defer func() {
				c.DANE = assessDANE(ctx, res, c.Host, rep.DNSSEC.ADTrusted, rep.DNSSEC.MXSecure, secure, name, c.Addresses, now)
			}()
			if err != nil {
				c.Error = err.Error()
				return
			}
			if len(ips) > 2 {
				ips = ips[:2]
			}
			for _, ip := range ips {
				c.Addresses = append(c.Addresses, delivery.Probe(ctx, c.Host, ip, o.Probe))
			}
		}(&rep.MX[i])
	}
	wg.Wait()
}

// mxFindings adds the problems and advice of one probed MX host to rep:
// its address lookup, its match with the policy, and the connection,
// STARTTLS and certificate of each address.
func mxFindings(rep *Report, mx *MX) {
	if mx.Error != "" {
		rep.Problems = append(rep.Problems, fmt.Sprintf("MX %s: address lookup failed: %s", mx.Host, mx.Error))
	}
	if mx.MatchesPolicy != nil && !*mx.MatchesPolicy {
		rep.Problems = append(rep.Problems, fmt.Sprintf("MX %s matches no mx pattern of the policy: senders in enforce mode will not use it (RFC 8461 §4.1)", mx.Host))
	}
	for _, a := range mx.Addresses {
		switch {
		case !a.Connected:
			rep.Problems = append(rep.Problems, fmt.Sprintf("MX %s [%s]: cannot connect: %s", mx.Host, a.IP, a.Error))
		case a.ResultType == string(tlsrpt.ResultSTARTTLSNotSupported):
			rep.Problems = append(rep.Problems, fmt.Sprintf("MX %s [%s]: no STARTTLS", mx.Host, a.IP))
		case !a.CertVerified && mx.MatchesPolicy == nil && mx.DANE.Authenticates(a.IP):
			// No MTA-STS policy asks for WebPKI: DANE senders
			// authenticate the server, the others use TLS anyway.
			rep.Advice = append(rep.Advice, fmt.Sprintf("MX %s [%s]: certificate not valid for %s under WebPKI (%s), but DANE-authenticated", mx.Host, a.IP, mx.Host, a.ResultType))
		case !a.CertVerified:
			msg := a.CertError
			if msg == "" {
				msg = a.Error
			}
			rep.Problems = append(rep.Problems, fmt.Sprintf("MX %s [%s]: certificate not valid for %s (%s): %s", mx.Host, a.IP, mx.Host, a.ResultType, msg))
		case a.CertDaysLeft != nil && *a.CertDaysLeft < CertWarnDays:
			rep.Advice = append(rep.Advice, fmt.Sprintf("MX %s [%s]: certificate expires in %d day(s)", mx.Host, a.IP, *a.CertDaysLeft))
		}
	}
}

// patternFindings records in rep which of the policy's mx patterns match
// a current MX host, advising on the stale ones and on testing mode.
func patternFindings(rep *Report, policy *mtasts.Policy, mxs []dnsclient.MX) {
	if policy == nil || policy.Mode == mtasts.ModeNone {
		return
	}
	for _, p := range policy.MX {
		matched := slices.ContainsFunc(mxs, func(mx dnsclient.MX) bool { return mtasts.MatchesPattern(p, mx.Host) })
		rep.Patterns = append(rep.Patterns, Pattern{Pattern: p, MatchesMX: matched})
		if !matched {
			rep.Advice = append(rep.Advice, fmt.Sprintf("policy pattern %q matches no current MX host (stale entry?)", p))
		}
	}
	if policy.Mode == mtasts.ModeTesting {
		rep.Advice = append(rep.Advice, "run in testing for a few weeks with TLS-RPT reports, then move to enforce")
	}
}

// checkTLSRPT looks up the TLS-RPT record of domain (RFC 8460 §3) and
// records it, or why it is missing or unusable, in rep.
func checkTLSRPT(ctx context.Context, res *dnsclient.Resolver, domain string, rep *Report) {
	rep.TLSRPT.Name = tlsrpt.RecordName(domain)
	rec, err := tlsrpt.LookupRecord(ctx, res, domain)
	switch {
	case err == nil:
		rep.TLSRPT.Present, rep.TLSRPT.Valid, rep.TLSRPT.Record = true, true, rec.Raw
		for _, u := range rec.RUAs {
			rep.TLSRPT.RUA = append(rep.TLSRPT.RUA, u.URI)
		}
		if len(rec.RUAs) == 0 {
			rep.TLSRPT.Valid = false
			rep.Problems = append(rep.Problems, "TLS-RPT record has no usable rua (mailto: or https:)")
		}
	case errors.Is(err, tlsrpt.ErrNoRecord):
		rep.TLSRPT.Error = err.Error()
		rep.Advice = append(rep.Advice, "publish a TLS-RPT record ("+rep.TLSRPT.Name+" TXT \"v=TLSRPTv1; rua=mailto:...\") to hear about TLS failures")
	default:
		rep.TLSRPT.Present = !errors.Is(err, tlsrpt.ErrDNS)
		rep.TLSRPT.Error = err.Error()
		rep.Problems = append(rep.Problems, "TLS-RPT record: "+err.Error())
	}
}

// AddForecast adds the relay's enforce forecast for the domain to the
// report: a testing domain that enforce would hurt gets the verdict as
// advice.
func (r *Report) AddForecast(s forecast.Summary) {
	r.Forecast = &s
	if s.Mode == forecast.ModeTesting && !s.Safe && s.Testing.Week.Refused > 0 {
		r.Advice = append(r.Advice, "this relay's enforce forecast: "+s.Verdict)
	}
}
