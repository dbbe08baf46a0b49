package mtastsdb

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/internal/testworld"
	"github.com/stsrelay/stsrelay/mtasts"
)

// env is a test world with the real DNS client and a Fetcher wired to it.
type env struct {
	w   *testworld.World
	dns *dnsclient.Resolver
	f   *mtasts.Fetcher
}

func newEnv(t *testing.T) *env {
	t.Helper()
	w := testworld.New(t)
	r, err := dnsclient.New([]string{w.DNS.Addr()}, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return &env{
		w:   w,
		dns: r,
		f: &mtasts.Fetcher{
			HTTPSPort: w.HTTPSPort(),
			Timeout:   2 * time.Second,
			MaxBytes:  64 << 10,
			RootCAs:   w.CA.Pool(),
			DialAddr:  r.DialContext,
		},
	}
}

// stsDomain publishes _mta-sts.<domain> with id and a policy host serving
// body with a valid certificate.
func (e *env) stsDomain(domain, id, body string) *testworld.PolicyServer {
	e.w.DNS.SetTXT("_mta-sts."+domain, []string{"v=STSv1; id=" + id})
	ps := e.w.PolicyHost(domain, testworld.CertValid)
	ps.SetPolicy(body)
	return ps
}

// fakeTXT is a TXTResolver answering from a map, for the benchmark.
type fakeTXT struct {
	records map[string][][]string
}

func (f *fakeTXT) LookupTXT(_ context.Context, name string) ([][]string, error) {
	if r, ok := f.records[name]; ok {
		return r, nil
	}
	return nil, fmt.Errorf("%s: %w", name, dnsclient.ErrNotFound)
}

// fakeClock is a controllable clock.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *fakeClock { return &fakeClock{t: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}
