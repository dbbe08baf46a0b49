package mtasts

import (
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/internal/testworld"
	"github.com/stsrelay/stsrelay/internal/testworld/worldres"
)

// env is a test world with the real DNS client and a Fetcher wired to it.
type env struct {
	w   *testworld.World
	dns *dnsclient.Resolver
	f   *Fetcher
}

func newEnv(t *testing.T) *env {
	t.Helper()
	w := testworld.New(t)
	r := worldres.New(t, w)
	return &env{
		w:   w,
		dns: r,
		f: &Fetcher{
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

// fakeClock is the test kit's clock.
type fakeClock = testworld.Clock

func newClock() *fakeClock { return testworld.NewClock(time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)) }
