package tlsrptdb

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/stsrelay/stsrelay/tlsrpt"
)

// Fleet mode (several relays, one report per policy domain and period)
// plugs in through three seams; the tlsrpt packages know nothing of where
// the shared state lives (internal/fleet/rptfleet keeps it in a NATS
// JetStream key-value bucket):
//
//   - every relay's Recorder hands its finished periods to a Sink
//     (Recorder.HandOff) instead of to a local Reporter;
//   - the tlsrptsend.Reporter takes finished periods from a Source
//     (tlsrptsend.Options.Source), which merges the counts of all relays,
//     instead of from its Recorder;
//   - the Reporter keeps its report jobs in a tlsrptsend.JobStore
//     (Options.Jobs), shared by the fleet, instead of files, and only the
//     relay for which Options.Active says true makes and sends reports.
//
// Without them (the default) the Reporter works on its own Recorder and
// files exactly as a standalone relay always has.

// Sink takes the counts of one finished period from a Recorder
// (Recorder.HandOff).
type Sink interface {
	// PutCounts stores what this relay counted in the period starting at
	// periodStart: one PolicyCounts per policy domain. It must be
	// idempotent, since after a crash the same period may be put again.
	PutCounts(periodStart time.Time, counts []tlsrpt.PolicyCounts) error
}

// Source gives a tlsrptsend.Reporter the counts of finished periods in place of its
// Recorder.
type Source interface {
	// Closed returns the counts ready to be reported at now: at most one
	// PolicyCounts per period and policy domain, holding everything
	// counted for it.
	Closed(now time.Time) ([]tlsrpt.PolicyCounts, error)
	// Done says that the report job of that period and policy domain is
	// durable (or was given up): the source may forget the counts it
	// returned for them and must never return that period and domain
	// again.
	Done(periodStart time.Time, policyDomain string) error
}

// HandOff hands the counts of every period that ended at least grace
// before now to sink, oldest first, and closes each period handed off, as
// a Reporter does once its report jobs are durable: later sessions for it
// (and earlier periods) are dropped and its counts leave the counts file.
// A period whose PutCounts fails keeps its counts and HandOff stops there
// with the error; the next call tries again. It is for fleet mode, where
// the Reporter reads a Source instead of this Recorder; the caller runs it
// about once a second, next to Run.
func (r *Recorder) HandOff(now time.Time, grace time.Duration, sink Sink) error {
	closed := false
	var err error
	for _, start := range r.PendingPeriods() {
		if now.Before(time.Unix(start+r.interval, 0).Add(grace)) {
			break
		}
		counts := r.Collect(func(s int64) bool { return s == start })
		if err = sink.PutCounts(time.Unix(start, 0).UTC(), counts); err != nil {
			err = fmt.Errorf("tlsrpt: hand off period %s: %w", time.Unix(start, 0).UTC().Format(time.RFC3339), err)
			break
		}
		r.ClosePeriod(start, nil)
		closed = true
	}
	if closed {
		// After a crash before this lands the period is handed off again;
		// PutCounts is idempotent.
		err = errors.Join(err, r.Flush())
	}
	return err
}

// MergeCounts adds up counts of the same period and policy domain (those
// of the relays of a fleet) into one PolicyCounts each. Policies match by
// type, policy-string and mx-host, and their summaries add up; failure
// details match by every field but the count, keeping the first non-empty
// additional-information. Strings are
// bounded as Record bounds them, since the counts come from elsewhere. The
// result is ordered by period and domain, with policies and details in
// the order Pending gives them.
func MergeCounts(counts []tlsrpt.PolicyCounts) []tlsrpt.PolicyCounts {
	type pdKey struct {
		start  int64
		domain string
	}
	type detKey struct {
		result                                   tlsrpt.ResultType
		sendingIP, mx, receivingIP, helo, reason string
	}
	type polAcc struct {
		res     tlsrpt.PolicyResult
		details map[detKey]*tlsrpt.FailureDetail
	}
	type pdAcc struct {
		pc       tlsrpt.PolicyCounts
		policies map[string]*polAcc
	}
	byPD := map[pdKey]*pdAcc{}
	var order []*pdAcc
	for _, in := range counts {
		dom := tlsrpt.Bound(tlsrpt.NormDomain(in.PolicyDomain), tlsrpt.MaxNameLen)
		if dom == "" {
			continue
		}
		k := pdKey{in.PeriodStart.Unix(), dom}
		acc := byPD[k]
		if acc == nil {
			acc = &pdAcc{pc: tlsrpt.PolicyCounts{PeriodStart: in.PeriodStart.UTC(), PeriodEnd: in.PeriodEnd.UTC(), PolicyDomain: dom},
				policies: map[string]*polAcc{}}
			byPD[k] = acc
			order = append(order, acc)
		}
		for _, p := range in.Policies {
			typ := p.Policy.PolicyType
			if !typ.Valid() {
				typ = tlsrpt.PolicyTypeNoPolicyFound
			}
			pk := policyKey(policyDef{Type: typ, Lines: p.Policy.PolicyString, MX: p.Policy.MXHost})
			pa := acc.policies[pk]
			if pa == nil {
				pa = &polAcc{res: tlsrpt.PolicyResult{Policy: tlsrpt.PolicyDesc{PolicyType: typ, PolicyString: nonNil(p.Policy.PolicyString),
					PolicyDomain: dom, MXHost: nonNil(p.Policy.MXHost)}, FailureDetails: []tlsrpt.FailureDetail{}},
					details: map[detKey]*tlsrpt.FailureDetail{}}
				acc.policies[pk] = pa
			}
			// The summary is authoritative: details may have been cut
			// down to fit somewhere.
			ok, failed := max(p.Summary.TotalSuccessfulSessionCount, 0), max(p.Summary.TotalFailureSessionCount, 0)
			pa.res.Summary.TotalSuccessfulSessionCount += ok
			pa.res.Summary.TotalFailureSessionCount += failed
			acc.pc.Successful += ok
			acc.pc.Failed += failed
			for _, d := range p.FailureDetails {
				n := max(d.FailedSessionCount, 0)
				rt := d.ResultType
				if !rt.Valid() {
					rt = tlsrpt.ResultValidationFailure
				}
				dk := detKey{result: rt, sendingIP: tlsrpt.Bound(d.SendingMTAIP, tlsrpt.MaxIPLen), mx: tlsrpt.Bound(tlsrpt.NormDomain(d.ReceivingMXHostname), tlsrpt.MaxNameLen),
					receivingIP: tlsrpt.Bound(d.ReceivingIP, tlsrpt.MaxIPLen), helo: tlsrpt.Bound(d.ReceivingMXHelo, tlsrpt.MaxNameLen), reason: tlsrpt.Bound(d.FailureReasonCode, tlsrpt.MaxReasonLen)}
				if fd := pa.details[dk]; fd != nil {
					fd.FailedSessionCount += n
					if fd.AdditionalInformation == "" {
						fd.AdditionalInformation = tlsrpt.Bound(d.AdditionalInformation, tlsrpt.MaxInfoLen)
					}
					continue
				}
				pa.details[dk] = &tlsrpt.FailureDetail{ResultType: rt, SendingMTAIP: dk.sendingIP, ReceivingMXHostname: dk.mx,
					ReceivingMXHelo: dk.helo, ReceivingIP: dk.receivingIP, FailedSessionCount: n,
					AdditionalInformation: tlsrpt.Bound(d.AdditionalInformation, tlsrpt.MaxInfoLen), FailureReasonCode: dk.reason}
			}
		}
	}
	out := make([]tlsrpt.PolicyCounts, 0, len(order))
	for _, acc := range order {
		pc := acc.pc
		for _, pa := range acc.policies {
			for _, fd := range pa.details {
				pa.res.FailureDetails = append(pa.res.FailureDetails, *fd)
			}
			slices.SortFunc(pa.res.FailureDetails, compareDetail)
			pc.Policies = append(pc.Policies, pa.res)
		}
		slices.SortFunc(pc.Policies, func(a, b tlsrpt.PolicyResult) int {
			return cmp.Or(cmp.Compare(a.Policy.PolicyType, b.Policy.PolicyType),
				slices.Compare(a.Policy.PolicyString, b.Policy.PolicyString),
				slices.Compare(a.Policy.MXHost, b.Policy.MXHost))
		})
		out = append(out, pc)
	}
	slices.SortFunc(out, func(a, b tlsrpt.PolicyCounts) int {
		return cmp.Or(a.PeriodStart.Compare(b.PeriodStart), strings.Compare(a.PolicyDomain, b.PolicyDomain))
	})
	return out
}
