package tlsrpt

import (
	"reflect"
	"testing"
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
