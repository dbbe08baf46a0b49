package queue

import (
	"io"
	"os"
	"time"
)

// Queue is what the submission server, delivery, the CLI and the metrics
// need of a queue. Store (this package: a segment log on local disk) is
// the default; fleet mode runs a queue replicated in NATS JetStream
// (internal/fleet/jsqueue) behind the same interface, so none of them
// care which one runs.
//
// The contract every implementation keeps:
//   - Commit (and Enqueue) return only once the message is durable: on
//     stable storage, or stored on a quorum of replicas.
//   - A leased message is the caller's until Update, Release or Requeue;
//     it is not handed out again meanwhile (in a fleet: not while its
//     lease is renewed).
//   - Update records the recipients' states durably; a message whose
//     recipients are all final leaves the queue.
type Queue interface {
	// Submission.
	NewWriter() MessageWriter
	CheckSpace(size int64) error
	Enqueue(env Envelope, body io.Reader) (string, error)
	EnqueueReport(from, to string, msg io.Reader) (string, error)
	TempFile() (*os.File, error)

	// Delivery.
	Wake() <-chan struct{}
	NextDue() (time.Time, bool)
	Lease(now time.Time, n int) []*Message
	LeaseID(id string) (*Message, error)
	Leased(id string) bool
	Release(id string)
	Requeue(m *Message)
	Update(m *Message) error
	UpdateAsync(m *Message, then func(error)) error
	HoldDomain(domain string, until time.Time)
	Body(id string) (*io.SectionReader, error)
	Schedule() Schedule

	// Operators.
	Get(id string) (*Message, error)
	List() []*Message
	Select(o ListOptions) ([]*Message, int)
	Summary(now time.Time) Summary
	Retry(id string) error
	RetryDomain(domain string) int
	Delete(id string) error
	Len() int
	Oldest() (time.Time, bool)
	Stats() Stats
	Close() error
}

// MessageWriter receives one message body: Write it, then Commit with
// the envelope, or Abort.
type MessageWriter interface {
	io.Writer
	Size() int64
	Commit(env Envelope) (string, error)
	Abort()
}

var _ Queue = (*Store)(nil)
