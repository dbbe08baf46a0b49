package jsqueue

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stsrelay/stsrelay/queue"
)

// Options configure a Queue (and Provision).
type Options struct {
	// Prefix names the stream, buckets, consumer and subjects
	// (default "stsrelay"): letters, digits, '-' and '_'.
	Prefix string
	// Replicas is the replication factor of the stream and buckets
	// (default 3).
	Replicas int
	// NodeName names this relay in locks and in the messages it writes.
	NodeName string
	// Schedule drives retries and expiry (as for queue.Store).
	Schedule queue.Schedule
	// InlineBodyBytes: bodies up to this size travel in the stream
	// message, larger ones in the object store (default 256 KiB). A
	// body that would not fit under the server's max_payload goes to
	// the object store whatever its size.
	InlineBodyBytes int
	// AckWait is the lease: a node that stops renewing it loses its
	// messages to the others this long after (default 2 minutes).
	AckWait time.Duration
	// Now is the clock (tests); nil means time.Now.
	Now func() time.Time
	// TempDir holds spool files: bodies on their way in, object-store
	// bodies downloaded for delivery (default os.TempDir()).
	TempDir string
	// Prefetch bounds how many due messages this node holds fetched but
	// not yet leased (default 256).
	Prefetch int
	// ControlWait is how long LeaseID waits for the other nodes to say
	// whether a delivery of the message is in flight (default 250ms).
	ControlWait time.Duration
	// OpTimeout bounds one queue operation against JetStream, retries
	// through a leader election included (default 30s).
	OpTimeout time.Duration
}

const (
	defaultInline = 256 << 10
	// maxNakDelay caps one NakWithDelay: a deferred message comes back
	// at least this often and is checked against its not-before again.
	maxNakDelay = time.Hour
	// dupWindow is the stream's duplicate window for Nats-Msg-Id.
	dupWindow = 2 * time.Minute
)

var prefixRE = regexp.MustCompile(`^[A-Za-z0-9_-]+$`)

func (o *Options) setDefaults() error {
	if o.Prefix == "" {
		o.Prefix = "stsrelay"
	}
	if !prefixRE.MatchString(o.Prefix) {
		return fmt.Errorf("jsqueue: prefix %q: only letters, digits, '-' and '_'", o.Prefix)
	}
	if o.Replicas <= 0 {
		o.Replicas = 3
	}
	if o.InlineBodyBytes <= 0 {
		o.InlineBodyBytes = defaultInline
	}
	if o.AckWait <= 0 {
		o.AckWait = 2 * time.Minute
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.TempDir == "" {
		o.TempDir = os.TempDir()
	}
	if o.Prefetch <= 0 {
		o.Prefetch = 256
	}
	if o.ControlWait <= 0 {
		o.ControlWait = 250 * time.Millisecond
	}
	if o.OpTimeout <= 0 {
		o.OpTimeout = 30 * time.Second
	}
	if o.Schedule.MaxQueueTime <= 0 {
		o.Schedule.MaxQueueTime = 120 * time.Hour
	}
	if o.NodeName == "" {
		o.NodeName, _ = os.Hostname()
	}
	return nil
}

// names are the JetStream names derived from the prefix.
type names struct {
	stream   string // STSRELAY_QUEUE
	subjects string // stsrelay.q.>
	subj     string // stsrelay.q. (+ queue ID)
	consumer string // stsrelay-workers
	bodies   string // STSRELAY_BODIES
	locks    string // STSRELAY_LOCKS
	ctl      string // stsrelay.ctl
}

func namesFor(prefix string) names {
	up := strings.ToUpper(prefix)
	return names{
		stream:   up + "_QUEUE",
		subjects: prefix + ".q.>",
		subj:     prefix + ".q.",
		consumer: prefix + "-workers",
		bodies:   up + "_BODIES",
		locks:    up + "_LOCKS",
		ctl:      prefix + ".ctl",
	}
}

func lockTTL(o *Options) time.Duration { return max(o.AckWait, time.Second) }

func streamConfig(o *Options, n names) jetstream.StreamConfig {
	return jetstream.StreamConfig{
		Name:              n.stream,
		Description:       "stsrelay fleet queue: one subject per queued message, newest version only",
		Subjects:          []string{n.subjects},
		Retention:         jetstream.LimitsPolicy,
		MaxMsgsPerSubject: 1,
		MaxMsgs:           -1,
		MaxBytes:          -1,
		MaxAge:            0,
		Discard:           jetstream.DiscardOld,
		Storage:           jetstream.FileStorage,
		Replicas:          o.Replicas,
		Duplicates:        dupWindow,
	}
}

func consumerConfig(o *Options, n names) jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:       n.consumer,
		Description:   "stsrelay delivery: shared by every node of the fleet",
		DeliverPolicy: jetstream.DeliverAllPolicy,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       o.AckWait,
		MaxDeliver:    -1,
		// Deferred messages wait NakWithDelay'd, which counts as
		// pending: any limit here would cap the number of deferred
		// messages, and new mail would stop flowing behind them.
		MaxAckPending: -1,
		FilterSubject: n.subjects,
		ReplayPolicy:  jetstream.ReplayInstantPolicy,
	}
}

// Provision creates or updates the stream, the consumer, the body object
// store and the lock bucket. It is idempotent, and every node calls it
// at start-up (New does). Existing queued messages are kept.
func Provision(ctx context.Context, js jetstream.JetStream, o Options) error {
	if err := o.setDefaults(); err != nil {
		return err
	}
	n := namesFor(o.Prefix)
	return retryProvision(ctx, func() error {
		s, err := js.CreateOrUpdateStream(ctx, streamConfig(&o, n))
		if err != nil {
			return fmt.Errorf("stream %s: %w", n.stream, err)
		}
		if _, err := s.CreateOrUpdateConsumer(ctx, consumerConfig(&o, n)); err != nil {
			return fmt.Errorf("consumer %s: %w", n.consumer, err)
		}
		if _, err := js.CreateOrUpdateObjectStore(ctx, jetstream.ObjectStoreConfig{
			Bucket:      n.bodies,
			Description: "stsrelay fleet queue: message bodies too large for the stream",
			Storage:     jetstream.FileStorage,
			Replicas:    o.Replicas,
		}); err != nil {
			return fmt.Errorf("object store %s: %w", n.bodies, err)
		}
		if _, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket:      n.locks,
			Description: "stsrelay fleet queue: operator locks on queued messages",
			History:     1,
			TTL:         lockTTL(&o),
			Storage:     jetstream.FileStorage,
			Replicas:    o.Replicas,
		}); err != nil {
			return fmt.Errorf("lock bucket %s: %w", n.locks, err)
		}
		return nil
	})
}

// retryProvision retries f a few times while the cluster settles (nodes
// provisioning at once, a leader being elected).
func retryProvision(ctx context.Context, f func() error) error {
	var err error
	wait := 100 * time.Millisecond
	for attempt := 0; ; attempt++ {
		if err = f(); err == nil {
			return nil
		}
		if attempt >= 8 {
			return fmt.Errorf("jsqueue: provision: %w", err)
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("jsqueue: provision: %w", err)
		case <-time.After(wait):
		}
		wait = min(2*wait, 2*time.Second)
	}
}
