package tlsrpt

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"
)

// schemaCheck holds the RFC 8460 §4.4 schema rules, one helper per JSON
// type, failing the test with the path of the offending field.
type schemaCheck struct{ t *testing.T }

func (c schemaCheck) object(v any, path string, required, optional []string) map[string]any {
	c.t.Helper()
	m, ok := v.(map[string]any)
	if !ok {
		c.t.Fatalf("%s: %T, want a JSON object", path, v)
	}
	for _, k := range required {
		if _, ok := m[k]; !ok {
			c.t.Errorf("%s: required key %q missing", path, k)
		}
	}
	for k := range m {
		if !slices.Contains(required, k) && !slices.Contains(optional, k) {
			c.t.Errorf("%s: unexpected key %q", path, k)
		}
	}
	return m
}

func (c schemaCheck) str(v any, path string) string {
	c.t.Helper()
	s, ok := v.(string)
	if !ok {
		c.t.Errorf("%s: %T (%v), want a JSON string", path, v, v)
	}
	return s
}

func (c schemaCheck) array(v any, path string) []any {
	c.t.Helper()
	a, ok := v.([]any)
	if !ok {
		c.t.Fatalf("%s: %T (%v), want a JSON array", path, v, v)
	}
	return a
}

func (c schemaCheck) strings(v any, path string) []string {
	c.t.Helper()
	var out []string
	for i, e := range c.array(v, path) {
		out = append(out, c.str(e, fmt.Sprintf("%s[%d]", path, i)))
	}
	return out
}

// integer: a JSON number (not a string) with no fraction, >= 0.
func (c schemaCheck) integer(v any, path string) int64 {
	c.t.Helper()
	n, ok := v.(json.Number)
	if !ok {
		c.t.Errorf("%s: %T (%v), want a JSON number", path, v, v)
		return -1
	}
	if strings.ContainsAny(n.String(), ".eE") {
		c.t.Errorf("%s: %s is not an integer", path, n)
	}
	i, err := n.Int64()
	if err != nil || i < 0 {
		c.t.Errorf("%s: %s: %v", path, n, err)
	}
	return i
}

// dateTime: RFC 3339 (§5.6) in UTC ("Z"), whole seconds.
func (c schemaCheck) dateTime(v any, path string) time.Time {
	c.t.Helper()
	s := c.str(v, path)
	tm, err := time.Parse(time.RFC3339, s)
	if err != nil {
		c.t.Errorf("%s: %q is not RFC 3339: %v", path, s, err)
	}
	if !strings.HasSuffix(s, "Z") || tm.Nanosecond() != 0 {
		c.t.Errorf("%s: %q is not whole seconds in UTC", path, s)
	}
	return tm
}

func (c schemaCheck) ip(v any, path string) string {
	c.t.Helper()
	s := c.str(v, path)
	if a, err := netip.ParseAddr(s); err != nil || a.Zone() != "" {
		c.t.Errorf("%s: %q is not an IP address", path, s)
	}
	return s
}

var resultTypes = []ResultType{
	ResultSTARTTLSNotSupported, ResultCertificateHostMismatch, ResultCertificateExpired,
	ResultCertificateNotTrusted, ResultValidationFailure, ResultTLSAInvalid, ResultDNSSECInvalid,
	ResultDANERequired, ResultSTSPolicyFetchError, ResultSTSPolicyInvalid, ResultSTSWebPKIInvalid,
}

// checkReportSchema checks raw JSON against RFC 8460 §4.4 field by field and
// returns the decoded tree.
func checkReportSchema(t *testing.T, raw []byte) map[string]any {
	t.Helper()
	c := schemaCheck{t}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		t.Fatalf("report is not JSON: %v", err)
	}
	if dec.More() {
		t.Fatal("trailing data after the report")
	}
	top := c.object(v, "$", []string{"organization-name", "date-range", "contact-info", "report-id", "policies"}, nil)
	c.str(top["organization-name"], "organization-name")
	dr := c.object(top["date-range"], "date-range", []string{"start-datetime", "end-datetime"}, nil)
	start := c.dateTime(dr["start-datetime"], "start-datetime")
	end := c.dateTime(dr["end-datetime"], "end-datetime")
	if end.Before(start) {
		t.Errorf("date-range end %v before start %v", end, start)
	}
	contact := c.str(top["contact-info"], "contact-info")
	if strings.HasPrefix(contact, "mailto:") || strings.Count(contact, "@") != 1 {
		t.Errorf("contact-info %q is not an addr-spec", contact)
	}
	if id := c.str(top["report-id"], "report-id"); id == "" {
		t.Error("report-id is empty")
	}
	pols := c.array(top["policies"], "policies") // RPT-4-b: always an array
	if len(pols) == 0 {
		t.Error("policies is empty")
	}
	for _, p := range pols {
		pm := c.object(p, "policies[]", []string{"policy", "summary", "failure-details"}, nil)
		pol := c.object(pm["policy"], "policy", []string{"policy-type", "policy-string", "policy-domain", "mx-host"}, nil)
		pt := c.str(pol["policy-type"], "policy-type")
		if !slices.Contains([]string{"sts", "tlsa", "no-policy-found"}, pt) {
			t.Errorf("policy-type %q", pt)
		}
		c.strings(pol["policy-string"], "policy-string")
		pd := c.str(pol["policy-domain"], "policy-domain")
		if pd != strings.ToLower(pd) || strings.HasSuffix(pd, ".") || !isASCII(pd) {
			t.Errorf("policy-domain %q is not a lowercase A-label name", pd)
		}
		c.strings(pol["mx-host"], "mx-host")
		sum := c.object(pm["summary"], "summary", []string{"total-successful-session-count", "total-failure-session-count"}, nil)
		c.integer(sum["total-successful-session-count"], "total-successful-session-count")
		failures := c.integer(sum["total-failure-session-count"], "total-failure-session-count")
		var detailSum int64
		for _, d := range c.array(pm["failure-details"], "failure-details") {
			dm := c.object(d, "failure-details[]",
				[]string{"result-type", "sending-mta-ip", "receiving-mx-hostname", "receiving-ip", "failed-session-count"},
				[]string{"receiving-mx-helo", "additional-information", "failure-reason-code"})
			if rt := c.str(dm["result-type"], "result-type"); !slices.Contains(resultTypes, ResultType(rt)) {
				t.Errorf("result-type %q is not registered (§6.6)", rt)
			}
			c.ip(dm["sending-mta-ip"], "sending-mta-ip")
			c.str(dm["receiving-mx-hostname"], "receiving-mx-hostname")
			c.ip(dm["receiving-ip"], "receiving-ip")
			detailSum += c.integer(dm["failed-session-count"], "failed-session-count")
			for _, k := range []string{"receiving-mx-helo", "additional-information", "failure-reason-code"} {
				if v, ok := dm[k]; ok {
					if c.str(v, k) == "" {
						t.Errorf("optional %s present but empty", k)
					}
				}
			}
		}
		if detailSum != failures {
			t.Errorf("failure-details add up to %d, summary says %d", detailSum, failures)
		}
	}
	return top
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= 0x80 {
			return false
		}
	}
	return true
}

// RPT-4-a..g: a report built from recorded sessions (3 successes, 2
// failures of different types, one with a reason code) has the RFC 8460
// §4.4 shape, every field checked.
func TestReportSchema(t *testing.T) {
	c := newClock(day1.Add(30 * time.Hour))
	r := newTestRecorder(t, t.TempDir(), c)
	for i := range 3 {
		r.Record(at(okSession, day1.Add(time.Duration(i)*time.Hour)))
	}
	r.Record(at(badSession, day1.Add(5*time.Hour))) // certificate-not-trusted with reason code
	noTLS := badSession
	noTLS.ResultType, noTLS.FailureReasonCode, noTLS.ReceivingHelo = ResultSTARTTLSNotSupported, "", ""
	noTLS.ReceivingIP = "2001:db8::25"
	noTLS.SendingIP = "2001:db8::1"
	r.Record(at(noTLS, day1.Add(23*time.Hour+59*time.Minute+59*time.Second)))

	p := r.Pending()
	if len(p) != 1 {
		t.Fatalf("pending = %+v", p)
	}
	rep := BuildReport(ReportOptions{OrganizationName: "Example Org", ContactInfo: "mailto:postmaster@relay.example.net",
		Submitter: "relay.example.net"}, p[0])
	raw, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	top := checkReportSchema(t, raw)

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
	c := newClock(day1.Add(time.Hour))
	r := newTestRecorder(t, t.TempDir(), c)
	r.Record(Session{PolicyDomain: "np.test", PolicyType: "no-policy-found", Success: true})
	rep := BuildReport(ReportOptions{ContactInfo: "a@b.test", Submitter: "b.test"}, r.Pending()[0])
	raw, _ := json.Marshal(rep)
	checkReportSchema(t, raw)
	if !bytes.Contains(raw, []byte(`"policy-string":[]`)) || !bytes.Contains(raw, []byte(`"mx-host":[]`)) ||
		!bytes.Contains(raw, []byte(`"failure-details":[]`)) {
		t.Errorf("arrays missing: %s", raw)
	}
}

func TestReportFilenameAndGzip(t *testing.T) {
	pc := PolicyCounts{PeriodStart: day1, PeriodEnd: day1.Add(24 * time.Hour), PolicyDomain: "ex.test",
		Policies: []PolicyResult{{Policy: PolicyDesc{PolicyType: "sts", PolicyString: stsLines, PolicyDomain: "ex.test", MXHost: stsMX},
			FailureDetails: []FailureDetail{}}}}
	rep := BuildReport(ReportOptions{ContactInfo: "postmaster@relay.example.net", Submitter: "Relay.Example.NET."}, pc)
	name := rep.Filename("Relay.Example.NET.", "ex.test")
	// RPT-5.1-a
	if !regexp.MustCompile(`^[^!]+![^!]+!\d+!\d+(![A-Za-z0-9]+)?\.json\.gz$`).MatchString(name) {
		t.Errorf("filename %q", name)
	}
	if !strings.HasPrefix(name, "relay.example.net!ex.test!1773446400!1773532799!") {
		t.Errorf("filename %q: want submitter!domain!start!last-second", name)
	}
	if rep2 := BuildReport(ReportOptions{Submitter: "relay.example.net"}, pc); rep2.ReportID == rep.ReportID {
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
	checkReportSchema(t, raw)
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
