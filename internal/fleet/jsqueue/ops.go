package jsqueue

import (
	"container/heap"
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stsrelay/stsrelay/queue"
)

// scan calls fn with the headers of every queued message, in stream
// order, reading headers only (an ordered consumer with HeadersOnly), so
// that memory stays bounded whatever the queue's size. Messages
// published during the scan may or may not be seen.
// scan calls fn for the headers of every queued message. A pass that
// fails (a fetch timing out while the cluster is busy or electing a
// leader) is started again, up to three passes, so that callers never see
// a partial queue; fn runs only once the whole pass has succeeded.
func (q *Queue) scan(ctx context.Context, fn func(hi hdrInfo)) error {
	var err error
	for range 3 {
		var his []hdrInfo
		if err = q.scanOnce(ctx, func(hi hdrInfo) { his = append(his, hi) }); err == nil {
			for _, hi := range his {
				fn(hi)
			}
			return nil
		}
		if ctx.Err() != nil {
			break
		}
	}
	return err
}

func (q *Queue) scanOnce(ctx context.Context, fn func(hi hdrInfo)) error {
	info, err := q.stream.Info(ctx)
	if err != nil {
		return err
	}
	if info.State.Msgs == 0 {
		return nil
	}
	last := info.State.LastSeq
	cons, err := q.stream.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{
		FilterSubjects:    []string{q.n.subjects},
		HeadersOnly:       true,
		InactiveThreshold: 30 * time.Second,
	})
	if err != nil {
		return err
	}
	// Ask for as many as the stream holds (then as many as are still
	// pending), so that a fetch ends when they came, not at its expiry.
	want := int(min(info.State.Msgs, 1024))
	for {
		wait := min(2*time.Second, time.Until(deadlineOf(ctx)))
		if wait <= 0 {
			return context.DeadlineExceeded
		}
		batch, err := cons.Fetch(max(want, 1), jetstream.FetchMaxWait(wait))
		if err != nil {
			return err
		}
		n := 0
		for m := range batch.Messages() {
			n++
			md, err := m.Metadata()
			if err != nil {
				continue
			}
			fn(parseHeaders(q.n.subj, m.Subject(), md.Sequence.Stream, m.Headers()))
			if md.NumPending == 0 || md.Sequence.Stream >= last {
				// The rest of this fetch, if any, expires by itself.
				return nil
			}
			want = int(min(md.NumPending, 1024))
		}
		if err := batch.Error(); err != nil && !errors.Is(err, jetstream.ErrNoMessages) && !errors.Is(err, context.DeadlineExceeded) {
			return err
		}
		if n == 0 {
			return nil
		}
	}
}

func deadlineOf(ctx context.Context) time.Time {
	if d, ok := ctx.Deadline(); ok {
		return d
	}
	return time.Now().Add(time.Hour)
}

// domainsOf returns a message's recipient domains: from its headers, or
// from its metadata when they did not fit there.
func (q *Queue) domainsOf(ctx context.Context, hi *hdrInfo) []string {
	if !hi.all {
		return hi.domains
	}
	if rec, err := q.getRecord(ctx, hi.id); err == nil {
		return rec.domains()
	}
	return []string{"(unreadable)"}
}

func (q *Queue) getRecord(ctx context.Context, id string) (*record, error) {
	raw, err := q.getLast(ctx, id)
	if err != nil {
		return nil, err
	}
	rec, _, err := decode(raw.Header, raw.Data)
	return rec, err
}

// Get returns the current version of a queued message (fleet-wide).
func (q *Queue) Get(id string) (*queue.Message, error) {
	if !queue.ValidID(id) {
		return nil, fmt.Errorf("%s: %w", id, queue.ErrNotFound)
	}
	ctx, cancel := q.opCtx()
	defer cancel()
	rec, err := q.getRecord(ctx, id)
	if err != nil {
		return nil, err
	}
	return rec.message(), nil
}

// List returns all queued messages, oldest first.
func (q *Queue) List() []*queue.Message {
	out, _ := q.Select(queue.ListOptions{})
	return out
}

// idHeap is a max-heap of IDs: the Limit oldest seen so far.
type idHeap []string

func (h idHeap) Len() int           { return len(h) }
func (h idHeap) Less(i, j int) bool { return h[i] > h[j] }
func (h idHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i] }
func (h *idHeap) Push(x any)        { *h = append(*h, x.(string)) }
func (h *idHeap) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// Select returns queued messages (fleet-wide), oldest first, and how
// many matched in all. The headers pass keeps only the Limit oldest IDs;
// the messages returned are then read in full.
func (q *Queue) Select(o queue.ListOptions) ([]*queue.Message, int) {
	ctx, cancel := q.opCtx()
	defer cancel()
	var ids idHeap
	total := 0
	_ = q.scan(ctx, func(hi hdrInfo) {
		if o.After != "" && hi.id <= o.After {
			return
		}
		if o.Domain != "" && !contains(q.domainsOf(ctx, &hi), o.Domain) {
			return
		}
		total++
		if o.Limit > 0 && len(ids) >= o.Limit {
			if hi.id >= ids[0] {
				return
			}
			heap.Pop(&ids)
		}
		heap.Push(&ids, hi.id)
	})
	sort.Strings(ids)
	out := make([]*queue.Message, 0, len(ids))
	for _, id := range ids {
		if rec, err := q.getRecord(ctx, id); err == nil {
			out = append(out, rec.message())
		}
	}
	return out, total
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func ageBucket(age time.Duration) int {
	for i, b := range queue.AgeBuckets {
		if age < b {
			return i
		}
	}
	return len(queue.AgeBuckets)
}

// Summary counts the queued messages (fleet-wide) by recipient domain
// and age, from headers alone. HeldUntil shows this node's holds.
func (q *Queue) Summary(now time.Time) queue.Summary {
	ctx, cancel := q.opCtx()
	defer cancel()
	sum := queue.Summary{Ages: make([]int, len(queue.AgeBuckets)+1)}
	per := map[string]*queue.DomainSummary{}
	_ = q.scan(ctx, func(hi hdrInfo) {
		b := ageBucket(now.Sub(queue.IDTime(hi.id)))
		sum.Total++
		sum.Ages[b]++
		for _, d := range q.domainsOf(ctx, &hi) {
			ds := per[d]
			if ds == nil {
				ds = &queue.DomainSummary{Domain: d, Ages: make([]int, len(queue.AgeBuckets)+1)}
				per[d] = ds
			}
			ds.Total++
			ds.Ages[b]++
		}
	})
	q.mu.Lock()
	for _, ds := range per {
		if h, ok := q.holds[ds.Domain]; ok && h.After(now) {
			ds.HeldUntil = h.UTC()
		}
		sum.Domains = append(sum.Domains, *ds)
	}
	q.mu.Unlock()
	sort.Slice(sum.Domains, func(i, j int) bool {
		a, b := sum.Domains[i], sum.Domains[j]
		if a.Total != b.Total {
			return a.Total > b.Total
		}
		return a.Domain < b.Domain
	})
	return sum
}

// Len returns the number of queued messages (the stream's count).
func (q *Queue) Len() int {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	info, err := q.stream.Info(ctx)
	if err != nil {
		return int(q.lastLen.Load()) // NATS away: the last count known
	}
	q.lastLen.Store(int64(info.State.Msgs))
	return int(info.State.Msgs)
}

// Stats reports the number of queued messages; the disk counters of
// queue.Store have no meaning here and stay zero.
func (q *Queue) Stats() queue.Stats { return queue.Stats{Messages: q.Len()} }

// oldestTTL: Oldest scans every header; metrics ask often, so the answer
// is reused for this long.
const oldestTTL = 10 * time.Second

// Oldest returns the receive time of the oldest queued message (to the
// millisecond, from its ID), fleet-wide.
func (q *Queue) Oldest() (time.Time, bool) {
	q.oldMu.Lock()
	defer q.oldMu.Unlock()
	if !q.oldAt.IsZero() && time.Since(q.oldAt) < oldestTTL {
		return q.oldest, q.oldOK
	}
	ctx, cancel := q.opCtx()
	defer cancel()
	min := ""
	if err := q.scan(ctx, func(hi hdrInfo) {
		if min == "" || hi.id < min {
			min = hi.id
		}
	}); err != nil {
		return q.oldest, q.oldOK
	}
	q.oldAt = time.Now()
	q.oldOK = min != ""
	q.oldest = time.Time{}
	if q.oldOK {
		q.oldest = queue.IDTime(min)
	}
	return q.oldest, q.oldOK
}

// Delete removes a message whatever its state (operator action): its
// subject is purged, then its body object deleted. A delivery in flight
// for it finishes but its Update fails (compare-and-set): nothing is
// resurrected.
func (q *Queue) Delete(id string) error {
	if !queue.ValidID(id) {
		return fmt.Errorf("%s: %w", id, queue.ErrNotFound)
	}
	ctx, cancel := q.opCtx()
	defer cancel()
	raw, err := q.getLast(ctx, id)
	if err != nil {
		return err
	}
	rec, _, derr := decode(raw.Header, raw.Data)
	if err := retry(ctx, 5*time.Second, func(ctx context.Context) error {
		return q.stream.Purge(ctx, jetstream.WithPurgeSubject(q.subject(id)))
	}); err != nil {
		return err
	}
	if derr == nil {
		if err := q.deleteBody(ctx, rec.Body); err != nil {
			return fmt.Errorf("%s: deleted, but not its body object %s: %w", id, rec.Body, err)
		}
	}
	q.mu.Lock()
	e := q.held[id]
	var msg jetstream.Msg
	if e != nil && !e.leased {
		q.forgetLocked(e)
		msg = e.msg
	}
	q.mu.Unlock()
	if msg != nil {
		_ = msg.Ack()
		e.closeBody()
	}
	return nil
}

// Retry makes every recipient of id that is not final due now, by
// publishing a new version (compare-and-set) under the message's lock.
// A message leased here becomes due at its Update, as with queue.Store;
// a message already due is left alone (it is being delivered, or about
// to be).
func (q *Queue) Retry(id string) error {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return queue.ErrClosed
	}
	if e := q.held[id]; e != nil {
		if e.leased {
			e.retryNow = true
		}
		q.mu.Unlock()
		return nil
	}
	q.mu.Unlock()
	if !queue.ValidID(id) {
		return fmt.Errorf("%s: %w", id, queue.ErrNotFound)
	}
	ctx, cancel := q.opCtx()
	defer cancel()
	rev, _, err := q.lock(ctx, id)
	if err != nil {
		return err
	}
	defer q.unlock(id, rev, false)
	return q.retryNow(ctx, id)
}

// retryNow publishes id's current version again with every recipient not
// final due now, unless it is due already.
func (q *Queue) retryNow(ctx context.Context, id string) error {
	for attempt := 0; ; attempt++ {
		raw, err := q.getLast(ctx, id)
		if err != nil {
			return err
		}
		rec, body, err := decode(raw.Header, raw.Data)
		if err != nil {
			return err
		}
		now := q.o.Now()
		if !rec.NotBefore.After(now) {
			return nil
		}
		rec.Version++
		for i := range rec.Rcpts {
			if !rec.Rcpts[i].Status.Final() {
				rec.Rcpts[i].NextAttempt = now
			}
		}
		rec.NotBefore = nextDue(rec.Rcpts)
		rec.Node = q.o.NodeName
		m, err := rec.encode(q.subject(id), fmt.Sprintf("%s:%d:%s", id, rec.Version, nonce(4)), body)
		if err != nil {
			return err
		}
		_, err = q.publish(ctx, &pending{msg: m, expect: raw.Sequence})
		if errors.Is(err, errConflict) && attempt < 3 {
			continue // changed under us: look again
		}
		if errors.Is(err, errConflict) {
			return fmt.Errorf("%s: %w", id, queue.ErrLeased)
		}
		return err
	}
}

// RetryDomain makes every message of destination d due now (fleet-wide)
// and ends its holds: messages not due yet get a new version, due now;
// messages leased on some node become due at their Update. Like
// queue.Store it counts, and releases, only messages whose recipients
// are all in d. It takes no per-message lock (a million messages would
// take a million lock round trips): a message that an operator bounces
// at the same moment may see the bounce's update refused.
func (q *Queue) RetryDomain(d string) int {
	q.retryDomainLocal(d)
	q.notify(ctlMsg{Op: "retry-domain", Domain: d})
	ctx, cancel := context.WithTimeout(context.Background(), 10*q.o.OpTimeout)
	defer cancel()
	now := q.o.Now()
	n := 0
	var todo []string
	_ = q.scan(ctx, func(hi hdrInfo) {
		if hi.singleDomain() != d {
			return
		}
		n++
		if hi.notBefore.After(now) {
			todo = append(todo, hi.id)
		}
	})
	work := make(chan string)
	var wg sync.WaitGroup
	for range min(4, len(todo)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for id := range work {
				_ = q.retryNow(ctx, id)
			}
		}()
	}
	for _, id := range todo {
		work <- id
	}
	close(work)
	wg.Wait()
	return n
}

// LeaseID takes the lease of one message whatever its due time, for an
// operator action (bounce) that must not race a delivery; give it back
// with Update or Release. A consumer cannot hand out a chosen message,
// so LeaseID takes the message's KV lock, tells the other nodes (who
// stop handing it out and say whether a delivery of it is in flight:
// then ErrLeased), and reads the current version. The lock is renewed
// until Update or Release; the Update is compare-and-set like any other.
func (q *Queue) LeaseID(id string) (*queue.Message, error) {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return nil, queue.ErrClosed
	}
	if e := q.held[id]; e != nil || q.writing[id] != nil {
		if e == nil || e.leased {
			q.mu.Unlock()
			return nil, fmt.Errorf("%s: %w", id, queue.ErrLeased)
		}
		// Fetched here and waiting: this node holds its delivery.
		q.ready = removeEntry(q.ready, e)
		e.leased = true
		q.mu.Unlock()
		q.signalRoom()
		return e.rec.message(), nil
	}
	q.mu.Unlock()
	if !queue.ValidID(id) {
		return nil, fmt.Errorf("%s: %w", id, queue.ErrNotFound)
	}
	ctx, cancel := q.opCtx()
	defer cancel()
	rev, val, err := q.lock(ctx, id)
	if err != nil {
		return nil, err
	}
	busy, err := q.ask(ctlMsg{Op: "lock", ID: id})
	if err == nil && busy {
		err = fmt.Errorf("%s: %w", id, queue.ErrLeased)
	}
	var raw *jetstream.RawStreamMsg
	if err == nil {
		raw, err = q.getLast(ctx, id)
	}
	var rec *record
	var body []byte
	if err == nil {
		rec, body, err = decode(raw.Header, raw.Data)
	}
	if err != nil {
		q.unlock(id, rev, true)
		return nil, err
	}
	e := &entry{id: id, seq: raw.Sequence, rec: rec, body: body, dom: singleDomain(rec),
		leased: true, lockRev: rev, lockVal: val}
	q.mu.Lock()
	if q.closed || q.held[id] != nil || q.writing[id] != nil {
		q.mu.Unlock()
		q.unlock(id, rev, true)
		return nil, fmt.Errorf("%s: %w", id, queue.ErrLeased)
	}
	q.held[id] = e
	q.live[e] = struct{}{}
	q.mu.Unlock()
	return rec.message(), nil
}

// SweepBodies deletes body objects that no queued message refers to and
// that are older than minAge: left by a node that died between storing
// a body and committing its message (never acknowledged), or between
// deleting a message and its body. minAge must exceed the longest
// commit (OpTimeout) so that a body on its way in is not taken.
func (q *Queue) SweepBodies(ctx context.Context, minAge time.Duration) (int, error) {
	infos, err := q.bodies.List(ctx)
	if errors.Is(err, jetstream.ErrNoObjectsFound) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	n := 0
	for _, info := range infos {
		if info.Deleted || time.Since(info.ModTime) < minAge || len(info.Name) < queue.IDLen {
			continue
		}
		id := info.Name[:queue.IDLen]
		rec, err := q.getRecord(ctx, id)
		if err == nil && rec.Body == info.Name {
			continue
		}
		if err != nil && !errors.Is(err, queue.ErrNotFound) {
			continue
		}
		if q.deleteBody(ctx, info.Name) == nil {
			n++
		}
	}
	return n, nil
}
