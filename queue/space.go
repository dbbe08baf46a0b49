package queue

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// ErrFull is returned (wrapped) when a new message is refused because
// the queue is over queue.max_disk_bytes or its file system is below
// queue.min_free_disk_bytes. The submission server answers 452 4.3.1
// (RFC 3463: mail system full); accepting resumes by itself once
// deliveries or compaction free the space.
var ErrFull = errors.New("queue full")

// spaceCheck caches the file system's free space for a moment, so that
// a busy server does not call statfs for every message.
type spaceCheck struct {
	dir  string
	mu   sync.Mutex
	at   time.Time
	free int64
	err  error
}

func (c *spaceCheck) freeBytes(now time.Time) (int64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if now.Sub(c.at) < time.Second && now.After(c.at) {
		return c.free, c.err
	}
	var st unix.Statfs_t
	c.err = unix.Statfs(c.dir, &st)
	c.free = int64(st.Bavail) * int64(st.Bsize)
	c.at = now
	return c.free, c.err
}

// CheckSpace says whether a new message of about size bytes may be
// queued now: nil, or an error wrapping ErrFull that says which limit
// was reached. Deliveries' updates and compaction are not limited: they
// are what frees space.
func (s *Store) CheckSpace(size int64) error {
	if s.opts.MaxDiskBytes > 0 {
		s.mu.Lock()
		disk, _ := s.diskLocked()
		s.mu.Unlock()
		if disk+size > s.opts.MaxDiskBytes {
			return fmt.Errorf("%w: the queue takes %d bytes on disk, max_disk_bytes is %d", ErrFull, disk, s.opts.MaxDiskBytes)
		}
	}
	if s.opts.MinFreeBytes > 0 {
		free, err := s.space.freeBytes(time.Now())
		if err == nil && free-size < s.opts.MinFreeBytes {
			return fmt.Errorf("%w: %d bytes free on the queue's file system, min_free_disk_bytes is %d", ErrFull, free, s.opts.MinFreeBytes)
		}
	}
	return nil
}

// fault runs the test hook for op, if any.
func (s *Store) fault(op string) error {
	if s.opts.testFault == nil {
		return nil
	}
	return s.opts.testFault(op)
}
