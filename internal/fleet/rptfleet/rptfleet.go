// Package rptfleet makes the relays of a fleet send one TLS-RPT report
// per policy domain and period between them (RFC 8460), with one
// report-id, whichever relays made the sessions. The shared state is one
// NATS JetStream key-value bucket, "<prefix>_TLSRPT", replicated over
// Config.Replicas servers; package tlsrpt keeps the protocol and knows
// nothing of NATS: a Node is its Sink, Source and JobStore.
//
// # Keys
//
//   - counts.<start>.<domain>.<node>: what relay <node> counted for
//     <domain> in the period starting at Unix second <start>: one
//     tlsrpt.PolicyCounts as JSON, the node's whole tally, so every write
//     replaces the last (idempotent). Each node writes it while the period
//     is open (Config.SnapshotEvery, only when changed), and a last time
//     when its Recorder closes the period (Recorder.HandOff, HandOffGrace
//     after the end).
//   - reporter: the lease. The value is the holder's node name; the key
//     carries a per-message TTL (LeaseTTL) and is renewed every LeaseTTL/3
//     by a publish that expects the key's last revision and sets the TTL
//     anew (KeyValue.Update would drop the TTL). The others try Create
//     every LeaseTTL/3, which succeeds once the key expired or was
//     released. A node believes it holds the lease only until LeaseTTL
//     (less a tenth) after it sent its last successful renewal, which is
//     before the server can expire the key, so two nodes never both
//     believe it (clocks running at the same rate).
//   - job.<start>.<domain>: the report job (tlsrpt's JSON: the report with
//     its report-id, and the state of each rua), created with Create, so
//     the first one made fixes the report-id, and updated with the
//     revision last seen, so a relay that lost the lease cannot overwrite
//     its successor's state. Removed a day after it is finished.
//   - done.<start>.<domain>: written (TTL DoneTTL, default 7 days) once
//     the job exists; counts that arrive for that period and domain later
//     are deleted unreported (and logged), like a Recorder's late sessions.
//
// <domain> and <node> are escaped to key tokens: [a-zA-Z0-9-] as is, "."
// as "_", any other byte as "=" and two hex digits.
//
// # The reporter
//
// Only the lease holder's tlsrptsend.Reporter does anything (Options.Active is
// IsReporter). MergeAfter after a period ends (later than every node's
// hand-off) it reads all counts of that period per domain (Closed), adds
// them up (tlsrptdb.MergeCounts), creates the job, then writes the done
// marker and deletes the counts it read (Done; a count key rewritten
// since is kept and dropped at the next pass as late). It then sends as a
// standalone relay does, writing each rua's state to the job key after
// each attempt.
//
// # What is guaranteed
//
//   - One report-id per policy domain and period for the whole fleet:
//     the job key is created once, and counts for a period and domain
//     whose job exists are never made into a second job.
//   - Counts a node wrote before it died are reported: its last snapshot
//     while the period was open (at most SnapshotEvery old), or its final
//     hand-off. A node that is down at MergeAfter and comes back later
//     hands off its remaining counts then, and they are dropped as late.
//   - The reporter dying: the lease expires within LeaseTTL and another
//     node takes it (within LeaseTTL/3 more), reloads the jobs and goes on:
//     jobs not yet made are made from the counts still in the bucket (a
//     job made but not yet followed by Done is found and kept); a rua
//     already marked sent is not sent again; a rua whose attempt was under
//     way when the reporter died may receive the report a second time,
//     with the same report-id (RFC 8460 §5.3 lets receivers drop such
//     duplicates), exactly as after a standalone relay's crash. Reports are
//     delayed by at most the takeover time, plus the rua's retry gap.
//   - A reporter cut off from NATS stops believing it is the reporter
//     before its lease can expire; a send it started before then may
//     still finish, so the one duplicate above is also possible there.
//
// Counts keys and job keys hold one domain each, far below any sane
// max_payload; should one not fit a quarter of it (a node's counts) or half
// of it (the merged counts), its rarest failure details are dropped and
// logged, the summary counts staying exact.
//
// Node names must be unique in the fleet and stable across restarts (with
// the same data directory): the counts keys are per node, so a node's
// restart replaces its own tally with the same tally reloaded from disk.
// The nodes' clocks must agree to well within MergeAfter - HandOffGrace.
package rptfleet

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/tlsrpt"
	"github.com/stsrelay/stsrelay/tlsrpt/tlsrptdb"
	"github.com/stsrelay/stsrelay/tlsrpt/tlsrptsend"
)

// Defaults of Config.
const (
	DefaultReplicas      = 3
	DefaultPrefix        = "STSRELAY"
	DefaultLeaseTTL      = 15 * time.Second
	DefaultSnapshotEvery = 10 * time.Second
	DefaultDoneTTL       = 7 * 24 * time.Hour
	DefaultOpTimeout     = 10 * time.Second
	// markerTTL is how long delete markers stay in the bucket: those the
	// server leaves when a key's TTL ends (the bucket's LimitMarkerTTL)
	// and those of purged counts and jobs.
	markerTTL = time.Minute
	leaseKey  = "reporter"
)

// Config configures a Node.
type Config struct {
	// JS is the fleet's JetStream context. Required.
	JS jetstream.JetStream
	// Prefix names the bucket "<Prefix>_TLSRPT" ([cluster] stream_prefix);
	// empty means DefaultPrefix.
	Prefix string
	// Node is this relay's name ([cluster] node_name), unique in the
	// fleet. Required.
	Node string
	// Replicas of the bucket; 0 means DefaultReplicas.
	Replicas int
	// Interval is the report period, the Recorder's. Required.
	Interval time.Duration
	// HandOffGrace is how long after a period's end the node hands its
	// counts off (sessions still being recorded); 0 means the Reporter's
	// grace, min(30s, Interval/10).
	HandOffGrace time.Duration
	// MergeAfter is how long after a period's end the reporter merges its
	// counts; it must exceed HandOffGrace. 0 means HandOffGrace plus
	// min(30s, Interval/4), at least 2s more.
	MergeAfter time.Duration
	// SnapshotEvery is how often the counts of the open period are
	// written when they changed; 0 means DefaultSnapshotEvery, negative
	// never (then a node that dies loses the open period's counts).
	SnapshotEvery time.Duration
	// LeaseTTL is the reporter lease's lifetime, renewed every third of
	// it; 0 means DefaultLeaseTTL. At least 1s (JetStream's smallest
	// per-message TTL).
	LeaseTTL time.Duration
	// DoneTTL is how long a period and domain whose report was made
	// refuses late counts; 0 means DefaultDoneTTL. Counts of periods that
	// ended longer ago are dropped.
	DoneTTL time.Duration
	// OpTimeout bounds each JetStream operation; 0 means DefaultOpTimeout.
	OpTimeout time.Duration
	// Now is the clock of periods (nil: time.Now); the same as the
	// Recorder's and the Reporter's. The lease always uses real time.
	Now func() time.Time
	// Logger; nil discards.
	Logger *zap.Logger
}

// Node is one relay's part in the fleet's TLS reporting: tlsrptdb.Sink for
// its Recorder, and tlsrptdb.Source and tlsrptsend.JobStore for its Reporter,
// which sends only while IsReporter. Its methods are safe for concurrent
// use.
type Node struct {
	cfg    Config
	js     jetstream.JetStream
	kv     jetstream.KeyValue
	log    *zap.Logger
	node   string // Node as a key token
	leaseS string // the lease key's subject (JS must have no domain or API prefix)

	mu         sync.Mutex
	leaseRev   uint64    // our lease's revision; 0: not held
	validUntil time.Time // real time until which we may act as reporter
	holder     string    // the holder last seen

	putMu   sync.Mutex
	lastPut map[string][]byte // counts key -> value last written

	srcMu    sync.Mutex
	read     map[pdKey]map[string]uint64 // counts read by Closed: key -> revision
	nextList time.Time                   // Closed lists the counts keys again then

	jobMu  sync.Mutex
	jobRev map[string]uint64 // job key -> revision last seen
}

type pdKey struct {
	start  int64
	domain string // key token
}

// Open checks cfg and creates (or updates) the bucket.
func Open(ctx context.Context, cfg Config) (*Node, error) {
	if cfg.JS == nil || cfg.Node == "" {
		return nil, errors.New("rptfleet: needs JetStream and a node name")
	}
	if cfg.Interval < time.Second {
		return nil, fmt.Errorf("rptfleet: interval %v", cfg.Interval)
	}
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultPrefix
	}
	if cfg.Replicas <= 0 {
		cfg.Replicas = DefaultReplicas
	}
	if cfg.HandOffGrace <= 0 {
		cfg.HandOffGrace = min(30*time.Second, cfg.Interval/10)
	}
	if cfg.MergeAfter <= 0 {
		cfg.MergeAfter = cfg.HandOffGrace + max(2*time.Second, min(30*time.Second, cfg.Interval/4))
	}
	if cfg.MergeAfter <= cfg.HandOffGrace {
		return nil, fmt.Errorf("rptfleet: MergeAfter %v must exceed HandOffGrace %v", cfg.MergeAfter, cfg.HandOffGrace)
	}
	if cfg.SnapshotEvery == 0 {
		cfg.SnapshotEvery = DefaultSnapshotEvery
	}
	if cfg.LeaseTTL <= 0 {
		cfg.LeaseTTL = DefaultLeaseTTL
	}
	if cfg.LeaseTTL < time.Second {
		return nil, fmt.Errorf("rptfleet: lease TTL %v is under JetStream's 1s", cfg.LeaseTTL)
	}
	if cfg.DoneTTL <= 0 {
		cfg.DoneTTL = DefaultDoneTTL
	}
	if cfg.OpTimeout <= 0 {
		cfg.OpTimeout = DefaultOpTimeout
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = zap.NewNop()
	}
	bucket := cfg.Prefix + "_TLSRPT"
	kv, err := openBucket(ctx, cfg.JS, jetstream.KeyValueConfig{
		Bucket:         bucket,
		Description:    "stsrelay TLS-RPT: per-node counts, the reporter lease, report jobs",
		History:        1,
		Replicas:       cfg.Replicas,
		Storage:        jetstream.FileStorage,
		LimitMarkerTTL: markerTTL,
	})
	if err != nil {
		return nil, fmt.Errorf("rptfleet: bucket %s: %w", bucket, err)
	}
	return &Node{
		cfg:     cfg,
		js:      cfg.JS,
		kv:      kv,
		log:     cfg.Logger.With(zap.String("node", cfg.Node)),
		node:    token(cfg.Node),
		leaseS:  "$KV." + bucket + "." + leaseKey,
		lastPut: map[string][]byte{},
		read:    map[pdKey]map[string]uint64{},
		jobRev:  map[string]uint64{},
	}, nil
}

// openBucket creates or updates the bucket, retrying attempts that time
// out until ctx ends: when relays on different NATS servers create the
// same replicated bucket at once, nats-server 2.15 may leave all but one
// request unanswered (seen with the in-process cluster of natstest); the
// retry then finds the bucket and updates it.
func openBucket(ctx context.Context, js jetstream.JetStream, cfg jetstream.KeyValueConfig) (jetstream.KeyValue, error) {
	wait := 2 * time.Second
	for {
		actx, cancel := context.WithTimeout(ctx, wait)
		kv, err := js.CreateOrUpdateKeyValue(actx, cfg)
		cancel()
		if err == nil || ctx.Err() != nil || !errors.Is(err, context.DeadlineExceeded) {
			return kv, err
		}
		wait = min(2*wait, 8*time.Second)
	}
}

// token escapes s to one key token: [a-zA-Z0-9-] as is, '.' as '_',
// other bytes as '=' and two hex digits.
func token(s string) string {
	const hexd = "0123456789abcdef"
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		switch c := s[i]; {
		case c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-':
			b.WriteByte(c)
		case c == '.':
			b.WriteByte('_')
		default:
			b.WriteByte('=')
			b.WriteByte(hexd[c>>4])
			b.WriteByte(hexd[c&15])
		}
	}
	return b.String()
}

func countsKey(start int64, domain, node string) string {
	return "counts." + strconv.FormatInt(start, 10) + "." + token(domain) + "." + node
}

func jobKey(start time.Time, domain string) string {
	return "job." + strconv.FormatInt(start.Unix(), 10) + "." + token(domain)
}

func doneKey(start int64, domTok string) string {
	return "done." + strconv.FormatInt(start, 10) + "." + domTok
}

func (n *Node) op() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), n.cfg.OpTimeout)
}

// Run takes part in the election and hands rec's counts to the bucket
// until ctx ends; then it writes the open period's counts a last time and
// releases the lease if it holds it, so that another node takes over at
// once. Cancel it before closing the NATS connection. rec may be nil (a
// node that only reports).
func (n *Node) Run(ctx context.Context, rec *tlsrptdb.Recorder) {
	var wg sync.WaitGroup
	wg.Go(func() { n.runLease(ctx) })
	if rec != nil {
		wg.Go(func() { n.runCounts(ctx, rec) })
	}
	wg.Wait()
	if rec != nil && n.cfg.SnapshotEvery > 0 {
		if err := n.snapshot(rec, true); err != nil {
			n.log.Warn("tlsrpt_fleet_snapshot", zap.Error(err))
		}
	}
	n.release()
}

// IsReporter reports whether this node holds the reporter lease now: the
// Reporter's Options.Active, and the value of a gauge such as
// stsrelay_tlsrpt_reporter.
func (n *Node) IsReporter() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.leaseRev != 0 && time.Now().Before(n.validUntil)
}

// Reporter is the node that held the lease when this node last looked
// ("" before it looked, or when nobody held it).
func (n *Node) Reporter() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.holder
}

func (n *Node) runLease(ctx context.Context) {
	every := n.cfg.LeaseTTL / 3
	for {
		n.leaseOnce()
		t := time.NewTimer(every)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

// leaseOnce renews the lease if held, or tries to take it.
func (n *Node) leaseOnce() {
	was := n.IsReporter()
	n.mu.Lock()
	rev := n.leaseRev
	n.mu.Unlock()
	if rev != 0 {
		n.renew(rev)
	} else {
		n.acquire()
	}
	if is := n.IsReporter(); is != was {
		if is {
			n.log.Info("tlsrpt_reporter_elected")
		} else {
			n.log.Warn("tlsrpt_reporter_lost", zap.String("holder", n.Reporter()))
		}
	}
}

// renew rewrites the lease with a fresh TTL if its last revision is still
// rev.
func (n *Node) renew(rev uint64) {
	sent := time.Now()
	ctx, cancel := n.op()
	defer cancel()
	pa, err := n.js.PublishMsg(ctx, &nats.Msg{Subject: n.leaseS, Data: []byte(n.cfg.Node)},
		jetstream.WithExpectLastSequencePerSubject(rev), jetstream.WithMsgTTL(n.cfg.LeaseTTL))
	n.mu.Lock()
	defer n.mu.Unlock()
	switch {
	case err == nil:
		n.leaseRev, n.holder = pa.Sequence, n.cfg.Node
		n.validUntil = sent.Add(n.cfg.LeaseTTL - n.cfg.LeaseTTL/10)
	case wrongLastSeq(err):
		// Expired (and maybe taken), or our last renewal's answer was
		// lost; acquire sorts it out.
		n.leaseRev, n.validUntil = 0, time.Time{}
	default:
		// Keep the revision: the key may well be alive; validUntil runs
		// out meanwhile.
		n.log.Warn("tlsrpt_lease_renew", zap.Error(err))
	}
}

// acquire takes the lease if nobody holds it.
func (n *Node) acquire() {
	ctx, cancel := n.op()
	defer cancel()
	sent := time.Now()
	rev, err := n.kv.Create(ctx, leaseKey, []byte(n.cfg.Node), jetstream.KeyTTL(n.cfg.LeaseTTL))
	if err == nil {
		n.mu.Lock()
		n.leaseRev, n.holder = rev, n.cfg.Node
		n.validUntil = sent.Add(n.cfg.LeaseTTL - n.cfg.LeaseTTL/10)
		n.mu.Unlock()
		return
	}
	if !errors.Is(err, jetstream.ErrKeyExists) {
		n.log.Warn("tlsrpt_lease_acquire", zap.Error(err))
		return
	}
	e, err := n.kv.Get(ctx, leaseKey)
	if err != nil {
		if !errors.Is(err, jetstream.ErrKeyNotFound) {
			n.log.Warn("tlsrpt_lease_acquire", zap.Error(err))
		}
		return
	}
	holder := string(e.Value())
	n.mu.Lock()
	n.holder = holder
	n.mu.Unlock()
	if holder == n.cfg.Node {
		// Ours: from before a restart, or a renewal whose answer was lost.
		n.renew(e.Revision())
	}
}

// release deletes the lease if we hold it.
func (n *Node) release() {
	n.mu.Lock()
	rev := n.leaseRev
	n.leaseRev, n.validUntil = 0, time.Time{}
	n.mu.Unlock()
	if rev == 0 {
		return
	}
	ctx, cancel := n.op()
	defer cancel()
	if err := n.kv.Delete(ctx, leaseKey, jetstream.LastRevision(rev)); err != nil {
		n.log.Warn("tlsrpt_lease_release", zap.Error(err))
		return
	}
	n.log.Info("tlsrpt_reporter_released")
}

func wrongLastSeq(err error) bool {
	var apiErr *jetstream.APIError
	return errors.As(err, &apiErr) && (apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequence ||
		apiErr.ErrorCode == jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// runCounts hands finished periods off every tick and writes the open
// period's counts every SnapshotEvery.
func (n *Node) runCounts(ctx context.Context, rec *tlsrptdb.Recorder) {
	tick := min(time.Second, max(n.cfg.HandOffGrace/4, 20*time.Millisecond))
	t := time.NewTicker(tick)
	defer t.Stop()
	var lastSnap time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if err := rec.HandOff(n.cfg.Now(), n.cfg.HandOffGrace, n); err != nil {
			n.log.Warn("tlsrpt_fleet_handoff", zap.Error(err))
		}
		if n.cfg.SnapshotEvery > 0 && time.Since(lastSnap) >= n.cfg.SnapshotEvery {
			lastSnap = time.Now()
			if err := n.snapshot(rec, false); err != nil {
				n.log.Warn("tlsrpt_fleet_snapshot", zap.Error(err))
			}
		}
	}
}

// PutCounts is tlsrptdb.Sink: it writes this node's final counts of a
// period, one key per domain.
func (n *Node) PutCounts(periodStart time.Time, counts []tlsrpt.PolicyCounts) error {
	for _, pc := range counts {
		if _, err := n.put(periodStart.Unix(), pc, true); err != nil {
			return err
		}
	}
	n.putMu.Lock()
	prefix := "counts." + strconv.FormatInt(periodStart.Unix(), 10) + "."
	for k := range n.lastPut {
		if strings.HasPrefix(k, prefix) {
			delete(n.lastPut, k)
		}
	}
	n.putMu.Unlock()
	return nil
}

// snapshot writes the counts of the periods rec still holds, those that
// changed since they were last written (all with force).
func (n *Node) snapshot(rec *tlsrptdb.Recorder, force bool) error {
	var errs []error
	for _, pc := range rec.Pending() {
		if _, err := n.put(pc.PeriodStart.Unix(), pc, force); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// put writes one domain's counts unless they are what was last written.
func (n *Node) put(start int64, pc tlsrpt.PolicyCounts, force bool) (bool, error) {
	key := countsKey(start, pc.PolicyDomain, n.node)
	n.fit(&pc, 4, key)
	data, err := json.Marshal(pc)
	if err != nil {
		return false, err
	}
	n.putMu.Lock()
	same := bytes.Equal(n.lastPut[key], data)
	n.putMu.Unlock()
	if same && !force {
		return false, nil
	}
	ctx, cancel := n.op()
	defer cancel()
	if _, err := n.kv.Put(ctx, key, data); err != nil {
		return false, fmt.Errorf("put %s (%d bytes): %w", key, len(data), err)
	}
	n.putMu.Lock()
	n.lastPut[key] = data
	n.putMu.Unlock()
	return true, nil
}

// listKeys lists the keys matching filter.
func (n *Node) listKeys(filter string) ([]string, error) {
	ctx, cancel := n.op()
	defer cancel()
	kl, err := n.kv.ListKeysFiltered(ctx, filter)
	if err != nil {
		if errors.Is(err, jetstream.ErrNoKeysFound) {
			return nil, nil
		}
		return nil, err
	}
	var keys []string
	for k := range kl.Keys() {
		keys = append(keys, k)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("list %s: %w", filter, err)
	}
	slices.Sort(keys)
	return slices.Compact(keys), nil
}

// Closed is tlsrptdb.Source: the fleet's merged counts of every period and
// domain that ended MergeAfter ago and has no report yet. Counts that
// come too late (a report was made, or the period ended more than DoneTTL
// ago) are deleted and logged.
func (n *Node) Closed(now time.Time) ([]tlsrpt.PolicyCounts, error) {
	n.srcMu.Lock()
	defer n.srcMu.Unlock()
	if now.Before(n.nextList) {
		return nil, nil
	}
	iv := int64(n.cfg.Interval / time.Second)
	// Look again when the next period is ready, and at least every
	// minute (late counts, nodes whose clocks differ).
	next := now.Add(min(time.Minute, n.cfg.Interval))
	if r := time.Unix(periodStartOf(now.Unix(), iv)+iv, 0).Add(n.cfg.MergeAfter); r.Before(next) {
		next = r
	}
	keys, err := n.listKeys("counts.>")
	if err != nil {
		return nil, fmt.Errorf("rptfleet: %w", err)
	}
	groups := map[pdKey][]string{}
	var order []pdKey
	for _, k := range keys {
		parts := strings.Split(k, ".")
		if len(parts) != 4 {
			continue
		}
		start, err := strconv.ParseInt(parts[1], 10, 64)
		if err != nil {
			continue
		}
		ready := time.Unix(start+iv, 0).Add(n.cfg.MergeAfter)
		if now.Before(ready) {
			if ready.Before(next) {
				next = ready
			}
			continue
		}
		g := pdKey{start, parts[2]}
		if groups[g] == nil {
			order = append(order, g)
		}
		groups[g] = append(groups[g], k)
	}
	slices.SortFunc(order, func(a, b pdKey) int {
		return cmp.Or(cmp.Compare(a.start, b.start), strings.Compare(a.domain, b.domain))
	})
	var out []tlsrpt.PolicyCounts
	var errs []error
	for _, g := range order {
		pc, err := n.merge(now, iv, g, groups[g])
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if pc != nil {
			out = append(out, *pc)
		}
	}
	if len(errs) == 0 && len(out) == 0 {
		// Otherwise list again at the next pass: what was returned goes
		// once Done, or is tried again.
		n.nextList = next
	}
	return out, errors.Join(errs...)
}

// merge reads and adds up the counts keys of one period and domain; nil
// when they came too late and were dropped.
func (n *Node) merge(now time.Time, iv int64, g pdKey, keys []string) (*tlsrpt.PolicyCounts, error) {
	ctx, cancel := n.op()
	defer cancel()
	late := ""
	if _, err := n.kv.Get(ctx, doneKey(g.start, g.domain)); err == nil {
		late = "report already made"
	} else if !errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, fmt.Errorf("rptfleet: %w", err)
	} else if time.Unix(g.start+iv, 0).Add(n.cfg.DoneTTL).Before(now) {
		late = "period too old"
	}
	if late != "" {
		for _, k := range keys {
			if err := n.kv.Purge(ctx, k, jetstream.PurgeTTL(markerTTL)); err != nil {
				return nil, fmt.Errorf("rptfleet: drop late %s: %w", k, err)
			}
		}
		n.log.Warn("tlsrpt_fleet_late_counts", zap.Time("period_start", time.Unix(g.start, 0).UTC()),
			zap.String("policy_domain", g.domain), zap.Strings("keys", keys), zap.String("reason", late))
		return nil, nil
	}
	var all []tlsrpt.PolicyCounts
	revs := map[string]uint64{}
	for _, k := range keys {
		e, err := n.kv.Get(ctx, k)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("rptfleet: %w", err)
		}
		revs[k] = e.Revision()
		var pc tlsrpt.PolicyCounts
		if err := json.Unmarshal(e.Value(), &pc); err != nil || pc.PeriodStart.Unix() != g.start || token(pc.PolicyDomain) != g.domain {
			n.log.Error("tlsrpt_fleet_bad_counts", zap.String("key", k), zap.Error(err))
			if err := n.kv.Purge(ctx, k, jetstream.LastRevision(e.Revision()), jetstream.PurgeTTL(markerTTL)); err != nil {
				n.log.Warn("tlsrpt_fleet_drop", zap.String("key", k), zap.Error(err))
			}
			delete(revs, k)
			continue
		}
		pc.PeriodEnd = time.Unix(g.start+iv, 0).UTC()
		all = append(all, pc)
	}
	n.read[g] = revs
	merged := tlsrptdb.MergeCounts(all)
	if len(merged) != 1 {
		return nil, nil // nothing (valid) left
	}
	// The job holds the report and a little state.
	n.fit(&merged[0], 2, "merged "+g.domain)
	return &merged[0], nil
}

// fit keeps pc's JSON within 1/share of the server's max_payload by
// dropping its rarest failure details (logged); the summary counts stay
// exact. One domain's counts are far smaller in any real fleet.
func (n *Node) fit(pc *tlsrpt.PolicyCounts, share int64, what string) {
	limit := int(n.js.Conn().MaxPayload() / share)
	if limit <= 0 {
		return
	}
	type ref struct{ p, d int }
	dropped := 0
	for {
		data, err := json.Marshal(pc)
		if err != nil || len(data) <= limit {
			break
		}
		var refs []ref
		for p := range pc.Policies {
			for d := range pc.Policies[p].FailureDetails {
				refs = append(refs, ref{p, d})
			}
		}
		if len(refs) == 0 {
			break // too big without details: the put fails and is logged
		}
		slices.SortStableFunc(refs, func(a, b ref) int {
			return cmp.Compare(pc.Policies[b.p].FailureDetails[b.d].FailedSessionCount, pc.Policies[a.p].FailureDetails[a.d].FailedSessionCount)
		})
		keep := min(len(refs)-1, len(refs)*limit/len(data)*9/10)
		drop := map[ref]bool{}
		for _, r := range refs[keep:] {
			drop[r] = true
		}
		for p := range pc.Policies {
			var kept []tlsrpt.FailureDetail
			for d, fd := range pc.Policies[p].FailureDetails {
				if !drop[ref{p, d}] {
					kept = append(kept, fd)
				}
			}
			if kept == nil {
				kept = []tlsrpt.FailureDetail{}
			}
			pc.Policies[p].FailureDetails = kept
		}
		dropped += len(refs) - keep
	}
	if dropped > 0 {
		n.log.Warn("tlsrpt_fleet_details_dropped", zap.String("counts", what), zap.Int("failure_details", dropped),
			zap.Int("limit_bytes", limit))
	}
}

func periodStartOf(sec, iv int64) int64 {
	p := sec - sec%iv
	if sec%iv < 0 {
		p -= iv
	}
	return p
}

// Done is tlsrptdb.Source: the job of that period and domain exists. It
// writes the done marker, then deletes the counts Closed read, unless
// rewritten since (those are dropped as late at the next Closed).
func (n *Node) Done(periodStart time.Time, policyDomain string) error {
	g := pdKey{periodStart.Unix(), token(policyDomain)}
	ctx, cancel := n.op()
	defer cancel()
	stamp := []byte(time.Now().UTC().Format(time.RFC3339))
	if _, err := n.kv.Create(ctx, doneKey(g.start, g.domain), stamp, jetstream.KeyTTL(n.cfg.DoneTTL)); err != nil &&
		!errors.Is(err, jetstream.ErrKeyExists) {
		return fmt.Errorf("rptfleet: %w", err)
	}
	n.srcMu.Lock()
	revs := n.read[g]
	delete(n.read, g)
	n.srcMu.Unlock()
	var errs []error
	for k, rev := range revs {
		err := n.kv.Purge(ctx, k, jetstream.LastRevision(rev), jetstream.PurgeTTL(markerTTL))
		if err != nil && !errors.Is(err, jetstream.ErrKeyExists) && !errors.Is(err, jetstream.ErrKeyRevisionMismatch) && !wrongLastSeq(err) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// LoadJobs is tlsrptsend.JobStore.
func (n *Node) LoadJobs() ([][]byte, error) {
	keys, err := n.listKeys("job.>")
	if err != nil {
		return nil, fmt.Errorf("rptfleet: %w", err)
	}
	ctx, cancel := n.op()
	defer cancel()
	var out [][]byte
	revs := map[string]uint64{}
	for _, k := range keys {
		e, err := n.kv.Get(ctx, k)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("rptfleet: %w", err)
		}
		revs[k] = e.Revision()
		out = append(out, e.Value())
	}
	n.jobMu.Lock()
	n.jobRev = revs
	n.jobMu.Unlock()
	return out, nil
}

// CreateJob is tlsrptsend.JobStore: the first job created for a period and
// domain wins, fleet-wide.
func (n *Node) CreateJob(periodStart time.Time, policyDomain string, data []byte) ([]byte, error) {
	key := jobKey(periodStart, policyDomain)
	ctx, cancel := n.op()
	defer cancel()
	rev, err := n.kv.Create(ctx, key, data)
	if err == nil {
		n.setJobRev(key, rev)
		return data, nil
	}
	if !errors.Is(err, jetstream.ErrKeyExists) {
		return nil, fmt.Errorf("rptfleet: create %s: %w", key, err)
	}
	e, err := n.kv.Get(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("rptfleet: %s exists: %w", key, err)
	}
	n.setJobRev(key, e.Revision())
	return e.Value(), nil
}

// UpdateJob is tlsrptsend.JobStore. It refuses while this node is not the
// reporter, and when the job changed since this node last saw it (another
// node took over meanwhile).
func (n *Node) UpdateJob(periodStart time.Time, policyDomain string, data []byte) error {
	key := jobKey(periodStart, policyDomain)
	if !n.IsReporter() {
		return fmt.Errorf("rptfleet: not updating %s: this node is not the reporter", key)
	}
	n.jobMu.Lock()
	rev, ok := n.jobRev[key]
	n.jobMu.Unlock()
	ctx, cancel := n.op()
	defer cancel()
	if !ok {
		e, err := n.kv.Get(ctx, key)
		if err != nil {
			return fmt.Errorf("rptfleet: update %s: %w", key, err)
		}
		rev = e.Revision()
	}
	rev, err := n.kv.Update(ctx, key, data, rev)
	if err != nil {
		return fmt.Errorf("rptfleet: update %s: %w", key, err)
	}
	n.setJobRev(key, rev)
	return nil
}

// RemoveJob is tlsrptsend.JobStore.
func (n *Node) RemoveJob(periodStart time.Time, policyDomain string) error {
	key := jobKey(periodStart, policyDomain)
	n.jobMu.Lock()
	rev := n.jobRev[key]
	n.jobMu.Unlock()
	ctx, cancel := n.op()
	defer cancel()
	opts := []jetstream.KVDeleteOpt{jetstream.PurgeTTL(markerTTL)}
	if rev != 0 {
		opts = append(opts, jetstream.LastRevision(rev))
	}
	if err := n.kv.Purge(ctx, key, opts...); err != nil {
		return fmt.Errorf("rptfleet: remove %s: %w", key, err)
	}
	n.jobMu.Lock()
	delete(n.jobRev, key)
	n.jobMu.Unlock()
	return nil
}

func (n *Node) setJobRev(key string, rev uint64) {
	n.jobMu.Lock()
	n.jobRev[key] = rev
	n.jobMu.Unlock()
}

// Interface checks.
var (
	_ tlsrptdb.Sink       = (*Node)(nil)
	_ tlsrptdb.Source     = (*Node)(nil)
	_ tlsrptsend.JobStore = (*Node)(nil)
)
