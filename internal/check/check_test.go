package check

import (
	"context"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/delivery"
	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/internal/testworld"
	"github.com/stsrelay/stsrelay/mtasts"
	"github.com/stsrelay/stsrelay/mtasts/forecast"
)

func testOptions(t *testing.T, w *testworld.World) Options {
	t.Helper()
	res, err := dnsclient.NewWithOptions(dnsclient.Options{Servers: []string{w.DNS.Addr()}, Timeout: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return Options{
		Resolver: res,
		Fetcher: &mtasts.Fetcher{HTTPSPort: w.HTTPSPort(), Timeout: 3 * time.Second, MaxBytes: 65536,
			RootCAs: w.CA.Pool(), DialAddr: res.DialContext},
		Probe: delivery.ProbeOptions{Hostname: "relay.stsrelay.test", Port: w.MXPort(), ConnectTimeout: 3 * time.Second,
			CommandTimeout: 10 * time.Second, Roots: w.CA.Pool()},
	}
}

// One MX, an enforce policy naming it and a stale wildcard: sound, with
// each pattern matched by itself against the MX hosts.
func TestRunPatterns(t *testing.T) {
	w := testworld.New(t)
	mx := w.NewMX(testworld.MXOptions{Hostname: "mx1.ex.test", Cert: w.CA.Issue(testworld.CertValid, "mx1.ex.test")})
	w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
	w.DNS.SetA("mx1.ex.test", mx.IP())
	w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=c1"})
	w.DNS.SetTXT("_smtp._tls.ex.test", []string{"v=TLSRPTv1; rua=mailto:tlsrpt@ex.test"})
	w.PolicyHost("ex.test", testworld.CertValid).SetPolicy(
		"version: STSv1\nmode: enforce\nmx: MX1.ex.test.\nmx: *.backup.ex.test\nmax_age: 604800\n")

	rep := Run(context.Background(), testOptions(t, w), "ex.test")
	if !rep.OK {
		t.Fatalf("not OK: %q", rep.Problems)
	}
	if rep.MTASTS.Parsed == nil || rep.MTASTS.Parsed.Mode != mtasts.ModeEnforce {
		t.Fatalf("parsed policy: %+v", rep.MTASTS.Parsed)
	}
	if len(rep.MX) != 1 || rep.MX[0].MatchesPolicy == nil || !*rep.MX[0].MatchesPolicy {
		t.Fatalf("MX: %+v", rep.MX)
	}
	want := []Pattern{{Pattern: "MX1.ex.test.", MatchesMX: true}, {Pattern: "*.backup.ex.test", MatchesMX: false}}
	if len(rep.Patterns) != len(want) || rep.Patterns[0] != want[0] || rep.Patterns[1] != want[1] {
		t.Fatalf("patterns %+v, want %+v", rep.Patterns, want)
	}

	// The relay's forecast for a testing domain that enforce would hurt
	// becomes advice.
	n := len(rep.Advice)
	rep.AddForecast(forecast.Summary{Domain: "ex.test", Mode: forecast.ModeTesting, Verdict: "not yet",
		Testing: forecast.Windows{Week: forecast.Window{Sessions: 10, Refused: 2}}})
	if rep.Forecast == nil || len(rep.Advice) != n+1 || rep.Advice[n] != "this relay's enforce forecast: not yet" {
		t.Fatalf("forecast advice: %q", rep.Advice[n:])
	}
}

// A domain without MTA-STS: no policy, no patterns, nothing matched.
func TestRunNoPolicy(t *testing.T) {
	w := testworld.New(t)
	mx := w.NewMX(testworld.MXOptions{Hostname: "mx.plain.test", Cert: w.CA.Issue(testworld.CertValid, "mx.plain.test")})
	w.DNS.SetMX("plain.test", testworld.MX{Pref: 10, Host: "mx.plain.test"})
	w.DNS.SetA("mx.plain.test", mx.IP())

	rep := Run(context.Background(), testOptions(t, w), "plain.test")
	if rep.MTASTS.Parsed != nil || len(rep.Patterns) != 0 || len(rep.MX) != 1 || rep.MX[0].MatchesPolicy != nil {
		t.Fatalf("report: %+v", rep)
	}
	if rep.TLSRPT.Present || !rep.OK {
		t.Fatalf("TLS-RPT %+v, problems %q", rep.TLSRPT, rep.Problems)
	}
}
