package queue

import (
	"encoding/json"
	"hash/crc32"
	"io"
	"time"
)

// Compaction keeps a message deferred for days from pinning the log
// behind it. Segments are removed oldest first (a state or remove record
// must never disappear while the message record it applies to survives),
// so a single live message in the oldest segment would keep every newer
// segment on disk. When the oldest segment is mostly dead, or the log is
// more than twice its live data plus two segments, the live messages of
// the oldest segment are copied forward into the active segment through
// the ordinary group commit, as message records that also carry their
// recipients' states, keeping their IDs, arrival times and attempt
// history. Once the copies are durable the index points at them, the old
// segment holds nothing live and goes.
//
// Crash safety: a copy is an ordinary record written after everything it
// supersedes. Recovery applies records in log order and treats a second
// message record for an ID as a replacement, so a crash before the copy
// is durable leaves the original, and a crash after it leaves the copy
// (and perhaps the original too, which the copy then replaces). While a
// message is being copied it cannot be leased, deleted or updated, so no
// state record or removal can fall between the copy's snapshot and the
// copy itself.

const (
	// compactBatchBytes bounds the bodies copied in one group commit, so
	// that a submission sharing that commit waits for little extra I/O.
	compactBatchBytes = 1 << 20
	compactBatchMsgs  = 256
	compactTick       = 200 * time.Millisecond
)

// compactLoop runs compaction and the periodic index checkpoint until
// Close.
func (s *Store) compactLoop() {
	defer s.committer.Done()
	t := time.NewTicker(s.opts.compactTick)
	defer t.Stop()
	lastCkpt := time.Now()
	ckptRecords := s.records.Load()
	// After a round that could copy nothing (the oldest segment's live
	// messages are all being delivered), wait a while before scanning
	// the index again.
	var idleUntil time.Time
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
		}
		if time.Now().After(idleUntil) {
			progress := false
			for s.compactOnce() {
				progress = true
				select {
				case <-s.stop:
					return
				default:
				}
			}
			s.mu.Lock()
			stuck := s.needsCompaction() != nil
			s.mu.Unlock()
			if !progress && stuck {
				idleUntil = time.Now().Add(25 * s.opts.compactTick)
			}
		}
		if time.Since(lastCkpt) >= s.opts.CheckpointInterval && s.records.Load() != ckptRecords {
			ckptRecords = s.records.Load()
			lastCkpt = time.Now()
			s.mu.Lock()
			snap := s.snapshotLocked()
			s.mu.Unlock()
			_ = s.writeCheckpoint(snap) // a failed checkpoint costs only restart time
		}
	}
}

// needsCompaction reports whether the oldest segment should be copied
// forward. Call with s.mu held.
func (s *Store) needsCompaction() *segment {
	if len(s.order) < 2 {
		return nil
	}
	seg := s.segs[s.order[0]]
	if seg == s.activeSeg || seg.live == 0 {
		return nil
	}
	disk, live := s.diskLocked()
	if seg.liveBytes*2 < seg.size || disk > 2*live+2*s.opts.SegmentBytes {
		return seg
	}
	return nil
}

type copyJob struct {
	slot uint32
	id   string
	meta []byte
	src  *io.SectionReader
	size int64
}

// compactOnce copies what it can of the oldest segment's live messages
// forward, one bounded batch per group commit. It reports whether it
// copied anything.
func (s *Store) compactOnce() bool {
	s.mu.Lock()
	seg := s.needsCompaction()
	if seg == nil {
		s.mu.Unlock()
		return false
	}
	type cand struct {
		slot uint32
		id   [IDLen]byte
	}
	var cands []cand
	s.arena.each(func(slot uint32, e *entry) bool {
		if e.msg.seg == uint32(seg.seq) && e.flags&(flagLeased|flagCopying) == 0 {
			cands = append(cands, cand{slot, e.id})
		}
		return true
	})
	s.mu.Unlock()
	copied := 0
	for len(cands) > 0 {
		var jobs []copyJob
		bytes := int64(0)
		s.mu.Lock()
		for len(cands) > 0 && len(jobs) < compactBatchMsgs && (bytes < compactBatchBytes || len(jobs) == 0) {
			c := cands[0]
			cands = cands[1:]
			e := s.arena.at(c.slot)
			if e.flags&flagUsed == 0 || e.id != c.id || e.msg.seg != uint32(seg.seq) || e.flags&(flagLeased|flagCopying) != 0 {
				continue
			}
			meta, err := s.copyMeta(e)
			if err != nil {
				continue
			}
			e.flags |= flagCopying
			s.schedule(c.slot)
			jobs = append(jobs, copyJob{slot: c.slot, id: e.idString(), meta: meta, size: e.bodyLen,
				src: io.NewSectionReader(seg.f, e.msg.off+headerLen+int64(e.msg.metaLen), e.bodyLen)})
			bytes += e.bodyLen
		}
		s.mu.Unlock()
		if len(jobs) == 0 {
			break
		}
		if err := s.commitCopies(seg, jobs); err != nil {
			return copied > 0
		}
		copied += len(jobs)
		s.copied.Add(uint64(len(jobs)))
	}
	s.mu.Lock()
	if _, still := s.segs[seg.seq]; !still {
		s.compactions.Add(1)
	}
	s.mu.Unlock()
	return copied > 0
}

// copyMeta builds the metadata of a compaction copy of e: its message
// record with the newest recipient states folded in. Call with s.mu held.
func (s *Store) copyMeta(e *entry) ([]byte, error) {
	raw, err := s.readMeta(e.msg, recMessage)
	if err != nil {
		return nil, err
	}
	var mm messageMeta
	if err := json.Unmarshal(raw, &mm); err != nil {
		return nil, err
	}
	if e.state.valid() {
		raw, err := s.readMeta(e.state, recState)
		if err != nil {
			return nil, err
		}
		var sm stateMeta
		if err := json.Unmarshal(raw, &sm); err != nil {
			return nil, err
		}
		mm.Rcpts, mm.DelayNotified = sm.Rcpts, sm.DelayNotified
	}
	return json.Marshal(mm)
}

// commitCopies writes one batch of copies and points the index at them.
func (s *Store) commitCopies(seg *segment, jobs []copyJob) error {
	recs := make([]*pendingRecord, 0, len(jobs))
	for _, j := range jobs {
		h := crc32.New(crcTable)
		_, _ = h.Write(j.meta)
		if _, err := io.Copy(h, io.NewSectionReader(j.src, 0, j.size)); err != nil {
			s.endCopies(jobs, nil)
			return err
		}
		recs = append(recs, &pendingRecord{typ: recMessage, meta: j.meta, src: j.src, size: j.size, crc: h.Sum32()})
	}
	err := s.submit(&commitReq{recs: recs, apply: func(recs []*pendingRecord) {
		for i := range jobs {
			s.endCopyLocked(seg, jobs[i], recs[i])
		}
	}})
	if err != nil {
		s.endCopies(jobs, nil)
	}
	return err
}

// endCopies ends copies that were not written.
func (s *Store) endCopies(jobs []copyJob, _ []*pendingRecord) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, j := range jobs {
		s.endCopyLocked(nil, j, nil)
	}
}

// endCopyLocked points the index at a durable copy (r) or, with r nil,
// just ends the copy. Call with s.mu held.
func (s *Store) endCopyLocked(seg *segment, j copyJob, r *pendingRecord) {
	slot := s.ids.find(&s.arena, j.id)
	if slot == 0 || slot != j.slot {
		return
	}
	e := s.arena.at(slot)
	if r != nil && seg != nil && e.msg.seg == uint32(seg.seq) {
		s.addLive(e, -1)
		e.msg = recLoc{off: r.recOff, seg: uint32(r.seg.seq), metaLen: uint32(len(r.meta))}
		e.state = recLoc{}
		s.addLive(e, 1)
	}
	e.flags &^= flagCopying
	if e.flags&flagRetryNow != 0 && e.next != 0 {
		e.next = min(e.next, s.opts.Now().UnixNano())
		e.flags &^= flagRetryNow
		e.flags |= flagDueNow
	}
	s.schedule(slot)
}
