package queue

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/stsrelay/stsrelay/internal/message"
)

// pendingRecord is one record waiting for the committer.
type pendingRecord struct {
	typ  recType
	meta []byte
	body []byte   // small bodies
	file *os.File // spilled bodies
	// src is a body copied from an older segment (compaction).
	src  *io.SectionReader
	size int64
	crc  uint32
	// Set by the committer: where the record (recOff) and its body (off)
	// landed.
	seg    *segment
	recOff int64
	off    int64
}

type commitReq struct {
	recs  []*pendingRecord
	apply func(recs []*pendingRecord) // run under s.mu after the sync
	done  chan error
	// then, when set, receives the outcome instead of done (UpdateAsync);
	// it runs on the committer goroutine and must not block.
	then func(error)
}

func (req *commitReq) finish(err error) {
	if req.then != nil {
		req.then(err)
		return
	}
	req.done <- err
}

// submitAsync hands req to the committer without waiting; req.then gets
// the outcome.
func (s *Store) submitAsync(req *commitReq) error {
	if !s.writable() {
		return ErrClosed
	}
	select {
	case s.reqs <- req:
		return nil
	case <-s.stop:
		return ErrClosed
	}
}

// writable reports whether the store takes new records.
func (s *Store) writable() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return !s.closed && !s.opts.ReadOnly
}

// maxBatchBytes bounds how much one group commit writes before it syncs.
const maxBatchBytes = 32 << 20

func (s *Store) submit(req *commitReq) error {
	if !s.writable() {
		return ErrClosed
	}
	req.done = make(chan error, 1)
	select {
	case s.reqs <- req:
	case <-s.stop:
		return ErrClosed
	}
	select {
	case err := <-req.done:
		return err
	case <-s.exited:
		// A request sent after the committer's last drain (Close raced
		// this call) is never written: it gets no answer otherwise.
		select {
		case err := <-req.done:
			return err
		default:
			return ErrClosed
		}
	}
}

// commitLoop is the group committer: it takes every request waiting,
// appends their records, makes them durable with one fdatasync and only
// then lets their callers answer 250.
func (s *Store) commitLoop() {
	defer s.committer.Done()
	defer close(s.exited)
	bw := bufio.NewWriterSize(s.active, 256<<10)
	var batch []*commitReq
	lastBatch := 0
	for {
		batch = batch[:0]
		select {
		case req := <-s.reqs:
			batch = append(batch, req)
		case <-s.stop:
			// Finish what was handed over before Close.
			for {
				select {
				case req := <-s.reqs:
					batch = append(batch, req)
					continue
				default:
				}
				break
			}
			if len(batch) > 0 {
				s.commitBatch(bw, batch)
			}
			return
		}
		// Writers woken by the last sync are usually a few microseconds
		// from handing in their next record: when the last batch was
		// shared, give them a moment so this sync carries them too.
		if lastBatch > 1 {
			runtime.Gosched()
		}
		bytes := int64(0)
	drain:
		for bytes < maxBatchBytes {
			select {
			case req := <-s.reqs:
				batch = append(batch, req)
				for _, r := range req.recs {
					bytes += int64(len(r.meta)) + r.size
				}
			default:
				break drain
			}
		}
		lastBatch = len(batch)
		bw = s.commitBatch(bw, batch)
	}
}

// commitBatch writes a batch of requests to the active segment, makes
// it durable with one fdatasync, applies it to the index and answers the
// requests; a failed batch is answered with the error and cut off. It
// returns the writer to use for the next batch.
func (s *Store) commitBatch(bw *bufio.Writer, batch []*commitReq) *bufio.Writer {
	if s.broken {
		// The last failed write could not be cut off its segment: start
		// a new one before writing anything.
		if err := s.rotate(); err != nil {
			finishAll(batch, fmt.Errorf("queue write: %w", err))
			return bw
		}
		bw = bufio.NewWriterSize(s.active, 256<<10)
	}
	seg := s.activeSeg
	start := seg.size
	off, n, err := s.writeBatch(bw, seg, batch)
	if err == nil {
		err = bw.Flush()
	}
	if err == nil {
		if err = s.fault("sync"); err == nil {
			err = unix.Fdatasync(int(s.active.Fd()))
		}
		s.syncs.Add(1)
	}
	if err != nil {
		finishAll(batch, fmt.Errorf("queue write: %w", err))
		return s.cutBack(bw, start)
	}
	s.records.Add(uint64(n))
	s.mu.Lock()
	seg.size = off
	for _, req := range batch {
		if req.apply != nil {
			req.apply(req.recs)
		}
	}
	s.collectSegments()
	s.mu.Unlock()
	finishAll(batch, nil)
	s.signal()
	if off >= s.opts.SegmentBytes {
		if err := s.rotate(); err == nil {
			return bufio.NewWriterSize(s.active, 256<<10)
		}
	}
	return bw
}

func finishAll(batch []*commitReq, err error) {
	for _, req := range batch {
		req.finish(err)
	}
}

// writeBatch buffers the records of batch for seg, setting where each
// lands, and returns the offset after the last and how many were
// written.
func (s *Store) writeBatch(bw *bufio.Writer, seg *segment, batch []*commitReq) (off int64, n int, err error) {
	off = seg.size
	var hdr [headerLen]byte
	for _, req := range batch {
		for _, r := range req.recs {
			putHeader(hdr[:], r.typ, len(r.meta), r.size, r.crc)
			if err = s.fault("write"); err != nil {
				return off, n, err
			}
			if _, err = bw.Write(hdr[:]); err != nil {
				return off, n, err
			}
			if _, err = bw.Write(r.meta); err != nil {
				return off, n, err
			}
			r.seg = seg
			r.recOff = off
			r.off = off + headerLen + int64(len(r.meta))
			if err = writeBody(bw, r); err != nil {
				return off, n, err
			}
			off = r.off + r.size
			n++
		}
	}
	return off, n, nil
}

// writeBody copies a record's body: from memory, its spool file, or the
// older segment a compaction copies it from.
func writeBody(bw *bufio.Writer, r *pendingRecord) error {
	var src io.Reader
	switch {
	case r.file != nil:
		if _, err := r.file.Seek(0, io.SeekStart); err != nil {
			return err
		}
		src = r.file
	case r.src != nil:
		src = io.NewSectionReader(r.src, 0, r.src.Size())
	default:
		_, err := bw.Write(r.body)
		return err
	}
	c, err := io.Copy(bw, src)
	if err == nil && c != r.size {
		err = fmt.Errorf("body changed size (%d != %d)", c, r.size)
	}
	return err
}

// cutBack undoes a failed batch: nothing of it was acknowledged. The
// segment is cut back to where the batch began, durably, and used on. If
// that fails the segment may hold garbage before whatever came next, and
// recovery would stop at the garbage: a new segment is started, and if
// that fails too nothing is written until one can be made.
func (s *Store) cutBack(bw *bufio.Writer, start int64) *bufio.Writer {
	bw.Reset(s.active)
	err := s.fault("truncate")
	if err == nil {
		err = s.active.Truncate(start)
	}
	if err == nil {
		err = unix.Fdatasync(int(s.active.Fd()))
	}
	if err == nil {
		return bw
	}
	if rerr := s.rotate(); rerr == nil {
		return bufio.NewWriterSize(s.active, 256<<10)
	}
	s.mu.Lock()
	s.broken = true
	s.mu.Unlock()
	return bw
}

func (s *Store) signal() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

func newRecord(typ recType, v any) (*pendingRecord, error) {
	meta, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	return &pendingRecord{typ: typ, meta: meta, crc: crc32.Update(0, crcTable, meta)}, nil
}

var bufPool = sync.Pool{New: func() any { return new([]byte) }}

// Writer receives one message body from the submission server. Write the
// body, then Commit with the envelope; or Abort.
type Writer struct {
	s     *Store
	buf   *[]byte
	spill *os.File
	size  int64
	err   error
	done  bool
	scan  *message.Scanner
}

// NewWriter starts a message.
func (s *Store) NewWriter() MessageWriter { return s.newWriter() }

func (s *Store) newWriter() *Writer {
	b := bufPool.Get().(*[]byte)
	*b = (*b)[:0]
	return &Writer{s: s, buf: b, scan: message.NewScanner()}
}

// Write appends body bytes; past MemBodyBytes the body streams to a spool
// file instead of memory.
func (w *Writer) Write(p []byte) (int, error) {
	if w.err != nil {
		return 0, w.err
	}
	w.size += int64(len(p))
	w.scan.Write(p)
	if w.spill == nil && len(*w.buf)+len(p) <= w.s.opts.MemBodyBytes {
		*w.buf = append(*w.buf, p...)
		return len(p), nil
	}
	if w.spill == nil {
		f, err := w.s.TempFile()
		if err != nil {
			w.err = err
			return 0, w.err
		}
		w.spill = f
		if _, err := f.Write(*w.buf); err != nil {
			w.err = fmt.Errorf("queue spool: %w", err)
			return 0, w.err
		}
	}
	if _, err := w.spill.Write(p); err != nil {
		w.err = fmt.Errorf("queue spool: %w", err)
		return 0, w.err
	}
	return len(p), nil
}

// TempFile returns a new file in the queue's spool directory, already
// unlinked: its data lives until it is closed, and a crash leaves nothing
// behind. It holds bodies on their way in, and converted copies on their
// way out.
func (s *Store) TempFile() (*os.File, error) {
	name := filepath.Join(s.spoolDir, strconv.FormatUint(s.spoolSeq.Add(1), 10)+".tmp")
	f, err := os.OpenFile(name, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o640)
	if err != nil {
		return nil, fmt.Errorf("queue spool: %w", err)
	}
	os.Remove(name)
	return f, nil
}

// Size returns the number of body bytes written so far.
func (w *Writer) Size() int64 { return w.size }

// Abort drops the message.
func (w *Writer) Abort() {
	if w.done {
		return
	}
	w.done = true
	if w.spill != nil {
		w.spill.Close()
	}
	if cap(*w.buf) <= 1<<20 {
		bufPool.Put(w.buf)
	}
	w.buf = nil
}

// Commit makes the message durable and returns its queue ID. When it
// returns nil the envelope and body are on stable storage. The envelope's
// NeedsSMTPUTF8 and EightBit are set here, from the addresses and the
// bytes written, whatever the caller put there: they are decided once,
// for every message, by content.
func (w *Writer) Commit(env Envelope) (string, error) {
	defer w.Abort()
	if w.done {
		return "", errors.New("queue: writer already used")
	}
	if w.err != nil {
		return "", w.err
	}
	if len(env.Rcpts) == 0 {
		return "", errors.New("queue: message without recipients")
	}
	env.SetContent(w.scan.Content())
	s := w.s
	if err := s.CheckSpace(w.size); err != nil {
		return "", err
	}
	now := s.opts.Now()
	id := s.idgen.next(now)
	meta, err := json.Marshal(messageMeta{ID: id, Received: now, Env: env})
	if err != nil {
		return "", err
	}
	crc := combineBody(meta, w)
	if w.err != nil {
		return "", fmt.Errorf("queue spool: %w", w.err)
	}
	dom := msgDomain(env.Rcpts)
	rec := &pendingRecord{typ: recMessage, meta: meta, body: *w.buf, file: w.spill, size: w.size, crc: crc}
	req := &commitReq{recs: []*pendingRecord{rec}, apply: func(recs []*pendingRecord) {
		r := recs[0]
		s.insertEntry(id, dom, now, r.size, recLoc{off: r.recOff, seg: uint32(r.seg.seq), metaLen: uint32(len(r.meta))})
	}}
	if err := s.submit(req); err != nil {
		return "", err
	}
	return id, nil
}

// combineBody computes CRC-32C over meta followed by the body. Small
// bodies are in memory; spilled ones are re-read from the spool file
// (page cache).
func combineBody(meta []byte, w *Writer) uint32 {
	crc := crc32.Update(0, crcTable, meta)
	if w.spill == nil {
		return crc32.Update(crc, crcTable, *w.buf)
	}
	h := crc32.New(crcTable)
	_, _ = h.Write(meta)
	if _, err := w.spill.Seek(0, io.SeekStart); err != nil {
		w.err = err
		return 0
	}
	if _, err := io.Copy(h, w.spill); err != nil {
		w.err = err
		return 0
	}
	return h.Sum32()
}

// EnqueueReport queues a TLS-RPT report mail (RFC 8460 §3): a message of
// KindTLSRPT, which delivery sends despite MTA-STS failures and never
// counts in TLS-RPT itself.
func (s *Store) EnqueueReport(from, to string, msg io.Reader) (string, error) {
	return s.Enqueue(Envelope{From: from, Kind: KindTLSRPT, Rcpts: []RcptSpec{{Addr: to}}}, msg)
}

// Enqueue queues a message the relay makes itself (a DSN, a TLS report).
func (s *Store) Enqueue(env Envelope, body io.Reader) (string, error) {
	w := s.newWriter()
	if _, err := io.Copy(w, body); err != nil {
		w.Abort()
		return "", err
	}
	return w.Commit(env)
}
