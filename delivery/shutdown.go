package delivery

import (
	"net"
	"sync"
	"time"

	"go.uber.org/zap"
)

// Shutdown with a deadline (issue #11, finding 1). When Run's context
// ends, set-ups and policy lookups in progress stop at once (they follow
// the context), but a transaction already sending goes on: it may finish
// within delivery.shutdown_timeout. After that the engine closes every
// outbound connection it still holds, which wakes any read or write
// blocked on a stalled MX, and the jobs cut short this way are requeued
// as not attempted (the message's round closes; no attempt is counted,
// no delivery line is logged): the MX never said yes, and the next start
// tries again. A job whose recipients were already accepted is recorded
// as usual.

// connSet holds the outbound connections open now, so that shutdown can
// close them from outside the goroutines that use them.
type connSet struct {
	mu     sync.Mutex
	conns  map[*trackedConn]struct{}
	closed bool // closeAll ran: every later connection is closed at once
}

// trackedConn is a connection of a connSet; closing it leaves the set.
type trackedConn struct {
	net.Conn
	set *connSet
}

func (c *trackedConn) Close() error {
	c.set.mu.Lock()
	delete(c.set.conns, c)
	c.set.mu.Unlock()
	return c.Conn.Close()
}

// track adds conn to the set; the connection to use is the one returned.
func (s *connSet) track(conn net.Conn) net.Conn {
	c := &trackedConn{Conn: conn, set: s}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		conn.Close()
		return c
	}
	if s.conns == nil {
		s.conns = map[*trackedConn]struct{}{}
	}
	s.conns[c] = struct{}{}
	s.mu.Unlock()
	return c
}

// closeAll closes every connection of the set, and any tracked later,
// and returns how many were open. net.Conn.Close may be called while
// another goroutine reads or writes: that is what unblocks it.
func (s *connSet) closeAll() int {
	s.mu.Lock()
	s.closed = true
	conns := s.conns
	s.conns = nil
	s.mu.Unlock()
	for c := range conns {
		c.Conn.Close()
	}
	return len(conns)
}

// open is the number of connections in the set.
func (s *connSet) open() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// drain waits for the workers in flight, at most grace; then it closes
// their connections (and the parked ones), marks the engine cut so that
// what the workers report next is requeued rather than counted, and waits
// for them to return, which the closed connections make quick.
func (e *Engine) drain(grace time.Duration) {
	done := make(chan struct{})
	go func() { e.wg.Wait(); close(done) }()
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-done:
		return
	case <-t.C:
	}
	e.cut.Store(true)
	n := e.conns.closeAll()
	e.log.Warn("shutdown timeout: deliveries in flight cut, their messages stay queued",
		zap.Duration("shutdown_timeout", grace), zap.Int("connections_closed", n))
	<-done
}

// cutShort reports whether job j's outcomes come from an attempt the
// shutdown deadline cut (drain), and if so requeues the job without
// counting an attempt. A job with a recipient delivered is not cut
// short: what the MX accepted must be recorded, or it would be sent
// twice.
func (e *Engine) cutShort(j *job, outs []outcome) bool {
	if !e.cut.Load() {
		return false
	}
	for _, o := range outs {
		if o.result == "delivered" {
			return false
		}
	}
	e.log.Info("delivery cut at shutdown",
		zap.String("queue_id", j.ms.m.ID), zap.String("domain", j.domain), zap.Int("rcpts", len(j.idx)))
	e.abandon(j)
	return true
}
