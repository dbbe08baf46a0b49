package tlsrptdb

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"time"

	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/internal/atomicfile"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// countsFile holds the aggregates under the recorder's directory.
const countsFile = "counts.json"

// flushEvery is how often Run writes dirty aggregates to disk.
const flushEvery = time.Second

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
	Start       int64             `json:"start"`
	Domain      string            `json:"domain"`
	Policy      uint32            `json:"policy"`
	Result      tlsrpt.ResultType `json:"result,omitempty"`
	SendingIP   string            `json:"sending_ip,omitempty"`
	MX          string            `json:"mx,omitempty"`
	ReceivingIP string            `json:"receiving_ip,omitempty"`
	HELO        string            `json:"helo,omitempty"`
	Reason      string            `json:"reason,omitempty"`
	Info        string            `json:"info,omitempty"`
	Count       int64             `json:"count"`
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
		k := aggKey{start: e.Start, domain: tlsrpt.Bound(e.Domain, tlsrpt.MaxNameLen), result: e.Result,
			sendingIP: tlsrpt.Bound(e.SendingIP, tlsrpt.MaxIPLen), mx: tlsrpt.Bound(e.MX, tlsrpt.MaxNameLen), receivingIP: tlsrpt.Bound(e.ReceivingIP, tlsrpt.MaxIPLen),
			helo: tlsrpt.Bound(e.HELO, tlsrpt.MaxNameLen), reason: tlsrpt.Bound(e.Reason, tlsrpt.MaxReasonLen)}
		if !p.Type.Valid() || k.domain == "" {
			continue
		}
		if k.result != "" && !k.result.Valid() {
			k.result = tlsrpt.ResultValidationFailure
		}
		e.Info = tlsrpt.Bound(e.Info, tlsrpt.MaxInfoLen)
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

// DurableClosed is closedBefore as last written to disk.
func (r *Recorder) DurableClosed() int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.durableClosedBefore
}
