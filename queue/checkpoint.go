package queue

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
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

// snapshot is the index at one log position, taken under s.mu.
type snapshot struct {
	seq     uint64
	off     int64
	segs    []ckptSeg
	doms    []string
	entries []entry
}

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

// snapshotLocked copies the index. Call with s.mu held.
func (s *Store) snapshotLocked() *snapshot {
	if s.activeSeg == nil {
		return nil
	}
	snap := &snapshot{seq: s.activeSeg.seq, off: s.activeSeg.size}
	for _, seq := range s.order {
		snap.segs = append(snap.segs, ckptSeg{seq: seq, inode: inodeOf(s.segs[seq].f)})
	}
	for _, d := range s.doms {
		snap.doms = append(snap.doms, d.name)
	}
	snap.entries = make([]entry, 0, s.arena.used)
	s.arena.each(func(_ uint32, e *entry) bool {
		snap.entries = append(snap.entries, *e)
		return true
	})
	return snap
}

func (s *Store) ckptPath() string { return filepath.Join(s.opts.Dir, "index.ckpt") }

// writeCheckpoint writes snap durably (write, fsync, rename).
func (s *Store) writeCheckpoint(snap *snapshot) error {
	if snap == nil {
		return nil
	}
	var buf bytes.Buffer
	buf.Grow(64 + len(snap.entries)*66)
	w := bufio.NewWriter(&buf)
	le := binary.LittleEndian
	var b [8]byte
	u64 := func(v uint64) { le.PutUint64(b[:], v); w.Write(b[:8]) }
	u32 := func(v uint32) { le.PutUint32(b[:], v); w.Write(b[:4]) }
	w.WriteString(ckptMagic)
	u64(snap.seq)
	u64(uint64(snap.off))
	u32(uint32(len(snap.segs)))
	for _, sg := range snap.segs {
		u64(sg.seq)
		u64(sg.inode)
	}
	u32(uint32(len(snap.doms)))
	for _, d := range snap.doms {
		le.PutUint16(b[:], uint16(len(d)))
		w.Write(b[:2])
		w.WriteString(d)
	}
	u32(uint32(len(snap.entries)))
	for i := range snap.entries {
		e := &snap.entries[i]
		w.Write(e.id[:])
		u64(uint64(e.next))
		u64(uint64(e.bodyLen))
		for _, l := range []recLoc{e.msg, e.state} {
			u64(uint64(l.off))
			u32(l.seg)
			u32(l.metaLen)
		}
		u32(e.dom)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	u32(crc32.Checksum(buf.Bytes(), crcTable))
	if err := w.Flush(); err != nil {
		return err
	}
	if err := atomicfile.Write(s.ckptPath(), buf.Bytes()); err != nil {
		return fmt.Errorf("queue: checkpoint: %w", err)
	}
	return nil
}

var errStale = errors.New("stale checkpoint")

// loadCheckpoint fills the index from the checkpoint and the log after
// it. It reports false (and leaves the index for the caller to reset)
// when there is no usable checkpoint. Call with s.mu held.
func (s *Store) loadCheckpoint(segs []*segment) (bool, error) {
	data, err := os.ReadFile(s.ckptPath())
	if err != nil || len(data) < len(ckptMagic)+4 {
		return false, nil
	}
	body := data[:len(data)-4]
	if string(body[:len(ckptMagic)]) != ckptMagic ||
		crc32.Checksum(body, crcTable) != binary.LittleEndian.Uint32(data[len(data)-4:]) {
		return false, nil
	}
	snap, err := decodeCheckpoint(body[len(ckptMagic):])
	if err != nil {
		return false, nil
	}
	posSeg := s.segs[snap.seq]
	if posSeg == nil {
		return false, nil
	}
	if fi, err := posSeg.f.Stat(); err != nil || fi.Size() < snap.off {
		return false, nil
	}
	inodes := map[uint64]uint64{}
	for _, sg := range snap.segs {
		inodes[sg.seq] = sg.inode
	}
	for _, seg := range segs {
		if seg.seq > snap.seq {
			break
		}
		ino, ok := inodes[seg.seq]
		if !ok || ino != inodeOf(seg.f) {
			return false, nil
		}
	}
	for _, name := range snap.doms {
		s.domain(name)
	}
	for i := range snap.entries {
		e := &snap.entries[i]
		if int(e.dom) >= len(s.doms) {
			return false, nil
		}
		slot := s.insertEntry(string(e.id[:]), s.doms[e.dom].name, time.Time{}, e.bodyLen, e.msg)
		ne := s.arena.at(slot)
		if e.state.valid() {
			s.addLive(ne, -1)
			ne.state = e.state
			s.addLive(ne, 1)
		}
		ne.next = e.next
		s.schedule(slot)
	}
	// Segments wholly before the position keep their size on disk.
	var tail []*segment
	for _, seg := range segs {
		if seg.seq < snap.seq {
			if fi, err := seg.f.Stat(); err == nil {
				seg.size = fi.Size()
			}
			continue
		}
		tail = append(tail, seg)
	}
	if err := s.replay(tail, snap.off); err != nil {
		return false, err
	}
	// Every entry must point into a segment that exists: one that points
	// into a segment removed after the checkpoint means records were
	// lost with it (the checkpoint is older than the log allows).
	stale := false
	s.arena.each(func(_ uint32, e *entry) bool {
		if s.segs[uint64(e.msg.seg)] == nil || e.state.valid() && s.segs[uint64(e.state.seg)] == nil {
			stale = true
			return false
		}
		return true
	})
	if stale {
		return false, nil
	}
	return true, nil
}

func decodeCheckpoint(p []byte) (*snapshot, error) {
	r := bytes.NewReader(p)
	le := binary.LittleEndian
	var err error
	rd := func(v any) {
		if err == nil {
			err = binary.Read(r, le, v)
		}
	}
	snap := &snapshot{}
	var off uint64
	var n uint32
	rd(&snap.seq)
	rd(&off)
	snap.off = int64(off)
	rd(&n)
	if err != nil || int64(n)*16 > int64(r.Len()) {
		return nil, errStale
	}
	snap.segs = make([]ckptSeg, n)
	for i := range snap.segs {
		rd(&snap.segs[i].seq)
		rd(&snap.segs[i].inode)
	}
	rd(&n)
	if err != nil || int64(n)*2 > int64(r.Len()) {
		return nil, errStale
	}
	snap.doms = make([]string, n)
	for i := range snap.doms {
		var l uint16
		rd(&l)
		if err != nil || int(l) > r.Len() {
			return nil, errStale
		}
		name := make([]byte, l)
		_, err = io.ReadFull(r, name)
		snap.doms[i] = string(name)
	}
	rd(&n)
	const entLen = IDLen + 8 + 8 + 16 + 16 + 4
	if err != nil || int64(n)*entLen != int64(r.Len()) {
		return nil, errStale
	}
	snap.entries = make([]entry, n)
	raw := make([]byte, entLen)
	for i := range snap.entries {
		if _, err := io.ReadFull(r, raw); err != nil {
			return nil, errStale
		}
		e := &snap.entries[i]
		copy(e.id[:], raw)
		q := raw[IDLen:]
		e.next = int64(le.Uint64(q))
		e.bodyLen = int64(le.Uint64(q[8:]))
		e.msg = recLoc{off: int64(le.Uint64(q[16:])), seg: le.Uint32(q[24:]), metaLen: le.Uint32(q[28:])}
		e.state = recLoc{off: int64(le.Uint64(q[32:])), seg: le.Uint32(q[40:]), metaLen: le.Uint32(q[44:])}
		e.dom = le.Uint32(q[48:])
		if !ValidID(string(e.id[:])) {
			return nil, errStale
		}
	}
	return snap, nil
}
