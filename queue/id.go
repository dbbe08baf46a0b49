package queue

import (
	"crypto/rand"
	"encoding/binary"
	"sync"
	"time"
)

// IDs are 14 characters of base32hex (0-9, a-v): 9 for the milliseconds
// since the Unix epoch, 5 for a counter that starts at a random value
// each millisecond. Base32hex keeps lexical order equal to time order, the
// alphabet is safe in file names and in SMTP replies, and the counter
// makes IDs unique within a process (32 Mi per millisecond).
const idAlphabet = "0123456789abcdefghijklmnopqrstuv"

// IDLen is the length of every queue ID.
const IDLen = 14

type idGen struct {
	mu     sync.Mutex
	lastMS uint64
	ctr    uint32
}

func (g *idGen) next(now time.Time) string {
	ms := uint64(now.UnixMilli())
	g.mu.Lock()
	if ms <= g.lastMS {
		ms = g.lastMS
		g.ctr++
		if g.ctr >= 1<<25 {
			// Counter exhausted within one millisecond: borrow the
			// next millisecond so IDs stay unique and ordered.
			ms++
			g.ctr = randCounter()
		}
	} else {
		g.ctr = randCounter()
	}
	g.lastMS = ms
	ctr := g.ctr
	g.mu.Unlock()

	var b [IDLen]byte
	for i := 8; i >= 0; i-- {
		b[i] = idAlphabet[ms&31]
		ms >>= 5
	}
	for i := IDLen - 1; i >= 9; i-- {
		b[i] = idAlphabet[ctr&31]
		ctr >>= 5
	}
	return string(b[:])
}

// IDGenerator makes queue IDs for a queue other than Store (fleet mode's
// JetStream queue): the same format and order, unique within a process;
// its random counter start keeps two processes apart. Safe for
// concurrent use.
type IDGenerator struct{ g idGen }

// Next returns a new ID for a message received at now.
func (g *IDGenerator) Next(now time.Time) string { return g.g.next(now) }

// randCounter starts each millisecond's counter in the lower half of its
// range, leaving room to count up.
func randCounter() uint32 {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return binary.LittleEndian.Uint32(b[:]) & (1<<24 - 1)
}

// ValidID reports whether s has the form of a queue ID.
func ValidID(s string) bool {
	if len(s) != IDLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'v') {
			return false
		}
	}
	return true
}

// IDTime returns the time encoded in a valid ID.
func IDTime(id string) time.Time {
	var ms uint64
	for i := 0; i < 9 && i < len(id); i++ {
		c := id[i]
		var v uint64
		if c >= '0' && c <= '9' {
			v = uint64(c - '0')
		} else {
			v = uint64(c-'a') + 10
		}
		ms = ms<<5 | v
	}
	return time.UnixMilli(int64(ms))
}
