package tlsrptdb

import (
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/tlsrpt"
)

// DefaultInterval is the report period: a UTC day (RFC 8460 §4.1).
const DefaultInterval = 24 * time.Hour

// aggKey identifies one aggregate. Successful sessions only count per
// period, domain and policy (the report has no details for them), which
// keeps the number of keys small.
type aggKey struct {
	start                                    int64 // period start, Unix seconds
	domain                                   string
	policy                                   uint32            // index into Recorder.policies
	result                                   tlsrpt.ResultType // "" for success
	sendingIP, mx, receivingIP, helo, reason string
}

type aggValue struct {
	count int64
	info  string // additional-information, the first one seen
}

// policyDef is an interned policy: type, lines and mx patterns.
type policyDef struct {
	Type  tlsrpt.PolicyType `json:"type"`
	Lines []string          `json:"lines"`
	MX    []string          `json:"mx"`
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

// Dir is the recorder's directory (data_dir/tlsrpt); the Reporter keeps
// its report jobs under it.
func (r *Recorder) Dir() string { return r.dir }

// PeriodOf returns the start of the period holding t.
func (r *Recorder) PeriodOf(t time.Time) time.Time {
	return time.Unix(periodStart(t.Unix(), r.interval), 0)
}

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
// string that reaches the report (see tlsrpt.MaxNameLen), so no caller can put a
// peer's megabyte into the counts file or a report.
func (r *Recorder) Record(s tlsrpt.Session) {
	t := s.Time
	if t.IsZero() {
		t = r.now()
	}
	start := periodStart(t.Unix(), r.interval)
	k := aggKey{start: start, domain: tlsrpt.Bound(tlsrpt.NormDomain(s.PolicyDomain), tlsrpt.MaxNameLen)}
	if k.domain == "" {
		return // nothing to report to
	}
	typ := s.PolicyType
	if !typ.Valid() {
		typ = tlsrpt.PolicyTypeNoPolicyFound
	}
	info := ""
	if !s.Success {
		k.result = s.ResultType
		if !k.result.Valid() {
			k.result = tlsrpt.ResultValidationFailure
		}
		if k.result.IsSTSPolicyFailure() && typ == tlsrpt.PolicyTypeNoPolicyFound {
			// §4.3.2.2: the domain has an _mta-sts record; its failure
			// belongs to the sts policy even though none could be had.
			typ = tlsrpt.PolicyTypeSTS
		}
		k.sendingIP = tlsrpt.Bound(s.SendingIP, tlsrpt.MaxIPLen)
		k.mx = tlsrpt.Bound(tlsrpt.NormDomain(s.ReceivingMX), tlsrpt.MaxNameLen)
		k.receivingIP = tlsrpt.Bound(s.ReceivingIP, tlsrpt.MaxIPLen)
		k.helo = tlsrpt.Bound(s.ReceivingHelo, tlsrpt.MaxNameLen)
		k.reason = tlsrpt.Bound(s.FailureReasonCode, tlsrpt.MaxReasonLen)
		info = tlsrpt.Bound(s.AdditionalInfo, tlsrpt.MaxInfoLen)
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

// internLocked returns the id of a policy, adding it if new. The lookup
// key is built in a reused buffer and looked up with m[string(b)], which
// the compiler does without allocating.
func (r *Recorder) internLocked(typ tlsrpt.PolicyType, lines, mx []string) uint32 {
	if typ == "" {
		typ = tlsrpt.PolicyTypeNoPolicyFound
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
