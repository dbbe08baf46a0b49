package tlsrpt

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
)

// FuzzParseTLSRPTRecord: RFC 8460 §3 records from DNS (peer-controlled
// text). ParseRecord must never panic; a record it accepts has 1 to
// MaxRUA supported URIs, each mailto: with an address or https:, and
// parsing is deterministic.
func FuzzParseTLSRPTRecord(f *testing.F) {
	for _, s := range []string{
		"v=TLSRPTv1; rua=mailto:reports@example.com",
		"v=TLSRPTv1;rua=https://reports.example.com/tlsrpt,mailto:a@example.com;",
		"v=TLSRPTv1 ; rua=mailto:a@example.com, mailto:a@example.com ; ext=1",
		"v=TLSRPTv1; rua=ftp://example.com/x",
		"v=TLSRPTv1; rua=mailto:%61@example.com?subject=x",
		"v=TLSRPTv1; rua=mailto:a@example.com,mailto:b@example.com,mailto:c@example.com,mailto:d@example.com,mailto:e@example.com,mailto:f@example.com",
		"v=TLSRPTv1;;rua=mailto:a@example.com",
		"v=STSv1; id=1",
		"",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, txt string) {
		rec, err := ParseRecord(txt)
		again, err2 := ParseRecord(txt)
		if (err == nil) != (err2 == nil) || !reflect.DeepEqual(rec, again) {
			t.Fatalf("ParseRecord(%q) is not deterministic", txt)
		}
		if err != nil {
			if rec != nil {
				t.Fatalf("ParseRecord(%q) returned a record and an error", txt)
			}
			return
		}
		if rec.Raw != txt {
			t.Fatalf("Raw %q, want the input", rec.Raw)
		}
		if n := len(rec.RUAs); n < 1 || n > MaxRUA {
			t.Fatalf("ParseRecord(%q) accepted %d RUAs", txt, n)
		}
		for _, r := range rec.RUAs {
			switch r.Scheme {
			case "mailto":
				if r.Address == "" {
					t.Fatalf("mailto RUA %q without an address", r.URI)
				}
			case "https":
			default:
				t.Fatalf("RUA %q with scheme %q", r.URI, r.Scheme)
			}
		}
	})
}

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
			rec.Record(Session{Time: now.Add(-time.Duration(i) * time.Minute), PolicyDomain: domain, PolicyType: PolicyTypeSTS,
				PolicyString: []string{"version: STSv1", policyLine}, MXPatterns: []string{pattern},
				Success: success && i%2 == 0, ResultType: ResultCertificateExpired,
				SendingIP: "192.0.2.1", ReceivingMX: mx, ReceivingHelo: helo, ReceivingIP: "198.51.100.7",
				FailureReasonCode: reason, AdditionalInfo: info})
		}
		pending := rec.Pending()
		// Also a report straight from strings the recorder never saw.
		pending = append(pending, PolicyCounts{PeriodStart: now.Truncate(24 * time.Hour), PeriodEnd: now.Truncate(24 * time.Hour).Add(24 * time.Hour),
			PolicyDomain: domain, Policies: []PolicyResult{{Policy: PolicyDesc{PolicyType: PolicyTypeSTS, PolicyString: []string{policyLine}, PolicyDomain: domain, MXHost: []string{pattern}},
				FailureDetails: []FailureDetail{{ResultType: ResultValidationFailure, ReceivingMXHostname: mx, ReceivingMXHelo: helo, FailedSessionCount: 1, FailureReasonCode: reason, AdditionalInformation: info}}}}})
		validInput := true
		for _, s := range []string{org, contact, submitter, domain, mx, helo, reason, info, policyLine, pattern} {
			validInput = validInput && utf8.ValidString(s)
		}
		for k, pc := range pending {
			fromRecorder := k < len(pending)-1
			rep := BuildReport(ReportOptions{OrganizationName: org, ContactInfo: contact, Submitter: submitter}, pc)
			data, err := json.Marshal(rep)
			if err != nil {
				t.Fatalf("json.Marshal: %v", err)
			}
			if !json.Valid(data) {
				t.Fatalf("invalid JSON: %q", data)
			}
			var back Report
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
						}{{d.ReceivingMXHostname, maxNameLen}, {d.ReceivingMXHelo, maxNameLen}, {d.FailureReasonCode, maxReasonLen},
							{d.AdditionalInformation, maxInfoLen}, {d.SendingMTAIP, maxIPLen}, {d.ReceivingIP, maxIPLen}} {
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
