package tlsrpt

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/internal/atomicfile"
)

// DefaultInterval is the report period: a UTC day (RFC 8460 §4.1).
const DefaultInterval = 24 * time.Hour

// countsFile holds the aggregates under the recorder's directory.
const countsFile = "counts.json"

// flushEvery is how often Run writes dirty aggregates to disk.
const flushEvery = time.Second

// Session is the outcome of one SMTP session: one connection and TLS
// negotiation attempt to one MX IP (RFC 8460 §4.2), not one message.
type Session struct {
	// Time is when the session happened; it picks the period. Zero means
	// the recorder's now().
	Time time.Time
	// PolicyDomain is the policy domain (the recipient domain, or the
	// next hop's), as an A-label (domain.Domain.ASCII).
	PolicyDomain string
	// PolicyType is the policy applied; empty or unknown means
	// no-policy-found. A failure with an sts-policy-* result type
	// (the domain publishes an _mta-sts record but no valid policy could
	// be had) is always counted under PolicyTypeSTS, with the
	// PolicyString and MXPatterns given (usually none), as §4.3.2.2
	// requires.
	PolicyType PolicyType
	// PolicyString is the applied policy, one element per line (each mx
	// line separately, §4.5); for TLSA one element per RR.
	PolicyString []string
	// MXPatterns are the policy's mx patterns (§4.4 "mx-host").
	MXPatterns []string
	// Success: a policy-compliant TLS session was negotiated (§4.2.1).
	Success bool
	// ResultType is the §4.3 result type of a failure; empty or unknown
	// on failure means validation-failure.
	ResultType ResultType
	// SendingIP is our address, ReceivingMX the MX host name,
	// ReceivingHelo the first word of its greeting, ReceivingIP its
	// address. Empty when the failure came before any MX was tried.
	SendingIP, ReceivingMX, ReceivingHelo, ReceivingIP string
	// FailureReasonCode is a short, stable code (§4.3.1, §4.3.3), as
	// Classify gives: no times, ports or peer text, which would make
	// every session its own failure-details entry. AdditionalInfo is an
	// optional URI (§4.4 "additional-information").
	FailureReasonCode, AdditionalInfo string
}

// Bounds on the strings of a Session that reach the aggregate key, the
// counts file and the report (the MX's greeting word and host name come
// from peers). Record truncates longer strings and replaces bytes outside
// printable ASCII with '?'.
const (
	maxNameLen   = 255 // policy domain, MX host name, HELO name
	maxIPLen     = 64  // IP addresses (an IPv6 address with a zone fits)
	maxReasonLen = 64  // failure-reason-code
	maxInfoLen   = 255 // additional-information
)

// aggKey identifies one aggregate. Successful sessions only count per
// period, domain and policy (the report has no details for them), which
// keeps the number of keys small.
type aggKey struct {
	start                                    int64 // period start, Unix seconds
	domain                                   string
	policy                                   uint32     // index into Recorder.policies
	result                                   ResultType // "" for success
	sendingIP, mx, receivingIP, helo, reason string
}

type aggValue struct {
	count int64
	info  string // additional-information, the first one seen
}

// policyDef is an interned policy: type, lines and mx patterns.
type policyDef struct {
	Type  PolicyType `json:"type"`
	Lines []string   `json:"lines"`
	MX    []string   `json:"mx"`
}

// Recorder aggregates session results per period and policy domain and
// keeps them on disk (data_dir/tlsrpt). It is safe for concurrent use.
type Recorder struct {
	dir      string
	now      func() time.Time
	log      *zap.Logger
	interval int64 // seconds

	mu       sync.Mutex
	counts   map[aggKey]*aggValue
	policies []policyDef
	policyID map[string]uint32 // policyKey bytes -> index
	scratch  []byte
	// closedBefore: periods starting before it have been handed to the
	// reporter; late sessions for them are dropped (and counted in late).
	closedBefore int64
	late         int64
	dirty        bool

	flushMu sync.Mutex // serializes Flush so snapshots land in order
	// durableClosedBefore is closedBefore as last written to disk.
	durableClosedBefore int64
}

// RecorderOption configures NewRecorder.
type RecorderOption func(*Recorder) error

// WithInterval sets the report period (tlsrpt.interval): a whole number of
// seconds; periods are aligned to multiples of it in Unix time, so 24h
// gives UTC days. The default is 24h.
func WithInterval(d time.Duration) RecorderOption {
	return func(r *Recorder) error {
		if d < time.Second || d%time.Second != 0 {
			return fmt.Errorf("tlsrpt: interval %v must be a whole number of seconds, at least 1s", d)
		}
		r.interval = int64(d / time.Second)
		return nil
	}
}

// NewRecorder opens the recorder in dir (data_dir/tlsrpt), creating it if
// needed, and loads the counts flushed before a restart. now is the clock
// (nil: time.Now).
func NewRecorder(dir string, now func() time.Time, logger *zap.Logger, opts ...RecorderOption) (*Recorder, error) {
	if now == nil {
		now = time.Now
	}
	if logger == nil {
		logger = zap.NewNop()
	}
	r := &Recorder{
		dir:      dir,
		now:      now,
		log:      logger,
		interval: int64(DefaultInterval / time.Second),
		counts:   map[aggKey]*aggValue{},
		policyID: map[string]uint32{},
	}
	for _, o := range opts {
		if err := o(r); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, fmt.Errorf("tlsrpt: %w", err)
	}
	if err := r.load(); err != nil {
		return nil, err
	}
	return r, nil
}

// Interval is the report period.
func (r *Recorder) Interval() time.Duration { return time.Duration(r.interval) * time.Second }

// periodStart floors sec to a multiple of interval (also for sec < 0).
func periodStart(sec, interval int64) int64 {
	p := sec - sec%interval
	if sec%interval < 0 {
		p -= interval
	}
	return p
}

// Record counts one session. It only updates memory under a mutex: no I/O,
// and no allocation when the aggregate already exists. It bounds every
// string that reaches the report (see maxNameLen), so no caller can put a
// peer's megabyte into the counts file or a report.
func (r *Recorder) Record(s Session) {
	t := s.Time
	if t.IsZero() {
		t = r.now()
	}
	start := periodStart(t.Unix(), r.interval)
	k := aggKey{start: start, domain: bound(normDomain(s.PolicyDomain), maxNameLen)}
	if k.domain == "" {
		return // nothing to report to
	}
	typ := s.PolicyType
	if !typ.Valid() {
		typ = PolicyTypeNoPolicyFound
	}
	info := ""
	if !s.Success {
		k.result = s.ResultType
		if !k.result.Valid() {
			k.result = ResultValidationFailure
		}
		if k.result.IsSTSPolicyFailure() && typ == PolicyTypeNoPolicyFound {
			// §4.3.2.2: the domain has an _mta-sts record; its failure
			// belongs to the sts policy even though none could be had.
			typ = PolicyTypeSTS
		}
		k.sendingIP = bound(s.SendingIP, maxIPLen)
		k.mx = bound(normDomain(s.ReceivingMX), maxNameLen)
		k.receivingIP = bound(s.ReceivingIP, maxIPLen)
		k.helo = bound(s.ReceivingHelo, maxNameLen)
		k.reason = bound(s.FailureReasonCode, maxReasonLen)
		info = bound(s.AdditionalInfo, maxInfoLen)
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	if start < r.closedBefore {
		r.late++
		return
	}
	k.policy = r.internLocked(typ, s.PolicyString, s.MXPatterns)
	if v, ok := r.counts[k]; ok {
		v.count++
		if v.info == "" && info != "" {
			v.info = info
		}
	} else {
		r.counts[k] = &aggValue{count: 1, info: info}
	}
	r.dirty = true
}

// bound returns s cut to at most n bytes, with every byte outside
// printable ASCII replaced by '?'. It does not allocate when s is already
// within bounds.
func bound(s string, n int) string {
	clean := len(s) <= n
	for i := 0; clean && i < len(s); i++ {
		clean = s[i] >= 0x20 && s[i] < 0x7f
	}
	if clean {
		return s
	}
	b := []byte(s[:min(len(s), n)])
	for i, c := range b {
		if c < 0x20 || c >= 0x7f {
			b[i] = '?'
		}
	}
	return string(b)
}

// internLocked returns the id of a policy, adding it if new. The lookup
// key is built in a reused buffer and looked up with m[string(b)], which
// the compiler does without allocating.
func (r *Recorder) internLocked(typ PolicyType, lines, mx []string) uint32 {
	if typ == "" {
		typ = PolicyTypeNoPolicyFound
	}
	b := append(r.scratch[:0], typ...)
	for _, l := range lines {
		b = append(b, 0)
		b = append(b, l...)
	}
	b = append(b, 1)
	for _, m := range mx {
		b = append(b, 0)
		b = append(b, m...)
	}
	r.scratch = b
	if id, ok := r.policyID[string(b)]; ok {
		return id
	}
	id := uint32(len(r.policies))
	r.policies = append(r.policies, policyDef{Type: typ, Lines: slices.Clone(lines), MX: slices.Clone(mx)})
	r.policyID[string(b)] = id
	return id
}

func policyKey(p policyDef) string {
	var sb strings.Builder
	sb.WriteString(string(p.Type))
	for _, l := range p.Lines {
		sb.WriteByte(0)
		sb.WriteString(l)
	}
	sb.WriteByte(1)
	for _, m := range p.MX {
		sb.WriteByte(0)
		sb.WriteString(m)
	}
	return sb.String()
}

// Run flushes dirty aggregates to disk about once a second until ctx ends,
// then flushes once more.
func (r *Recorder) Run(ctx context.Context) {
	tick := time.NewTicker(flushEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			if err := r.Flush(); err != nil {
				r.log.Error("tlsrpt_flush", zap.Error(err))
			}
			return
		case <-tick.C:
			if err := r.Flush(); err != nil {
				r.log.Error("tlsrpt_flush", zap.Error(err))
			}
		}
	}
}

// Close flushes the aggregates.
func (r *Recorder) Close() error { return r.Flush() }

// fileState is the on-disk form of the aggregates.
type fileState struct {
	Version         int         `json:"version"`
	IntervalSeconds int64       `json:"interval_seconds"`
	ClosedBefore    int64       `json:"closed_before"`
	Policies        []policyDef `json:"policies"`
	Entries         []fileEntry `json:"entries"`
	Late            int64       `json:"late,omitempty"`
	Written         time.Time   `json:"written"`
}

type fileEntry struct {
	Start       int64      `json:"start"`
	Domain      string     `json:"domain"`
	Policy      uint32     `json:"policy"`
	Result      ResultType `json:"result,omitempty"`
	SendingIP   string     `json:"sending_ip,omitempty"`
	MX          string     `json:"mx,omitempty"`
	ReceivingIP string     `json:"receiving_ip,omitempty"`
	HELO        string     `json:"helo,omitempty"`
	Reason      string     `json:"reason,omitempty"`
	Info        string     `json:"info,omitempty"`
	Count       int64      `json:"count"`
}

// Flush writes the aggregates to disk if they changed since the last
// Flush: a temporary file, fsync, rename over counts.json, fsync of the
// directory.
func (r *Recorder) Flush() error {
	r.flushMu.Lock()
	defer r.flushMu.Unlock()

	r.mu.Lock()
	if !r.dirty {
		r.mu.Unlock()
		return nil
	}
	st := fileState{
		Version:         1,
		IntervalSeconds: r.interval,
		ClosedBefore:    r.closedBefore,
		Policies:        slices.Clone(r.policies),
		Entries:         make([]fileEntry, 0, len(r.counts)),
		Late:            r.late,
	}
	for k, v := range r.counts {
		st.Entries = append(st.Entries, fileEntry{
			Start: k.start, Domain: k.domain, Policy: k.policy, Result: k.result,
			SendingIP: k.sendingIP, MX: k.mx, ReceivingIP: k.receivingIP, HELO: k.helo,
			Reason: k.reason, Info: v.info, Count: v.count,
		})
	}
	r.dirty = false
	r.mu.Unlock()

	st.Written = r.now().UTC()
	data, err := json.Marshal(&st)
	if err == nil {
		err = atomicfile.Write(filepath.Join(r.dir, countsFile), data)
	}
	if err != nil {
		r.mu.Lock()
		r.dirty = true // try again next time
		r.mu.Unlock()
		return fmt.Errorf("tlsrpt: flush counts: %w", err)
	}
	r.mu.Lock()
	r.durableClosedBefore = st.ClosedBefore
	r.mu.Unlock()
	return nil
}

// load reads counts.json. Counts of another interval (the configuration
// changed) are moved into the period of the new interval holding their
// old start.
func (r *Recorder) load() error {
	data, err := os.ReadFile(filepath.Join(r.dir, countsFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("tlsrpt: read counts: %w", err)
	}
	var st fileState
	if err := json.Unmarshal(data, &st); err != nil {
		// The file is only ever replaced by rename, so this is not a torn
		// write; keep it for inspection and start afresh.
		bad := filepath.Join(r.dir, countsFile+".bad")
		os.Rename(filepath.Join(r.dir, countsFile), bad)
		r.log.Error("tlsrpt_counts_corrupt", zap.String("file", bad), zap.Error(err))
		return nil
	}
	r.closedBefore = st.ClosedBefore
	r.durableClosedBefore = st.ClosedBefore
	r.late = st.Late
	rekey := st.IntervalSeconds != r.interval
	for _, e := range st.Entries {
		if int(e.Policy) >= len(st.Policies) {
			continue
		}
		p := st.Policies[e.Policy]
		// Bounded as in Record: a file written by an older version may
		// hold a peer's megabyte.
		k := aggKey{start: e.Start, domain: bound(e.Domain, maxNameLen), result: e.Result,
			sendingIP: bound(e.SendingIP, maxIPLen), mx: bound(e.MX, maxNameLen), receivingIP: bound(e.ReceivingIP, maxIPLen),
			helo: bound(e.HELO, maxNameLen), reason: bound(e.Reason, maxReasonLen)}
		if !p.Type.Valid() || k.domain == "" {
			continue
		}
		if k.result != "" && !k.result.Valid() {
			k.result = ResultValidationFailure
		}
		e.Info = bound(e.Info, maxInfoLen)
		if rekey {
			k.start = periodStart(e.Start, r.interval)
		}
		k.policy = r.internLocked(p.Type, p.Lines, p.MX)
		if v, ok := r.counts[k]; ok {
			v.count += e.Count
		} else {
			r.counts[k] = &aggValue{count: e.Count, info: e.Info}
		}
	}
	if rekey {
		r.closedBefore = periodStart(r.closedBefore, r.interval)
		r.dirty = true
		r.log.Warn("tlsrpt_interval_changed", zap.Int64("old_seconds", st.IntervalSeconds), zap.Int64("new_seconds", r.interval))
	}
	return nil
}

// PolicyCounts is what the report for one policy domain and period will
// say: the §4.4 "policies" array with summaries and failure details.
type PolicyCounts struct {
	// PeriodStart is the first second of the period; PeriodEnd the first
	// second after it. Both UTC.
	PeriodStart time.Time `json:"period_start"`
	PeriodEnd   time.Time `json:"period_end"`
	// PolicyDomain is the recipient domain.
	PolicyDomain string `json:"policy_domain"`
	// Successful and Failed total the sessions over all policies.
	Successful int64 `json:"successful"`
	Failed     int64 `json:"failed"`
	// Policies are the report's policy entries, one per policy applied in
	// the period (it may change, or be missing for part of it).
	Policies []PolicyResult `json:"policies"`
}

// Pending returns the counts gathered and not yet turned into reports,
// ordered by period and policy domain (for `stsrelay tlsrpt pending`).
func (r *Recorder) Pending() []PolicyCounts {
	return r.collect(func(int64) bool { return true })
}

// pendingPeriods returns the starts of the periods holding counts, in order.
func (r *Recorder) pendingPeriods() []int64 {
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

// collect builds PolicyCounts for the periods keep selects.
func (r *Recorder) collect(keep func(start int64) bool) []PolicyCounts {
	type pdKey struct {
		start  int64
		domain string
	}
	type polKey struct {
		pdKey
		policy uint32
	}
	r.mu.Lock()
	byPD := map[pdKey]*PolicyCounts{}
	byPol := map[polKey]*PolicyResult{}
	var pds []*PolicyCounts
	var order []polKey
	for k, v := range r.counts {
		if !keep(k.start) {
			continue
		}
		pk := pdKey{k.start, k.domain}
		pc := byPD[pk]
		if pc == nil {
			pc = &PolicyCounts{
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
			pr = &PolicyResult{
				Policy: PolicyDesc{
					PolicyType:   def.Type,
					PolicyString: nonNil(def.Lines),
					PolicyDomain: k.domain,
					MXHost:       nonNil(def.MX),
				},
				FailureDetails: []FailureDetail{},
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
		pr.FailureDetails = append(pr.FailureDetails, FailureDetail{
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
	slices.SortFunc(pds, func(a, b *PolicyCounts) int {
		return cmp.Or(a.PeriodStart.Compare(b.PeriodStart), cmp.Compare(a.PolicyDomain, b.PolicyDomain))
	})
	out := make([]PolicyCounts, len(pds))
	for i, pc := range pds {
		out[i] = *pc
	}
	return out
}

func compareDetail(a, b FailureDetail) int {
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

// closePeriod drops the counts of the period starting at start, after the
// reporter made its report jobs durable, except those of the policy
// domains in keep (their jobs could not be written yet), and refuses later
// sessions for it and every earlier period. The caller flushes.
func (r *Recorder) closePeriod(start int64, keep map[string]bool) {
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

// durableClosed is closedBefore as last written to disk.
func (r *Recorder) durableClosed() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.durableClosedBefore
}
