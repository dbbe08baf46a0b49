package jsqueue

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stsrelay/stsrelay/queue"
)

// dueSlack: a message due this soon is held as ready rather than
// NakWithDelay'd (Lease still waits for its time).
const dueSlack = 100 * time.Millisecond

// fetchWait is how long one pull request waits for messages. New
// messages arrive at once; the wait only bounds how soon a lost pull (a
// consumer leader that died) is replaced.
const fetchWait = 2 * time.Second

// fetchLoop keeps up to Prefetch due messages held and ready.
func (q *Queue) fetchLoop() {
	backoff := 100 * time.Millisecond
	for q.fetchCtx.Err() == nil {
		q.mu.Lock()
		room := q.o.Prefetch - len(q.ready)
		q.mu.Unlock()
		if room <= 0 {
			select {
			case <-q.room:
			case <-q.fetchCtx.Done():
				return
			case <-time.After(time.Second):
			}
			continue
		}
		ctx, cancel := context.WithTimeout(q.fetchCtx, fetchWait)
		batch, err := q.cons.Fetch(min(room, 64), jetstream.FetchContext(ctx))
		if err == nil {
			for m := range batch.Messages() {
				q.take(m)
			}
			err = batch.Error()
		}
		cancel()
		if errors.Is(err, jetstream.ErrConsumerNotFound) || errors.Is(err, jetstream.ErrConsumerDeleted) {
			// Deleted by an operator: put it back (messages queued
			// are all delivered again from the start of the stream).
			pctx, pcancel := context.WithTimeout(q.fetchCtx, 10*time.Second)
			if Provision(pctx, q.js, q.o) == nil {
				if c, cerr := q.stream.Consumer(pctx, q.n.consumer); cerr == nil {
					q.cons = c
				}
			}
			pcancel()
		}
		if err != nil && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, jetstream.ErrNoMessages) && q.fetchCtx.Err() == nil {
			// No connection, no consumer leader: try again soon.
			select {
			case <-q.fetchCtx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 2*time.Second)
			continue
		}
		backoff = 100 * time.Millisecond
	}
}

// take decides about one fetched message: hold it as ready, or hand it
// back to the consumer for later.
func (q *Queue) take(m jetstream.Msg) {
	md, err := m.Metadata()
	if err != nil {
		return
	}
	seq := md.Sequence.Stream
	id := strings.TrimPrefix(m.Subject(), q.n.subj)
	rec, body, derr := decode(m.Headers(), m.Data())
	now := q.o.Now()
	nakAfter := func(d time.Duration) {
		_ = m.NakWithDelay(min(max(d, 10*time.Millisecond), maxNakDelay))
	}
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		_ = m.Nak()
		return
	}
	if w := q.writing[id]; w != nil && w.seq >= seq {
		if w.seq == seq {
			w.msg = m // the delivery the consumer now expects acked
		}
		q.mu.Unlock()
		return
	}
	if e := q.held[id]; e != nil {
		switch {
		case e.seq == seq:
			// Delivered again while held here (a heartbeat came
			// late, or LeaseID took it first): keep the newest
			// delivery; its ack is the one the consumer expects.
			e.msg = m
			q.mu.Unlock()
			return
		case e.seq < seq && !e.leased:
			// A newer version replaced the one waiting here.
			q.unholdLocked(e)
			q.ready = removeEntry(q.ready, e)
			old := e.msg
			defer func() {
				_ = old.Ack() // gone from the stream: spare the consumer a redelivery
				e.closeBody()
			}()
		default:
			// Leased here at another version: that delivery's
			// Update settles it (and fails if it is outdated).
			q.mu.Unlock()
			nakAfter(q.o.AckWait / 2)
			return
		}
	}
	if derr != nil {
		// Unreadable: leave it in the stream for an operator, and
		// don't spin on it.
		q.mu.Unlock()
		nakAfter(maxNakDelay)
		return
	}
	if until, ok := q.locked[id]; ok && now.Before(until) {
		q.mu.Unlock()
		nakAfter(min(until.Sub(now), time.Second))
		return
	}
	for _, u := range q.undos {
		if u.id == id {
			// A commit that failed here, stored after all: the undo
			// takes it out.
			q.mu.Unlock()
			nakAfter(time.Second)
			return
		}
	}
	dom := singleDomain(rec)
	if until, ok := q.holds[dom]; ok && dom != "" && until.After(now) {
		q.mu.Unlock()
		nakAfter(until.Sub(now))
		return
	}
	if wait := rec.NotBefore.Sub(now); wait > dueSlack {
		q.mu.Unlock()
		nakAfter(wait)
		return
	}
	if md.NumDelivered > 1 && now.Sub(rec.NotBefore) > q.o.AckWait {
		q.ctr.redeliveries.Add(1)
	}
	e := &entry{id: id, seq: seq, msg: m, rec: rec, body: body, dom: dom, heldAt: now}
	q.held[id] = e
	q.ready = append(q.ready, e)
	q.live[e] = struct{}{}
	q.mu.Unlock()
	q.signalWake()
}

func singleDomain(r *record) string {
	if d := r.domains(); len(d) == 1 {
		return d[0]
	}
	return ""
}

// unholdLocked forgets e as held and renewed (not its place in ready).
// Call with q.mu held.
func (q *Queue) unholdLocked(e *entry) {
	if q.held[e.id] == e {
		delete(q.held, e.id)
	}
	delete(q.live, e)
}

// forgetLocked forgets e entirely. Call with q.mu held.
func (q *Queue) forgetLocked(e *entry) {
	q.unholdLocked(e)
	q.ready = removeEntry(q.ready, e)
}

func removeEntry(list []*entry, e *entry) []*entry {
	for i, x := range list {
		if x == e {
			copy(list[i:], list[i+1:])
			list[len(list)-1] = nil
			return list[:len(list)-1]
		}
	}
	return list
}

// heartbeatLoop renews the leases of held messages and the locks of
// LeaseID, expires local marks, and retries requeued updates.
func (q *Queue) heartbeatLoop() {
	defer q.bg.Done()
	t := time.NewTicker(max(q.o.AckWait/3, 50*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-q.ctx.Done():
			return
		case <-t.C:
		}
		now := q.o.Now()
		var msgs []jetstream.Msg
		var locks, retries []*entry
		q.mu.Lock()
		for e := range q.live {
			if e.msg != nil {
				msgs = append(msgs, e.msg)
			}
			if e.lockRev != 0 {
				locks = append(locks, e)
			}
			if e.pending != nil && !e.retrying && !now.Before(e.retryAt) && q.held[e.id] == e {
				e.retrying = true
				retries = append(retries, e)
			}
		}
		// Ready messages this node's engine has not taken for a whole
		// AckWait (it is busy) go back to the consumer for another
		// node to take.
		var stale []jetstream.Msg
		keep := q.ready[:0]
		for _, e := range q.ready {
			if now.Sub(e.heldAt) > q.o.AckWait {
				q.unholdLocked(e)
				stale = append(stale, e.msg)
				continue
			}
			keep = append(keep, e)
		}
		clear(q.ready[len(keep):])
		q.ready = keep
		for id, until := range q.locked {
			if !now.Before(until) {
				delete(q.locked, id)
			}
		}
		for d, until := range q.holds {
			if !now.Before(until) {
				delete(q.holds, d)
			}
		}
		undos := len(q.undos) > 0 && !q.undoing
		if undos {
			q.undoing = true
		}
		q.mu.Unlock()
		for _, m := range stale {
			_ = m.Nak()
		}
		for _, m := range msgs {
			_ = m.InProgress()
		}
		if undos {
			q.bg.Add(1)
			go func() {
				defer q.bg.Done()
				q.runUndos()
				q.mu.Lock()
				q.undoing = false
				q.mu.Unlock()
			}()
		}
		for _, e := range locks {
			q.refreshLock(e)
		}
		for _, e := range retries {
			q.bg.Add(1)
			go func() {
				defer q.bg.Done()
				q.retryPending(e)
			}()
		}
	}
}

// Lease hands out up to n held messages due at now. A leased message is
// the caller's until Update, Release or Requeue: its lease is renewed
// meanwhile, so no other node gets it unless this one dies.
func (q *Queue) Lease(now time.Time, n int) []*queue.Message {
	type nak struct {
		e   *entry
		msg jetstream.Msg
		d   time.Duration
	}
	var out []*queue.Message
	var naks []nak
	wall := q.o.Now()
	q.mu.Lock()
	keep := q.ready[:0]
	for i, e := range q.ready {
		if len(out) >= n || q.closed {
			keep = append(keep, q.ready[i:]...)
			break
		}
		if until, ok := q.locked[e.id]; ok && wall.Before(until) {
			q.unholdLocked(e)
			naks = append(naks, nak{e, e.msg, time.Second})
			continue
		}
		if until, ok := q.holds[e.dom]; ok && e.dom != "" && until.After(wall) {
			q.unholdLocked(e)
			naks = append(naks, nak{e, e.msg, until.Sub(wall)})
			continue
		}
		if e.rec.NotBefore.After(now) {
			keep = append(keep, e)
			continue
		}
		e.leased = true
		out = append(out, e.rec.message())
	}
	clear(q.ready[len(keep):])
	q.ready = keep
	q.mu.Unlock()
	for _, k := range naks {
		_ = k.msg.NakWithDelay(min(max(k.d, 10*time.Millisecond), maxNakDelay))
		k.e.closeBody()
	}
	if len(out) > 0 || len(naks) > 0 {
		q.signalRoom()
	}
	return out
}

// NextDue returns the earliest due time of the messages held ready; none
// held, it says so, and Wake tells when some arrive.
func (q *Queue) NextDue() (time.Time, bool) {
	q.mu.Lock()
	defer q.mu.Unlock()
	var t time.Time
	for _, e := range q.ready {
		if t.IsZero() || e.rec.NotBefore.Before(t) {
			t = e.rec.NotBefore
		}
	}
	return t, !t.IsZero()
}

// Leased reports whether this node holds the lease of id (a delivery or
// an operator action in flight here).
func (q *Queue) Leased(id string) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	e := q.held[id]
	return e != nil && e.leased
}

// Update records m's recipient states and ends its lease: all final, the
// message leaves the queue (its stream message, then its body object);
// otherwise a new version is published (not-before = m.NextDue()) and
// the delivery acked. Both are compare-and-set against the version
// leased: a message deleted, retried or taken over meanwhile gives an
// error wrapping queue.ErrNotFound and is left as it is. A failed Update
// keeps the lease: Requeue retries it in the background, Release gives
// the message back.
func (q *Queue) Update(m *queue.Message) error {
	e, err := q.beginUpdate(m, false)
	if err != nil {
		return err
	}
	return q.finishUpdate(e, m)
}

// UpdateAsync is Update on another goroutine; then gets the outcome (it
// must not block for long). Close waits for it.
func (q *Queue) UpdateAsync(m *queue.Message, then func(error)) error {
	e, err := q.beginUpdate(m, true)
	if err != nil {
		return err
	}
	go func() {
		defer q.async.Done()
		err := q.finishUpdate(e, m)
		if then != nil {
			then(err)
		}
	}()
	return nil
}

// beginUpdate takes m's entry out of the held set for writing (its lease
// is still renewed). A message not leased here is updated at its
// current version. With async, q.async counts the update.
func (q *Queue) beginUpdate(m *queue.Message, async bool) (*entry, error) {
	q.mu.Lock()
	if q.closed && async {
		// Synchronous updates still work after Close began (the
		// engine's last ones); new async ones do not.
		q.mu.Unlock()
		return nil, queue.ErrClosed
	}
	if async {
		q.async.Add(1)
	}
	fail := func(err error) (*entry, error) {
		if async {
			q.async.Done()
		}
		return nil, err
	}
	e := q.held[m.ID]
	if e != nil && e.leased {
		if len(m.Rcpts) != len(e.rec.Rcpts) {
			q.mu.Unlock()
			return fail(fmt.Errorf("%s: recipient count changed", m.ID))
		}
		delete(q.held, m.ID)
		q.writing[m.ID] = e
		if e.pending == nil {
			e.pending = q.buildPending(e, m, e.retryNow)
		}
		q.mu.Unlock()
		return e, nil
	}
	q.mu.Unlock()
	// Not leased here (as queue.Store allows): write over the current
	// version, compare-and-set.
	ctx, cancel := q.opCtx()
	defer cancel()
	raw, err := q.getLast(ctx, m.ID)
	if err != nil {
		return fail(err)
	}
	rec, body, err := decode(raw.Header, raw.Data)
	if err != nil {
		return fail(err)
	}
	if len(m.Rcpts) != len(rec.Rcpts) {
		return fail(fmt.Errorf("%s: recipient count changed", m.ID))
	}
	e = &entry{id: m.ID, seq: raw.Sequence, rec: rec, body: body, dom: singleDomain(rec)}
	e.pending = q.buildPending(e, m, false)
	return e, nil
}

// buildPending makes the write that records m's states over e's version:
// a removal when all recipients are final, else a new version. Its dedup
// ID is fixed here, for every retry.
func (q *Queue) buildPending(e *entry, m *queue.Message, retryNow bool) *pending {
	rcpts := append([]queue.Recipient(nil), m.Rcpts...)
	if retryNow {
		now := q.o.Now()
		for i := range rcpts {
			if !rcpts[i].Status.Final() {
				rcpts[i].NextAttempt = now
			}
		}
	}
	if allFinal(rcpts) {
		return &pending{remove: true, expect: e.seq}
	}
	rec := *e.rec
	rec.Version++
	rec.Rcpts = rcpts
	rec.DelayNotified = m.DelayNotified
	rec.NotBefore = nextDue(rcpts)
	rec.Node = q.o.NodeName
	msg, err := rec.encode(q.subject(e.id), fmt.Sprintf("%s:%d:%s", e.id, rec.Version, nonce(4)), e.body)
	if err != nil {
		return &pending{err: err}
	}
	return &pending{msg: msg, expect: e.seq}
}

// write carries out e.pending.
func (q *Queue) write(ctx context.Context, e *entry) error {
	p := e.pending
	switch {
	case p.err != nil:
		return p.err
	case p.remove:
		return q.remove(ctx, e)
	}
	_, err := q.publish(ctx, p)
	if errors.Is(err, errConflict) {
		return fmt.Errorf("%s: %w (%v)", e.id, queue.ErrNotFound, errConflict)
	}
	return err
}

// remove deletes the version e holds, then its body object.
func (q *Queue) remove(ctx context.Context, e *entry) error {
	err := retry(ctx, 5*time.Second, func(ctx context.Context) error {
		return q.stream.DeleteMsg(ctx, e.seq)
	})
	if err == nil {
		_ = q.deleteBody(ctx, e.rec.Body) // else an orphan: SweepBodies
		return nil
	}
	if !isNotFound(err) {
		return err
	}
	// Not there: deleted by an earlier attempt of this very call, or
	// by an operator, or replaced by a newer version.
	raw, gerr := q.getLast(ctx, e.id)
	switch {
	case errors.Is(gerr, queue.ErrNotFound):
		_ = q.deleteBody(ctx, e.rec.Body)
		return nil
	case gerr != nil:
		return gerr
	}
	return fmt.Errorf("%s: %w (%v: now at sequence %d)", e.id, queue.ErrNotFound, errConflict, raw.Sequence)
}

// finishUpdate writes e.pending and settles the entry.
func (q *Queue) finishUpdate(e *entry, m *queue.Message) error {
	ctx, cancel := q.opCtx()
	defer cancel()
	err := q.write(ctx, e)
	return q.settle(e, err)
}

// settle ends e after a write: done (or gone), the delivery is acked and
// the entry forgotten; failed, the entry is held again, still leased,
// and the write is retried in the background (Requeue).
func (q *Queue) settle(e *entry, err error) error {
	q.mu.Lock()
	e.retrying = false
	if q.writing[e.id] == e {
		delete(q.writing, e.id)
	}
	if err != nil && !errors.Is(err, queue.ErrNotFound) {
		if cur := q.held[e.id]; cur == nil && e.leased {
			q.held[e.id] = e
			e.retryWait = min(max(2*e.retryWait, time.Second), 30*time.Second)
			e.retryAt = q.o.Now().Add(e.retryWait)
			q.mu.Unlock()
			return err
		} else if cur != e {
			// A newer version of the message came in meanwhile:
			// this one is outdated, its write moot.
			err = fmt.Errorf("%s: %w (%v)", e.id, queue.ErrNotFound, errConflict)
		}
	}
	delete(q.live, e)
	if q.held[e.id] == e {
		delete(q.held, e.id)
	}
	msg := e.msg
	q.mu.Unlock()
	if msg != nil {
		// The version held is gone or replaced; the ack just spares
		// the consumer a redelivery attempt.
		_ = msg.Ack()
	}
	if e.lockRev != 0 {
		q.unlockEntry(e)
	}
	e.closeBody()
	return err
}

// retryPending retries a requeued update.
func (q *Queue) retryPending(e *entry) {
	q.mu.Lock()
	if q.held[e.id] != e || e.pending == nil {
		e.retrying = false
		q.mu.Unlock()
		return
	}
	delete(q.held, e.id)
	q.writing[e.id] = e
	q.mu.Unlock()
	ctx, cancel := context.WithTimeout(q.ctx, q.o.OpTimeout)
	err := q.write(ctx, e)
	cancel()
	_ = q.settle(e, err)
}

// Requeue is for an Update that failed (NATS unreachable): the message
// stays leased here with m's states, its lease renewed, and the update
// is retried in the background (same dedup ID) until it lands or the
// message turns out to be gone. Releasing it instead would make it due
// at once with its old states, redelivering to recipients just done.
// If this node dies first, the message comes back with its old states.
func (q *Queue) Requeue(m *queue.Message) {
	q.mu.Lock()
	defer q.mu.Unlock()
	e := q.held[m.ID]
	if e == nil || !e.leased {
		return
	}
	if e.pending == nil {
		e.pending = q.buildPending(e, m, e.retryNow)
		e.retryWait = time.Second
		e.retryAt = q.o.Now().Add(e.retryWait)
	}
}

// Release gives a leased message back unchanged: it is redelivered at
// once (to any node).
func (q *Queue) Release(id string) {
	q.mu.Lock()
	e := q.held[id]
	if e == nil || !e.leased {
		q.mu.Unlock()
		return
	}
	q.unholdLocked(e)
	msg := e.msg
	q.mu.Unlock()
	if msg != nil {
		_ = msg.Nak()
	}
	if e.lockRev != 0 {
		q.unlockEntry(e)
	}
	e.closeBody()
}

// HoldDomain holds destination d back on this node until until (a zero
// or past until ends the hold). It is a local hint: the destination's
// messages held here, and those fetched later, are NakWithDelay'd until
// then, and other nodes decide for themselves. Messages with recipients
// in several domains are not held.
func (q *Queue) HoldDomain(d string, until time.Time) {
	now := q.o.Now()
	q.mu.Lock()
	if !until.After(now) {
		delete(q.holds, d)
		q.mu.Unlock()
		return
	}
	q.holds[d] = until
	var naks []*entry
	keep := q.ready[:0]
	for _, e := range q.ready {
		if e.dom == d {
			q.unholdLocked(e)
			naks = append(naks, e)
			continue
		}
		keep = append(keep, e)
	}
	clear(q.ready[len(keep):])
	q.ready = keep
	q.mu.Unlock()
	for _, e := range naks {
		_ = e.msg.NakWithDelay(min(until.Sub(now), maxNakDelay))
		e.closeBody()
	}
	if len(naks) > 0 {
		q.signalRoom()
	}
}

// Body returns a message's body, exactly as committed. For a message
// held here it reads the inline bytes, or a spool file the object-store
// body was downloaded to once (removed when the lease ends); for any
// other, the current version is read from the stream.
func (q *Queue) Body(id string) (*io.SectionReader, error) {
	q.mu.Lock()
	e := q.held[id]
	q.mu.Unlock()
	if e == nil {
		return q.loadBody(id)
	}
	if e.rec.Body == "" {
		return io.NewSectionReader(bytes.NewReader(e.body), 0, int64(len(e.body))), nil
	}
	e.bodyMu.Lock()
	defer e.bodyMu.Unlock()
	if e.bodyFile == nil {
		f, err := q.download(e.id, e.rec.Body, e.rec.Size)
		if err != nil {
			return nil, err
		}
		e.bodyFile = f
	}
	return io.NewSectionReader(e.bodyFile, 0, e.rec.Size), nil
}

func (q *Queue) loadBody(id string) (*io.SectionReader, error) {
	ctx, cancel := q.opCtx()
	defer cancel()
	raw, err := q.getLast(ctx, id)
	if err != nil {
		return nil, err
	}
	rec, body, err := decode(raw.Header, raw.Data)
	if err != nil {
		return nil, err
	}
	if rec.Body == "" {
		return io.NewSectionReader(bytes.NewReader(body), 0, int64(len(body))), nil
	}
	// The spool file is unlinked already; the reader keeps it open
	// until it is collected.
	f, err := q.download(id, rec.Body, rec.Size)
	if err != nil {
		return nil, err
	}
	return io.NewSectionReader(f, 0, rec.Size), nil
}

// download copies a body object into a new spool file.
func (q *Queue) download(id, name string, size int64) (*os.File, error) {
	f, err := q.TempFile()
	if err != nil {
		return nil, err
	}
	ctx, cancel := q.opCtx()
	defer cancel()
	err = retry(ctx, q.o.OpTimeout, func(ctx context.Context) error {
		if err := f.Truncate(0); err != nil {
			return err
		}
		if _, err := f.Seek(0, io.SeekStart); err != nil {
			return err
		}
		r, err := q.bodies.Get(ctx, name)
		if err != nil {
			return err
		}
		defer r.Close()
		n, err := io.Copy(f, r)
		if err != nil {
			return err
		}
		if n != size {
			return fmt.Errorf("jsqueue: body object %s holds %d bytes, want %d", name, n, size)
		}
		return nil
	})
	if err != nil {
		f.Close()
		if errors.Is(err, jetstream.ErrObjectNotFound) {
			return nil, fmt.Errorf("%s: body object %s: %w", id, name, queue.ErrNotFound)
		}
		return nil, fmt.Errorf("%s: body: %w", id, err)
	}
	return f, nil
}

func (e *entry) closeBody() {
	e.bodyMu.Lock()
	defer e.bodyMu.Unlock()
	if e.bodyFile != nil {
		e.bodyFile.Close()
		e.bodyFile = nil
	}
}
