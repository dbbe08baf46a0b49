package jsqueue

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stsrelay/stsrelay/queue"
)

var _ queue.Queue = (*Queue)(nil)

// Queue is the fleet queue of one relay node. It is safe for concurrent
// use.
type Queue struct {
	o      Options
	n      names
	nc     *nats.Conn
	js     jetstream.JetStream
	stream jetstream.Stream
	cons   jetstream.Consumer
	bodies jetstream.ObjectStore
	locks  jetstream.KeyValue
	// inst tells this Queue apart from every other (two may share a
	// node name, or a connection, in tests).
	inst string
	ids  queue.IDGenerator

	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	// The fetcher stops first at Close (fetchStop, then fetchDone), so
	// that no pull request of this node is left to receive the messages
	// Close hands back.
	fetchCtx  context.Context
	fetchStop context.CancelFunc
	fetchDone chan struct{}
	bg        sync.WaitGroup // fetcher, heartbeats, background retries
	async     sync.WaitGroup // UpdateAsync in flight
	ctlSub    *nats.Subscription

	wake chan struct{} // to the delivery engine: ready messages
	room chan struct{} // to the fetcher: Lease made room

	mu sync.Mutex
	// held are the messages this node holds, by ID: ready (fetched,
	// due, not leased) or leased.
	held map[string]*entry
	// ready are the held messages not leased, in fetch order.
	ready []*entry
	// live are the entries whose delivery (or lock) is renewed by the
	// heartbeat: held ones, and those whose Update is being written.
	live map[*entry]struct{}
	// writing are the entries whose Update is being written, by ID.
	writing map[string]*entry
	// holds are destinations held back locally (HoldDomain).
	holds map[string]time.Time
	// locked are IDs another node locked (LeaseID), until when.
	locked map[string]time.Time
	closed bool
	// undos are failed commits to take out (commit.go).
	undos   []undo
	undoing bool

	lastLen atomic.Int64
	ctr     counters

	infoMu sync.Mutex
	info   *jetstream.StreamInfo // CheckSpace's view, refreshed now and then
	infoAt time.Time
	oldMu  sync.Mutex
	oldest time.Time
	oldOK  bool
	oldAt  time.Time
}

// entry is one message this node holds.
type entry struct {
	id   string
	seq  uint64        // stream sequence of the version held
	msg  jetstream.Msg // its delivery; nil when taken with LeaseID
	rec  *record
	body []byte // inline body
	dom  string // single recipient domain, "" when several
	// heldAt is when the message was fetched (ready ones go back to
	// the consumer when no lease came for an AckWait).
	heldAt time.Time

	leased   bool
	retryNow bool   // Retry while leased: due now at the Update
	lockRev  uint64 // LeaseID: revision of the KV lock held
	lockVal  string // LeaseID: the lock's value

	// Requeue: the update to retry in the background.
	pending   *pending
	retryAt   time.Time
	retryWait time.Duration
	retrying  bool

	bodyMu   sync.Mutex
	bodyFile *os.File // object-store body downloaded for delivery
}

// New provisions the stream, consumer and buckets (idempotently) and
// starts this node's fetcher, heartbeats and control subscription. The
// caller keeps nc and closes it after Close.
func New(ctx context.Context, nc *nats.Conn, o Options) (*Queue, error) {
	if err := o.setDefaults(); err != nil {
		return nil, err
	}
	js, err := jetstream.New(nc)
	if err != nil {
		return nil, fmt.Errorf("jsqueue: %w", err)
	}
	if err := Provision(ctx, js, o); err != nil {
		return nil, err
	}
	q := &Queue{
		o:       o,
		n:       namesFor(o.Prefix),
		nc:      nc,
		js:      js,
		inst:    o.NodeName + "/" + nonce(4),
		wake:    make(chan struct{}, 1),
		room:    make(chan struct{}, 1),
		held:    map[string]*entry{},
		live:    map[*entry]struct{}{},
		writing: map[string]*entry{},
		holds:   map[string]time.Time{},
		locked:  map[string]time.Time{},
	}
	if q.stream, err = js.Stream(ctx, q.n.stream); err != nil {
		return nil, fmt.Errorf("jsqueue: stream %s: %w", q.n.stream, err)
	}
	if q.cons, err = q.stream.Consumer(ctx, q.n.consumer); err != nil {
		return nil, fmt.Errorf("jsqueue: consumer %s: %w", q.n.consumer, err)
	}
	if q.bodies, err = js.ObjectStore(ctx, q.n.bodies); err != nil {
		return nil, fmt.Errorf("jsqueue: object store %s: %w", q.n.bodies, err)
	}
	if q.locks, err = js.KeyValue(ctx, q.n.locks); err != nil {
		return nil, fmt.Errorf("jsqueue: lock bucket %s: %w", q.n.locks, err)
	}
	if q.ctlSub, err = nc.Subscribe(q.n.ctl, q.onControl); err != nil {
		return nil, fmt.Errorf("jsqueue: subscribe %s: %w", q.n.ctl, err)
	}
	q.ctx, q.cancel = context.WithCancel(context.Background())
	q.fetchCtx, q.fetchStop = context.WithCancel(q.ctx)
	q.fetchDone = make(chan struct{})
	q.bg.Add(1)
	go func() {
		defer close(q.fetchDone)
		q.fetchLoop()
	}()
	go q.heartbeatLoop()
	return q, nil
}

// Schedule returns the retry schedule.
func (q *Queue) Schedule() queue.Schedule { return q.o.Schedule }

// Close stops fetching and renewing leases. Messages fetched but not
// leased are Nak'd so that other nodes take them at once; leased ones
// (whose delivery never ended) come back to the others after AckWait.
// Updates in flight (UpdateAsync) are waited for first. The connection
// stays open: it is the caller's.
func (q *Queue) Close() error {
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return nil
	}
	q.closed = true
	q.mu.Unlock()
	q.fetchStop()
	<-q.fetchDone
	// The fetch's unsubscription goes out before the Naks below, so the
	// consumer gives them to other nodes' pulls, not to this one's.
	_ = q.nc.FlushTimeout(2 * time.Second)
	q.async.Wait()
	q.mu.Lock()
	var naks []*entry
	for _, e := range q.ready {
		naks = append(naks, e)
		q.unholdLocked(e)
	}
	q.ready = nil
	q.mu.Unlock()
	for _, e := range naks {
		_ = e.msg.Nak()
	}
	if q.ctlSub != nil {
		_ = q.ctlSub.Unsubscribe()
	}
	q.cancel()
	q.bg.Wait()
	q.mu.Lock()
	for e := range q.live {
		e.closeBody()
	}
	q.mu.Unlock()
	// Acks and Naks are plain publishes: see them out.
	_ = q.nc.FlushTimeout(2 * time.Second)
	return nil
}

// opCtx bounds one operation.
func (q *Queue) opCtx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), q.o.OpTimeout)
}

// subject returns the stream subject of a queue ID.
func (q *Queue) subject(id string) string { return q.n.subj + id }

// errConflict: the message is not at the version the writer expected (an
// operator deleted or retried it, or another node took it over).
var errConflict = errors.New("changed or deleted meanwhile")

// pending is one logical publish: its dedup ID is fixed, so every retry
// of it is deduplicated against the attempts before.
type pending struct {
	msg    *nats.Msg
	expect uint64 // expected last sequence of the subject; 0: none
	// remove: delete the version at expect instead of publishing.
	remove bool
	err    error // the write could not be built
}

func apiCode(err error) (jetstream.ErrorCode, int, string, bool) {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) {
		return apiErr.ErrorCode, apiErr.Code, apiErr.Description, true
	}
	return 0, 0, "", false
}

// Server error codes (nats-server's jetstream_errors_generated.go).
const (
	codeAccountResources  = 10002
	codeClusterNotAvail   = 10008
	codeClusterNotLeader  = 10009
	codeInsufficientRes   = 10023
	codeNoMessageFound    = 10037
	codeSeqNotFound       = 10043
	codeMsgDeleteFailed   = 10057
	codeStoreFailed       = 10077
	codeDupConflict       = 10158
	codeWrongLastSeqConst = 10164
)

// transient reports whether err may go away on a retry (a leader
// election, a reconnect, a timeout).
func transient(err error) bool {
	if code, status, _, ok := apiCode(err); ok {
		return status == 503 || code == codeClusterNotAvail || code == codeClusterNotLeader || code == codeDupConflict
	}
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, nats.ErrTimeout) ||
		errors.Is(err, nats.ErrNoResponders) || errors.Is(err, jetstream.ErrNoStreamResponse) ||
		errors.Is(err, nats.ErrConnectionReconnecting) || errors.Is(err, nats.ErrDisconnected)
}

// mapErr turns JetStream's refusals into the queue's errors.
func mapErr(err error) error {
	code, _, desc, ok := apiCode(err)
	if !ok {
		return err
	}
	switch {
	case code == jetstream.JSErrCodeStreamWrongLastSequence || code == codeWrongLastSeqConst:
		return errConflict
	case code == codeAccountResources || code == codeInsufficientRes ||
		code == codeStoreFailed && strings.Contains(desc, "maximum"):
		return fmt.Errorf("%w: JetStream: %s", queue.ErrFull, desc)
	}
	return err
}

// retry runs f until it succeeds, fails for good, or ctx ends; each
// attempt gets at most attempt of ctx's time.
func retry(ctx context.Context, attempt time.Duration, f func(ctx context.Context) error) error {
	wait := 50 * time.Millisecond
	for {
		actx, cancel := context.WithTimeout(ctx, attempt)
		err := f(actx)
		cancel()
		if err == nil || !transient(err) || ctx.Err() != nil {
			if err != nil && ctx.Err() != nil && transient(err) {
				return fmt.Errorf("jsqueue: gave up: %w", err)
			}
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("jsqueue: gave up: %w", err)
		case <-time.After(wait):
		}
		wait = min(2*wait, time.Second)
	}
}

// publish stores p and waits for the publish ack (a quorum of replicas),
// retrying through elections and reconnects with the same dedup ID.
func (q *Queue) publish(ctx context.Context, p *pending) (*jetstream.PubAck, error) {
	var ack *jetstream.PubAck
	start := time.Now()
	err := retry(ctx, 5*time.Second, func(ctx context.Context) error {
		var opts []jetstream.PublishOpt
		opts = append(opts, jetstream.WithExpectStream(q.n.stream),
			jetstream.WithExpectLastSequencePerSubject(p.expect))
		// The message is reused across attempts: copy it, as the
		// client adds option headers to it.
		m := nats.NewMsg(p.msg.Subject)
		for k, v := range p.msg.Header {
			m.Header[k] = append([]string(nil), v...)
		}
		m.Data = p.msg.Data
		a, err := q.js.PublishMsg(ctx, m, opts...)
		if err != nil {
			return err
		}
		ack = a
		return nil
	})
	if err != nil {
		return nil, mapErr(err)
	}
	q.observePublish(time.Since(start))
	return ack, nil
}

// maxStreamMsg is the largest stream message (headers and data) this
// client may publish: the server's max_payload, less room for the
// headers the client adds.
func (q *Queue) maxStreamMsg() int {
	return int(q.nc.MaxPayload()) - 512
}

// isNotFound reports whether err says a message or object is not there.
func isNotFound(err error) bool {
	if errors.Is(err, jetstream.ErrMsgNotFound) || errors.Is(err, jetstream.ErrObjectNotFound) {
		return true
	}
	code, _, desc, ok := apiCode(err)
	return ok && (code == codeNoMessageFound || code == codeSeqNotFound ||
		code == codeMsgDeleteFailed && strings.Contains(desc, "not found"))
}

// getLast returns the current version of id: its stream message.
func (q *Queue) getLast(ctx context.Context, id string) (*jetstream.RawStreamMsg, error) {
	var raw *jetstream.RawStreamMsg
	err := retry(ctx, 5*time.Second, func(ctx context.Context) error {
		var err error
		raw, err = q.stream.GetLastMsgForSubject(ctx, q.subject(id))
		return err
	})
	if err != nil {
		if isNotFound(err) {
			return nil, fmt.Errorf("%s: %w", id, queue.ErrNotFound)
		}
		return nil, err
	}
	return raw, nil
}

// deleteBody removes a body object; one already gone is fine.
func (q *Queue) deleteBody(ctx context.Context, name string) error {
	if name == "" {
		return nil
	}
	err := retry(ctx, 5*time.Second, func(ctx context.Context) error {
		return q.bodies.Delete(ctx, name)
	})
	if err != nil && !errors.Is(err, jetstream.ErrObjectNotFound) {
		return err
	}
	return nil
}

// TempFile returns a new spool file in TempDir, already unlinked: its
// data lives until it is closed, and a crash leaves nothing behind.
func (q *Queue) TempFile() (*os.File, error) {
	f, err := os.CreateTemp(q.o.TempDir, "stsrelay-jsq-*.tmp")
	if err != nil {
		return nil, fmt.Errorf("jsqueue spool: %w", err)
	}
	os.Remove(f.Name())
	return f, nil
}

func (q *Queue) signalWake() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

func (q *Queue) signalRoom() {
	select {
	case q.room <- struct{}{}:
	default:
	}
}

// Wake returns a channel that receives when due messages arrived.
func (q *Queue) Wake() <-chan struct{} { return q.wake }
