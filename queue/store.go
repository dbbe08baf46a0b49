// Package queue is stsrelay's durable message store. A message is on
// stable storage before the submission server answers 250: its envelope
// and body are appended to a segment log and fdatasync'd. Concurrent
// submissions share each fdatasync (group commit), so the disk's sync
// rate bounds batches, not messages. A body is written once; recipients'
// states change through small records appended later.
package queue

import (
	"container/heap"
	"encoding/json"
	"errors"
	"fmt"
	"github.com/stsrelay/stsrelay/internal/atomicfile"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// ErrNotFound is returned for an ID the queue does not hold.
var ErrNotFound = errors.New("no such message in the queue")

// ErrClosed is returned after Close.
var ErrClosed = errors.New("queue closed")

// ErrLocked is returned by Open when another process holds the queue.
var ErrLocked = errors.New("queue is in use by another process (is stsrelay serve running?)")

// Options configure a Store.
type Options struct {
	// Dir is the queue directory (data_dir/queue).
	Dir string
	// Schedule drives next-attempt times and expiry.
	Schedule Schedule
	// SegmentBytes is the size at which the log rolls to a new segment.
	SegmentBytes int64
	// MemBodyBytes is how much of a body is buffered in memory before it
	// spills to a spool file; larger bodies are streamed to disk.
	MemBodyBytes int
	// Now is the clock (tests); nil means time.Now.
	Now func() time.Time
	// ReadOnly opens the store for inspection only (the CLI while the
	// server runs): no lock, no writes.
	ReadOnly bool
}

// Store is the queue. It is safe for concurrent use.
type Store struct {
	opts     Options
	logDir   string
	spoolDir string
	lockFile *os.File

	mu     sync.Mutex
	msgs   map[string]*Message
	segs   map[uint64]*segment
	order  []uint64 // segment seqs, ascending
	due    dueHeap
	leased map[string]bool
	// retryNow marks leased messages an operator asked to retry: their
	// Update makes the non-final recipients due at once.
	retryNow map[string]bool
	wake     chan struct{}
	closed   bool

	reqs      chan *commitReq
	stop      chan struct{}
	exited    chan struct{} // closed when commitLoop has returned
	committer sync.WaitGroup
	active    *os.File
	activeSeg *segment
	spoolSeq  atomic.Uint64

	ids idGen

	// Counters for benchmarks and metrics.
	syncs   atomic.Uint64
	records atomic.Uint64
}

// Open opens (creating if needed) the queue in opts.Dir and recovers its
// contents: every message whose 250 was sent is found again; records torn
// by a crash (never acknowledged) are dropped.
func Open(opts Options) (*Store, error) {
	if opts.SegmentBytes <= 0 {
		opts.SegmentBytes = 64 << 20
	}
	if opts.MemBodyBytes <= 0 {
		opts.MemBodyBytes = 64 << 10
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Schedule.MaxQueueTime <= 0 {
		opts.Schedule.MaxQueueTime = 120 * time.Hour
	}
	s := &Store{
		opts:     opts,
		logDir:   filepath.Join(opts.Dir, "log"),
		spoolDir: filepath.Join(opts.Dir, "spool"),
		msgs:     map[string]*Message{},
		segs:     map[uint64]*segment{},
		leased:   map[string]bool{},
		retryNow: map[string]bool{},
		wake:     make(chan struct{}, 1),
		reqs:     make(chan *commitReq, 1024),
		stop:     make(chan struct{}),
		exited:   make(chan struct{}),
	}
	if opts.ReadOnly {
		if err := s.recover(); err != nil {
			return nil, err
		}
		return s, nil
	}
	for _, d := range []string{opts.Dir, s.logDir, s.spoolDir} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			return nil, fmt.Errorf("queue: %w", err)
		}
	}
	lf, err := os.OpenFile(filepath.Join(opts.Dir, "lock"), os.O_CREATE|os.O_RDWR, 0o640)
	if err != nil {
		return nil, fmt.Errorf("queue: %w", err)
	}
	if err := unix.Flock(int(lf.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lf.Close()
		return nil, fmt.Errorf("queue %s: %w", opts.Dir, ErrLocked)
	}
	s.lockFile = lf
	// Spool files belong to transactions that never committed.
	if ents, err := os.ReadDir(s.spoolDir); err == nil {
		for _, e := range ents {
			os.Remove(filepath.Join(s.spoolDir, e.Name()))
		}
	}
	if err := s.recover(); err != nil {
		s.closeFiles()
		return nil, err
	}
	if err := s.rotate(); err != nil {
		s.closeFiles()
		return nil, err
	}
	s.mu.Lock()
	s.collectSegments()
	s.mu.Unlock()
	s.committer.Add(1)
	go s.commitLoop()
	return s, nil
}

type messageMeta struct {
	ID       string    `json:"id"`
	Received time.Time `json:"received"`
	Env      Envelope  `json:"env"`
}

type stateMeta struct {
	ID            string      `json:"id"`
	Rcpts         []Recipient `json:"rcpts"`
	DelayNotified bool        `json:"delay_notified,omitempty"`
}

type removeMeta struct {
	ID string `json:"id"`
}

type bodyLoc struct {
	seg *segment
	off int64
}

// recover rebuilds the index from the segments. Reading and decoding the
// segments (CRC checks, JSON) runs in parallel, one segment per worker;
// folding the records into the index then goes in log order.
func (s *Store) recover() error {
	seqs, err := listSegments(s.logDir)
	if err != nil {
		if os.IsNotExist(err) && s.opts.ReadOnly {
			return nil
		}
		return fmt.Errorf("queue: %w", err)
	}
	type scanned struct {
		seg  *segment
		recs []decoded
		err  error
	}
	var segs []*scanned
	for _, seq := range seqs {
		path := segPath(s.logDir, seq)
		f, err := os.Open(path)
		if err != nil {
			if os.IsNotExist(err) && s.opts.ReadOnly {
				// Removed by the running relay since the listing:
				// segments go oldest first and only when nothing in
				// them is queued, so skipping it loses nothing.
				continue
			}
			return fmt.Errorf("queue: %w", err)
		}
		seg := &segment{seq: seq, path: path, f: f}
		s.segs[seq] = seg
		s.order = append(s.order, seq)
		segs = append(segs, &scanned{seg: seg})
	}
	work := make(chan *scanned)
	var wg sync.WaitGroup
	for range min(runtime.GOMAXPROCS(0), len(segs)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for sc := range work {
				sc.seg.size, sc.err = scanSegment(sc.seg.f, func(r scanRecord) error {
					d, err := decodeRecord(r)
					if err != nil {
						return err
					}
					sc.recs = append(sc.recs, d)
					return nil
				})
			}
		}()
	}
	for _, sc := range segs {
		work <- sc
	}
	close(work)
	wg.Wait()
	for i, sc := range segs {
		for j := range sc.recs {
			s.apply(sc.seg, &sc.recs[j])
		}
		sc.recs = nil
		if errors.Is(sc.err, errTorn) {
			// The tail of the last segment may hold a batch whose fsync
			// never completed: nobody was told 250 for it. Cut it off so
			// that the file ends with whole records.
			if i == len(segs)-1 && !s.opts.ReadOnly {
				if err := os.Truncate(sc.seg.path, sc.seg.size); err != nil {
					return fmt.Errorf("queue: truncate torn tail of %s: %w", sc.seg.path, err)
				}
			}
		} else if sc.err != nil {
			return fmt.Errorf("queue: %s: %w", sc.seg.path, sc.err)
		}
	}
	s.due = make(dueHeap, 0, len(s.msgs))
	for id, m := range s.msgs {
		s.due = append(s.due, dueEntry{id: id, at: m.NextDue()})
	}
	heap.Init(&s.due)
	return nil
}

// decoded is a log record with its metadata parsed.
type decoded struct {
	typ     recType
	msg     *messageMeta
	state   *stateMeta
	remove  string
	bodyOff int64
	bodyLen int64
}

func decodeRecord(r scanRecord) (decoded, error) {
	d := decoded{typ: r.typ, bodyOff: r.bodyOff, bodyLen: r.bodyLen}
	switch r.typ {
	case recMessage:
		d.msg = new(messageMeta)
		if err := json.Unmarshal(r.meta, d.msg); err != nil {
			return d, fmt.Errorf("message record: %w", err)
		}
	case recState:
		d.state = new(stateMeta)
		if err := json.Unmarshal(r.meta, d.state); err != nil {
			return d, fmt.Errorf("state record: %w", err)
		}
	case recRemove:
		var rm removeMeta
		if err := json.Unmarshal(r.meta, &rm); err != nil {
			return d, fmt.Errorf("remove record: %w", err)
		}
		d.remove = rm.ID
	}
	return d, nil
}

// apply folds one decoded log record into the index.
func (s *Store) apply(seg *segment, d *decoded) {
	switch d.typ {
	case recMessage:
		mm := d.msg
		m := &Message{ID: mm.ID, Env: mm.Env, Received: mm.Received, Size: d.bodyLen,
			loc: bodyLoc{seg: seg, off: d.bodyOff}}
		m.Rcpts = make([]Recipient, len(mm.Env.Rcpts))
		for i, rs := range mm.Env.Rcpts {
			m.Rcpts[i] = Recipient{RcptSpec: rs, Status: Pending, NextAttempt: mm.Received}
		}
		if old, ok := s.msgs[m.ID]; ok {
			old.loc.seg.live--
		}
		s.msgs[m.ID] = m
		seg.live++
	case recState:
		sm := d.state
		if m, ok := s.msgs[sm.ID]; ok && len(sm.Rcpts) == len(m.Rcpts) {
			m.Rcpts = sm.Rcpts
			m.DelayNotified = sm.DelayNotified
		}
	case recRemove:
		if m, ok := s.msgs[d.remove]; ok {
			m.loc.seg.live--
			delete(s.msgs, d.remove)
		}
	}
}

// rotate starts a new active segment (after the newest one).
func (s *Store) rotate() error {
	var seq uint64 = 1
	if n := len(s.order); n > 0 {
		seq = s.order[n-1] + 1
	}
	path := segPath(s.logDir, seq)
	w, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return fmt.Errorf("queue: new segment: %w", err)
	}
	r, err := os.Open(path)
	if err != nil {
		w.Close()
		return fmt.Errorf("queue: new segment: %w", err)
	}
	// The new file's directory entry must be durable before any record
	// in it is acknowledged.
	if err := atomicfile.SyncDir(s.logDir); err != nil {
		w.Close()
		r.Close()
		return fmt.Errorf("queue: sync %s: %w", s.logDir, err)
	}
	if s.active != nil {
		s.active.Close()
	}
	seg := &segment{seq: seq, path: path, f: r}
	s.mu.Lock()
	s.segs[seq] = seg
	s.order = append(s.order, seq)
	s.mu.Unlock()
	s.active = w
	s.activeSeg = seg
	return nil
}

// collectSegments removes, oldest first, segments that hold no queued
// message. Removal is strictly in order (with a directory sync after
// each) so that a remove record is never lost while the message record it
// cancels survives. Call with s.mu held.
func (s *Store) collectSegments() {
	for len(s.order) > 0 {
		seg := s.segs[s.order[0]]
		if seg == s.activeSeg || seg.live > 0 || s.opts.ReadOnly {
			return
		}
		seg.f.Close()
		if err := os.Remove(seg.path); err != nil && !os.IsNotExist(err) {
			return
		}
		if err := atomicfile.SyncDir(s.logDir); err != nil {
			return
		}
		delete(s.segs, seg.seq)
		s.order = s.order[1:]
	}
}

func (s *Store) closeFiles() {
	for _, seg := range s.segs {
		seg.f.Close()
	}
	if s.active != nil {
		s.active.Close()
	}
	if s.lockFile != nil {
		s.lockFile.Close()
	}
}

// Close stops the committer after the batches already handed to it and
// closes the files. Later calls fail with ErrClosed.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	if !s.opts.ReadOnly {
		close(s.stop)
		s.committer.Wait()
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closeFiles()
	return nil
}

// Stats are counters since Open.
type Stats struct {
	// Syncs is the number of fdatasync calls made for records; Records
	// the number of records they made durable.
	Syncs, Records uint64
	// Messages is the number of queued messages, Segments of log files.
	Messages, Segments int
}

// Stats returns the store's counters.
func (s *Store) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return Stats{Syncs: s.syncs.Load(), Records: s.records.Load(), Messages: len(s.msgs), Segments: len(s.order)}
}

// Get returns a copy of a queued message.
func (s *Store) Get(id string) (*Message, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, ok := s.msgs[id]
	if !ok {
		return nil, fmt.Errorf("%s: %w", id, ErrNotFound)
	}
	return m.clone(), nil
}

// List returns copies of all queued messages, oldest first.
func (s *Store) List() []*Message {
	s.mu.Lock()
	out := make([]*Message, 0, len(s.msgs))
	for _, m := range s.msgs {
		out = append(out, m.clone())
	}
	s.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// Len returns the number of queued messages.
func (s *Store) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.msgs)
}

// Oldest returns the receive time of the oldest queued message.
func (s *Store) Oldest() (time.Time, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var t time.Time
	for _, m := range s.msgs {
		if t.IsZero() || m.Received.Before(t) {
			t = m.Received
		}
	}
	return t, !t.IsZero()
}

// Body returns a reader of a message's body, exactly as committed.
func (s *Store) Body(id string) (*io.SectionReader, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	m, ok := s.msgs[id]
	if !ok {
		return nil, fmt.Errorf("%s: %w", id, ErrNotFound)
	}
	return io.NewSectionReader(m.loc.seg.f, m.loc.off, m.Size), nil
}

// Schedule returns the retry schedule the store was opened with.
func (s *Store) Schedule() Schedule { return s.opts.Schedule }
