// Package queue is stsrelay's durable message store. A message is on
// stable storage before the submission server answers 250: its envelope
// and body are appended to a segment log and fdatasync'd. Concurrent
// submissions share each fdatasync (group commit), so the disk's sync
// rate bounds batches, not messages. A body is written once; recipients'
// states change through small records appended later.
package queue

import (
	"container/heap"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/stsrelay/stsrelay/internal/atomicfile"
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
	// MaxDiskBytes is the queue's high-water mark on disk (0: none):
	// beyond it new messages are refused with ErrFull (queue.max_disk_bytes).
	MaxDiskBytes int64
	// MinFreeBytes is a floor on the free space of the queue's file
	// system (0: none); below it new messages are refused with ErrFull
	// (queue.min_free_disk_bytes).
	MinFreeBytes int64
	// CheckpointInterval is how often the index is written to disk for a
	// fast restart while it changes (default 5 minutes); it is always
	// written at Close.
	CheckpointInterval time.Duration
	// Now is the clock (tests); nil means time.Now.
	Now func() time.Time
	// ReadOnly opens the store for inspection only (the CLI while the
	// server runs): no lock, no writes.
	ReadOnly bool

	// testFault, when set, is asked before each write ("write") and sync
	// ("sync") of a batch; an error it returns fails that step (tests:
	// ENOSPC in the middle of a write).
	testFault func(op string) error
	// compactTick is how often compaction looks at the log (tests).
	compactTick time.Duration
}

// Store is the queue. It is safe for concurrent use.
type Store struct {
	opts     Options
	logDir   string
	spoolDir string
	lockFile *os.File

	mu sync.Mutex
	// The index (index.go): entries in an arena, found by ID.
	arena   arena
	ids     idTable
	doms    []*domEntry
	domIdx  map[string]uint32
	domHeap []*domEntry
	// overrides hold recipient states a failed Update could not write
	// (Requeue): they win over the disk until the next write succeeds.
	overrides map[string]*stateMeta

	segs   map[uint64]*segment
	order  []uint64 // segment seqs, ascending
	wake   chan struct{}
	closed bool
	// broken is set when a failed write could not be cut off the active
	// segment and no new segment could be made: nothing more is written
	// until a new segment can be started.
	broken bool

	reqs      chan *commitReq
	stop      chan struct{}
	exited    chan struct{} // closed when commitLoop has returned
	committer sync.WaitGroup
	active    *os.File
	activeSeg *segment
	spoolSeq  atomic.Uint64

	idgen idGen
	space spaceCheck

	// Counters for benchmarks and metrics.
	syncs       atomic.Uint64
	records     atomic.Uint64
	compactions atomic.Uint64
	copied      atomic.Uint64
	fullScan    bool // Open had to scan the whole log
}

// Open opens (creating if needed) the queue in opts.Dir and recovers its
// contents: every message whose 250 was sent is found again; records torn
// by a crash (never acknowledged) are dropped. The index comes from the
// checkpoint written at the last Close (or periodically) and the log
// written after it; without a usable checkpoint the whole log is read.
func Open(opts Options) (*Store, error) {
	if opts.SegmentBytes <= 0 {
		opts.SegmentBytes = 64 << 20
	}
	if opts.MaxDiskBytes > 0 {
		// The disk bound is twice the live data plus two segments, and
		// the active segment is never compacted: segments must be small
		// beside the high-water mark, or a full queue could not shrink
		// below it by deliveries alone.
		opts.SegmentBytes = min(opts.SegmentBytes, max(1<<20, opts.MaxDiskBytes/16))
	}
	if opts.MemBodyBytes <= 0 {
		opts.MemBodyBytes = 64 << 10
	}
	if opts.compactTick <= 0 {
		opts.compactTick = compactTick
	}
	if opts.CheckpointInterval <= 0 {
		opts.CheckpointInterval = 5 * time.Minute
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Schedule.MaxQueueTime <= 0 {
		opts.Schedule.MaxQueueTime = 120 * time.Hour
	}
	s := &Store{
		opts:      opts,
		logDir:    filepath.Join(opts.Dir, "log"),
		spoolDir:  filepath.Join(opts.Dir, "spool"),
		domIdx:    map[string]uint32{},
		overrides: map[string]*stateMeta{},
		segs:      map[uint64]*segment{},
		wake:      make(chan struct{}, 1),
		reqs:      make(chan *commitReq, 1024),
		stop:      make(chan struct{}),
		exited:    make(chan struct{}),
	}
	s.space.dir = opts.Dir
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
	if s.arena.used >= 100_000 {
		// Recovery's transient buffers (decoded records, the checkpoint
		// reader) are garbage now: hand the memory back to the system
		// rather than keep a start-up peak as the process's size.
		debug.FreeOSMemory()
	}
	if err := s.rotate(); err != nil {
		s.closeFiles()
		return nil, err
	}
	s.mu.Lock()
	s.collectSegments()
	s.mu.Unlock()
	s.committer.Add(2)
	go s.commitLoop()
	go s.compactLoop()
	return s, nil
}

type messageMeta struct {
	ID       string    `json:"id"`
	Received time.Time `json:"received"`
	Env      Envelope  `json:"env"`
	// A copy made by compaction carries the message's recipient states
	// as they were when it was copied; a newer state record or copy wins.
	Rcpts         []Recipient `json:"rcpts,omitempty"`
	DelayNotified bool        `json:"delay_notified,omitempty"`
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

// recover rebuilds the index: from the checkpoint and the log after it
// when the checkpoint is usable, else from the whole log.
func (s *Store) recover() error {
	seqs, err := listSegments(s.logDir)
	if err != nil {
		if os.IsNotExist(err) && s.opts.ReadOnly {
			return nil
		}
		return fmt.Errorf("queue: %w", err)
	}
	var segs []*segment
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
		if seq >= 1<<32 {
			f.Close()
			return fmt.Errorf("queue: segment number %d out of range", seq)
		}
		seg := &segment{seq: seq, path: path, f: f}
		s.segs[seq] = seg
		s.order = append(s.order, seq)
		segs = append(segs, seg)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if ok, err := s.loadCheckpoint(segs); err != nil {
		return err
	} else if ok {
		return nil
	}
	s.resetIndex()
	s.fullScan = true
	return s.replay(segs, 0)
}

// resetIndex empties the index (a checkpoint that turned out stale).
func (s *Store) resetIndex() {
	s.arena = arena{}
	s.ids = idTable{}
	s.doms = nil
	s.domIdx = map[string]uint32{}
	s.domHeap = nil
	for _, seg := range s.segs {
		seg.live, seg.liveBytes = 0, 0
	}
}

// replay applies the records of segs in log order, the first from offset
// from. Reading and decoding (CRC checks, JSON) runs in parallel, one
// segment per worker, a few segments ahead of the one being applied, so
// memory stays bounded whatever the log's size. Call with s.mu held.
func (s *Store) replay(segs []*segment, from int64) error {
	type scanned struct {
		seg  *segment
		recs []decoded
		size int64
		err  error
		done chan struct{}
	}
	work := make([]*scanned, len(segs))
	for i, seg := range segs {
		work[i] = &scanned{seg: seg, done: make(chan struct{})}
	}
	ahead := make(chan struct{}, max(2, runtime.GOMAXPROCS(0)))
	go func() {
		for i, sc := range work {
			ahead <- struct{}{}
			start := int64(0)
			if i == 0 {
				start = from
			}
			go func() {
				defer close(sc.done)
				sc.size, sc.err = scanSegmentFrom(sc.seg.f, start, func(r scanRecord) error {
					d, err := decodeRecord(r)
					if err != nil {
						return err
					}
					sc.recs = append(sc.recs, d)
					return nil
				})
			}()
		}
	}()
	var firstErr error
	for i, sc := range work {
		<-sc.done
		<-ahead
		if firstErr != nil {
			continue
		}
		sc.seg.size = sc.size
		for j := range sc.recs {
			s.apply(sc.seg, &sc.recs[j])
		}
		sc.recs = nil
		if errors.Is(sc.err, errTorn) {
			// The tail of the last segment may hold a batch whose fsync
			// never completed: nobody was told 250 for it. Cut it off so
			// that the file ends with whole records.
			if i == len(work)-1 && !s.opts.ReadOnly {
				if err := os.Truncate(sc.seg.path, sc.seg.size); err != nil {
					firstErr = fmt.Errorf("queue: truncate torn tail of %s: %w", sc.seg.path, err)
				}
			} else if fi, err := sc.seg.f.Stat(); err == nil {
				sc.seg.size = fi.Size() // garbage after a failed write still takes disk
			}
		} else if sc.err != nil {
			firstErr = fmt.Errorf("queue: %s: %w", sc.seg.path, sc.err)
		}
	}
	return firstErr
}

// decoded is what recovery needs of a log record.
type decoded struct {
	typ     recType
	id      string
	dom     string // recMessage
	next    time.Time
	delayed bool
	recOff  int64
	metaLen uint32
	bodyLen int64
}

func decodeRecord(r scanRecord) (decoded, error) {
	d := decoded{typ: r.typ, recOff: r.bodyOff - headerLen - int64(len(r.meta)), metaLen: uint32(len(r.meta)), bodyLen: r.bodyLen}
	switch r.typ {
	case recMessage:
		var mm messageMeta
		if err := json.Unmarshal(r.meta, &mm); err != nil {
			return d, fmt.Errorf("message record: %w", err)
		}
		d.id = mm.ID
		d.dom = msgDomain(mm.Env.Rcpts)
		d.next = mm.Received
		if mm.Rcpts != nil {
			d.next = nextDue(mm.Rcpts)
			d.delayed = mm.DelayNotified
		}
	case recState:
		var sm stateMeta
		if err := json.Unmarshal(r.meta, &sm); err != nil {
			return d, fmt.Errorf("state record: %w", err)
		}
		d.id = sm.ID
		d.next = nextDue(sm.Rcpts)
		d.delayed = sm.DelayNotified
	case recRemove:
		var rm removeMeta
		if err := json.Unmarshal(r.meta, &rm); err != nil {
			return d, fmt.Errorf("remove record: %w", err)
		}
		d.id = rm.ID
	}
	if !ValidID(d.id) {
		return d, fmt.Errorf("record with a bad queue ID %q", d.id)
	}
	return d, nil
}

// apply folds one decoded log record into the index. A message record
// for an ID already queued is a compaction copy: it replaces the older
// entry, so the newest state wins. Call with s.mu held.
func (s *Store) apply(seg *segment, d *decoded) {
	slot := s.ids.find(&s.arena, d.id)
	loc := recLoc{off: d.recOff, seg: uint32(seg.seq), metaLen: d.metaLen}
	switch d.typ {
	case recMessage:
		if slot != 0 {
			s.removeEntry(slot)
		}
		slot = s.insertEntry(d.id, d.dom, d.next, d.bodyLen, loc)
		if d.delayed {
			s.arena.at(slot).flags |= flagDelayed
		}
	case recState:
		if slot != 0 {
			s.setState(s.arena.at(slot), loc, d.next, d.delayed)
			s.schedule(slot)
		}
	case recRemove:
		if slot != 0 {
			s.removeEntry(slot)
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
	fail := func(err error) error {
		// Leave nothing behind: no file, no descriptor.
		w.Close()
		os.Remove(path)
		return err
	}
	r, err := os.Open(path)
	if err != nil {
		return fail(fmt.Errorf("queue: new segment: %w", err))
	}
	// The new file's directory entry must be durable before any record
	// in it is acknowledged.
	if err := atomicfile.SyncDir(s.logDir); err != nil {
		r.Close()
		return fail(fmt.Errorf("queue: sync %s: %w", s.logDir, err))
	}
	if s.active != nil {
		s.active.Close()
	}
	seg := &segment{seq: seq, path: path, f: r, created: s.opts.Now()}
	s.mu.Lock()
	s.segs[seq] = seg
	s.order = append(s.order, seq)
	s.broken = false
	s.active = w
	s.activeSeg = seg
	s.mu.Unlock()
	return nil
}

// collectSegments removes, oldest first, segments that hold no queued
// message, and empty segments anywhere. Removal of segments with records
// is strictly in order (with a directory sync after each) so that a
// remove or state record is never lost while the message record it
// applies to survives. Call with s.mu held.
func (s *Store) collectSegments() {
	if s.opts.ReadOnly {
		return
	}
	for len(s.order) > 0 {
		seg := s.segs[s.order[0]]
		if seg == s.activeSeg || seg.live > 0 {
			break
		}
		if !s.removeSegment(seg) {
			return
		}
		s.order = s.order[1:]
	}
	// A segment with no records at all (one made just before a failed
	// write) holds nothing anybody needs.
	for i := 0; i < len(s.order); i++ {
		seg := s.segs[s.order[i]]
		if seg != s.activeSeg && seg.size == 0 && seg.live == 0 {
			if !s.removeSegment(seg) {
				return
			}
			s.order = append(s.order[:i], s.order[i+1:]...)
			i--
		}
	}
}

func (s *Store) removeSegment(seg *segment) bool {
	seg.f.Close()
	if err := os.Remove(seg.path); err != nil && !os.IsNotExist(err) {
		return false
	}
	if err := atomicfile.SyncDir(s.logDir); err != nil {
		return false
	}
	delete(s.segs, seg.seq)
	return true
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

// Close stops the committer after the batches already handed to it,
// writes the index checkpoint and closes the files. Later calls fail
// with ErrClosed.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	s.mu.Unlock()
	var err error
	if !s.opts.ReadOnly {
		close(s.stop)
		s.committer.Wait()
		s.mu.Lock()
		snap := s.snapshotLocked()
		s.mu.Unlock()
		err = s.writeCheckpoint(snap)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closeFiles()
	return err
}

// Stats are counters since Open and the queue's size.
type Stats struct {
	// Syncs is the number of fdatasync calls made for records; Records
	// the number of records they made durable.
	Syncs, Records uint64
	// Messages is the number of queued messages, Segments of log files.
	Messages, Segments int
	// DiskBytes is the size of the log on disk; LiveBytes the part of it
	// queued messages still need (their message and newest state records).
	DiskBytes, LiveBytes int64
	// Compactions counts segments emptied by copying their messages
	// forward; Copied the messages copied.
	Compactions, Copied uint64
	// FullScan says Open read the whole log (no usable checkpoint).
	FullScan bool
}

// Stats returns the store's counters.
func (s *Store) Stats() Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Stats{Syncs: s.syncs.Load(), Records: s.records.Load(), Messages: s.arena.used, Segments: len(s.order),
		Compactions: s.compactions.Load(), Copied: s.copied.Load(), FullScan: s.fullScan}
	st.DiskBytes, st.LiveBytes = s.diskLocked()
	return st
}

// diskLocked sums the segments' sizes and live bytes. Call with s.mu held.
func (s *Store) diskLocked() (disk, live int64) {
	for _, seg := range s.segs {
		disk += seg.size
		live += seg.liveBytes
	}
	return disk, live
}

// Get returns a queued message, read from disk.
func (s *Store) Get(id string) (*Message, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	slot := s.ids.find(&s.arena, id)
	if slot == 0 {
		return nil, fmt.Errorf("%s: %w", id, ErrNotFound)
	}
	return s.loadLocked(slot)
}

// ListOptions select what List returns.
type ListOptions struct {
	// Domain keeps messages with a recipient in this domain (A-label);
	// "" keeps all.
	Domain string
	// Limit is the most messages returned, oldest first; 0 means all.
	Limit int
	// After keeps messages whose ID sorts after it (paging through a
	// large queue: the last ID of the previous page).
	After string
}

// smallest returns the k smallest of slots by less, unordered.
func smallest(slots []uint32, k int, less func(a, b uint32) bool) []uint32 {
	h := &slotHeap{less: less}
	for _, sl := range slots {
		if len(h.s) < k {
			heap.Push(h, sl)
		} else if less(sl, h.s[0]) {
			h.s[0] = sl
			heap.Fix(h, 0)
		}
	}
	return h.s
}

// slotHeap is a max-heap of slots by less.
type slotHeap struct {
	s    []uint32
	less func(a, b uint32) bool
}

func (h *slotHeap) Len() int           { return len(h.s) }
func (h *slotHeap) Less(i, j int) bool { return h.less(h.s[j], h.s[i]) }
func (h *slotHeap) Swap(i, j int)      { h.s[i], h.s[j] = h.s[j], h.s[i] }
func (h *slotHeap) Push(x any)         { h.s = append(h.s, x.(uint32)) }
func (h *slotHeap) Pop() any {
	x := h.s[len(h.s)-1]
	h.s = h.s[:len(h.s)-1]
	return x
}

// List returns all queued messages, oldest first.
func (s *Store) List() []*Message {
	out, _ := s.Select(ListOptions{})
	return out
}

// Select returns queued messages, oldest first, and how many matched in
// all (more than returned when Limit cut the list). Only the envelopes
// of the messages returned are read from disk.
func (s *Store) Select(o ListOptions) ([]*Message, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var slots []uint32
	total := 0
	want, known := s.domIdx[o.Domain]
	multi, hasMulti := s.domIdx[multiDomain]
	s.arena.each(func(slot uint32, e *entry) bool {
		if o.After != "" && string(e.id[:]) <= o.After {
			return true
		}
		if o.Domain == "" || known && e.dom == want || hasMulti && e.dom == multi {
			slots = append(slots, slot)
		}
		return true
	})
	less := func(a, b uint32) bool { return string(s.arena.at(a).id[:]) < string(s.arena.at(b).id[:]) }
	if o.Limit > 0 && o.Domain == "" && len(slots) > o.Limit {
		// The oldest Limit of a large queue: keep a bounded heap instead
		// of sorting a million IDs under the lock. Every message counts.
		total = len(slots)
		slots = smallest(slots, o.Limit, less)
	}
	counted := total > 0
	sort.Slice(slots, func(i, j int) bool { return less(slots[i], slots[j]) })
	n := len(slots)
	if o.Limit > 0 {
		n = min(n, o.Limit)
	}
	out := make([]*Message, 0, n)
	for _, slot := range slots {
		e := s.arena.at(slot)
		var m *Message
		if o.Domain != "" && hasMulti && e.dom == multi {
			// Recipients in several domains: read to see if one is it.
			var err error
			if m, err = s.loadLocked(slot); err != nil || !m.hasDomain(o.Domain) {
				continue
			}
		}
		if !counted {
			total++
		}
		if o.Limit > 0 && len(out) >= o.Limit {
			continue
		}
		if m == nil {
			var err error
			if m, err = s.loadLocked(slot); err != nil {
				continue
			}
		}
		out = append(out, m)
	}
	return out, total
}

// Len returns the number of queued messages.
func (s *Store) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.arena.used
}

// Oldest returns the receive time of the oldest queued message (to the
// millisecond, from its ID).
func (s *Store) Oldest() (time.Time, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var oldest [IDLen]byte
	found := false
	s.arena.each(func(_ uint32, e *entry) bool {
		if !found || string(e.id[:]) < string(oldest[:]) {
			oldest, found = e.id, true
		}
		return true
	})
	if !found {
		return time.Time{}, false
	}
	return IDTime(string(oldest[:])), true
}

// Body returns a reader of a message's body, exactly as committed.
func (s *Store) Body(id string) (*io.SectionReader, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	slot := s.ids.find(&s.arena, id)
	if slot == 0 {
		return nil, fmt.Errorf("%s: %w", id, ErrNotFound)
	}
	e := s.arena.at(slot)
	seg := s.segs[uint64(e.msg.seg)]
	if seg == nil {
		return nil, fmt.Errorf("%s: segment %d missing", id, e.msg.seg)
	}
	return io.NewSectionReader(seg.f, e.msg.off+headerLen+int64(e.msg.metaLen), e.bodyLen), nil
}

// Schedule returns the retry schedule the store was opened with.
func (s *Store) Schedule() Schedule { return s.opts.Schedule }

// readMeta reads the metadata of the record at loc.
func (s *Store) readMeta(loc recLoc, want recType) ([]byte, error) {
	seg := s.segs[uint64(loc.seg)]
	if seg == nil {
		return nil, fmt.Errorf("queue: segment %d missing", loc.seg)
	}
	buf := make([]byte, headerLen+int(loc.metaLen))
	if _, err := seg.f.ReadAt(buf, loc.off); err != nil {
		return nil, fmt.Errorf("queue: read %s at %d: %w", seg.path, loc.off, err)
	}
	if binary.LittleEndian.Uint32(buf) != recMagic || recType(buf[4]) != want ||
		binary.LittleEndian.Uint32(buf[5:]) != loc.metaLen {
		return nil, fmt.Errorf("queue: %s at %d: not the record the index expects", seg.path, loc.off)
	}
	return buf[headerLen:], nil
}

// loadLocked reads a message's envelope and recipients from disk. Call
// with s.mu held.
func (s *Store) loadLocked(slot uint32) (*Message, error) {
	e := s.arena.at(slot)
	raw, err := s.readMeta(e.msg, recMessage)
	if err != nil {
		return nil, err
	}
	var mm messageMeta
	if err := json.Unmarshal(raw, &mm); err != nil {
		return nil, fmt.Errorf("queue: message record of %s: %w", e.idString(), err)
	}
	m := &Message{ID: mm.ID, Env: mm.Env, Received: mm.Received, Size: e.bodyLen,
		loc: bodyLoc{seg: s.segs[uint64(e.msg.seg)], off: e.msg.off + headerLen + int64(e.msg.metaLen)}}
	if mm.ID != e.idString() {
		return nil, fmt.Errorf("queue: index points %s at the record of %s", e.idString(), mm.ID)
	}
	m.Rcpts = mm.Rcpts
	m.DelayNotified = mm.DelayNotified
	if e.state.valid() {
		raw, err := s.readMeta(e.state, recState)
		if err != nil {
			return nil, err
		}
		var sm stateMeta
		if err := json.Unmarshal(raw, &sm); err != nil {
			return nil, fmt.Errorf("queue: state record of %s: %w", m.ID, err)
		}
		m.Rcpts, m.DelayNotified = sm.Rcpts, sm.DelayNotified
	}
	if len(m.Rcpts) != len(m.Env.Rcpts) {
		m.Rcpts = make([]Recipient, len(m.Env.Rcpts))
		for i, rs := range m.Env.Rcpts {
			m.Rcpts[i] = Recipient{RcptSpec: rs, Status: Pending, NextAttempt: m.Received}
		}
	}
	if o := s.overrides[m.ID]; o != nil && len(o.Rcpts) == len(m.Rcpts) {
		m.Rcpts = append([]Recipient(nil), o.Rcpts...)
		m.DelayNotified = o.DelayNotified
	}
	return m, nil
}
