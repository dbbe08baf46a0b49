package queue

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/stsrelay/stsrelay/internal/atomicfile"
)

// The index checkpoint (queue/index.ckpt) lets a queue of a million
// messages open in well under two seconds: instead of reading and
// decoding every record of the log, Open loads the index as it stood at
// a log position, then applies the records written after that position.
// It is written at Close and every Options.CheckpointInterval while the
// queue changes.
//
// A checkpoint is only a cache of the log: the log stays the truth. It
// is used only if its CRC matches, the segment holding its position
// still exists (same inode) and is at least that long, and after the
// records since are applied every entry points into a segment that
// exists. Otherwise Open reads the whole log, as it would without one.
//
// Format (little-endian):
//
//	magic    "STSQIDX1"
//	seq      uint64   segment of the log position
//	off      int64    offset in it: records from here on are not in the index
//	nsegs    uint32   then per segment: seq uint64, inode uint64
//	ndoms    uint32   then per domain: len uint16, name
//	nents    uint32   then per entry (66 bytes): id [14], next int64,
//	                  bodyLen int64, msg (off int64, seg uint32,
//	                  metaLen uint32), state (same), dom uint32
//	crc      uint32   CRC-32C of everything before it
const ckptMagic = "STSQIDX1"

type ckptSeg struct {
	seq   uint64
	inode uint64
}

// snapshot is the index at one log position, taken under s.mu and
// already encoded: the entries section is built in one buffer of 66
// bytes per message, so a checkpoint of a million messages costs one
// 66 MB buffer for a moment, not a copy of the index and an encoding.
type snapshot struct {
	seq     uint64
	off     int64
	segs    []ckptSeg
	doms    []string
	n       int
	entries []byte
}

const ckptEntryLen = IDLen + 8 + 8 + 16 + 16 + 4

func inodeOf(f *os.File) uint64 {
	fi, err := f.Stat()
	if err != nil {
		return 0
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Ino
	}
	return 0
}

// snapshotLocked encodes the index. Call with s.mu held.
func (s *Store) snapshotLocked() *snapshot {
	if s.activeSeg == nil {
		return nil
	}
	snap := &snapshot{seq: s.activeSeg.seq, off: s.activeSeg.size, n: s.arena.used}
	for _, seq := range s.order {
		snap.segs = append(snap.segs, ckptSeg{seq: seq, inode: inodeOf(s.segs[seq].f)})
	}
	for _, d := range s.doms {
		snap.doms = append(snap.doms, d.name)
	}
	le := binary.LittleEndian
	b := make([]byte, 0, s.arena.used*ckptEntryLen)
	s.arena.each(func(_ uint32, e *entry) bool {
		b = append(b, e.id[:]...)
		b = le.AppendUint64(b, uint64(e.next))
		b = le.AppendUint64(b, uint64(e.bodyLen))
		for _, l := range []recLoc{e.msg, e.state} {
			b = le.AppendUint64(b, uint64(l.off))
			b = le.AppendUint32(b, l.seg)
			b = le.AppendUint32(b, l.metaLen)
		}
		b = le.AppendUint32(b, e.dom)
		return true
	})
	snap.entries = b
	return snap
}

func (s *Store) ckptPath() string { return filepath.Join(s.opts.Dir, "index.ckpt") }

// writeCheckpoint writes snap durably: a temporary file, fsync, rename,
// directory sync.
func (s *Store) writeCheckpoint(snap *snapshot) (err error) {
	if snap == nil {
		return nil
	}
	tmp := s.ckptPath() + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o640)
	if err != nil {
		return fmt.Errorf("queue: checkpoint: %w", err)
	}
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
			err = fmt.Errorf("queue: checkpoint: %w", err)
		}
	}()
	h := crc32.New(crcTable)
	w := bufio.NewWriterSize(io.MultiWriter(f, h), 1<<20)
	le := binary.LittleEndian
	var b []byte
	b = append(b, ckptMagic...)
	b = le.AppendUint64(b, snap.seq)
	b = le.AppendUint64(b, uint64(snap.off))
	b = le.AppendUint32(b, uint32(len(snap.segs)))
	for _, sg := range snap.segs {
		b = le.AppendUint64(b, sg.seq)
		b = le.AppendUint64(b, sg.inode)
	}
	b = le.AppendUint32(b, uint32(len(snap.doms)))
	for _, d := range snap.doms {
		b = le.AppendUint16(b, uint16(len(d)))
		b = append(b, d...)
	}
	b = le.AppendUint32(b, uint32(snap.n))
	if _, err := w.Write(b); err != nil {
		return err
	}
	if _, err := w.Write(snap.entries); err != nil {
		return err
	}
	if err := w.Flush(); err != nil {
		return err
	}
	if _, err := f.Write(le.AppendUint32(nil, h.Sum32())); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, s.ckptPath()); err != nil {
		return err
	}
	return atomicfile.SyncDir(s.opts.Dir)
}

// ckptReader reads a checkpoint's fields in order, remembering the
// first error.
type ckptReader struct {
	r   *bufio.Reader
	err error
	buf [ckptEntryLen]byte
}

func (c *ckptReader) bytes(n int) []byte {
	if c.err != nil {
		return nil
	}
	if _, err := io.ReadFull(c.r, c.buf[:n]); err != nil {
		c.err = err
		return nil
	}
	return c.buf[:n]
}

func (c *ckptReader) u64() uint64 {
	if b := c.bytes(8); b != nil {
		return binary.LittleEndian.Uint64(b)
	}
	return 0
}

func (c *ckptReader) u32() uint32 {
	if b := c.bytes(4); b != nil {
		return binary.LittleEndian.Uint32(b)
	}
	return 0
}

// loadCheckpoint fills the index from the checkpoint and the log after
// it. It reports false (and leaves the index for the caller to reset)
// when there is no usable checkpoint. The file is read twice, streaming:
// once for its CRC, once into the index, so loading costs no copy of it.
// Call with s.mu held.
func (s *Store) loadCheckpoint(segs []*segment) (bool, error) {
	f, err := os.Open(s.ckptPath())
	if err != nil {
		return false, nil
	}
	defer f.Close()
	body, ok := checkpointBody(f)
	if !ok {
		return false, nil
	}
	c := &ckptReader{r: bufio.NewReaderSize(io.NewSectionReader(f, 0, body), 1<<20)}
	if string(c.bytes(len(ckptMagic))) != ckptMagic {
		return false, nil
	}
	seq, off := c.u64(), int64(c.u64())
	if !s.checkpointSegmentsMatch(c, body, segs, seq, off) || !s.loadCheckpointIndex(c, body) {
		return false, nil
	}
	// Segments wholly before the position keep their size on disk; the
	// rest is the log written after the checkpoint.
	var tail []*segment
	for _, seg := range segs {
		if seg.seq < seq {
			if sfi, err := seg.f.Stat(); err == nil {
				seg.size = sfi.Size()
			}
			continue
		}
		tail = append(tail, seg)
	}
	if err := s.replay(tail, off); err != nil {
		return false, err
	}
	return !s.pointsIntoMissingSegment(), nil
}

// checkpointBody checks the checkpoint's CRC and returns the length of
// what it covers.
func checkpointBody(f *os.File) (int64, bool) {
	fi, err := f.Stat()
	if err != nil || fi.Size() < int64(len(ckptMagic))+4 {
		return 0, false
	}
	body := fi.Size() - 4
	h := crc32.New(crcTable)
	if _, err := io.Copy(h, io.NewSectionReader(f, 0, body)); err != nil {
		return 0, false
	}
	var tail [4]byte
	if _, err := f.ReadAt(tail[:], body); err != nil || binary.LittleEndian.Uint32(tail[:]) != h.Sum32() {
		return 0, false
	}
	return body, true
}

// checkpointSegmentsMatch reads the checkpoint's segment list and
// reports whether the log still holds its position (segment seq, at
// least off long) and the same files (inodes) up to it.
func (s *Store) checkpointSegmentsMatch(c *ckptReader, body int64, segs []*segment, seq uint64, off int64) bool {
	nsegs := c.u32()
	if c.err != nil || int64(nsegs)*16 > body {
		return false
	}
	inodes := map[uint64]uint64{}
	for range nsegs {
		sq := c.u64()
		inodes[sq] = c.u64()
	}
	posSeg := s.segs[seq]
	if c.err != nil || posSeg == nil {
		return false
	}
	if pfi, err := posSeg.f.Stat(); err != nil || pfi.Size() < off {
		return false
	}
	for _, seg := range segs {
		if seg.seq > seq {
			break
		}
		if ino, ok := inodes[seg.seq]; !ok || ino != inodeOf(seg.f) {
			return false
		}
	}
	return true
}

// loadCheckpointIndex reads the domains and entries into the index.
func (s *Store) loadCheckpointIndex(c *ckptReader, body int64) bool {
	ndoms := c.u32()
	if c.err != nil || int64(ndoms)*2 > body {
		return false
	}
	names := make([]string, ndoms)
	for i := range names {
		l := c.bytes(2)
		if l == nil {
			return false
		}
		names[i] = string(c.bytes(int(binary.LittleEndian.Uint16(l))))
	}
	for _, name := range names {
		s.domain(name)
	}
	n := c.u32()
	if c.err != nil || int64(n)*ckptEntryLen > body {
		return false
	}
	le := binary.LittleEndian
	for range n {
		q := c.bytes(ckptEntryLen)
		if q == nil || !ValidID(string(q[:IDLen])) {
			return false
		}
		id := string(q[:IDLen])
		q = q[IDLen:]
		next := int64(le.Uint64(q))
		bodyLen := int64(le.Uint64(q[8:]))
		msg := recLoc{off: int64(le.Uint64(q[16:])), seg: le.Uint32(q[24:]), metaLen: le.Uint32(q[28:])}
		state := recLoc{off: int64(le.Uint64(q[32:])), seg: le.Uint32(q[40:]), metaLen: le.Uint32(q[44:])}
		dom := le.Uint32(q[48:])
		if int(dom) >= len(s.doms) || s.ids.find(&s.arena, id) != 0 {
			return false
		}
		slot := s.insertEntry(id, s.doms[dom].name, time.Time{}, bodyLen, msg)
		e := s.arena.at(slot)
		if state.valid() {
			s.addLive(e, -1)
			e.state = state
			s.addLive(e, 1)
		}
		e.next = next
		s.schedule(slot)
	}
	return c.err == nil
}

// pointsIntoMissingSegment reports whether an entry points into a
// segment that no longer exists: one removed after the checkpoint, whose
// records were lost with it (the checkpoint is older than the log allows).
func (s *Store) pointsIntoMissingSegment() bool {
	missing := false
	s.arena.each(func(_ uint32, e *entry) bool {
		if s.segs[uint64(e.msg.seg)] == nil || e.state.valid() && s.segs[uint64(e.state.seg)] == nil {
			missing = true
			return false
		}
		return true
	})
	return missing
}
