package queue

import (
	"container/heap"
	"errors"
	"fmt"
	"time"
)

// dueEntry says message id has a recipient due at at. Entries go stale
// when the message changes; a stale entry is skipped when popped.
type dueEntry struct {
	id string
	at time.Time
}

type dueHeap []dueEntry

func (h dueHeap) Len() int           { return len(h) }
func (h dueHeap) Less(i, j int) bool { return h[i].at.Before(h[j].at) }
func (h dueHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *dueHeap) Push(x any)        { *h = append(*h, x.(dueEntry)) }
func (h *dueHeap) Pop() any {
	old := *h
	e := old[len(old)-1]
	*h = old[:len(old)-1]
	return e
}

// pushDue schedules m at its next due time. Call with s.mu held.
func (s *Store) pushDue(m *Message) {
	if t := m.NextDue(); !t.IsZero() {
		heap.Push(&s.due, dueEntry{id: m.ID, at: t})
	}
}

// Wake returns a channel that receives when messages were added or
// changed, so a scheduler can sleep until then or until NextDue.
func (s *Store) Wake() <-chan struct{} { return s.wake }

// NextDue returns the earliest time a message not leased is due.
func (s *Store) NextDue() (time.Time, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for s.due.Len() > 0 {
		e := s.due[0]
		if s.validEntry(e) {
			return e.at, true
		}
		heap.Pop(&s.due)
	}
	return time.Time{}, false
}

func (s *Store) validEntry(e dueEntry) bool {
	m, ok := s.msgs[e.id]
	return ok && !s.leased[e.id] && m.NextDue().Equal(e.at)
}

// Lease hands out up to n messages due at or before now that are not
// leased already. A leased message is the caller's until it calls Update
// or Release; it is not handed out again meanwhile.
func (s *Store) Lease(now time.Time, n int) []*Message {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*Message
	for len(out) < n && s.due.Len() > 0 {
		e := s.due[0]
		if !s.validEntry(e) {
			heap.Pop(&s.due)
			continue
		}
		if e.at.After(now) {
			break
		}
		heap.Pop(&s.due)
		s.leased[e.id] = true
		out = append(out, s.msgs[e.id].clone())
	}
	return out
}

// Release gives a leased message back unchanged.
func (s *Store) Release(id string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.leased, id)
	if m, ok := s.msgs[id]; ok {
		s.pushDue(m)
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
	delete(s.leased, m.ID)
	if cur, ok := s.msgs[m.ID]; ok && len(cur.Rcpts) == len(m.Rcpts) {
		cur.Rcpts = append([]Recipient(nil), m.Rcpts...)
		cur.DelayNotified = m.DelayNotified
		s.pushDue(cur)
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
	cur, ok := s.msgs[m.ID]
	n := 0
	if ok {
		n = len(cur.Rcpts)
	}
	s.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("%s: %w", m.ID, ErrNotFound)
	}
	if len(m.Rcpts) != n {
		return nil, fmt.Errorf("%s: recipient count changed", m.ID)
	}
	rcpts := append([]Recipient(nil), m.Rcpts...)
	s.mu.Lock()
	if s.retryNow[m.ID] {
		now := s.opts.Now()
		for i := range rcpts {
			if !rcpts[i].Status.Final() {
				rcpts[i].NextAttempt = now
			}
		}
		delete(s.retryNow, m.ID)
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
	return &commitReq{recs: []*pendingRecord{rec}, apply: func([]*pendingRecord) {
		delete(s.leased, id)
		cur, ok := s.msgs[id]
		if !ok {
			return
		}
		if done {
			cur.loc.seg.live--
			delete(s.msgs, id)
			return
		}
		cur.Rcpts = rcpts
		cur.DelayNotified = delayNotified
		s.pushDue(cur)
	}}, nil
}

// Delete removes a message from the queue whatever its state (operator
// action). A delivery in flight for it finishes but is not recorded.
func (s *Store) Delete(id string) error {
	s.mu.Lock()
	_, ok := s.msgs[id]
	s.mu.Unlock()
	if !ok {
		return fmt.Errorf("%s: %w", id, ErrNotFound)
	}
	rec, err := newRecord(recRemove, removeMeta{ID: id})
	if err != nil {
		return err
	}
	return s.submit(&commitReq{recs: []*pendingRecord{rec}, apply: func([]*pendingRecord) {
		if cur, ok := s.msgs[id]; ok {
			cur.loc.seg.live--
			delete(s.msgs, id)
			delete(s.leased, id)
		}
	}})
}

// Retry makes every recipient of id that is not final due now.
func (s *Store) Retry(id string) error {
	s.mu.Lock()
	cur, ok := s.msgs[id]
	if !ok {
		s.mu.Unlock()
		return fmt.Errorf("%s: %w", id, ErrNotFound)
	}
	if s.leased[id] {
		// A delivery is in flight: writing its recipients now could
		// overwrite the outcome it is about to record. Its Update
		// applies the retry instead.
		s.retryNow[id] = true
		s.mu.Unlock()
		return nil
	}
	// Hold the lease while the new state is written, so that no delivery
	// starts from (and later overwrites) the state being replaced.
	s.leased[id] = true
	m := cur.clone()
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
	return s.leased[id]
}

// ErrLeased is returned by LeaseID for a message a delivery holds.
var ErrLeased = errors.New("a delivery attempt of this message is in flight; try again in a moment")

// LeaseID takes the lease of one message whatever its due time, for an
// operator action that must not race a delivery; give it back with Update
// or Release.
func (s *Store) LeaseID(id string) (*Message, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, ok := s.msgs[id]
	if !ok {
		return nil, fmt.Errorf("%s: %w", id, ErrNotFound)
	}
	if s.leased[id] {
		return nil, fmt.Errorf("%s: %w", id, ErrLeased)
	}
	s.leased[id] = true
	return m.clone(), nil
}
