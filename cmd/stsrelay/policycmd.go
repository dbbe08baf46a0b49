package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/stsrelay/stsrelay/internal/config"
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

// cmdPolicy is `stsrelay policy`: it lists, shows, refreshes or forgets
// cached MTA-STS policies, through the running relay or, with none, on
// the policy cache itself; `policy forecast` goes to cmdPolicyForecast.
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
	if sub == "forecast" {
		return policyForecastArgs(cf, pos)
	}
	if err := checkPolicyArgs(sub, pos); err != nil {
		return err
	}
	cfg, err := loadConfig(cf.config)
	if err != nil {
		return err
	}
	domain := policyDomainArg(pos)
	ctx := context.Background()
	entries, err := policyAction(ctx, controlClient(cfg), sub, domain)
	if errors.Is(err, control.ErrNoServer) {
		api, oerr := offlinePolicyAPI(cfg)
		if oerr != nil {
			return oerr
		}
		entries, err = policyAction(ctx, api, sub, domain)
	}
	if err != nil {
		if control.IsNotFound(err) {
			fmt.Fprintf(os.Stderr, "stsrelay: %v\n", err)
			return &exitError{exitFailed}
		}
		return err
	}
	switch sub {
	case "forget":
		return printPolicyForget(domain, cf.json)
	case "list":
		return printPolicyList(cfg, entries, cf.json)
	}
	return printPolicyShow(entries[0], cf.json)
}

// policyForecastArgs checks the arguments of `policy forecast [DOMAIN]`
// and runs it.
func policyForecastArgs(cf commonFlags, pos []string) error {
	if len(pos) > 2 {
		return &usageError{"policy forecast: want at most one DOMAIN"}
	}
	cfg, err := loadConfig(cf.config)
	if err != nil {
		return err
	}
	return cmdPolicyForecast(cfg, policyDomainArg(pos), cf.json)
}

// checkPolicyArgs refuses an unknown policy subcommand or the wrong
// number of arguments for a known one.
func checkPolicyArgs(sub string, pos []string) error {
	switch sub {
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
	return nil
}

// policyDomainArg is the DOMAIN argument of a policy subcommand, as a
// cache key, or "" when none was given.
func policyDomainArg(pos []string) string {
	if len(pos) == 2 {
		return dompkg.Key(pos[1])
	}
	return ""
}

// offlinePolicyAPI opens the policy cache of cfg directly, for when no
// relay is running; in fleet mode the cache is the fleet's and only a
// running node can reach it.
func offlinePolicyAPI(cfg *config.Config) (control.API, error) {
	res, err := server.NewResolver(cfg)
	if err != nil {
		return nil, err
	}
	_, extra, err := server.TrustRoots(cfg)
	if err != nil {
		return nil, err
	}
	if cfg.Cluster.Enabled() {
		// The fleet's cache lives in NATS: act on it through a
		// running node, which holds the connection.
		return nil, errors.New("fleet mode: run this on a node whose relay is running (the policy cache is the fleet's)")
	}
	cache, err := server.NewPolicyCache(cfg, res, extra, nil, nil, nil)
	if err != nil {
		return nil, err
	}
	return &control.Service{Policies: cache}, nil
}

// printPolicyForget reports a forgotten policy.
func printPolicyForget(domain string, asJSON bool) error {
	if asJSON {
		return jsonOut().Encode(map[string]string{"domain": domain, "action": "forget", "result": "ok"})
	}
	fmt.Printf("%s: cached policy forgotten\n", domain)
	return nil
}

// printPolicyList prints the cached policies, each with its enforce
// forecast when one was counted (best effort: the list does not fail for
// want of it).
func printPolicyList(cfg *config.Config, entries []mtastsdb.Entry, asJSON bool) error {
	forecasts := map[string]forecast.Summary{}
	sums, _ := readForecast(cfg, "")
	for _, s := range sums {
		forecasts[s.Domain] = s
	}
	if asJSON {
		enc := jsonOut()
		enc.SetIndent("", "  ")
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

// printPolicyShow prints one cached policy, for show and refresh.
func printPolicyShow(e mtastsdb.Entry, asJSON bool) error {
	if asJSON {
		enc := jsonOut()
		enc.SetIndent("", "  ")
		return enc.Encode(e)
	}
	fmt.Printf("Domain:    %s\nPolicy id: %s\nMode:      %s\nMX:        %s\nMax age:   %ds\nFetched:   %s\nExpires:   %s\nLast used: %s\n",
		termSafe(e.Domain), termSafe(e.ID), termSafe(string(e.Mode)), termSafe(strings.Join(e.MX, ", ")), e.MaxAgeSeconds,
		e.Fetched.UTC().Format(time.RFC3339), e.Expires.UTC().Format(time.RFC3339), e.LastUsed.UTC().Format(time.RFC3339))
	if e.LastError != "" {
		fmt.Printf("Last error: %s (%s)\n", termSafe(e.LastError), e.LastErrorAt.UTC().Format(time.RFC3339))
	}
	return nil
}
