package queue

import (
	"container/heap"
	"errors"
	"fmt"
	"time"
)

// Wake returns a channel that receives when messages were added or
// changed, so a scheduler can sleep until then or until NextDue.
func (s *Store) Wake() <-chan struct{} { return s.wake }

// NextDue returns the earliest time a message not leased is due (or a
// held destination's hold ends).
func (s *Store) NextDue() (time.Time, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.domHeap) == 0 {
		return time.Time{}, false
	}
	return time.Unix(0, topHeap{s}.key(s.domHeap[0])), true
}

// Lease hands out up to n messages due at or before now that are not
// leased already, read from disk. A leased message is the caller's until
// it calls Update or Release; it is not handed out again meanwhile.
// Destinations take turns by the due time of their first message.
func (s *Store) Lease(now time.Time, n int) []*Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*Message
	th := topHeap{s}
	limit := now.UnixNano()
	for len(out) < n && len(s.domHeap) > 0 {
		d := s.domHeap[0]
		if th.key(d) > limit {
			break
		}
		slot := d.heap[0]
		e := s.arena.at(slot)
		e.flags |= flagLeased
		s.schedule(slot)
		m, err := s.loadLocked(slot)
		if err != nil {
			// The record can't be read now (an I/O error): leave the
			// message leased until a Release, which never comes, would
			// lose it from scheduling; put it back a minute later.
			e.flags &^= flagLeased
			e.next = now.Add(time.Minute).UnixNano()
			s.schedule(slot)
			continue
		}
		if e.flags&flagDueNow != 0 {
			e.flags &^= flagDueNow
			for i := range m.Rcpts {
				if !m.Rcpts[i].Status.Final() {
					m.Rcpts[i].NextAttempt = now
				}
			}
		}
		if nd := m.NextDue(); nd.IsZero() || nd.After(now) {
			// The index thought it due but its recipients say otherwise:
			// believe the recipients (never hand out, and get back, a
			// message nobody can work on, in a loop).
			e.flags &^= flagLeased
			e.next = nextOf(nd)
			s.schedule(slot)
			continue
		}
		out = append(out, m)
	}
	return out
}

// HoldDomain stops Lease from handing out messages of destination d
// until until (a destination found dead: its messages wait together,
// without one wake-up each). A zero until ends a hold.
func (s *Store) HoldDomain(d string, until time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	i, ok := s.domIdx[d]
	if !ok || d == multiDomain {
		return
	}
	de := s.doms[i]
	de.hold = nextOf(until)
	s.fixTop(de)
	s.signal()
}

// RetryDomain makes every message of destination d that is not leased
// due now, and ends its hold; leased ones become due when their lease
// ends. It changes the schedule in memory only (a restart keeps the
// times on disk), so that a million messages are released at once. It
// returns how many messages it released. Messages with recipients in
// several domains are not included.
func (s *Store) RetryDomain(d string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	i, ok := s.domIdx[d]
	if !ok || d == multiDomain {
		return 0
	}
	de := s.doms[i]
	de.hold = 0
	now := s.opts.Now().UnixNano()
	n := 0
	s.arena.each(func(slot uint32, e *entry) bool {
		if e.dom != i || e.next == 0 {
			return true
		}
		n++
		if e.flags&(flagLeased|flagCopying) != 0 {
			e.flags |= flagRetryNow
			return true
		}
		e.next = min(e.next, now)
		e.flags |= flagDueNow
		return true
	})
	heap.Init(domHeap{&s.arena, de})
	s.fixTop(de)
	s.signal()
	return n
}

// unlease ends the lease of slot and schedules it. Call with s.mu held.
func (s *Store) unlease(slot uint32) {
	e := s.arena.at(slot)
	e.flags &^= flagLeased
	if e.flags&flagRetryNow != 0 && e.next != 0 {
		e.next = min(e.next, s.opts.Now().UnixNano())
		e.flags &^= flagRetryNow
		e.flags |= flagDueNow
	}
	s.schedule(slot)
}

// Release gives a leased message back unchanged.
func (s *Store) Release(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if slot := s.ids.find(&s.arena, id); slot != 0 {
		s.unlease(slot)
	}
	s.signal()
}

// Requeue gives a leased message back with m's recipient states and
// DelayNotified applied in memory only: for when Update failed (a disk
// error). Release would make the message due again at once with its old
// states, so every recipient just delivered would be sent the message
// again, in a loop for as long as the disk fails. The states hold until a
// restart, which then redoes the attempt; a later Update records them.
func (s *Store) Requeue(m *Message) {
	s.mu.Lock()
	defer s.mu.Unlock()
	slot := s.ids.find(&s.arena, m.ID)
	if slot != 0 {
		s.overrides[m.ID] = &stateMeta{ID: m.ID, Rcpts: append([]Recipient(nil), m.Rcpts...), DelayNotified: m.DelayNotified}
		e := s.arena.at(slot)
		e.next = nextOf(m.NextDue())
		s.unlease(slot)
	}
	s.signal()
}

// Update durably records the recipients' states (and DelayNotified) of m,
// which must be a message of this store, and releases its lease. A
// message whose recipients are all final leaves the queue. Updating a
// message that was deleted meanwhile returns ErrNotFound.
func (s *Store) Update(m *Message) error {
	req, err := s.updateReq(m)
	if err != nil {
		return err
	}
	return s.submit(req)
}

// UpdateAsync is Update without waiting for the sync: then receives the
// outcome later, on the committer goroutine (it must not block). The
// message stays leased until the record is durable. A delivery worker
// uses it to go on to its next message while the group commit runs.
func (s *Store) UpdateAsync(m *Message, then func(error)) error {
	req, err := s.updateReq(m)
	if err != nil {
		return err
	}
	req.then = then
	return s.submitAsync(req)
}

func (s *Store) updateReq(m *Message) (*commitReq, error) {
	s.mu.Lock()
	slot := s.ids.find(&s.arena, m.ID)
	if slot == 0 {
		s.mu.Unlock()
		return nil, fmt.Errorf("%s: %w", m.ID, ErrNotFound)
	}
	if len(m.Rcpts) != len(m.Env.Rcpts) {
		s.mu.Unlock()
		return nil, fmt.Errorf("%s: recipient count changed", m.ID)
	}
	rcpts := append([]Recipient(nil), m.Rcpts...)
	if e := s.arena.at(slot); e.flags&flagRetryNow != 0 {
		now := s.opts.Now()
		for i := range rcpts {
			if !rcpts[i].Status.Final() {
				rcpts[i].NextAttempt = now
			}
		}
		e.flags &^= flagRetryNow
	}
	s.mu.Unlock()
	done := m.Done()
	var rec *pendingRecord
	var err error
	if done {
		rec, err = newRecord(recRemove, removeMeta{ID: m.ID})
	} else {
		rec, err = newRecord(recState, stateMeta{ID: m.ID, Rcpts: rcpts, DelayNotified: m.DelayNotified})
	}
	if err != nil {
		return nil, err
	}
	id := m.ID
	delayNotified := m.DelayNotified
	next := nextDue(rcpts)
	return &commitReq{recs: []*pendingRecord{rec}, apply: func(recs []*pendingRecord) {
		delete(s.overrides, id)
		slot := s.ids.find(&s.arena, id)
		if slot == 0 {
			return
		}
		if done {
			s.removeEntry(slot)
			return
		}
		r := recs[0]
		s.setState(s.arena.at(slot), recLoc{off: r.recOff, seg: uint32(r.seg.seq), metaLen: uint32(len(r.meta))}, next, delayNotified)
		s.unlease(slot)
	}}, nil
}

// Delete removes a message from the queue whatever its state (operator
// action). A delivery in flight for it finishes but is not recorded.
func (s *Store) Delete(id string) error {
	// A compaction copying the message forward holds it for one group
	// commit: wait that out rather than send the operator away.
	var slot uint32
	for wait := time.Now().Add(2 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		s.mu.Lock()
		slot = s.ids.find(&s.arena, id)
		copying := slot != 0 && s.arena.at(slot).flags&flagCopying != 0
		s.mu.Unlock()
		if !copying {
			break
		}
		if time.Now().After(wait) {
			return fmt.Errorf("%s: %w", id, ErrLeased)
		}
	}
	if slot == 0 {
		return fmt.Errorf("%s: %w", id, ErrNotFound)
	}
	rec, err := newRecord(recRemove, removeMeta{ID: id})
	if err != nil {
		return err
	}
	return s.submit(&commitReq{recs: []*pendingRecord{rec}, apply: func([]*pendingRecord) {
		delete(s.overrides, id)
		if slot := s.ids.find(&s.arena, id); slot != 0 {
			s.removeEntry(slot)
		}
	}})
}

// Retry makes every recipient of id that is not final due now.
func (s *Store) Retry(id string) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	slot := s.ids.find(&s.arena, id)
	if slot == 0 {
		s.mu.Unlock()
		return fmt.Errorf("%s: %w", id, ErrNotFound)
	}
	e := s.arena.at(slot)
	if e.flags&(flagLeased|flagCopying) != 0 {
		// A delivery is in flight: writing its recipients now could
		// overwrite the outcome it is about to record. Its Update
		// applies the retry instead (compaction's copy: the lease's end).
		e.flags |= flagRetryNow
		s.mu.Unlock()
		return nil
	}
	// Hold the lease while the new state is written, so that no delivery
	// starts from (and later overwrites) the state being replaced.
	e.flags |= flagLeased
	s.schedule(slot)
	m, err := s.loadLocked(slot)
	if err != nil {
		s.unlease(slot)
		s.mu.Unlock()
		return err
	}
	s.mu.Unlock()
	now := s.opts.Now()
	for i := range m.Rcpts {
		if !m.Rcpts[i].Status.Final() {
			m.Rcpts[i].NextAttempt = now
		}
	}
	if err := s.Update(m); err != nil {
		s.Release(id)
		return err
	}
	return nil
}

// Leased reports whether a delivery of id is in flight.
func (s *Store) Leased(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	slot := s.ids.find(&s.arena, id)
	return slot != 0 && s.arena.at(slot).flags&flagLeased != 0
}

// ErrLeased is returned by LeaseID for a message a delivery holds.
var ErrLeased = errors.New("a delivery attempt of this message is in flight; try again in a moment")

// LeaseID takes the lease of one message whatever its due time, for an
// operator action that must not race a delivery; give it back with Update
// or Release.
func (s *Store) LeaseID(id string) (*Message, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	slot := s.ids.find(&s.arena, id)
	if slot == 0 {
		return nil, fmt.Errorf("%s: %w", id, ErrNotFound)
	}
	e := s.arena.at(slot)
	if e.flags&(flagLeased|flagCopying) != 0 {
		return nil, fmt.Errorf("%s: %w", id, ErrLeased)
	}
	e.flags |= flagLeased
	s.schedule(slot)
	m, err := s.loadLocked(slot)
	if err != nil {
		s.unlease(slot)
		return nil, err
	}
	return m, nil
}
