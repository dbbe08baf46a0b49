// Package kvcache is the fleet's shared MTA-STS policy cache: it
// implements mtastsdb.Shared on a JetStream key-value bucket, so that a
// fleet of relays fetches each policy (domain and TXT id) once, shares
// the negative back-off after a failed fetch, and sees a policy fetched,
// refreshed or forgotten on one node within a second on the others.
//
// Layout of the bucket <prefix>_MTASTS (History 1, per-key TTLs allowed):
//
//	policy.<domain>  JSON mtastsdb.SharedEntry: the policy body as fetched,
//	                 its TXT id, fetch and last-use times, last error, and
//	                 the back-off {id, until, result_type, reason, error}
//	lock.<domain>    JSON {node, id, at}: the fetch lock, created with a
//	                 TTL of the fetch timeout plus a margin, purged by its
//	                 holder once the result is in policy.<domain>
//
// <domain> is the domain's A-label; a byte other than [a-z0-9_-] or a dot
// between two labels is written =XX (hex), so every key is valid.
package kvcache

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/mtasts/mtastsdb"
)

// Defaults of Options.
const (
	DefaultPrefix   = "STSRELAY"
	DefaultReplicas = 3
	// BucketSuffix is appended to the prefix to name the bucket.
	BucketSuffix = "_MTASTS"
	// MarkerTTL is how long the bucket keeps the marker of a key removed
	// by its TTL or purged (LimitMarkerTTL): watchers see the removal.
	MarkerTTL = time.Minute
	// WaitPoll is how often Wait reads the lock besides watching it.
	WaitPoll = 250 * time.Millisecond
	// maxUpdateTries bounds Update's compare-and-set retries.
	maxUpdateTries = 32
)

const (
	policyPrefix = "policy."
	lockPrefix   = "lock."
)

// Options configure the shared cache.
type Options struct {
	// Prefix is [cluster] stream_prefix; "" means DefaultPrefix.
	Prefix string
	// Replicas is [cluster] replicas, used when the bucket is created;
	// 0 means DefaultReplicas.
	Replicas int
	// Node names this relay in the locks it holds (for operators).
	Node string
	// Logger; nil means none.
	Logger *zap.Logger
}

func (o Options) prefix() string {
	if o.Prefix == "" {
		return DefaultPrefix
	}
	return o.Prefix
}

// Bucket is the name of the bucket for prefix.
func Bucket(prefix string) string {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	return prefix + BucketSuffix
}

// Config is the bucket's configuration.
func Config(o Options) jetstream.KeyValueConfig {
	r := o.Replicas
	if r <= 0 {
		r = DefaultReplicas
	}
	return jetstream.KeyValueConfig{
		Bucket:         Bucket(o.prefix()),
		Description:    "stsrelay MTA-STS policy cache (fleet mode)",
		History:        1,
		Replicas:       r,
		Storage:        jetstream.FileStorage,
		LimitMarkerTTL: MarkerTTL,
	}
}

// Provision creates the bucket, or updates its configuration to Config.
func Provision(ctx context.Context, js jetstream.JetStream, o Options) (jetstream.KeyValue, error) {
	kv, err := js.CreateOrUpdateKeyValue(ctx, Config(o))
	if err != nil {
		return nil, fmt.Errorf("kvcache: provision bucket %s: %w", Bucket(o.prefix()), err)
	}
	return kv, nil
}

// Shared is the shared cache of one relay. Close it when done.
type Shared struct {
	js   jetstream.JetStream
	kv   jetstream.KeyValue
	node string
	log  *zap.Logger

	ctx    context.Context // until Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // the watchers' goroutines
}

var _ mtastsdb.Shared = (*Shared)(nil)

// New opens the bucket, creating it (Provision) when it does not exist.
// An existing bucket must allow per-key TTLs (the fetch locks need them).
func New(ctx context.Context, js jetstream.JetStream, o Options) (*Shared, error) {
	name := Bucket(o.prefix())
	kv, err := js.KeyValue(ctx, name)
	if errors.Is(err, jetstream.ErrBucketNotFound) {
		kv, err = Provision(ctx, js, o)
	}
	if err != nil {
		return nil, fmt.Errorf("kvcache: open bucket %s: %w", name, err)
	}
	st, err := kv.Status(ctx)
	if err != nil {
		return nil, fmt.Errorf("kvcache: bucket %s: %w", name, err)
	}
	if st.LimitMarkerTTL() <= 0 {
		return nil, fmt.Errorf("kvcache: bucket %s does not allow per-key TTLs (LimitMarkerTTL); provision it again", name)
	}
	if err := waitAnswering(ctx, kv); err != nil {
		return nil, fmt.Errorf("kvcache: bucket %s: %w", name, err)
	}
	s := &Shared{js: js, kv: kv, node: o.Node, log: o.Logger}
	if s.log == nil {
		s.log = zap.NewNop()
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s, nil
}

// waitAnswering returns once the bucket answers reads: right after a
// replicated bucket is created, its replicas take a moment to serve
// them ("no responders").
func waitAnswering(ctx context.Context, kv jetstream.KeyValue) error {
	for {
		_, err := kv.Get(ctx, "ready")
		if err == nil || errors.Is(err, jetstream.ErrKeyNotFound) {
			return nil
		}
		if !errors.Is(err, nats.ErrNoResponders) {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%w (%w)", err, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Close stops the watchers.
func (s *Shared) Close() {
	s.cancel()
	s.wg.Wait()
}

// Load implements mtastsdb.Shared.
func (s *Shared) Load(ctx context.Context, domain string) (*mtastsdb.SharedEntry, uint64, error) {
	kve, err := s.kv.Get(ctx, policyPrefix+Key(domain))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, 0, nil
	}
	if err != nil {
		return nil, 0, fmt.Errorf("kvcache: get %s: %w", domain, err)
	}
	e, err := decode(kve.Value())
	if err != nil {
		return nil, 0, fmt.Errorf("kvcache: entry of %s: %w", domain, err)
	}
	return e, kve.Revision(), nil
}

func decode(b []byte) (*mtastsdb.SharedEntry, error) {
	var e mtastsdb.SharedEntry
	if err := json.Unmarshal(b, &e); err != nil {
		return nil, err
	}
	return &e, nil
}

// Update implements mtastsdb.Shared: a read, then a write that succeeds
// only if the key is still at the revision read, retried when another
// node wrote in between.
func (s *Shared) Update(ctx context.Context, domain string, fn func(cur *mtastsdb.SharedEntry) (*mtastsdb.SharedEntry, bool)) error {
	key := policyPrefix + Key(domain)
	for try := range maxUpdateTries {
		var cur *mtastsdb.SharedEntry
		var rev uint64
		kve, err := s.kv.Get(ctx, key)
		switch {
		case errors.Is(err, jetstream.ErrKeyNotFound):
		case err != nil:
			return fmt.Errorf("kvcache: get %s: %w", domain, err)
		default:
			rev = kve.Revision()
			if cur, err = decode(kve.Value()); err != nil {
				s.log.Warn("kvcache_bad_entry", zap.String("domain", domain), zap.Error(err))
				cur = nil // overwritten
			}
		}
		next, write := fn(cur)
		if !write {
			return nil
		}
		switch {
		case next == nil && rev == 0:
			return nil
		case next == nil:
			err = s.kv.Delete(ctx, key, jetstream.LastRevision(rev))
		default:
			n := *next
			n.Domain = domain
			var data []byte
			if data, err = json.Marshal(&n); err != nil {
				return fmt.Errorf("kvcache: encode %s: %w", domain, err)
			}
			if rev == 0 {
				_, err = s.kv.Create(ctx, key, data)
			} else {
				_, err = s.kv.Update(ctx, key, data, rev)
			}
		}
		if err == nil {
			return nil
		}
		if !conflict(err) {
			return fmt.Errorf("kvcache: write %s: %w", domain, err)
		}
		// Another writer got in first: read again, after a short random
		// pause so that contending writers spread out.
		t := time.NewTimer(time.Duration(rand.Int64N(int64(time.Millisecond) << min(try, 5))))
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		}
	}
	return fmt.Errorf("kvcache: write %s: too many concurrent writers", domain)
}

// conflict reports whether a write failed because the key was not at
// the revision expected: another writer got in first. Create reports it
// as ErrKeyExists, except when the key held a delete marker, where the
// server's "wrong last sequence" error (10071, or 10164 on a replicated
// bucket) comes back as it is.
func conflict(err error) bool {
	if errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
		return true
	}
	var ae *jetstream.APIError
	return errors.As(err, &ae) && (ae.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		ae.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// lockValue is the value of a lock key, for operators.
type lockValue struct {
	Node string    `json:"node"`
	ID   string    `json:"id"`
	At   time.Time `json:"at"`
}

// Lock implements mtastsdb.Shared: it creates lock.<domain> with a TTL
// (rounded up to whole seconds, the server's unit); creation fails when
// the key exists, so one node holds it at a time.
func (s *Shared) Lock(ctx context.Context, domain, id string, ttl time.Duration) (func(), bool, error) {
	key := lockPrefix + Key(domain)
	ttl = max(time.Second, (ttl + time.Second - 1).Truncate(time.Second))
	data, _ := json.Marshal(lockValue{Node: s.node, ID: id, At: time.Now().UTC()})
	rev, err := s.kv.Create(ctx, key, data, jetstream.KeyTTL(ttl))
	if conflict(err) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("kvcache: lock %s: %w", domain, err)
	}
	unlock := func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		// Only our own lock: if it expired and another node took it,
		// the revision differs and nothing is removed. The marker
		// goes away after MarkerTTL.
		err := s.kv.Purge(ctx, key, jetstream.LastRevision(rev), jetstream.PurgeTTL(MarkerTTL))
		if err != nil && !errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			s.log.Warn("kvcache_unlock", zap.String("domain", domain), zap.Error(err))
		}
	}
	return unlock, true, nil
}

// Wait implements mtastsdb.Shared: it watches lock.<domain> until no value
// is there (released, expired, or never taken). It also reads the key
// every WaitPoll: while a server of the cluster is being replaced, a new
// watcher may take seconds to start, and reads still work.
func (s *Shared) Wait(ctx context.Context, domain string) error {
	key := lockPrefix + Key(domain)
	wctx, cancel := context.WithCancel(ctx)
	started := make(chan jetstream.KeyWatcher, 1)
	go func() {
		w, err := s.kv.Watch(wctx, key)
		if err != nil {
			w = nil
		}
		started <- w
	}()
	var w jetstream.KeyWatcher
	defer func() {
		cancel()
		if started != nil {
			w = <-started // returns soon: its context is cancelled
		}
		if w != nil {
			s.stop(w)
		}
	}()
	var updates <-chan jetstream.KeyValueEntry
	poll := time.NewTicker(WaitPoll)
	defer poll.Stop()
	held, initDone := false, false
	for {
		select {
		case w = <-started:
			if w != nil {
				updates = w.Updates()
			}
			started = nil
		case u, ok := <-updates:
			if !ok {
				updates = nil // polling only
				continue
			}
			if u == nil {
				initDone = true
			} else {
				held = u.Operation() == jetstream.KeyValuePut
			}
			if initDone && !held {
				return nil
			}
		case <-poll.C:
			_, err := s.kv.Get(ctx, key)
			if errors.Is(err, jetstream.ErrKeyNotFound) {
				return nil
			}
		case <-ctx.Done():
			return ctx.Err()
		}
	}
}

// Watch implements mtastsdb.Shared on the policy.> keys. The watcher lives
// until Close or until the connection closes. After a reconnect it reads
// all keys again: its consumer may have died with the server this node
// was connected to, which the library notices only after missed
// heartbeats (about 10 s); the cache ignores revisions it has applied.
func (s *Shared) Watch(ctx context.Context, fn func(domain string, e *mtastsdb.SharedEntry, rev uint64)) error {
	apply := func(u jetstream.KeyValueEntry) {
		d, ok := Domain(strings.TrimPrefix(u.Key(), policyPrefix))
		if !ok {
			s.log.Warn("kvcache_bad_key", zap.String("key", u.Key()))
			return
		}
		if u.Operation() != jetstream.KeyValuePut {
			fn(d, nil, u.Revision())
			return
		}
		e, err := decode(u.Value())
		if err != nil {
			s.log.Warn("kvcache_bad_entry", zap.String("domain", d), zap.Error(err))
			return
		}
		fn(d, e, u.Revision())
	}
	nc := s.js.Conn()
	reconnected := nc.StatusChanged(nats.CONNECTED)
	w := s.watchPolicies(ctx)
	if w == nil {
		nc.RemoveStatusListener(reconnected)
		return fmt.Errorf("kvcache: watch: %w", context.Cause(ctx))
	}
	// The current entries, up to the nil that ends them.
	for initial := true; initial; {
		select {
		case u, ok := <-w.Updates():
			if !ok {
				nc.RemoveStatusListener(reconnected)
				return errors.New("kvcache: watch: closed")
			}
			if u == nil {
				initial = false
				break
			}
			apply(u)
		case <-ctx.Done():
			s.stop(w)
			nc.RemoveStatusListener(reconnected)
			return fmt.Errorf("kvcache: watch: %w", ctx.Err())
		}
	}
	s.wg.Go(func() {
		defer func() {
			if w != nil {
				s.stop(w)
			}
		}()
		defer nc.RemoveStatusListener(reconnected)
		for {
			select {
			case u, ok := <-w.Updates():
				if ok {
					if u != nil {
						apply(u)
					}
					continue
				}
				if nc.IsClosed() {
					return
				}
			case <-reconnected:
				s.log.Info("kvcache_resync", zap.String("reason", "reconnected"))
			case <-s.ctx.Done():
				return
			}
			s.stop(w)
			if w = s.watchPolicies(s.ctx); w == nil {
				return
			}
		}
	})
	return nil
}

// policyWatcher is a watcher with the context it was made with, which
// the library keeps to make its consumer again.
type policyWatcher struct {
	jetstream.KeyWatcher
	cancel context.CancelFunc
}

func (w *policyWatcher) Stop() error {
	err := w.KeyWatcher.Stop()
	w.cancel()
	return err
}

// watchAttempt bounds one attempt of watchPolicies: while the cluster
// replaces a dead server, a request to the JetStream API can go
// unanswered until its 5 s timeout where the next one works.
const watchAttempt = time.Second

// watchPolicies starts a watcher of the policy keys, trying again until
// it works; nil when ctx or the Shared is done first.
func (s *Shared) watchPolicies(ctx context.Context) *policyWatcher {
	for {
		wctx, cancel := context.WithCancel(s.ctx)
		timer := time.AfterFunc(watchAttempt, cancel)
		stopped := context.AfterFunc(ctx, cancel)
		w, err := s.kv.Watch(wctx, policyPrefix+">")
		inTime := timer.Stop()
		stopped()
		switch {
		case err == nil && inTime && ctx.Err() == nil:
			return &policyWatcher{KeyWatcher: w, cancel: cancel}
		case err == nil:
			s.stop(w) // made too late: its context is cancelled
		default:
			s.log.Info("kvcache_watch_retry", zap.Error(err))
		}
		cancel()
		select {
		case <-ctx.Done():
			return nil
		case <-s.ctx.Done():
			return nil
		case <-time.After(100 * time.Millisecond):
		}
	}
}

// stop stops a watcher in the background: stopping deletes its
// consumer, which waits for the JetStream API, and the API may be out
// for seconds while the cluster replaces a dead server.
func (s *Shared) stop(w jetstream.KeyWatcher) {
	go func() { _ = w.Stop() }()
}

// Key is the key token(s) of domain: the domain itself when it is made
// of labels of [a-z0-9_-], else with the other bytes escaped as =XX.
func Key(domain string) string {
	var b strings.Builder
	for i := 0; i < len(domain); i++ {
		c := domain[i]
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-', c == '_':
			b.WriteByte(c)
		case c == '.' && i > 0 && i < len(domain)-1 && domain[i+1] != '.':
			b.WriteByte(c)
		default:
			fmt.Fprintf(&b, "=%02X", c)
		}
	}
	return b.String()
}

// Domain reverses Key.
func Domain(key string) (string, bool) {
	var b strings.Builder
	for i := 0; i < len(key); i++ {
		c := key[i]
		if c != '=' {
			b.WriteByte(c)
			continue
		}
		if i+2 >= len(key) {
			return "", false
		}
		v, err := strconv.ParseUint(key[i+1:i+3], 16, 8)
		if err != nil {
			return "", false
		}
		b.WriteByte(byte(v))
		i += 2
	}
	return b.String(), true
}
