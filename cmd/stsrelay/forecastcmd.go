package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/stsrelay/stsrelay/internal/check"
	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/control"
	"github.com/stsrelay/stsrelay/internal/server"
	"github.com/stsrelay/stsrelay/mtasts/forecast"
)

// The enforce forecast (`stsrelay policy forecast`): per-domain counts of
// the sessions enforce would have refused (testing mode) or refused
// (enforce mode), kept under data_dir/forecast.

// readForecast asks the running relay, or reads the files of a stopped
// one.
func readForecast(cfg *config.Config, domain string) ([]forecast.Summary, error) {
	ctx := context.Background()
	out, err := controlClient(cfg).Forecast(ctx, domain)
	if errors.Is(err, control.ErrNoServer) {
		fc, lerr := forecast.Load(server.ForecastDir(cfg))
		if lerr != nil {
			return nil, lerr
		}
		return (&control.Service{Forecasts: fc}).Forecast(ctx, domain)
	}
	return out, err
}

func cmdPolicyForecast(cfg *config.Config, domain string, asJSON bool) error {
	sums, err := readForecast(cfg, domain)
	if err != nil {
		if control.IsNotFound(err) {
			fmt.Fprintf(os.Stderr, "stsrelay: %v\n", err)
			return &exitError{exitFailed}
		}
		return err
	}
	if asJSON {
		if sums == nil {
			sums = []forecast.Summary{}
		}
		enc := jsonOut()
		enc.SetIndent("", "  ")
		if domain != "" {
			return enc.Encode(sums[0])
		}
		return enc.Encode(sums)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "DOMAIN\tMODE\tSESSIONS 1D\tREFUSED 1D\tSESSIONS 7D\tREFUSED 7D\tREFUSALS BY REASON (7D)")
	for _, s := range sums {
		w := s.Testing
		if s.Mode == forecast.ModeEnforce {
			w = s.Enforce
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", termSafe(s.Domain), s.Mode,
			forecast.Thousands(w.Day.Sessions), forecast.Thousands(w.Day.Refused),
			forecast.Thousands(w.Week.Sessions), forecast.Thousands(w.Week.Refused), termSafe(reasonList(w.Week)))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if len(sums) > 0 {
		fmt.Println()
	}
	for _, s := range sums {
		// The MX names come from the domain's DNS: termSafe.
		fmt.Printf("%s: %s\n", termSafe(s.Domain), termSafe(s.Verdict))
	}
	if len(sums) == 0 {
		fmt.Println("no sessions to testing or enforce domains counted in 7 days")
	}
	return nil
}

func reasonList(w forecast.Window) string {
	var parts []string
	for _, m := range w.ByMX {
		parts = append(parts, fmt.Sprintf("%s %s=%d", m.MX, m.Reason, m.Count))
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, ", ")
}

// forecastColumn is the FORECAST column of `policy list`.
func forecastColumn(s forecast.Summary, ok bool) string {
	if !ok {
		return "-"
	}
	switch s.Mode {
	case forecast.ModeEnforce:
		return fmt.Sprintf("refused %s/%s", forecast.Thousands(s.Enforce.Week.Refused), forecast.Thousands(s.Enforce.Week.Sessions))
	case forecast.ModeTesting:
		if s.Testing.Week.Sessions == 0 {
			return "no data"
		}
		if s.Safe {
			return fmt.Sprintf("safe 0/%s", forecast.Thousands(s.Testing.Week.Sessions))
		}
		return fmt.Sprintf("not yet %s/%s", forecast.Thousands(s.Testing.Week.Refused), forecast.Thousands(s.Testing.Week.Sessions))
	}
	return "-"
}

// printCheckForecast ends `check` with the relay's own figures.
func printCheckForecast(r *check.Report) {
	if r.Forecast == nil {
		return
	}
	fmt.Printf("\nEnforce forecast from this relay's traffic: %s\n", termSafe(r.Forecast.Verdict))
}
