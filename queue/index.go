package queue

import (
	"container/heap"
	"hash/maphash"
	"math"
	"time"
)

// The in-memory index keeps, per queued message, only what scheduling
// needs: its ID, when it is next due, where its records lie in the log
// and which destination it waits for. Envelopes and recipients stay on
// disk and are read when a message is leased, shown or listed, so a
// million queued messages cost well under 100 MB (issue #12's bound is
// 100 bytes per message; BenchmarkIndexBytesPerMessage measures it).
//
// Entries live in an arena of fixed-size pages (no pointers, so the
// garbage collector never scans them), found by ID through an
// open-addressing hash table of arena slots. Due work is grouped by
// destination: each domain has a heap of its messages by due time, and
// one heap of domains by their earliest due message decides what comes
// next. A destination on hold (dead, see HoldDomain) leaves that heap
// until the hold ends, so its messages cost one timer, not one wake-up
// each.

// recLoc is where a record lies: its segment, the offset of its header
// and the length of its metadata.
type recLoc struct {
	off     int64
	seg     uint32
	metaLen uint32
}

func (l recLoc) valid() bool { return l.seg != 0 }

// entry flags.
const (
	flagUsed     uint8 = 1 << iota // the slot holds a message
	flagLeased                     // a delivery or an operator action holds it
	flagRetryNow                   // make its non-final recipients due when the lease ends
	flagCopying                    // compaction is copying it forward
	flagDelayed                    // a delay DSN went out (DelayNotified)
	flagDueNow                     // an operator retry: recipients not final are due at the next Lease
)

// entry is one queued message in the index (72 bytes).
type entry struct {
	id      [IDLen]byte
	flags   uint8
	_       uint8
	next    int64 // unix nanoseconds of the next due recipient; 0 when none
	bodyLen int64
	msg     recLoc // the message record (envelope and body)
	state   recLoc // the newest state record, if any since msg
	dom     uint32 // index into Store.doms
	pos     int32  // position in its domain's heap, -1 when not in it
}

func (e *entry) idString() string { return string(e.id[:]) }

const pageBits = 12
const pageSize = 1 << pageBits

// arena holds entries in pages of pageSize, addressed by slot number
// (from 1: slot 0 means "none").
type arena struct {
	pages [][]entry
	free  []uint32
	n     uint32 // slots handed out so far (highest slot number)
	used  int
}

func (a *arena) at(slot uint32) *entry {
	i := slot - 1
	return &a.pages[i>>pageBits][i&(pageSize-1)]
}

func (a *arena) alloc() uint32 {
	a.used++
	if n := len(a.free); n > 0 {
		s := a.free[n-1]
		a.free = a.free[:n-1]
		return s
	}
	a.n++
	if int(a.n-1)>>pageBits >= len(a.pages) {
		a.pages = append(a.pages, make([]entry, pageSize))
	}
	return a.n
}

func (a *arena) release(slot uint32) {
	*a.at(slot) = entry{}
	a.used--
	a.free = append(a.free, slot)
}

// each calls fn for every used slot, in slot order.
func (a *arena) each(fn func(slot uint32, e *entry) bool) {
	for s := uint32(1); s <= a.n; s++ {
		e := a.at(s)
		if e.flags&flagUsed != 0 && !fn(s, e) {
			return
		}
	}
}

// idTable maps IDs to arena slots: linear probing over a power-of-two
// table, deletion by backward shift (no tombstones), grown at 3/4 full.
type idTable struct {
	seed  maphash.Seed
	slots []uint32
	n     int
}

func (t *idTable) hash(id []byte) uint64 { return maphash.Bytes(t.seed, id) }

func (t *idTable) find(a *arena, id string) uint32 {
	if len(t.slots) == 0 || len(id) != IDLen {
		return 0
	}
	mask := uint64(len(t.slots) - 1)
	for i := maphash.String(t.seed, id) & mask; ; i = (i + 1) & mask {
		s := t.slots[i]
		if s == 0 {
			return 0
		}
		if string(a.at(s).id[:]) == id {
			return s
		}
	}
}

func (t *idTable) insert(a *arena, slot uint32) {
	if (t.n+1)*4 > len(t.slots)*3 {
		t.grow(a)
	}
	t.put(a, slot)
	t.n++
}

func (t *idTable) put(a *arena, slot uint32) {
	mask := uint64(len(t.slots) - 1)
	for i := t.hash(a.at(slot).id[:]) & mask; ; i = (i + 1) & mask {
		if t.slots[i] == 0 {
			t.slots[i] = slot
			return
		}
	}
}

func (t *idTable) grow(a *arena) {
	old := t.slots
	n := max(1024, 2*len(old))
	if len(old) == 0 {
		t.seed = maphash.MakeSeed()
	}
	t.slots = make([]uint32, n)
	for _, s := range old {
		if s != 0 {
			t.put(a, s)
		}
	}
}

func (t *idTable) remove(a *arena, slot uint32) {
	mask := uint64(len(t.slots) - 1)
	i := t.hash(a.at(slot).id[:]) & mask
	for t.slots[i] != slot {
		i = (i + 1) & mask
	}
	// Backward-shift deletion: move later members of the probe run into
	// the hole when their home position allows it.
	for j := (i + 1) & mask; ; j = (j + 1) & mask {
		s := t.slots[j]
		if s == 0 {
			break
		}
		home := t.hash(a.at(s).id[:]) & mask
		// s may move to i if i lies cyclically in [home, j).
		if (j-home)&mask >= (j-i)&mask {
			t.slots[i] = s
			i = j
		}
	}
	t.slots[i] = 0
	t.n--
}

// domEntry is one destination: its messages' heap by due time.
type domEntry struct {
	name  string
	idx   uint32
	count int      // messages whose dom is this entry
	heap  []uint32 // arena slots with a due time and not leased, by next
	hold  int64    // unix nanoseconds until which nothing is handed out
	pos   int      // position in Store.domHeap, -1 when not in it
}

// multiDomain is the domain entry of messages whose recipients are in
// more than one domain.
const multiDomain = ""

// domHeap orders messages of one domain by due time; it keeps each
// entry's pos current.
type domHeap struct {
	a *arena
	d *domEntry
}

func (h domHeap) Len() int { return len(h.d.heap) }
func (h domHeap) Less(i, j int) bool {
	return h.a.at(h.d.heap[i]).next < h.a.at(h.d.heap[j]).next
}
func (h domHeap) Swap(i, j int) {
	hp := h.d.heap
	hp[i], hp[j] = hp[j], hp[i]
	h.a.at(hp[i]).pos = int32(i)
	h.a.at(hp[j]).pos = int32(j)
}
func (h domHeap) Push(x any) {
	s := x.(uint32)
	h.a.at(s).pos = int32(len(h.d.heap))
	h.d.heap = append(h.d.heap, s)
}
func (h domHeap) Pop() any {
	hp := h.d.heap
	s := hp[len(hp)-1]
	h.d.heap = hp[:len(hp)-1]
	h.a.at(s).pos = -1
	if cap(h.d.heap) > 64 && len(h.d.heap) < cap(h.d.heap)/4 {
		h.d.heap = append([]uint32(nil), h.d.heap...)
	}
	return s
}

// topHeap orders domains by the due time of their first message (or the
// end of their hold).
type topHeap struct {
	s *Store
}

func (h topHeap) key(d *domEntry) int64 {
	if len(d.heap) == 0 {
		return math.MaxInt64
	}
	return max(h.s.arena.at(d.heap[0]).next, d.hold)
}
func (h topHeap) Len() int           { return len(h.s.domHeap) }
func (h topHeap) Less(i, j int) bool { return h.key(h.s.domHeap[i]) < h.key(h.s.domHeap[j]) }
func (h topHeap) Swap(i, j int) {
	t := h.s.domHeap
	t[i], t[j] = t[j], t[i]
	t[i].pos, t[j].pos = i, j
}
func (h topHeap) Push(x any) {
	d := x.(*domEntry)
	d.pos = len(h.s.domHeap)
	h.s.domHeap = append(h.s.domHeap, d)
}
func (h topHeap) Pop() any {
	t := h.s.domHeap
	d := t[len(t)-1]
	h.s.domHeap = t[:len(t)-1]
	d.pos = -1
	return d
}

// domain returns the entry of a destination, made on first use. Call
// with s.mu held.
func (s *Store) domain(name string) *domEntry {
	if i, ok := s.domIdx[name]; ok {
		return s.doms[i]
	}
	d := &domEntry{name: name, idx: uint32(len(s.doms)), pos: -1}
	s.doms = append(s.doms, d)
	s.domIdx[name] = d.idx
	return d
}

// fixTop puts d where it belongs in the domain heap after its first
// message or hold changed. Call with s.mu held.
func (s *Store) fixTop(d *domEntry) {
	th := topHeap{s}
	switch {
	case len(d.heap) == 0 && d.pos >= 0:
		heap.Remove(th, d.pos)
	case len(d.heap) > 0 && d.pos < 0:
		heap.Push(th, d)
	case len(d.heap) > 0:
		heap.Fix(th, d.pos)
	}
}

// schedule puts slot in its domain's heap at its due time, or takes it
// out when it has none or is leased. Call with s.mu held.
func (s *Store) schedule(slot uint32) {
	e := s.arena.at(slot)
	d := s.doms[e.dom]
	dh := domHeap{&s.arena, d}
	want := e.next != 0 && e.flags&(flagLeased|flagCopying) == 0
	switch {
	case want && e.pos < 0:
		heap.Push(dh, slot)
	case want:
		heap.Fix(dh, int(e.pos))
	case e.pos >= 0:
		heap.Remove(dh, int(e.pos))
	default:
		return
	}
	s.fixTop(d)
}

// nextOf is the due time of m as the index keeps it.
func nextOf(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.UnixNano()
}

// insertEntry adds a message to the index (recovery or commit). Call
// with s.mu held.
func (s *Store) insertEntry(id string, dom string, next time.Time, bodyLen int64, msg recLoc) uint32 {
	slot := s.arena.alloc()
	e := s.arena.at(slot)
	copy(e.id[:], id)
	e.flags = flagUsed
	e.next = nextOf(next)
	e.bodyLen = bodyLen
	e.msg = msg
	e.pos = -1
	d := s.domain(dom)
	d.count++
	e.dom = d.idx
	s.ids.insert(&s.arena, slot)
	s.addLive(e, 1)
	s.schedule(slot)
	return slot
}

// removeEntry drops a message from the index. Call with s.mu held.
func (s *Store) removeEntry(slot uint32) {
	e := s.arena.at(slot)
	if e.pos >= 0 {
		e.next = 0
		e.flags &^= flagLeased | flagCopying
		s.schedule(slot)
	}
	s.addLive(e, -1)
	s.doms[e.dom].count--
	s.ids.remove(&s.arena, slot)
	s.arena.release(slot)
}

// addLive adds (sign 1) or takes away (-1) the entry's records from its
// segments' live accounts.
func (s *Store) addLive(e *entry, sign int64) {
	if seg := s.segs[uint64(e.msg.seg)]; seg != nil {
		seg.live += int(sign)
		seg.liveBytes += sign * (headerLen + int64(e.msg.metaLen) + e.bodyLen)
	}
	if e.state.valid() {
		if seg := s.segs[uint64(e.state.seg)]; seg != nil {
			seg.liveBytes += sign * (headerLen + int64(e.state.metaLen))
		}
	}
}

// setState records a new state record for an entry. Call with s.mu held.
func (s *Store) setState(e *entry, loc recLoc, next time.Time, delayed bool) {
	s.addLive(e, -1)
	e.state = loc
	s.addLive(e, 1)
	e.next = nextOf(next)
	if delayed {
		e.flags |= flagDelayed
	} else {
		e.flags &^= flagDelayed
	}
}

// msgDomain is the index's domain of a message: its recipients' domain
// when they share one, else multiDomain.
func msgDomain(rcpts []RcptSpec) string {
	if len(rcpts) == 0 {
		return multiDomain
	}
	d := AddrDomain(rcpts[0].Addr)
	for _, r := range rcpts[1:] {
		if AddrDomain(r.Addr) != d {
			return multiDomain
		}
	}
	return d
}
