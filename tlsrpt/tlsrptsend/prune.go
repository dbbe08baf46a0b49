package tlsrptsend

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"time"

	"go.uber.org/zap"
)

// prune removes finished jobs after doneRetention, once the Recorder's
// durable state no longer holds the counts of their period (so the job can
// never be made again).
//
// With Options.Source the Recorder is not looked at: the Source never
// returns a period and domain again once told Done.
func (rp *Reporter) prune(now time.Time) {
	closed := rp.rec.DurableClosed()
	iv := int64(rp.rec.Interval() / time.Second)
	rp.mu.Lock()
	var old []string
	for name, j := range rp.jobs {
		if !j.Done || now.Sub(j.DoneAt) < doneRetention || rp.opts.Source == nil && j.PeriodStart+iv > closed {
			continue
		}
		old = append(old, name)
	}
	rp.mu.Unlock()
	slices.Sort(old)
	for _, name := range old {
		var err error
		if rp.opts.Jobs != nil {
			rp.mu.Lock()
			j := rp.jobs[name]
			rp.mu.Unlock()
			err = rp.opts.Jobs.RemoveJob(time.Unix(j.PeriodStart, 0).UTC(), j.PolicyDomain)
		} else if err = os.Remove(filepath.Join(rp.dir, name)); errors.Is(err, os.ErrNotExist) {
			err = nil
		}
		if err != nil {
			rp.log.Error("tlsrpt_job_remove", zap.String("file", name), zap.Error(err))
			continue
		}
		rp.mu.Lock()
		delete(rp.jobs, name)
		rp.mu.Unlock()
	}
}
