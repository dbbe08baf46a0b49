package tlsrptdb

import (
	"cmp"
	"slices"
	"time"

	"github.com/stsrelay/stsrelay/tlsrpt"
)

// Pending returns the counts gathered and not yet turned into reports,
// ordered by period and policy domain (for `stsrelay tlsrpt pending`).
func (r *Recorder) Pending() []tlsrpt.PolicyCounts {
	return r.Collect(func(int64) bool { return true })
}

// PendingPeriods returns the starts of the periods holding counts, in order.
func (r *Recorder) PendingPeriods() []int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	seen := map[int64]bool{}
	var out []int64
	for k := range r.counts {
		if !seen[k.start] {
			seen[k.start] = true
			out = append(out, k.start)
		}
	}
	slices.Sort(out)
	return out
}

// Collect builds PolicyCounts for the periods keep selects.
func (r *Recorder) Collect(keep func(start int64) bool) []tlsrpt.PolicyCounts {
	type pdKey struct {
		start  int64
		domain string
	}
	type polKey struct {
		pdKey
		policy uint32
	}
	r.mu.Lock()
	byPD := map[pdKey]*tlsrpt.PolicyCounts{}
	byPol := map[polKey]*tlsrpt.PolicyResult{}
	var pds []*tlsrpt.PolicyCounts
	var order []polKey
	for k, v := range r.counts {
		if !keep(k.start) {
			continue
		}
		pk := pdKey{k.start, k.domain}
		pc := byPD[pk]
		if pc == nil {
			pc = &tlsrpt.PolicyCounts{
				PeriodStart:  time.Unix(k.start, 0).UTC(),
				PeriodEnd:    time.Unix(k.start+r.interval, 0).UTC(),
				PolicyDomain: k.domain,
			}
			byPD[pk] = pc
			pds = append(pds, pc)
		}
		plk := polKey{pk, k.policy}
		pr := byPol[plk]
		if pr == nil {
			def := r.policies[k.policy]
			pr = &tlsrpt.PolicyResult{
				Policy: tlsrpt.PolicyDesc{
					PolicyType:   def.Type,
					PolicyString: nonNil(def.Lines),
					PolicyDomain: k.domain,
					MXHost:       nonNil(def.MX),
				},
				FailureDetails: []tlsrpt.FailureDetail{},
			}
			byPol[plk] = pr
			order = append(order, plk)
		}
		if k.result == "" {
			pr.Summary.TotalSuccessfulSessionCount += v.count
			pc.Successful += v.count
			continue
		}
		pr.Summary.TotalFailureSessionCount += v.count
		pc.Failed += v.count
		pr.FailureDetails = append(pr.FailureDetails, tlsrpt.FailureDetail{
			ResultType:            k.result,
			SendingMTAIP:          k.sendingIP,
			ReceivingMXHostname:   k.mx,
			ReceivingMXHelo:       k.helo,
			ReceivingIP:           k.receivingIP,
			FailedSessionCount:    v.count,
			AdditionalInformation: v.info,
			FailureReasonCode:     k.reason,
		})
	}
	r.mu.Unlock()

	// Deterministic order: policies by type and text, details by fields.
	slices.SortFunc(order, func(a, b polKey) int {
		pa, pb := byPol[a].Policy, byPol[b].Policy
		return cmp.Or(cmp.Compare(pa.PolicyType, pb.PolicyType),
			slices.Compare(pa.PolicyString, pb.PolicyString),
			slices.Compare(pa.MXHost, pb.MXHost))
	})
	for _, k := range order {
		pr := byPol[k]
		slices.SortFunc(pr.FailureDetails, compareDetail)
		pc := byPD[k.pdKey]
		pc.Policies = append(pc.Policies, *pr)
	}
	slices.SortFunc(pds, func(a, b *tlsrpt.PolicyCounts) int {
		return cmp.Or(a.PeriodStart.Compare(b.PeriodStart), cmp.Compare(a.PolicyDomain, b.PolicyDomain))
	})
	out := make([]tlsrpt.PolicyCounts, len(pds))
	for i, pc := range pds {
		out[i] = *pc
	}
	return out
}

func compareDetail(a, b tlsrpt.FailureDetail) int {
	return cmp.Or(cmp.Compare(a.ResultType, b.ResultType),
		cmp.Compare(a.ReceivingMXHostname, b.ReceivingMXHostname),
		cmp.Compare(a.ReceivingIP, b.ReceivingIP),
		cmp.Compare(a.SendingMTAIP, b.SendingMTAIP),
		cmp.Compare(a.ReceivingMXHelo, b.ReceivingMXHelo),
		cmp.Compare(a.FailureReasonCode, b.FailureReasonCode))
}

func nonNil(s []string) []string {
	if s == nil {
		return []string{}
	}
	return slices.Clone(s)
}

// ClosePeriod drops the counts of the period starting at start, after the
// reporter made its report jobs durable, except those of the policy
// domains in keep (their jobs could not be written yet), and refuses later
// sessions for it and every earlier period. The caller flushes.
func (r *Recorder) ClosePeriod(start int64, keep map[string]bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for k := range r.counts {
		if k.start == start && !keep[k.domain] {
			delete(r.counts, k)
		}
	}
	r.closedBefore = max(r.closedBefore, start+r.interval)
	r.compactLocked()
	r.dirty = true
}

// compactLocked drops interned policies no aggregate uses any more.
func (r *Recorder) compactLocked() {
	used := make([]bool, len(r.policies))
	n := 0
	for k := range r.counts {
		if !used[k.policy] {
			used[k.policy] = true
			n++
		}
	}
	if n == len(r.policies) {
		return
	}
	remap := make([]uint32, len(r.policies))
	var policies []policyDef
	ids := map[string]uint32{}
	for i, p := range r.policies {
		if used[i] {
			remap[i] = uint32(len(policies))
			ids[policyKey(p)] = uint32(len(policies))
			policies = append(policies, p)
		}
	}
	counts := make(map[aggKey]*aggValue, len(r.counts))
	for k, v := range r.counts {
		k.policy = remap[k.policy]
		counts[k] = v
	}
	r.counts, r.policies, r.policyID = counts, policies, ids
}
