package queue

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
)

// The queue is a sequence of append-only segment files under
// queue/log/. Each record is
//
//	magic   uint32  "STSQ"
//	type    uint8
//	metaLen uint32  length of the JSON metadata
//	bodyLen uint64  length of the body that follows it (messages only)
//	crc     uint32  CRC-32C of the metadata and the body
//	meta    [metaLen]byte
//	body    [bodyLen]byte
//
// A record counts only if it is whole and its CRC matches: a record torn
// by a crash was never acknowledged (the 250 is sent after the fsync), so
// recovery drops it and everything after it in that segment.
const (
	recMagic   = 0x51535453 // "STSQ" little-endian
	headerLen  = 4 + 1 + 4 + 8 + 4
	maxMetaLen = 16 << 20
)

type recType uint8

const (
	recMessage recType = 1 // a new message: envelope + body
	recState   recType = 2 // recipient states of a message changed
	recRemove  recType = 3 // a message left the queue
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

var errTorn = errors.New("torn or corrupt record")

type segment struct {
	seq  uint64
	path string
	f    *os.File // read handle, for records and bodies
	live int      // messages whose recMessage lies here and are still queued
	// liveBytes counts the bytes of records here that queued messages
	// still need: their message records and newest state records.
	liveBytes int64
	size      int64
	created   time.Time
}

func segName(seq uint64) string { return fmt.Sprintf("%016d.seg", seq) }

func listSegments(dir string) ([]uint64, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	var seqs []uint64
	for _, e := range ents {
		name := e.Name()
		if !strings.HasSuffix(name, ".seg") {
			continue
		}
		n, err := strconv.ParseUint(strings.TrimSuffix(name, ".seg"), 10, 64)
		if err != nil {
			continue
		}
		seqs = append(seqs, n)
	}
	sort.Slice(seqs, func(i, j int) bool { return seqs[i] < seqs[j] })
	return seqs, nil
}

func putHeader(h []byte, t recType, metaLen int, bodyLen int64, crc uint32) {
	binary.LittleEndian.PutUint32(h[0:], recMagic)
	h[4] = byte(t)
	binary.LittleEndian.PutUint32(h[5:], uint32(metaLen))
	binary.LittleEndian.PutUint64(h[9:], uint64(bodyLen))
	binary.LittleEndian.PutUint32(h[17:], crc)
}

// scanRecord is one record found by scanSegment.
type scanRecord struct {
	typ     recType
	meta    []byte
	bodyOff int64
	bodyLen int64
}

// scanSegment reads the whole records of a segment in order and calls fn
// for each; it returns the offset just past the last whole record, and
// errTorn if something other than a clean end followed it.
func scanSegment(f *os.File, fn func(scanRecord) error) (int64, error) {
	return scanSegmentFrom(f, 0, fn)
}

// scanSegmentFrom is scanSegment from offset start, which must be where
// a record begins (or the end).
func scanSegmentFrom(f *os.File, start int64, fn func(scanRecord) error) (int64, error) {
	r := bufio.NewReaderSize(io.NewSectionReader(f, start, 1<<62), 256<<10)
	off := start
	var h [headerLen]byte
	for {
		if _, err := io.ReadFull(r, h[:]); err != nil {
			if err == io.EOF {
				return off, nil
			}
			return off, errTorn
		}
		if binary.LittleEndian.Uint32(h[0:]) != recMagic {
			return off, errTorn
		}
		typ := recType(h[4])
		metaLen := int64(binary.LittleEndian.Uint32(h[5:]))
		bodyLen := int64(binary.LittleEndian.Uint64(h[9:]))
		want := binary.LittleEndian.Uint32(h[17:])
		if metaLen > maxMetaLen || bodyLen < 0 || bodyLen > 1<<40 || typ < recMessage || typ > recRemove {
			return off, errTorn
		}
		meta := make([]byte, metaLen)
		if _, err := io.ReadFull(r, meta); err != nil {
			return off, errTorn
		}
		crc := crc32.Update(0, crcTable, meta)
		if bodyLen > 0 {
			hw := crc32.New(crcTable)
			_, _ = hw.Write(meta)
			if n, err := io.CopyN(hw, r, bodyLen); err != nil || n != bodyLen {
				return off, errTorn
			}
			crc = hw.Sum32()
		}
		if crc != want {
			return off, errTorn
		}
		rec := scanRecord{typ: typ, meta: meta, bodyOff: off + headerLen + metaLen, bodyLen: bodyLen}
		if err := fn(rec); err != nil {
			return off, err
		}
		off += headerLen + metaLen + bodyLen
	}
}

func segPath(dir string, seq uint64) string { return filepath.Join(dir, segName(seq)) }
