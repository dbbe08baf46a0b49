package queue

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// FuzzQueueRecovery feeds arbitrary bytes to recovery as a segment file
// (queue/log/…seg). Recovery must never panic, scanSegment must never
// hand over a record that is not whole or whose CRC-32C does not match
// the bytes on disk, and a store that opens must serve every message it
// reports from inside the segment's whole records.
func FuzzQueueRecovery(f *testing.F) {
	// Seeds: real segments (messages, state changes, removals), then
	// damaged copies; testdata/fuzz/FuzzQueueRecovery holds more.
	seg := realSegment(f)
	f.Add(seg)
	f.Add(seg[:len(seg)-3])
	flipped := bytes.Clone(seg)
	flipped[headerLen+2] ^= 0x20
	f.Add(flipped)
	f.Add([]byte{})
	f.Add([]byte("STSQ"))
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		logDir := filepath.Join(dir, "log")
		if err := os.MkdirAll(logDir, 0o700); err != nil {
			t.Fatal(err)
		}
		path := segPath(logDir, 1)
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}

		file, err := os.Open(path)
		if err != nil {
			t.Fatal(err)
		}
		var off int64
		end, serr := scanSegment(file, func(r scanRecord) error {
			checkRecord(t, data, off, r)
			off = r.bodyOff + r.bodyLen
			return nil
		})
		file.Close()
		if end != off {
			t.Fatalf("scanSegment returned end %d, but its last whole record ends at %d", end, off)
		}
		if serr == nil && end != int64(len(data)) {
			t.Fatalf("scanSegment reported a clean end at %d of %d bytes", end, len(data))
		}

		st, err := Open(Options{Dir: dir})
		if err != nil {
			return // a whole record whose metadata is not valid: refused, not guessed at
		}
		defer st.Close()
		for _, m := range st.List() {
			if m.loc.off < headerLen || m.loc.off+m.Size > end {
				t.Fatalf("message %q body at %d+%d, outside the whole records (end %d)", m.ID, m.loc.off, m.Size, end)
			}
			b, err := st.Body(m.ID)
			if err != nil {
				t.Fatalf("Body(%q) of a listed message: %v", m.ID, err)
			}
			got, err := io.ReadAll(b)
			if err != nil || !bytes.Equal(got, data[m.loc.off:m.loc.off+m.Size]) {
				t.Fatalf("Body(%q): %d bytes, %v; want the %d bytes of its record", m.ID, len(got), err, m.Size)
			}
		}
	})
}

// checkRecord verifies that record r, which scanSegment said starts at
// off, is whole in data and that its CRC matches data's bytes.
func checkRecord(t *testing.T, data []byte, off int64, r scanRecord) {
	t.Helper()
	n := int64(len(data))
	if off+headerLen > n || r.bodyOff < off+headerLen || r.bodyLen < 0 || r.bodyOff+r.bodyLen > n {
		t.Fatalf("record at %d (body %d+%d) is not inside the %d-byte segment", off, r.bodyOff, r.bodyLen, n)
	}
	h := data[off : off+headerLen]
	if binary.LittleEndian.Uint32(h) != recMagic {
		t.Fatalf("record at %d has no magic", off)
	}
	metaLen := int64(binary.LittleEndian.Uint32(h[5:]))
	if r.bodyOff != off+headerLen+metaLen || !bytes.Equal(r.meta, data[off+headerLen:r.bodyOff]) {
		t.Fatalf("record at %d: metadata is not the bytes on disk", off)
	}
	if int64(binary.LittleEndian.Uint64(h[9:])) != r.bodyLen {
		t.Fatalf("record at %d: body length %d, header says %d", off, r.bodyLen, binary.LittleEndian.Uint64(h[9:]))
	}
	want := binary.LittleEndian.Uint32(h[17:])
	if got := crc32.Checksum(data[off+headerLen:r.bodyOff+r.bodyLen], crcTable); got != want {
		t.Fatalf("record at %d handed over with CRC %08x, header says %08x", off, got, want)
	}
}

// realSegment is the segment a store writes for two messages, a state
// change and a removal.
func realSegment(tb testing.TB) []byte {
	dir := tb.TempDir()
	st, err := Open(Options{Dir: dir})
	if err != nil {
		tb.Fatal(err)
	}
	a, err := st.Enqueue(Envelope{From: "a@example.net", Rcpts: []RcptSpec{{Addr: "u@example.com"}, {Addr: "v@example.org"}}},
		strings.NewReader("Subject: a\r\n\r\nbody a\r\n"))
	if err != nil {
		tb.Fatal(err)
	}
	b, err := st.Enqueue(Envelope{From: "", Rcpts: []RcptSpec{{Addr: "w@example.com"}}}, strings.NewReader("Subject: b\r\n\r\nb\r\n"))
	if err != nil {
		tb.Fatal(err)
	}
	if ms := st.Lease(time.Now().Add(time.Minute), 10); len(ms) > 0 {
		for _, m := range ms {
			if m.ID == a {
				m.Rcpts[0].Status = Delivered
				m.Rcpts[0].Attempts = 1
				m.Rcpts[1].Status = Deferred
				m.Rcpts[1].Attempts = 1
				m.Rcpts[1].LastError = "451 try later"
				if err := st.Update(m); err != nil {
					tb.Fatal(err)
				}
			} else {
				st.Release(m.ID)
			}
		}
	}
	if err := st.Delete(b); err != nil {
		tb.Fatal(err)
	}
	st.Close()
	seqs, err := listSegments(filepath.Join(dir, "log"))
	if err != nil || len(seqs) == 0 {
		tb.Fatalf("no segment written: %v", err)
	}
	data, err := os.ReadFile(segPath(filepath.Join(dir, "log"), seqs[0]))
	if err != nil {
		tb.Fatal(err)
	}
	return data
}
