package tlsrptsend

import (
	"math/rand/v2"
	"time"

	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/internal/atomicfile"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// makeJobs turns the counts of each finished period into one job per policy
// domain, written durably before the counts are dropped from the Recorder.
// A job that already exists (the counts survived a crash after the jobs were
// written) is not made again. A domain whose job cannot be written keeps
// its counts and is tried again at the next passes, up to maxJobTries,
// then given up; it never holds up the reports of other domains or
// periods.
func (rp *Reporter) makeJobs(now time.Time) {
	iv := int64(rp.rec.Interval() / time.Second)
	for _, start := range rp.rec.PendingPeriods() {
		end := time.Unix(start+iv, 0)
		if now.Before(end.Add(rp.grace)) {
			break
		}
		counts := rp.rec.Collect(func(s int64) bool { return s == start })
		wrote := false
		var keep map[string]bool // domains whose counts stay for another try
		for _, pc := range counts {
			name := jobName(start, pc.PolicyDomain)
			rp.mu.Lock()
			_, exists := rp.jobs[name]
			rp.mu.Unlock()
			if exists {
				continue
			}
			j := rp.newJob(start, end, pc, now)
			if err := rp.writeJob(name, j, false); err != nil {
				if !rp.jobFailed(name, pc.PolicyDomain, start, err) {
					continue
				}
				if keep == nil {
					keep = map[string]bool{}
				}
				keep[pc.PolicyDomain] = true
				continue
			}
			delete(rp.jobTries, name)
			rp.mu.Lock()
			rp.jobs[name] = j
			rp.mu.Unlock()
			wrote = true
		}
		if wrote {
			if err := atomicfile.SyncDir(rp.dir); err != nil {
				// The period stays open; the jobs written exist and are
				// not made again at the next pass.
				rp.log.Error("tlsrpt_report_jobs_sync", zap.String("dir", rp.dir), zap.Error(err))
				continue
			}
		}
		rp.rec.ClosePeriod(start, keep)
		if err := rp.rec.Flush(); err != nil {
			// The counts file still holds the period; after a crash the
			// jobs, which exist, are not made again.
			rp.log.Error("tlsrpt_flush", zap.Error(err))
		}
		rp.log.Debug("tlsrpt_period_closed", zap.Time("period_start", time.Unix(start, 0).UTC()),
			zap.Int("policy_domains", len(counts)), zap.Int("retry_later", len(keep)))
	}
}

// makeSourceJobs is makeJobs for Options.Source: one job per period and
// policy domain the Source has ready, made durable (or found made, by this
// relay or by another one that was the reporter before) before the Source
// is told Done. A job that cannot be made is retried at the next passes,
// up to maxJobTries, then given up, as in makeJobs.
func (rp *Reporter) makeSourceJobs(now time.Time) {
	counts, err := rp.opts.Source.Closed(now)
	if err != nil {
		rp.log.Error("tlsrpt_source", zap.Error(err))
		// Whatever it returned is still worth a job.
	}
	iv := int64(rp.rec.Interval() / time.Second)
	for _, pc := range counts {
		start := pc.PeriodStart.Unix()
		name := jobName(start, pc.PolicyDomain)
		rp.mu.Lock()
		_, exists := rp.jobs[name]
		rp.mu.Unlock()
		if !exists {
			end := time.Unix(start+iv, 0)
			j := rp.newJob(start, end, pc, now)
			stored, err := rp.createJob(name, j)
			if err != nil {
				if rp.jobFailed(name, pc.PolicyDomain, start, err) {
					continue // the Source returns it again
				}
			} else {
				delete(rp.jobTries, name)
				rp.mu.Lock()
				rp.jobs[name] = stored
				rp.mu.Unlock()
			}
		}
		if err := rp.opts.Source.Done(pc.PeriodStart, pc.PolicyDomain); err != nil {
			// The Source returns the counts again; the job exists then.
			rp.log.Warn("tlsrpt_source_done", zap.String("policy_domain", pc.PolicyDomain),
				zap.Time("period_start", pc.PeriodStart.UTC()), zap.Error(err))
		}
	}
}

// newJob is the report job of policy domain pc.PolicyDomain for the period
// from start to end, first due at end plus the random send delay.
func (rp *Reporter) newJob(start int64, end time.Time, pc tlsrpt.PolicyCounts, now time.Time) *job {
	return &job{
		PeriodStart:  start,
		PolicyDomain: pc.PolicyDomain,
		Report: tlsrpt.BuildReport(tlsrpt.ReportOptions{
			OrganizationName: rp.opts.OrganizationName,
			ContactInfo:      rp.opts.ContactInfo,
			Submitter:        rp.opts.Hostname,
		}, pc),
		Created:   now.UTC(),
		NotBefore: end.Add(rp.sendDelay()).UTC(),
	}
}

// jobFailed counts a failed attempt at making job name durable. It
// reports whether to try again at a later pass; after maxJobTries the
// report is given up (logged and counted as dropped).
func (rp *Reporter) jobFailed(name, policyDomain string, start int64, err error) (retry bool) {
	rp.jobTries[name]++
	fields := []zap.Field{zap.String("policy_domain", policyDomain),
		zap.Time("period_start", time.Unix(start, 0).UTC()), zap.Int("attempt", rp.jobTries[name]), zap.Error(err)}
	if rp.jobTries[name] < maxJobTries {
		rp.log.Warn("tlsrpt_report_job_failed", fields...)
		return true
	}
	delete(rp.jobTries, name)
	rp.log.Error("tlsrpt_report_dropped", fields...)
	rp.onReport(SendDropped)
	return false
}

// sendDelay draws the random delay before a period's first attempt (§4.1).
func (rp *Reporter) sendDelay() time.Duration {
	if rp.opts.SendDelay <= 0 {
		return 0
	}
	return rand.N(rp.opts.SendDelay)
}
