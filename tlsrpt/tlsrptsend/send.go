package tlsrptsend

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/tlsrpt"
)

// attemptDue runs the due jobs, a bounded number at a time.
func (rp *Reporter) attemptDue(ctx context.Context, now time.Time) {
	type item struct {
		name string
		j    *job
	}
	var due []item
	rp.mu.Lock()
	for name, j := range rp.jobs {
		if t, ok := j.due(); ok && !t.After(now) {
			due = append(due, item{name, j.clone()})
		}
	}
	rp.mu.Unlock()
	slices.SortFunc(due, func(a, b item) int { return strings.Compare(a.name, b.name) })

	sem := make(chan struct{}, sendParallel)
	var wg sync.WaitGroup
	for _, it := range due {
		if ctx.Err() != nil || !rp.active() {
			break
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			rp.attemptJob(ctx, it.name, it.j)
		}()
	}
	wg.Wait()
}

// attemptJob discovers the domain's TLSRPT record if not done yet, then
// tries each due rua. j is this goroutine's own copy; after every change it
// is written to disk and a copy published in rp.jobs.
func (rp *Reporter) attemptJob(ctx context.Context, name string, j *job) {
	now := rp.now()
	save := func() { rp.publish(name, j) }
	if !j.Discovered {
		changed, goOn := rp.discover(ctx, j, now)
		if changed {
			save()
		}
		if !goOn {
			return
		}
	}

	var gz []byte
	for _, tg := range j.Targets {
		if tg.State != statePending || tg.NextAttempt.After(now) || ctx.Err() != nil {
			continue
		}
		if gz == nil {
			var err error
			if gz, err = j.Report.Gzip(); err != nil {
				rp.log.Error("tlsrpt_gzip", zap.String("policy_domain", j.PolicyDomain), zap.Error(err))
				return
			}
		}
		result, err := rp.attemptTarget(ctx, j, tg, gz, now)
		if result == "" {
			continue // interrupted by shutdown
		}
		// Persist before logging "ok": a sent report is never sent again.
		save()
		rp.logSent(j, tg, result, err)
		rp.onReport(result)
	}
	if rp.settle(j, now) {
		save()
	}
}

// publish writes j's changed state and publishes a copy in rp.jobs.
func (rp *Reporter) publish(name string, j *job) {
	if err := rp.saveJob(name, j); err != nil {
		rp.log.Error("tlsrpt_job_write", zap.String("policy_domain", j.PolicyDomain), zap.Error(err))
	}
	c := j.clone()
	rp.mu.Lock()
	rp.jobs[name] = c
	rp.mu.Unlock()
}

// discover looks up the policy domain's TLSRPT record (§3) and makes a
// target of each rua. changed says j must be saved; goOn that its targets
// are to be tried now. A DNS failure is retried with backoff for RetryFor;
// no (valid) record finishes the job: the domain wants no reports.
func (rp *Reporter) discover(ctx context.Context, j *job, now time.Time) (changed, goOn bool) {
	pd := j.PolicyDomain
	if j.FirstAttempt.IsZero() {
		j.FirstAttempt = now.UTC()
	}
	lctx, cancel := context.WithTimeout(ctx, rp.opts.Timeout)
	rec, err := tlsrpt.LookupRecord(lctx, rp.opts.Resolver, pd)
	cancel()
	switch {
	case err == nil:
		j.Discovered = true
		for _, rua := range rec.RUAs {
			j.Targets = append(j.Targets, &target{RUA: rua, State: statePending})
		}
		if len(rec.Ignored) > 0 {
			rp.log.Debug("tlsrpt_rua_ignored", zap.String("policy_domain", pd), zap.Strings("rua", clipList(rec.Ignored)))
		}
		if len(rec.Excess) > 0 {
			rp.log.Warn("tlsrpt_rua_excess", zap.String("policy_domain", pd), zap.Int("used", len(rec.RUAs)),
				zap.Int("ignored", len(rec.Excess)), zap.Strings("rua", clipList(rec.Excess)))
		}
		return true, true
	case errors.Is(err, tlsrpt.ErrDNS) && ctx.Err() == nil:
		j.LookupTries++
		if now.Sub(j.FirstAttempt) >= rp.opts.RetryFor {
			rp.finish(j, now, SendDropped)
			rp.log.Info("tlsrpt_sent", zap.String("policy_domain", pd), zap.String("rua", ""),
				zap.String("report_id", j.Report.ReportID), zap.String("result", SendDropped), zap.Error(err))
			rp.onReport(SendDropped)
		} else {
			j.NextAttempt = now.Add(rp.backoff(j.LookupTries)).UTC()
			rp.log.Debug("tlsrpt_lookup_failed", zap.String("policy_domain", pd), zap.Error(err))
		}
		return true, false
	case ctx.Err() != nil:
		return false, false // shutting down; try again next time
	default:
		// No (valid) record: the domain does not want reports (§3).
		rp.finish(j, now, "no-record")
		rp.log.Debug("tlsrpt_no_record", zap.String("policy_domain", pd), zap.Error(err))
		return true, false
	}
}

// attemptTarget makes one attempt at sending the gzip report to tg and
// updates tg: sent, dropped, or failed with its next attempt. The result
// is SendOK, SendFailed or SendDropped, or "" when shutdown interrupted
// the attempt, which leaves tg as it was.
func (rp *Reporter) attemptTarget(ctx context.Context, j *job, tg *target, gz []byte, now time.Time) (result string, err error) {
	if tg.FirstAttempt.IsZero() {
		tg.FirstAttempt = now.UTC()
	}
	tg.Attempts++
	err = rp.deliver(ctx, j, tg, gz)
	switch {
	case err == nil:
		tg.State, tg.SentAt, tg.LastError = stateSent, rp.now().UTC(), ""
		return SendOK, nil
	case ctx.Err() != nil:
		// Interrupted by shutdown: not a failure of the endpoint.
		tg.Attempts--
		return "", err
	case errors.Is(err, ErrRUAAddressRefused):
		// Not a failure that retrying mends: the domain names an
		// endpoint on an address we do not post to.
		tg.State, tg.LastError = stateDropped, err.Error()
		return SendDropped, err
	case rp.now().Sub(tg.FirstAttempt) >= rp.opts.RetryFor:
		tg.State, tg.LastError = stateDropped, err.Error()
		return SendDropped, err
	default:
		tg.LastError = err.Error()
		tg.NextAttempt = rp.now().Add(rp.backoff(tg.Attempts)).UTC()
		return SendFailed, err
	}
}

// deliver hands the report to the transport of tg's scheme.
func (rp *Reporter) deliver(ctx context.Context, j *job, tg *target, gz []byte) error {
	switch tg.RUA.Scheme {
	case "https":
		return rp.post(ctx, tg.RUA.URI, gz)
	case "mailto":
		var err error
		tg.QueueID, err = rp.mail(j, tg.RUA.Address, gz)
		return err
	default:
		return fmt.Errorf("unsupported rua scheme %q", tg.RUA.Scheme)
	}
}

// logSent logs the outcome of one attempt at a rua.
func (rp *Reporter) logSent(j *job, tg *target, result string, err error) {
	fields := []zap.Field{zap.String("policy_domain", j.PolicyDomain), zap.String("rua", tg.RUA.URI),
		zap.String("report_id", j.Report.ReportID), zap.String("result", result), zap.Int("attempt", tg.Attempts)}
	if err != nil {
		fields = append(fields, zap.Error(err))
	}
	if tg.QueueID != "" && result == SendOK {
		fields = append(fields, zap.String("queue_id", tg.QueueID))
	}
	rp.log.Info("tlsrpt_sent", fields...)
}

// settle finishes j once no rua is pending: "sent" when every rua took
// the report, "partial" when some did, dropped when none did. It reports
// whether it finished j.
func (rp *Reporter) settle(j *job, now time.Time) bool {
	sent, pending := 0, 0
	for _, tg := range j.Targets {
		switch tg.State {
		case stateSent:
			sent++
		case statePending:
			pending++
		}
	}
	if pending != 0 {
		return false
	}
	switch {
	case sent == len(j.Targets):
		rp.finish(j, now, "sent")
	case sent > 0:
		rp.finish(j, now, "partial")
	default:
		rp.finish(j, now, SendDropped)
	}
	return true
}

func (rp *Reporter) finish(j *job, now time.Time, outcome string) {
	j.Done, j.Outcome, j.DoneAt = true, outcome, now.UTC()
}

func (rp *Reporter) onReport(result string) {
	if rp.opts.OnReport != nil {
		rp.opts.OnReport(result)
	}
}

// backoff is the gap after the n-th failed attempt: RetryBase doubled each
// time (§5.5 "exponential backoff"), at most 4h.
func (rp *Reporter) backoff(n int) time.Duration {
	d := rp.opts.RetryBase
	for i := 1; i < n && d < maxRetryGap; i++ {
		d *= 2
	}
	return min(d, maxRetryGap)
}

// clipList bounds a list of URIs from DNS for a log line.
func clipList(l []string) []string {
	const n = 10
	if len(l) <= n {
		return l
	}
	return append(slices.Clone(l[:n]), fmt.Sprintf("(%d more)", len(l)-n))
}
