package tlsrpt_test

// An external test: it builds reports from sessions a tlsrptdb.Recorder
// counted, and tlsrptdb imports tlsrpt.

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"io"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap/zaptest"

	"github.com/stsrelay/stsrelay/tlsrpt"
	"github.com/stsrelay/stsrelay/tlsrpt/tlsrptdb"
	"github.com/stsrelay/stsrelay/tlsrpt/tlsrpttest"
)

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

// newRecorder is a Recorder in a temporary directory whose clock stands at now.
func newRecorder(t *testing.T, now time.Time) *tlsrptdb.Recorder {
	t.Helper()
	r, err := tlsrptdb.NewRecorder(t.TempDir(), func() time.Time { return now }, zaptest.NewLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// RPT-4-a..g: a report built from recorded sessions (3 successes, 2
// failures of different types, one with a reason code) has the RFC 8460
// §4.4 shape, every field checked.
func TestReportSchema(t *testing.T) {
	r := newRecorder(t, day1.Add(30*time.Hour))
	for i := range 3 {
		r.Record(at(okSession, day1.Add(time.Duration(i)*time.Hour)))
	}
	r.Record(at(badSession, day1.Add(5*time.Hour))) // certificate-not-trusted with reason code
	noTLS := badSession
	noTLS.ResultType, noTLS.FailureReasonCode, noTLS.ReceivingHelo = tlsrpt.ResultSTARTTLSNotSupported, "", ""
	noTLS.ReceivingIP = "2001:db8::25"
	noTLS.SendingIP = "2001:db8::1"
	r.Record(at(noTLS, day1.Add(23*time.Hour+59*time.Minute+59*time.Second)))

	p := r.Pending()
	if len(p) != 1 {
		t.Fatalf("pending = %+v", p)
	}
	rep := tlsrpt.BuildReport(tlsrpt.ReportOptions{OrganizationName: "Example Org", ContactInfo: "mailto:postmaster@relay.example.net",
		Submitter: "relay.example.net"}, p[0])
	raw, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	top := tlsrpttest.CheckReportSchema(t, raw)

	// And the values.
	if top["organization-name"] != "Example Org" || top["contact-info"] != "postmaster@relay.example.net" {
		t.Errorf("metadata = %v / %v", top["organization-name"], top["contact-info"])
	}
	dr := top["date-range"].(map[string]any)
	if dr["start-datetime"] != "2026-03-14T00:00:00Z" || dr["end-datetime"] != "2026-03-14T23:59:59Z" {
		t.Errorf("date-range = %v (RPT-4-i: one UTC day)", dr)
	}
	if id := top["report-id"].(string); !regexp.MustCompile(`^1773446400\.ex\.test\.[0-9a-f]{16}@relay\.example\.net$`).MatchString(id) {
		t.Errorf("report-id = %q", id)
	}
	pols := top["policies"].([]any)
	if len(pols) != 1 {
		t.Fatalf("policies = %v", pols)
	}
	pm := pols[0].(map[string]any)
	pol := pm["policy"].(map[string]any)
	if pol["policy-type"] != "sts" || pol["policy-domain"] != "ex.test" {
		t.Errorf("policy = %v", pol)
	}
	if got := toStrings(pol["policy-string"]); !slices.Equal(got, stsLines) {
		t.Errorf("policy-string = %q, want each line, each mx separately: %q", got, stsLines)
	}
	if got := toStrings(pol["mx-host"]); !slices.Equal(got, stsMX) {
		t.Errorf("mx-host = %q, want %q", got, stsMX)
	}
	sum := pm["summary"].(map[string]any)
	if sum["total-successful-session-count"] != json.Number("3") || sum["total-failure-session-count"] != json.Number("2") {
		t.Errorf("summary = %v, want 3 / 2", sum)
	}
	details := pm["failure-details"].([]any)
	if len(details) != 2 {
		t.Fatalf("failure-details = %v", details)
	}
	d0, d1 := details[0].(map[string]any), details[1].(map[string]any)
	want0 := map[string]any{"result-type": "certificate-not-trusted", "sending-mta-ip": "192.0.2.1",
		"receiving-mx-hostname": "mx1.ex.test", "receiving-mx-helo": "mx1.ex.test", "receiving-ip": "198.51.100.7",
		"failed-session-count": json.Number("1"), "failure-reason-code": "certificate-unknown-authority"}
	want1 := map[string]any{"result-type": "starttls-not-supported", "sending-mta-ip": "2001:db8::1",
		"receiving-mx-hostname": "mx1.ex.test", "receiving-ip": "2001:db8::25", "failed-session-count": json.Number("1")}
	if !mapsEqual(d0, want0) || !mapsEqual(d1, want1) {
		t.Errorf("failure-details =\n%v\n%v\nwant\n%v\n%v", d0, d1, want0, want1)
	}
}

// A single-policy, single-line report still has arrays everywhere, and a
// no-policy-found entry has empty arrays, not null.
func TestReportArraysNeverNull(t *testing.T) {
	r := newRecorder(t, day1.Add(time.Hour))
	r.Record(tlsrpt.Session{PolicyDomain: "np.test", PolicyType: "no-policy-found", Success: true})
	rep := tlsrpt.BuildReport(tlsrpt.ReportOptions{ContactInfo: "a@b.test", Submitter: "b.test"}, r.Pending()[0])
	raw, _ := json.Marshal(rep)
	tlsrpttest.CheckReportSchema(t, raw)
	if !bytes.Contains(raw, []byte(`"policy-string":[]`)) || !bytes.Contains(raw, []byte(`"mx-host":[]`)) ||
		!bytes.Contains(raw, []byte(`"failure-details":[]`)) {
		t.Errorf("arrays missing: %s", raw)
	}
}

func TestReportFilenameAndGzip(t *testing.T) {
	pc := tlsrpt.PolicyCounts{PeriodStart: day1, PeriodEnd: day1.Add(24 * time.Hour), PolicyDomain: "ex.test",
		Policies: []tlsrpt.PolicyResult{{Policy: tlsrpt.PolicyDesc{PolicyType: "sts", PolicyString: stsLines, PolicyDomain: "ex.test", MXHost: stsMX},
			FailureDetails: []tlsrpt.FailureDetail{}}}}
	rep := tlsrpt.BuildReport(tlsrpt.ReportOptions{ContactInfo: "postmaster@relay.example.net", Submitter: "Relay.Example.NET."}, pc)
	name := rep.Filename("Relay.Example.NET.", "ex.test")
	// RPT-5.1-a
	if !regexp.MustCompile(`^[^!]+![^!]+!\d+!\d+(![A-Za-z0-9]+)?\.json\.gz$`).MatchString(name) {
		t.Errorf("filename %q", name)
	}
	if !strings.HasPrefix(name, "relay.example.net!ex.test!1773446400!1773532799!") {
		t.Errorf("filename %q: want submitter!domain!start!last-second", name)
	}
	if rep2 := tlsrpt.BuildReport(tlsrpt.ReportOptions{Submitter: "relay.example.net"}, pc); rep2.ReportID == rep.ReportID {
		t.Error("two reports got the same report-id")
	}
	gz, err := rep.Gzip()
	if err != nil {
		t.Fatal(err)
	}
	if gz[0] != 0x1f || gz[1] != 0x8b { // RPT-5.2-a
		t.Errorf("not gzip: % x", gz[:2])
	}
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := io.ReadAll(zr)
	tlsrpttest.CheckReportSchema(t, raw)
}

func toStrings(v any) []string {
	var out []string
	for _, e := range v.([]any) {
		out = append(out, e.(string))
	}
	return out
}

func mapsEqual(a, b map[string]any) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}
