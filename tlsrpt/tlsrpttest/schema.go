// Package tlsrpttest holds test helpers for the tlsrpt packages: the
// RFC 8460 §4.4 report schema check. Only tests import it.
package tlsrpttest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/tlsrpt"
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

var resultTypes = []tlsrpt.ResultType{
	tlsrpt.ResultSTARTTLSNotSupported, tlsrpt.ResultCertificateHostMismatch, tlsrpt.ResultCertificateExpired,
	tlsrpt.ResultCertificateNotTrusted, tlsrpt.ResultValidationFailure, tlsrpt.ResultTLSAInvalid, tlsrpt.ResultDNSSECInvalid,
	tlsrpt.ResultDANERequired, tlsrpt.ResultSTSPolicyFetchError, tlsrpt.ResultSTSPolicyInvalid, tlsrpt.ResultSTSWebPKIInvalid,
}

// CheckReportSchema checks raw JSON against RFC 8460 §4.4 field by field and
// returns the decoded tree.
func CheckReportSchema(t *testing.T, raw []byte) map[string]any {
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
			if rt := c.str(dm["result-type"], "result-type"); !slices.Contains(resultTypes, tlsrpt.ResultType(rt)) {
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
