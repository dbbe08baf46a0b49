package tlsrptsend

// Fixtures shared by this package's tests (as tlsrptdb's tests have them).

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/tlsrpt"
	"github.com/stsrelay/stsrelay/tlsrpt/tlsrptdb"
)

// clock is a settable test clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock(t time.Time) *clock { return &clock{t: t} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Set(t time.Time) {
	c.mu.Lock()
	c.t = t
	c.mu.Unlock()
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

var (
	day1       = time.Date(2026, 3, 14, 0, 0, 0, 0, time.UTC)
	stsLines   = []string{"version: STSv1", "mode: enforce", "mx: mx1.ex.test", "mx: *.backup.ex.test", "max_age: 86400"}
	stsMX      = []string{"mx1.ex.test", "*.backup.ex.test"}
	okSession  = tlsrpt.Session{PolicyDomain: "ex.test", PolicyType: "sts", PolicyString: stsLines, MXPatterns: stsMX, Success: true}
	badSession = tlsrpt.Session{PolicyDomain: "ex.test", PolicyType: "sts", PolicyString: stsLines, MXPatterns: stsMX,
		ResultType: tlsrpt.ResultCertificateNotTrusted, SendingIP: "192.0.2.1", ReceivingMX: "mx1.ex.test",
		ReceivingHelo: "mx1.ex.test", ReceivingIP: "198.51.100.7", FailureReasonCode: "certificate-unknown-authority"}
)

func at(s tlsrpt.Session, t time.Time) tlsrpt.Session { s.Time = t; return s }

func newTestRecorder(t testing.TB, dir string, c *clock, opts ...tlsrptdb.RecorderOption) *tlsrptdb.Recorder {
	t.Helper()
	r, err := tlsrptdb.NewRecorder(dir, c.Now, zaptest.NewLogger(t), opts...)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// fakeTXT answers LookupTXT from a map; err, when set, is returned for
// every name.
type fakeTXT struct {
	records map[string][][]string
	err     error
	queries []string
}

func (f *fakeTXT) LookupTXT(_ context.Context, name string) ([][]string, error) {
	f.queries = append(f.queries, name)
	if f.err != nil {
		return nil, f.err
	}
	r, ok := f.records[name]
	if !ok {
		return nil, fmt.Errorf("%s: %w", name, dnsclient.ErrNotFound)
	}
	return r, nil
}
