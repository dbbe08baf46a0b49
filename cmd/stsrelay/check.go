package main

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/stsrelay/stsrelay/delivery"
	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/internal/server"
	"github.com/stsrelay/stsrelay/mtasts"
	"github.com/stsrelay/stsrelay/mtasts/forecast"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// checkReport is `stsrelay check DOMAIN -json`: stable field names for
// scripts.
type checkReport struct {
	Domain   string               `json:"domain"`
	OK       bool                 `json:"ok"`
	MTASTS   *mtasts.PolicyReport `json:"mta_sts"`
	MX       []checkMX            `json:"mx"`
	MXError  string               `json:"mx_error,omitempty"`
	Patterns []checkPattern       `json:"patterns,omitempty"`
	TLSRPT   checkTLSRPT          `json:"tls_rpt"`
	// DNSSEC is whether DNSSEC can be judged and the MX RRset is
	// secure; each MX's DANE findings are in its "dane" object.
	DNSSEC   checkDNSSEC `json:"dnssec"`
	Problems []string    `json:"problems"`
	Advice   []string    `json:"advice"`
	// Forecast is the relay's enforce forecast for the domain, with
	// -config, when the relay counted sessions to it.
	Forecast *forecast.Summary `json:"forecast,omitempty"`
}

type checkMX struct {
	Host string `json:"host"`
	Pref uint16 `json:"preference"`
	// MatchesPolicy is set when a policy with mx patterns was found.
	MatchesPolicy *bool                  `json:"matches_policy,omitempty"`
	Addresses     []delivery.ProbeResult `json:"addresses"`
	Error         string                 `json:"error,omitempty"`
	// DANE is the TLSA assessment of the host (see checkDANE).
	DANE checkDANE `json:"dane"`
}

type checkPattern struct {
	Pattern   string `json:"pattern"`
	MatchesMX bool   `json:"matches_mx"`
}

type checkTLSRPT struct {
	Name    string   `json:"name"`
	Present bool     `json:"present"`
	Valid   bool     `json:"valid"`
	Record  string   `json:"record,omitempty"`
	RUA     []string `json:"rua,omitempty"`
	Error   string   `json:"error,omitempty"`
}

func cmdCheck(args []string) error {
	var cf commonFlags
	fs := newFlagSet("check", &cf)
	fs.Lookup("config").DefValue = ""
	cf.config = ""
	timeout := fs.Duration("timeout", 2*time.Minute, "bound on the whole check")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return &usageError{"check: want one DOMAIN"}
	}
	cfg := config.Default()
	if cf.config != "" {
		if cfg, err = config.Load(cf.config); err != nil {
			return err
		}
	}
	res, err := server.NewResolver(cfg)
	if err != nil {
		return err
	}
	roots, extra, err := server.TrustRoots(cfg)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	rep := runCheck(ctx, cfg, res, roots, extra, strings.ToLower(strings.TrimSuffix(pos[0], ".")))
	if cf.config != "" {
		addForecast(rep, cfg)
	}
	if cf.json {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return err
		}
	} else {
		printCheck(rep)
	}
	if !rep.OK {
		return &exitError{exitFailed}
	}
	return nil
}

// runCheck gathers the findings: the MTA-STS record and policy, the MX
// hosts and how they align with the policy's patterns, each MX address's
// STARTTLS and certificate, DNSSEC and each MX's DANE TLSA records (see
// checkdane.go), and the TLS-RPT record.
func runCheck(ctx context.Context, cfg *config.Config, res *dnsclient.Resolver, roots, extra *x509.CertPool, domain string) *checkReport {
	rep := &checkReport{Domain: domain, MX: []checkMX{}, Problems: []string{}, Advice: []string{}}
	fetcher := &mtasts.Fetcher{HTTPSPort: cfg.MTASTS.HTTPSPort, Timeout: cfg.MTASTS.FetchTimeout.Duration,
		MaxBytes: cfg.MTASTS.MaxPolicyBytes, RootCAs: extra, DialAddr: res.DialContext}
	rep.MTASTS = mtasts.CheckPolicy(ctx, res, fetcher, domain)
	rep.Problems = append(rep.Problems, rep.MTASTS.Problems...)
	rep.Advice = append(rep.Advice, rep.MTASTS.Advice...)
	var policy *mtasts.Policy
	if pr := rep.MTASTS.Policy; pr != nil {
		policy, _ = mtasts.ParsePolicy([]byte(strings.Join(pr.Lines, "\n")))
	}

	// MX hosts, in preference order, each address probed.
	mxs, mxSecure, err := res.LookupMXSecure(ctx, domain)
	rep.DNSSEC = checkDNSSEC{ADTrusted: res.TrustsAD(), Servers: res.Servers(), MXSecure: mxSecure}
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
	now := time.Now()
	var wg sync.WaitGroup
	rep.MX = make([]checkMX, len(mxs))
	for i, mx := range mxs {
		rep.MX[i] = checkMX{Host: mx.Host, Pref: mx.Pref, Addresses: []delivery.ProbeResult{},
			DANE: checkDANE{Records: []checkTLSA{}, Certificates: []checkDANECert{}}}
		if policy != nil && policy.Mode != mtasts.ModeNone {
			m := policy.Matches(mx.Host)
			rep.MX[i].MatchesPolicy = &m
		}
		wg.Add(1)
		go func(c *checkMX) {
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
				c.Addresses = append(c.Addresses, delivery.Probe(ctx, c.Host, ip, delivery.ProbeOptions{
					Hostname: cfg.Hostname, Port: cfg.Delivery.Port, ConnectTimeout: cfg.Delivery.ConnectTimeout.Duration,
					CommandTimeout: 30 * time.Second, Roots: roots}))
			}
		}(&rep.MX[i])
	}
	wg.Wait()
	for i := range rep.MX {
		mx := &rep.MX[i]
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
			case !a.CertVerified && mx.MatchesPolicy == nil && mx.DANE.authenticates(a.IP):
				// No MTA-STS policy asks for WebPKI: DANE senders
				// authenticate the server, the others use TLS anyway.
				rep.Advice = append(rep.Advice, fmt.Sprintf("MX %s [%s]: certificate not valid for %s under WebPKI (%s), but DANE-authenticated", mx.Host, a.IP, mx.Host, a.ResultType))
			case !a.CertVerified:
				msg := a.CertError
				if msg == "" {
					msg = a.Error
				}
				rep.Problems = append(rep.Problems, fmt.Sprintf("MX %s [%s]: certificate not valid for %s (%s): %s", mx.Host, a.IP, mx.Host, a.ResultType, msg))
			case a.CertDaysLeft != nil && *a.CertDaysLeft < 21:
				rep.Advice = append(rep.Advice, fmt.Sprintf("MX %s [%s]: certificate expires in %d day(s)", mx.Host, a.IP, *a.CertDaysLeft))
			}
		}
		daneFindings(rep, mx)
	}
	if policy != nil && policy.Mode != mtasts.ModeNone {
		for _, p := range policy.MX {
			one := &mtasts.Policy{Mode: policy.Mode, MX: []string{p}}
			matched := false
			for _, mx := range mxs {
				if one.Matches(mx.Host) {
					matched = true
				}
			}
			rep.Patterns = append(rep.Patterns, checkPattern{Pattern: p, MatchesMX: matched})
			if !matched {
				rep.Advice = append(rep.Advice, fmt.Sprintf("policy pattern %q matches no current MX host (stale entry?)", p))
			}
		}
		if policy.Mode == mtasts.ModeTesting {
			rep.Advice = append(rep.Advice, "run in testing for a few weeks with TLS-RPT reports, then move to enforce")
		}
	}

	// RFC 8460 §3: the TLS-RPT record.
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
	rep.OK = len(rep.Problems) == 0
	return rep
}

func printCheck(r *checkReport) {
	mark := func(ok bool) string {
		if ok {
			return "ok  "
		}
		return "FAIL"
	}
	fmt.Printf("MTA-STS check for %s\n\n", r.Domain)
	t := r.MTASTS.TXT
	fmt.Printf("[%s] TXT %s: ", mark(t.Valid), t.Name)
	switch {
	case t.Valid:
		fmt.Printf("id=%s\n", t.ID)
	case !t.Present:
		fmt.Printf("none\n")
	default:
		fmt.Printf("%s\n", t.Error)
	}
	if f := r.MTASTS.Fetch; f != nil {
		fmt.Printf("[%s] policy %s: ", mark(f.OK), f.URL)
		if f.OK {
			fmt.Printf("HTTP %d, %s, %d bytes", f.HTTPStatus, f.ContentType, f.Size)
		} else {
			fmt.Printf("%s", f.Error)
		}
		if f.CertDaysLeft != nil {
			fmt.Printf("; certificate %s, %d day(s) left", map[bool]string{true: "valid", false: "INVALID"}[f.TLSCertOK], *f.CertDaysLeft)
		}
		fmt.Println()
		for _, s := range r.MTASTS.SyntaxErrors {
			fmt.Printf("       line %d: %s\n", s.Line, s.Message)
		}
	}
	if p := r.MTASTS.Policy; p != nil {
		fmt.Printf("       mode %s, max_age %d, mx %s\n", p.Mode, p.MaxAgeSeconds, strings.Join(p.MX, ", "))
	}
	if r.MXError != "" {
		fmt.Printf("[FAIL] MX: %s\n", r.MXError)
	}
	for _, mx := range r.MX {
		ok := mx.Error == "" && (mx.MatchesPolicy == nil || *mx.MatchesPolicy)
		for _, a := range mx.Addresses {
			ok = ok && a.Connected && (a.CertVerified || mx.MatchesPolicy == nil && mx.DANE.authenticates(a.IP))
		}
		match := ""
		if mx.MatchesPolicy != nil {
			match = map[bool]string{true: ", matches policy", false: ", NOT IN POLICY"}[*mx.MatchesPolicy]
		}
		fmt.Printf("[%s] MX %d %s%s\n", mark(ok), mx.Pref, mx.Host, match)
		if mx.Error != "" {
			fmt.Printf("       %s\n", mx.Error)
		}
		for _, a := range mx.Addresses {
			switch {
			case !a.Connected:
				fmt.Printf("       %s: cannot connect: %s\n", a.IP, a.Error)
			case !a.STARTTLS:
				fmt.Printf("       %s: no STARTTLS\n", a.IP)
			case a.CertVerified:
				fmt.Printf("       %s: STARTTLS %s, certificate valid, %d day(s) left\n", a.IP, a.TLSVersion, deref(a.CertDaysLeft))
			case mx.DANE.authenticates(a.IP):
				fmt.Printf("       %s: STARTTLS %s, certificate not WebPKI-valid (%s), DANE-authenticated\n", a.IP, a.TLSVersion, a.ResultType)
			default:
				fmt.Printf("       %s: STARTTLS %s, certificate INVALID (%s): %s\n", a.IP, a.TLSVersion, a.ResultType, a.CertError+a.Error)
			}
		}
	}
	for _, p := range r.Patterns {
		if !p.MatchesMX {
			fmt.Printf("[warn] policy pattern %s matches no MX\n", p.Pattern)
		}
	}
	tr := r.TLSRPT
	fmt.Printf("[%s] TLS-RPT %s: ", mark(tr.Valid), tr.Name)
	if tr.Valid {
		fmt.Printf("%s\n", strings.Join(tr.RUA, ", "))
	} else {
		fmt.Printf("%s\n", tr.Error)
	}
	printCheckDANE(r)
	if len(r.Problems) > 0 {
		fmt.Printf("\nProblems:\n")
		for _, p := range r.Problems {
			fmt.Printf("  - %s\n", p)
		}
	}
	if len(r.Advice) > 0 {
		fmt.Printf("\nAdvice:\n")
		for _, a := range r.Advice {
			fmt.Printf("  - %s\n", a)
		}
	}
	printCheckForecast(r)
	if r.OK {
		fmt.Printf("\nResult: sound\n")
	} else {
		fmt.Printf("\nResult: %d problem(s)\n", len(r.Problems))
	}
}

func deref(p *int) int {
	if p == nil {
		return 0
	}
	return *p
}
