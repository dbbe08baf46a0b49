package tlsrptdb

import (
	"bytes"
	"compress/gzip"
	"encoding/json"
	"io"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/tlsrpt"
)

// FuzzBuildReport: strings that reach a report come from peers (an MX's
// host name and greeting word, a policy's lines) and from the config. The
// recorder bounds the session's strings; the report must always marshal
// to valid JSON that reads back to the same report (for valid UTF-8
// input), its gzip must hold that JSON, every failure-details string is
// printable ASCII within its bound, and its filename has no line break.
func FuzzBuildReport(f *testing.F) {
	f.Add("Example Org", "mailto:postmaster@example.net", "relay.example.net", "example.com", "mx1.example.com", "mx1.example.com", "certificate-expired", "https://example.net/info", "mode: enforce", "*.example.com", false, uint8(3))
	f.Add("Org \"quoted\"", "tlsrpt@example.net", "RELAY.example.net.", "xn--bcher-kva.example", "mx.\x00evil", "\x1b[2Jhelo", "x509-expired", "", "mx: *.example.com", "", true, uint8(1))
	f.Add("", "", "", "", "", "", "", "", "", "", false, uint8(0))
	f.Add("\xff\xfe", "mailto:", "a/b", "c/../d\r\ne", strings.Repeat("m", 300), strings.Repeat("h", 4000), strings.Repeat("r", 100), "\u009b", "version: STSv1\u2028", "\t", false, uint8(255))
	f.Fuzz(func(t *testing.T, org, contact, submitter, domain, mx, helo, reason, info, policyLine, pattern string, success bool, n uint8) {
		now := time.Date(2025, 3, 1, 12, 0, 0, 0, time.UTC)
		rec, err := NewRecorder(t.TempDir(), func() time.Time { return now }, zap.NewNop())
		if err != nil {
			t.Fatal(err)
		}
		for i := 0; i < int(n%8)+1; i++ {
			rec.Record(tlsrpt.Session{Time: now.Add(-time.Duration(i) * time.Minute), PolicyDomain: domain, PolicyType: tlsrpt.PolicyTypeSTS,
				PolicyString: []string{"version: STSv1", policyLine}, MXPatterns: []string{pattern},
				Success: success && i%2 == 0, ResultType: tlsrpt.ResultCertificateExpired,
				SendingIP: "192.0.2.1", ReceivingMX: mx, ReceivingHelo: helo, ReceivingIP: "198.51.100.7",
				FailureReasonCode: reason, AdditionalInfo: info})
		}
		pending := rec.Pending()
		// Also a report straight from strings the recorder never saw.
		pending = append(pending, tlsrpt.PolicyCounts{PeriodStart: now.Truncate(24 * time.Hour), PeriodEnd: now.Truncate(24 * time.Hour).Add(24 * time.Hour),
			PolicyDomain: domain, Policies: []tlsrpt.PolicyResult{{Policy: tlsrpt.PolicyDesc{PolicyType: tlsrpt.PolicyTypeSTS, PolicyString: []string{policyLine}, PolicyDomain: domain, MXHost: []string{pattern}},
				FailureDetails: []tlsrpt.FailureDetail{{ResultType: tlsrpt.ResultValidationFailure, ReceivingMXHostname: mx, ReceivingMXHelo: helo, FailedSessionCount: 1, FailureReasonCode: reason, AdditionalInformation: info}}}}})
		validInput := true
		for _, s := range []string{org, contact, submitter, domain, mx, helo, reason, info, policyLine, pattern} {
			validInput = validInput && utf8.ValidString(s)
		}
		for k, pc := range pending {
			fromRecorder := k < len(pending)-1
			rep := tlsrpt.BuildReport(tlsrpt.ReportOptions{OrganizationName: org, ContactInfo: contact, Submitter: submitter}, pc)
			data, err := json.Marshal(rep)
			if err != nil {
				t.Fatalf("json.Marshal: %v", err)
			}
			if !json.Valid(data) {
				t.Fatalf("invalid JSON: %q", data)
			}
			var back tlsrpt.Report
			if err := json.Unmarshal(data, &back); err != nil {
				t.Fatalf("the report does not read back: %v", err)
			}
			if validInput && !reflect.DeepEqual(&back, rep) {
				t.Fatalf("report changed through JSON:\n%+v\n%+v", rep, &back)
			}
			gz, err := rep.Gzip()
			if err != nil {
				t.Fatalf("Gzip: %v", err)
			}
			zr, err := gzip.NewReader(bytes.NewReader(gz))
			if err != nil {
				t.Fatal(err)
			}
			unz, err := io.ReadAll(zr)
			if err != nil || !bytes.Equal(unz, data) {
				t.Fatalf("gzip does not hold the JSON (%v)", err)
			}
			if fromRecorder {
				for _, p := range rep.Policies {
					for _, d := range p.FailureDetails {
						for _, s := range []struct {
							v string
							n int
						}{{d.ReceivingMXHostname, tlsrpt.MaxNameLen}, {d.ReceivingMXHelo, tlsrpt.MaxNameLen}, {d.FailureReasonCode, tlsrpt.MaxReasonLen},
							{d.AdditionalInformation, tlsrpt.MaxInfoLen}, {d.SendingMTAIP, tlsrpt.MaxIPLen}, {d.ReceivingIP, tlsrpt.MaxIPLen}} {
							if len(s.v) > s.n || strings.ContainsFunc(s.v, func(r rune) bool { return r < 0x20 || r >= 0x7f }) {
								t.Fatalf("failure detail string %q: over %d bytes or not printable ASCII", s.v, s.n)
							}
						}
					}
				}
				if name := rep.Filename(submitter, pc.PolicyDomain); strings.ContainsAny(name, "\r\n") {
					t.Fatalf("report filename %q has a line break", name)
				}
			}
		}
	})
}
