package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/stsrelay/stsrelay/delivery"
	"github.com/stsrelay/stsrelay/internal/check"
	"github.com/stsrelay/stsrelay/internal/config"
	dompkg "github.com/stsrelay/stsrelay/internal/domain"
	"github.com/stsrelay/stsrelay/internal/server"
)

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
	rep := check.Run(ctx, check.Options{
		Resolver: res,
		Fetcher:  server.PolicyFetcher(cfg, res, extra),
		Probe: delivery.ProbeOptions{Hostname: cfg.Hostname, Port: cfg.Delivery.Port,
			ConnectTimeout: cfg.Delivery.ConnectTimeout.Duration, CommandTimeout: 30 * time.Second, Roots: roots},
	}, dompkg.Key(pos[0]))
	if cf.config != "" {
		// The relay's forecast for the domain (best effort: no counts,
		// no line).
		if sums, err := readForecast(cfg, rep.Domain); err == nil && len(sums) == 1 {
			rep.AddForecast(sums[0])
		}
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

func printCheck(r *check.Report) {
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
			ok = ok && a.Connected && (a.CertVerified || mx.MatchesPolicy == nil && mx.DANE.Authenticates(a.IP))
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
			case mx.DANE.Authenticates(a.IP):
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
