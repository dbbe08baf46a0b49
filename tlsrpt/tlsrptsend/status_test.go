package tlsrptsend

import (
	"slices"
	"strings"
	"time"
)

// ReportStatus is the state of one report job, as the tests look at it
// (Reporter.Reports; nothing outside the tests needs it).
type ReportStatus struct {
	PolicyDomain string         `json:"policy_domain"`
	PeriodStart  time.Time      `json:"period_start"`
	ReportID     string         `json:"report_id"`
	Done         bool           `json:"done"`
	Outcome      string         `json:"outcome,omitempty"`
	Targets      []TargetStatus `json:"targets,omitempty"`
}

// TargetStatus is the state of one rua of a report.
type TargetStatus struct {
	URI         string    `json:"uri"`
	State       string    `json:"state"` // pending, sent, dropped
	Attempts    int       `json:"attempts"`
	NextAttempt time.Time `json:"next_attempt,omitzero"`
	LastError   string    `json:"last_error,omitempty"`
}

// Reports lists the report jobs kept (pending, and finished ones for a
// day), in order of period and domain.
func (rp *Reporter) Reports() []ReportStatus {
	rp.mu.Lock()
	defer rp.mu.Unlock()
	var out []ReportStatus
	for _, j := range rp.jobs {
		s := ReportStatus{PolicyDomain: j.PolicyDomain, PeriodStart: time.Unix(j.PeriodStart, 0).UTC(),
			ReportID: j.Report.ReportID, Done: j.Done, Outcome: j.Outcome}
		for _, tg := range j.Targets {
			s.Targets = append(s.Targets, TargetStatus{URI: tg.RUA.URI, State: tg.State,
				Attempts: tg.Attempts, NextAttempt: tg.NextAttempt, LastError: tg.LastError})
		}
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b ReportStatus) int {
		if c := a.PeriodStart.Compare(b.PeriodStart); c != 0 {
			return c
		}
		return strings.Compare(a.PolicyDomain, b.PolicyDomain)
	})
	return out
}
