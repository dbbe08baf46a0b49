package kvcache_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/stsrelay/stsrelay/internal/fleet/kvcache"
	"github.com/stsrelay/stsrelay/internal/fleet/natstest"
	"github.com/stsrelay/stsrelay/internal/testworld"
	"github.com/stsrelay/stsrelay/internal/testworld/worldres"
	"github.com/stsrelay/stsrelay/mtasts"
	"github.com/stsrelay/stsrelay/mtasts/mtastsdb"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

const (
	enforceMX1 = "version: STSv1\nmode: enforce\nmx: mx1.ex.test\nmax_age: 86400\n"
	enforceMX2 = "version: STSv1\nmode: enforce\nmx: mx2.ex.test\nmax_age: 86400\n"
	// fetchTimeout is the nodes' Fetcher timeout: their fetch locks live
	// fetchTimeout + 5 s.
	fetchTimeout = 2 * time.Second
)

// fleet is a test world, a NATS server and relay "nodes" sharing one
// bucket, each with its own connection, resolver and cache.
type fleet struct {
	w    *testworld.World
	nats *natstest.Cluster
	next int // server the next connection prefers
}

type node struct {
	nc   *nats.Conn
	sh   *kvcache.Shared
	c    *mtastsdb.Cache
	logs *observer.ObservedLogs
}

func newFleet(t testing.TB) *fleet {
	t.Helper()
	return &fleet{w: testworld.New(t), nats: natstest.Start(t, 3)}
}

// shared opens a connection and the shared cache on it.
func (f *fleet) shared(t testing.TB, name string) (*nats.Conn, *kvcache.Shared) {
	return f.sharedLog(t, name, nil)
}

func (f *fleet) sharedLog(t testing.TB, name string, log *zap.Logger) (*nats.Conn, *kvcache.Shared) {
	t.Helper()
	// Each connection prefers another server of the cluster, and fails
	// over to the others.
	urls := f.nats.URLs()
	i := f.next % len(urls)
	f.next++
	urls = append(urls[i:], urls[:i]...)
	nc, err := nats.Connect(strings.Join(urls, ","), nats.Name(name), nats.DontRandomize(),
		nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	sh, err := kvcache.New(ctx, js, kvcache.Options{Prefix: "TEST", Replicas: 3, Node: name, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(sh.Close)
	return nc, sh
}

func (f *fleet) node(t testing.TB, name string, adjust func(*mtastsdb.Options)) *node {
	t.Helper()
	r := worldres.New(t, f.w)
	core, logs := observer.New(zapcore.InfoLevel)
	nc, sh := f.sharedLog(t, name, zap.New(core))
	opts := mtastsdb.Options{
		Resolver: r,
		Fetcher: &mtasts.Fetcher{HTTPSPort: f.w.HTTPSPort(), Timeout: fetchTimeout, MaxBytes: 64 << 10,
			RootCAs: f.w.CA.Pool(), DialAddr: r.DialContext},
		Logger: zap.New(core),
		Shared: sh,
	}
	if adjust != nil {
		adjust(&opts)
	}
	c, err := mtastsdb.New(opts)
	if err != nil {
		t.Fatal(err)
	}
	return &node{nc: nc, sh: sh, c: c, logs: logs}
}

func (f *fleet) nodes(t testing.TB, n int, adjust func(*mtastsdb.Options)) []*node {
	var ns []*node
	for i := range n {
		ns = append(ns, f.node(t, "node"+string(rune('0'+i)), adjust))
	}
	return ns
}

func (f *fleet) stsDomain(domain, id, body string) *testworld.PolicyServer {
	f.w.DNS.SetTXT("_mta-sts."+domain, []string{"v=STSv1; id=" + id})
	ps := f.w.PolicyHost(domain, testworld.CertValid)
	ps.SetPolicy(body)
	return ps
}

// getAll runs per concurrent calls of get on every node and returns the
// results, node by node.
func getAll(t *testing.T, ns []*node, per int, get func(*mtastsdb.Cache) (mtastsdb.Result, error)) [][]mtastsdb.Result {
	t.Helper()
	out := make([][]mtastsdb.Result, len(ns))
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i, n := range ns {
		for range per {
			wg.Go(func() {
				res, err := get(n.c)
				if err != nil {
					t.Errorf("node %d: %v", i, err)
				}
				mu.Lock()
				out[i] = append(out[i], res)
				mu.Unlock()
			})
		}
	}
	wg.Wait()
	return out
}

func fetchLines(ns []*node) int {
	n := 0
	for _, x := range ns {
		n += x.logs.FilterMessage("mtasts_fetch").Len()
	}
	return n
}

// eventually polls cond for up to d and reports how long it took.
func eventually(t *testing.T, d time.Duration, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for !cond() {
		if time.Since(start) > d {
			t.Fatalf("%s: not within %v", what, d)
		}
		time.Sleep(5 * time.Millisecond)
	}
	return time.Since(start)
}

func TestOneFetchPerDomainAndIDForTheFleet(t *testing.T) {
	f := newFleet(t)
	ns := f.nodes(t, 3, nil)
	ps := f.stsDomain("ex.test", "a1", enforceMX1)
	ps.SetStall(300 * time.Millisecond) // every node reaches the fetch lock

	start := time.Now()
	res := getAll(t, ns, 5, func(c *mtastsdb.Cache) (mtastsdb.Result, error) { return c.Get(context.Background(), "ex.test") })
	t.Logf("15 concurrent Gets on 3 nodes: %v", time.Since(start))
	fetched := 0
	for i, rs := range res {
		for _, r := range rs {
			if r.Policy == nil || r.ID != "a1" || !r.Policy.Matches("mx1.ex.test") || r.Failure != nil {
				t.Fatalf("node %d: %+v", i, r)
			}
			if !r.FromCache {
				fetched++
			}
		}
	}
	if n := ps.Count(); n != 1 {
		t.Errorf("policy host saw %d GETs, want 1 for the fleet", n)
	}
	if n := fetchLines(ns); n != 1 {
		t.Errorf("%d mtasts_fetch lines in the fleet, want 1", n)
	}
	if fetched < 1 || fetched > 5 {
		t.Errorf("%d results not FromCache, want those of the fetching node's flight only", fetched)
	}

	// A new id: one more fetch, whoever notices it.
	ps.SetPolicy(enforceMX2)
	f.w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=b2"})
	res = getAll(t, ns, 3, func(c *mtastsdb.Cache) (mtastsdb.Result, error) { return c.Recheck(context.Background(), "ex.test") })
	for i, rs := range res {
		for _, r := range rs {
			if r.Policy == nil || r.ID != "b2" || !r.Policy.Matches("mx2.ex.test") {
				t.Fatalf("node %d after the id change: %+v", i, r)
			}
		}
	}
	if n := ps.Count(); n != 2 {
		t.Errorf("policy host saw %d GETs, want 2 (one per id)", n)
	}
}

func TestNewPolicySeenByOtherNodesWithinASecond(t *testing.T) {
	f := newFleet(t)
	ns := f.nodes(t, 3, nil)
	ps := f.stsDomain("ex.test", "a1", enforceMX1)
	if _, err := ns[0].c.Get(context.Background(), "ex.test"); err != nil {
		t.Fatal(err)
	}
	took := eventually(t, time.Second, "policy on nodes 1 and 2", func() bool {
		e1, ok1 := ns[1].c.Entry("ex.test")
		e2, ok2 := ns[2].c.Entry("ex.test")
		return ok1 && ok2 && e1.ID == "a1" && e2.ID == "a1"
	})
	t.Logf("new policy on the other nodes after %v", took)
	// They use it without fetching.
	for _, n := range ns[1:] {
		r, err := n.c.Get(context.Background(), "ex.test")
		if err != nil || r.Policy == nil || !r.FromCache {
			t.Fatalf("%+v, %v", r, err)
		}
	}
	if ps.Count() != 1 {
		t.Errorf("%d GETs", ps.Count())
	}
	// A node started later loads the shared cache at start.
	late := f.node(t, "late", nil)
	if e, ok := late.c.Entry("ex.test"); !ok || e.ID != "a1" || e.Mode != mtasts.ModeEnforce {
		t.Errorf("late node: %+v, %v", e, ok)
	}
}

func TestDeadLockHolder(t *testing.T) {
	f := newFleet(t)
	ns := f.nodes(t, 3, nil)
	ps := f.stsDomain("ex.test", "a1", enforceMX1)
	// A fourth client takes the fetch lock and dies holding it.
	_, dead := f.shared(t, "dead")
	const ttl = 2 * time.Second
	_, ok, err := dead.Lock(context.Background(), "ex.test", "a1", ttl)
	if err != nil || !ok {
		t.Fatalf("lock: %v, %v", ok, err)
	}
	locked := time.Now()
	res := getAll(t, ns, 2, func(c *mtastsdb.Cache) (mtastsdb.Result, error) { return c.Get(context.Background(), "ex.test") })
	took := time.Since(locked)
	t.Logf("Gets answered %v after the dead holder's lock (TTL %v)", took, ttl)
	for i, rs := range res {
		for _, r := range rs {
			if r.Policy == nil || r.ID != "a1" {
				t.Fatalf("node %d: %+v", i, r)
			}
		}
	}
	if took < ttl-100*time.Millisecond {
		t.Errorf("fetched %v after the lock was taken, before its TTL %v", took, ttl)
	}
	if took > ttl+5*time.Second {
		t.Errorf("fetched only %v after the lock was taken (TTL %v)", took, ttl)
	}
	if n := ps.Count(); n != 1 {
		t.Errorf("policy host saw %d GETs, want 1 (the nodes take the lock in turn)", n)
	}
}

func TestNegativeBackoffShared(t *testing.T) {
	f := newFleet(t)
	const backoff = 1500 * time.Millisecond
	ns := f.nodes(t, 3, func(o *mtastsdb.Options) { o.TXTGrace = -1; o.FailureBackoff = backoff })
	ps := f.stsDomain("ex.test", "a1", "")
	ps.SetResponse(500, "text/plain", "oops", nil)

	r, err := ns[0].c.Get(context.Background(), "ex.test")
	failedAt := time.Now()
	if err != nil || r.Policy != nil || r.Failure == nil || r.Failure.ResultType != tlsrpt.ResultSTSPolicyFetchError {
		t.Fatalf("node 0: %+v, %v", r, err)
	}
	reason := r.Failure.Reason
	// The other nodes return the failure without fetching, during the
	// back-off.
	res := getAll(t, ns, 4, func(c *mtastsdb.Cache) (mtastsdb.Result, error) { return c.Get(context.Background(), "ex.test") })
	if time.Since(failedAt) >= backoff {
		t.Fatal("test too slow for the back-off")
	}
	for i, rs := range res {
		for _, r := range rs {
			if r.Policy != nil || r.Failure == nil || r.ID != "a1" || r.Failure.Reason != reason ||
				r.Failure.ResultType != tlsrpt.ResultSTSPolicyFetchError || !errors.Is(r.Failure, mtasts.ErrPolicyFetch) {
				t.Fatalf("node %d: %+v (failure %v)", i, r, r.Failure)
			}
		}
	}
	if n := ps.Count(); n != 1 {
		t.Errorf("policy host saw %d GETs during the shared back-off, want 1", n)
	}
	// After the back-off, one node of the fleet tries again.
	ps.SetPolicy(enforceMX1)
	time.Sleep(time.Until(failedAt.Add(backoff + 100*time.Millisecond)))
	res = getAll(t, ns, 2, func(c *mtastsdb.Cache) (mtastsdb.Result, error) { return c.Get(context.Background(), "ex.test") })
	for i, rs := range res {
		for _, r := range rs {
			if r.Policy == nil || r.Failure != nil {
				t.Fatalf("node %d after the back-off: %+v", i, r)
			}
		}
	}
	if n := ps.Count(); n != 2 {
		t.Errorf("policy host saw %d GETs, want 2", n)
	}
}

func TestForgetPropagates(t *testing.T) {
	f := newFleet(t)
	ns := f.nodes(t, 3, nil)
	ps := f.stsDomain("ex.test", "a1", enforceMX1)
	for _, n := range ns {
		if _, err := n.c.Get(context.Background(), "ex.test"); err != nil {
			t.Fatal(err)
		}
	}
	if err := ns[1].c.Forget("ex.test"); err != nil {
		t.Fatal(err)
	}
	took := eventually(t, time.Second, "forget on nodes 0 and 2", func() bool {
		_, ok0 := ns[0].c.Entry("ex.test")
		_, ok2 := ns[2].c.Entry("ex.test")
		return !ok0 && !ok2
	})
	t.Logf("forget seen by the other nodes after %v", took)
	if e, _, err := ns[0].sh.Load(context.Background(), "ex.test"); err != nil || e != nil {
		t.Errorf("shared entry after Forget: %+v, %v", e, err)
	}
	// The next Get fetches again (once for the fleet).
	getAll(t, ns, 2, func(c *mtastsdb.Cache) (mtastsdb.Result, error) { return c.Get(context.Background(), "ex.test") })
	if n := ps.Count(); n != 2 {
		t.Errorf("policy host saw %d GETs, want 2", n)
	}
}

func TestFetchesWithoutNATS(t *testing.T) {
	f := newFleet(t)
	n := f.node(t, "lonely", nil)
	ps := f.stsDomain("ex.test", "a1", enforceMX1)
	n.nc.Close()
	r, err := n.c.Get(context.Background(), "ex.test")
	if err != nil || r.Policy == nil || r.ID != "a1" {
		t.Fatalf("%+v, %v", r, err)
	}
	if ps.Count() != 1 || n.logs.FilterMessage("mtasts_shared_unavailable").Len() == 0 {
		t.Errorf("%d GETs, %d warnings", ps.Count(), n.logs.FilterMessage("mtasts_shared_unavailable").Len())
	}
}

func TestKeys(t *testing.T) {
	f := newFleet(t)
	_, sh := f.shared(t, "keys")
	for _, d := range []string{"ex.test", "xn--bcher-kva.test", "a_b-c.test", "a..b", ".a.", "a=b", "A*>b c", "x"} {
		k := kvcache.Key(d)
		if back, ok := kvcache.Domain(k); !ok || back != d {
			t.Errorf("Key(%q) = %q, back %q %v", d, k, back, ok)
		}
		err := sh.Update(context.Background(), d, func(*mtastsdb.SharedEntry) (*mtastsdb.SharedEntry, bool) {
			return &mtastsdb.SharedEntry{ID: "a1"}, true
		})
		if err != nil {
			t.Errorf("%q (key %q): %v", d, k, err)
			continue
		}
		if e, _, err := sh.Load(context.Background(), d); err != nil || e == nil || e.Domain != d {
			t.Errorf("%q: %+v, %v", d, e, err)
		}
	}
	if k := kvcache.Key("ex.test"); k != "ex.test" {
		t.Errorf("Key(ex.test) = %q", k)
	}
}

func TestUpdateConcurrent(t *testing.T) {
	f := newFleet(t)
	var shs []*kvcache.Shared
	for i := range 3 {
		_, sh := f.shared(t, "n"+string(rune('0'+i)))
		shs = append(shs, sh)
	}
	var wg sync.WaitGroup
	var calls atomic.Int64
	for _, sh := range shs {
		for range 10 {
			wg.Go(func() {
				err := sh.Update(context.Background(), "ex.test", func(cur *mtastsdb.SharedEntry) (*mtastsdb.SharedEntry, bool) {
					calls.Add(1)
					next := &mtastsdb.SharedEntry{}
					if cur != nil {
						*next = *cur
					}
					next.LastUsed = next.LastUsed.Add(time.Second)
					return next, true
				})
				if err != nil {
					t.Error(err)
				}
			})
		}
	}
	wg.Wait()
	e, _, err := shs[0].Load(context.Background(), "ex.test")
	if err != nil || e == nil || e.LastUsed.Sub(time.Time{}) != 30*time.Second {
		t.Errorf("after 30 increments: %+v, %v (%d calls)", e, err, calls.Load())
	}
}

// BenchmarkCacheHit is the delivery path's lookup of a cached policy in
// fleet mode: served from the node's in-memory copy, no NATS round trip.
func BenchmarkCacheHit(b *testing.B) {
	f := newFleet(b)
	n := f.node(b, "bench", nil)
	f.stsDomain("ex.test", "a1", enforceMX1)
	ctx := context.Background()
	if r, err := n.c.Get(ctx, "ex.test"); err != nil || r.Policy == nil {
		b.Fatal(r, err)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		r, _ := n.c.Get(ctx, "ex.test")
		if !r.Policy.Matches("mx1.ex.test") {
			b.Fatal("no match")
		}
	}
}

// The refresher of every node finds a policy due at about the same time;
// one node of the fleet refreshes it, the others take its result.
func TestRefreshOncePerFleet(t *testing.T) {
	f := newFleet(t)
	// Due 2 s after each fetch: it expires within RefreshBeforeExpiry.
	ns := f.nodes(t, 3, func(o *mtastsdb.Options) {
		o.RefreshBeforeExpiry = 86400*time.Second - 2*time.Second
		o.RefreshInterval = 100 * time.Millisecond
	})
	ps := f.stsDomain("ex.test", "a1", enforceMX1)
	if _, err := ns[0].c.Get(context.Background(), "ex.test"); err != nil {
		t.Fatal(err)
	}
	first, _ := ns[0].c.Entry("ex.test")
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for _, n := range ns {
		wg.Go(func() { n.c.Run(ctx) })
	}
	eventually(t, 5*time.Second, "a refresh", func() bool { return ps.Count() >= 2 })
	time.Sleep(time.Second) // the other nodes' passes, before the next due time
	cancel()
	wg.Wait()
	if n := ps.Count(); n != 2 {
		t.Errorf("policy host saw %d GETs, want 2 (one refresh for the fleet)", n)
	}
	for i, n := range ns {
		e, ok := n.c.Entry("ex.test")
		if !ok || !e.Fetched.After(first.Fetched) {
			t.Errorf("node %d: %+v, %v: refreshed policy not seen", i, e, ok)
		}
	}
}

// A NATS server of the three dies: once its clients have failed over,
// the fleet still fetches once, and changes still reach every node.
func TestNATSServerDies(t *testing.T) {
	f := newFleet(t)
	ns := f.nodes(t, 3, nil) // node i prefers server i
	ps := f.stsDomain("ex.test", "a1", enforceMX1)
	f.nats.Shutdown(0)
	killed := time.Now()
	took := eventually(t, 20*time.Second, "the bucket answering every node", func() bool {
		for _, n := range ns {
			ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
			_, _, err := n.sh.Load(ctx, "probe.test")
			cancel()
			if err != nil {
				return false
			}
		}
		return true
	})
	t.Logf("bucket answering all nodes %v after the server died", took)
	ps.SetStall(300 * time.Millisecond)
	start := time.Now()
	res := getAll(t, ns, 3, func(c *mtastsdb.Cache) (mtastsdb.Result, error) { return c.Get(context.Background(), "ex.test") })
	t.Logf("Gets took %v", time.Since(start))
	for i, rs := range res {
		for _, r := range rs {
			if r.Policy == nil || r.ID != "a1" {
				t.Fatalf("node %d: %+v", i, r)
			}
		}
	}
	if n := ps.Count(); n != 1 {
		t.Errorf("policy host saw %d GETs, want 1", n)
	}
	if err := ns[1].c.Forget("ex.test"); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if t.Failed() {
			for i, n := range ns {
				for _, l := range n.logs.All() {
					t.Logf("node %d at %v: %s %v", i, l.Time.Sub(killed), l.Message, l.ContextMap())
				}
			}
		}
	}()
	// Node 0 made a new watcher when it reconnected to another server.
	took = eventually(t, 3*time.Second, "forget on node 0, which lost its server", func() bool {
		_, ok := ns[0].c.Entry("ex.test")
		return !ok
	})
	t.Logf("forget on node 0 after %v; whole test %v after the server died", took, time.Since(killed))
}
