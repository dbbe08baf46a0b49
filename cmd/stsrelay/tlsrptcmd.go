package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/internal/control"
	"github.com/stsrelay/stsrelay/internal/server"
	"github.com/stsrelay/stsrelay/tlsrpt"
	"github.com/stsrelay/stsrelay/tlsrpt/tlsrptdb"
)

func cmdTLSRPT(args []string) error {
	var cf commonFlags
	fs := newFlagSet("tlsrpt", &cf)
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 || pos[0] != "pending" {
		return &usageError{"tlsrpt: want pending"}
	}
	cfg, err := loadConfig(cf.config)
	if err != nil {
		return err
	}
	pending, err := controlClient(cfg).TLSRPTPending(context.Background())
	if errors.Is(err, control.ErrNoServer) {
		// The relay is stopped: read the counts it flushed.
		rec, rerr := tlsrptdb.NewRecorder(server.TLSRPTDir(cfg), nil, zap.NewNop(), tlsrptdb.WithInterval(cfg.TLSRPT.Interval.Duration))
		if rerr != nil {
			return rerr
		}
		pending, err = rec.Pending(), nil
	}
	if err != nil {
		return err
	}
	if cf.json {
		if pending == nil {
			pending = []tlsrpt.PolicyCounts{}
		}
		enc := jsonOut()
		enc.SetIndent("", "  ")
		return enc.Encode(pending)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PERIOD (UTC)\tPOLICY DOMAIN\tPOLICY\tSUCCESS\tFAILURE\tFAILURES BY TYPE")
	for _, p := range pending {
		for _, pol := range p.Policies {
			byType := map[tlsrpt.ResultType]int64{}
			var types []tlsrpt.ResultType
			for _, fd := range pol.FailureDetails {
				if byType[fd.ResultType] == 0 {
					types = append(types, fd.ResultType)
				}
				byType[fd.ResultType] += fd.FailedSessionCount
			}
			var parts []string
			for _, t := range types {
				parts = append(parts, fmt.Sprintf("%s=%d", t, byType[t]))
			}
			fmt.Fprintf(tw, "%s – %s\t%s\t%s\t%d\t%d\t%s\n", p.PeriodStart.UTC().Format(time.RFC3339), p.PeriodEnd.UTC().Format(time.RFC3339),
				termSafe(p.PolicyDomain), pol.Policy.PolicyType, pol.Summary.TotalSuccessfulSessionCount, pol.Summary.TotalFailureSessionCount, termSafe(strings.Join(parts, " ")))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Printf("%d report(s) pending\n", len(pending))
	return nil
}
