package tlsrptsend

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/internal/atomicfile"
	"github.com/stsrelay/stsrelay/internal/domain"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// job is one report for one policy domain and period, and its delivery
// state. It is persisted as reports/<start>_<domain.FileName>.json.
type job struct {
	PeriodStart  int64          `json:"period_start"`
	PolicyDomain string         `json:"policy_domain"`
	Report       *tlsrpt.Report `json:"report"`
	Created      time.Time      `json:"created"`
	// NotBefore is the period end plus the random send delay.
	NotBefore time.Time `json:"not_before"`
	// Discovery of the TLSRPT record: attempts and the next one.
	Discovered   bool      `json:"discovered"`
	LookupTries  int       `json:"lookup_tries,omitempty"`
	FirstAttempt time.Time `json:"first_attempt,omitzero"`
	NextAttempt  time.Time `json:"next_attempt,omitzero"`
	Targets      []*target `json:"targets,omitempty"`
	// Done: nothing more to do; Outcome says why.
	Done    bool      `json:"done"`
	Outcome string    `json:"outcome,omitempty"` // sent, partial, no-record, dropped
	DoneAt  time.Time `json:"done_at,omitzero"`
}

// target is one rua of a job.
type target struct {
	RUA          tlsrpt.RUA `json:"rua"`
	State        string     `json:"state"` // pending, sent, dropped
	Attempts     int        `json:"attempts"`
	FirstAttempt time.Time  `json:"first_attempt,omitzero"`
	NextAttempt  time.Time  `json:"next_attempt,omitzero"`
	LastError    string     `json:"last_error,omitempty"`
	QueueID      string     `json:"queue_id,omitempty"`
	SentAt       time.Time  `json:"sent_at,omitzero"`
}

const (
	statePending = "pending"
	stateSent    = "sent"
	stateDropped = "dropped"
)

// jobName is the job's file name: deterministic, so that a period is never
// turned into a second job for the same domain, and short enough for any
// file system whatever the domain (domain.FileName).
func jobName(start int64, policyDomain string) string {
	return strconv.FormatInt(start, 10) + "_" + domain.FileName(policyDomain) + ".json"
}

// due is when the job next has something to do.
func (j *job) due() (time.Time, bool) {
	if j.Done {
		return time.Time{}, false
	}
	if !j.Discovered {
		return later(j.NotBefore, j.NextAttempt), true
	}
	var t time.Time
	found := false
	for _, tg := range j.Targets {
		if tg.State == statePending && (!found || tg.NextAttempt.Before(t)) {
			t, found = tg.NextAttempt, true
		}
	}
	// With no rua pending the job only needs to be marked done (a crash
	// may have come between the last rua's state and that).
	return later(j.NotBefore, t), true
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// clone copies j deeply enough for one goroutine to change it while
// others read the original (the Report is never changed).
func (j *job) clone() *job {
	c := *j
	c.Targets = make([]*target, len(j.Targets))
	for i, t := range j.Targets {
		tc := *t
		c.Targets[i] = &tc
	}
	return &c
}

func (rp *Reporter) loadJobs() error {
	err := atomicfile.ReadDirJSON(rp.dir, func(path string, data []byte, err error) error {
		if err != nil {
			return err
		}
		j := &job{}
		if err := json.Unmarshal(data, j); err != nil || j.Report == nil {
			os.Rename(path, path+".bad")
			rp.log.Error("tlsrpt_job_corrupt", zap.String("file", path+".bad"), zap.Error(err))
			return nil
		}
		rp.jobs[filepath.Base(path)] = j
		return nil
	})
	if err != nil {
		return fmt.Errorf("tlsrpt: %w", err)
	}
	return nil
}

// loadStoreJobs reads the jobs from Options.Jobs.
func (rp *Reporter) loadStoreJobs() (map[string]*job, error) {
	docs, err := rp.opts.Jobs.LoadJobs()
	if err != nil {
		return nil, fmt.Errorf("tlsrpt: load report jobs: %w", err)
	}
	jobs := make(map[string]*job, len(docs))
	for _, data := range docs {
		j := &job{}
		if err := json.Unmarshal(data, j); err != nil || j.Report == nil || j.PolicyDomain == "" {
			rp.log.Error("tlsrpt_job_corrupt", zap.Int("bytes", len(data)), zap.Error(err))
			continue
		}
		jobs[jobName(j.PeriodStart, j.PolicyDomain)] = j
	}
	return jobs, nil
}

// createJob makes j durable as a new job and returns the job stored: j,
// or the one a JobStore already held for that period and domain.
func (rp *Reporter) createJob(name string, j *job) (*job, error) {
	if rp.opts.Jobs == nil {
		return j, rp.writeJob(name, j, true)
	}
	data, err := json.Marshal(j)
	if err != nil {
		return nil, err
	}
	stored, err := rp.opts.Jobs.CreateJob(time.Unix(j.PeriodStart, 0).UTC(), j.PolicyDomain, data)
	if err != nil {
		return nil, err
	}
	if bytes.Equal(stored, data) {
		return j, nil
	}
	old := &job{}
	if err := json.Unmarshal(stored, old); err != nil || old.Report == nil ||
		old.PeriodStart != j.PeriodStart || old.PolicyDomain != j.PolicyDomain {
		return nil, fmt.Errorf("existing report job for %s is not valid: %v", j.PolicyDomain, err)
	}
	return old, nil
}

// saveJob writes the changed state of job j.
func (rp *Reporter) saveJob(name string, j *job) error {
	if rp.opts.Jobs == nil {
		return rp.writeJob(name, j, false)
	}
	data, err := json.Marshal(j)
	if err != nil {
		return err
	}
	return rp.opts.Jobs.UpdateJob(time.Unix(j.PeriodStart, 0).UTC(), j.PolicyDomain, data)
}

// writeJob writes j to its file (tmp, fsync, rename); syncParent also
// fsyncs the directory.
func (rp *Reporter) writeJob(name string, j *job, syncParent bool) error {
	data, err := json.Marshal(j)
	if err != nil {
		return err
	}
	path := filepath.Join(rp.dir, name)
	if err := atomicfile.WriteNoDirSync(path, data); err != nil {
		return fmt.Errorf("write report job %s: %w", path, err)
	}
	if syncParent {
		return atomicfile.SyncDir(rp.dir)
	}
	return nil
}

// JobStore keeps a Reporter's report jobs in place of the files under its
// Recorder's directory. A job is an opaque JSON document, identified by
// its period start and policy domain.
type JobStore interface {
	// LoadJobs returns every job kept.
	LoadJobs() ([][]byte, error)
	// CreateJob stores data as the job of that period and domain unless
	// there is one already, and returns the job stored: data, or the
	// existing job, which then wins (its report-id is the report's).
	CreateJob(periodStart time.Time, policyDomain string, data []byte) (stored []byte, err error)
	// UpdateJob replaces the job (delivery state changed).
	UpdateJob(periodStart time.Time, policyDomain string, data []byte) error
	// RemoveJob deletes a finished job.
	RemoveJob(periodStart time.Time, policyDomain string) error
}
