package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/stsrelay/stsrelay/internal/control"
	dompkg "github.com/stsrelay/stsrelay/internal/domain"
	"github.com/stsrelay/stsrelay/internal/server"
	"github.com/stsrelay/stsrelay/mtasts/forecast"
	"github.com/stsrelay/stsrelay/mtasts/mtastsdb"
)

// policyListEntry is one line of `policy list -json`: the cached policy
// and, when sessions were counted, its enforce forecast.
type policyListEntry struct {
	mtastsdb.Entry
	Forecast *forecast.Summary `json:"forecast,omitempty"`
}

// policyAction applies a policy subcommand (list, show, refresh,
// forget) through api.
func policyAction(ctx context.Context, api control.API, sub, domain string) ([]mtastsdb.Entry, error) {
	one := func(e mtastsdb.Entry, err error) ([]mtastsdb.Entry, error) {
		if err != nil {
			return nil, err
		}
		return []mtastsdb.Entry{e}, nil
	}
	switch sub {
	case "list":
		return api.PolicyList(ctx)
	case "show":
		return one(api.PolicyShow(ctx, domain))
	case "refresh":
		return one(api.PolicyRefresh(ctx, domain))
	case "forget":
		return nil, api.PolicyForget(ctx, domain)
	}
	return nil, fmt.Errorf("unknown policy action %q", sub)
}

func cmdPolicy(args []string) error {
	var cf commonFlags
	fs := newFlagSet("policy", &cf)
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) == 0 {
		return &usageError{"policy: want list, show DOMAIN, refresh DOMAIN, forget DOMAIN or forecast [DOMAIN]"}
	}
	sub := pos[0]
	switch sub {
	case "forecast":
		if len(pos) > 2 {
			return &usageError{"policy forecast: want at most one DOMAIN"}
		}
		cfg, err := loadConfig(cf.config)
		if err != nil {
			return err
		}
		domain := ""
		if len(pos) == 2 {
			domain = dompkg.Key(pos[1])
		}
		return cmdPolicyForecast(cfg, domain, cf.json)
	case "list":
		if len(pos) != 1 {
			return &usageError{"policy list takes no argument"}
		}
	case "show", "refresh", "forget":
		if len(pos) != 2 {
			return &usageError{"policy " + sub + ": want one DOMAIN"}
		}
	default:
		return &usageError{"policy: unknown subcommand " + sub}
	}
	cfg, err := loadConfig(cf.config)
	if err != nil {
		return err
	}
	domain := ""
	if len(pos) == 2 {
		domain = dompkg.Key(pos[1])
	}
	ctx := context.Background()
	entries, err := policyAction(ctx, controlClient(cfg), sub, domain)
	if errors.Is(err, control.ErrNoServer) {
		res, rerr := server.NewResolver(cfg)
		if rerr != nil {
			return rerr
		}
		_, extra, rerr := server.TrustRoots(cfg)
		if rerr != nil {
			return rerr
		}
		if cfg.Cluster.Enabled() {
			// The fleet's cache lives in NATS: act on it through a
			// running node, which holds the connection.
			return errors.New("fleet mode: run this on a node whose relay is running (the policy cache is the fleet's)")
		}
		cache, cerr := server.NewPolicyCache(cfg, res, extra, nil, nil, nil)
		if cerr != nil {
			return cerr
		}
		entries, err = policyAction(ctx, &control.Service{Policies: cache}, sub, domain)
	}
	if err != nil {
		if control.IsNotFound(err) {
			fmt.Fprintf(os.Stderr, "stsrelay: %v\n", err)
			return &exitError{exitFailed}
		}
		return err
	}
	if sub == "forget" {
		if cf.json {
			return jsonOut().Encode(map[string]string{"domain": domain, "action": "forget", "result": "ok"})
		}
		fmt.Printf("%s: cached policy forgotten\n", domain)
		return nil
	}
	// The enforce forecast of each listed domain (best effort: the list
	// does not fail for want of it).
	forecasts := map[string]forecast.Summary{}
	if sub == "list" {
		sums, _ := readForecast(cfg, "")
		for _, s := range sums {
			forecasts[s.Domain] = s
		}
	}
	if cf.json {
		if entries == nil {
			entries = []mtastsdb.Entry{}
		}
		enc := jsonOut()
		enc.SetIndent("", "  ")
		if sub == "list" {
			out := make([]policyListEntry, 0, len(entries))
			for _, e := range entries {
				le := policyListEntry{Entry: e}
				if s, ok := forecasts[e.Domain]; ok {
					le.Forecast = &s
				}
				out = append(out, le)
			}
			return enc.Encode(out)
		}
		return enc.Encode(entries[0])
	}
	if sub == "list" {
		tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "DOMAIN\tID\tMODE\tMX\tEXPIRES\tFORECAST 7D\tLAST ERROR")
		for _, e := range entries {
			exp := e.Expires.UTC().Format(time.RFC3339)
			if e.Expired {
				exp += " (expired)"
			}
			// The policy (id, mode, mx) and the error come from the
			// domain's servers: termSafe.
			fs, ok := forecasts[e.Domain]
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", termSafe(e.Domain), termSafe(e.ID), termSafe(string(e.Mode)), termSafe(strings.Join(e.MX, ",")), exp, forecastColumn(fs, ok), termSafe(e.LastError))
		}
		if err := tw.Flush(); err != nil {
			return err
		}
		fmt.Printf("%d polic(ies)\n", len(entries))
		return nil
	}
	e := entries[0]
	fmt.Printf("Domain:    %s\nPolicy id: %s\nMode:      %s\nMX:        %s\nMax age:   %ds\nFetched:   %s\nExpires:   %s\nLast used: %s\n",
		termSafe(e.Domain), termSafe(e.ID), termSafe(string(e.Mode)), termSafe(strings.Join(e.MX, ", ")), e.MaxAgeSeconds,
		e.Fetched.UTC().Format(time.RFC3339), e.Expires.UTC().Format(time.RFC3339), e.LastUsed.UTC().Format(time.RFC3339))
	if e.LastError != "" {
		fmt.Printf("Last error: %s (%s)\n", termSafe(e.LastError), e.LastErrorAt.UTC().Format(time.RFC3339))
	}
	return nil
}
