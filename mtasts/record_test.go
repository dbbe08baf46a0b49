package mtasts

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/stsrelay/stsrelay/internal/dnsclient"
)

func TestParseRecord(t *testing.T) {
	valid := []struct {
		name, in, id string
		ext          map[string]string
	}{
		{"example from RFC 8461 §3.1", "v=STSv1; id=20160831085700Z;", "20160831085700Z", nil},
		{"WSP around delimiters", "v=STSv1; \t id=20160831085700Z  \t;", "20160831085700Z", nil},
		{"no space after ;", "v=STSv1;id=a1", "a1", nil},
		{"trailing ; optional", "v=STSv1; id=a1;", "a1", nil},
		{"one-char id", "v=STSv1; id=a", "a", nil},
		{"32-char id is the maximum", "v=STSv1; id=" + strings.Repeat("a", 32), strings.Repeat("a", 32), nil},
		{"extensions kept", "v=STSv1; id=a; more=a; ext=2", "a", map[string]string{"more": "a", "ext": "2"}},
		{"WSP before first ; (errata 6285)", "v=STSv1 ; id=foo; unrelated=1", "foo", map[string]string{"unrelated": "1"}},
		{"unknown field before id", "v=STSv1; foo=bar; id=a1", "a1", map[string]string{"foo": "bar"}},
		{"duplicate id: first wins", "v=STSv1; id=a1; id=b2", "a1", nil},
		{"duplicate extension: first wins", "v=STSv1; id=a1; x=1; x=2", "a1", map[string]string{"x": "1"}},
		{"extension name with _-.", "v=STSv1; id=a1; a_b-c.d=x:y/z", "a1", map[string]string{"a_b-c.d": "x:y/z"}},
		{"trailing whitespace without ; (lenient)", "v=STSv1; id=a1 ", "a1", nil},
	}
	for _, tc := range valid {
		t.Run(tc.name, func(t *testing.T) {
			r, err := ParseRecord(tc.in)
			if err != nil {
				t.Fatalf("ParseRecord(%q): %v", tc.in, err)
			}
			if r.ID != tc.id {
				t.Errorf("id = %q, want %q", r.ID, tc.id)
			}
			if fmt.Sprint(r.Extensions) != fmt.Sprint(tc.ext) {
				t.Errorf("extensions = %v, want %v", r.Extensions, tc.ext)
			}
		})
	}

	invalid := []struct{ name, in string }{
		{"v=STSv0", "v=STSv0; id=a"},
		{"v=STSv10", "v=STSv10; id=a"},
		{"v=STSv2", "v=STSv2; id=a"},
		{"v=STSv12 without space", "v=STSv12;id=a"},
		{"version is case-sensitive", "v=stsv1; id=a1"},
		{"no id", "v=STSv1"},
		{"no id after ;", "v=STSv1;"},
		{"extension but no id", "v=STSv1; ext=1"},
		{"empty id", "v=STSv1; id="},
		{"33-char id", "v=STSv1; id=" + strings.Repeat("a", 33)},
		{"id with dash", "v=STSv1; id=test-123"},
		{"id with dashes (date)", "v=STSv1; id=2024-01-01"},
		{"empty extension value", "v=STSv1; id=a; more="},
		{"extension name over 32", "v=STSv1; id=a; " + strings.Repeat("a", 33) + "=1"},
		{"extension name bad char", "v=STSv1; id=a; 1%=a"},
		{"extension name starting with _", "v=STSv1; id=a; _x=a"},
		{"= in value", "v=STSv1; id=a; test=="},
		{"empty field between ;;", "v=STSv1; id=a;;"},
		{"space instead of ;", "v=STSv1; id=foo include=foo.com"},
		{"v not first", "id=a1; v=STSv1;"},
		{"garbage", "azazaza;asdasd"},
		{"field without =", "v=STSv1; id=a; flag"},
		{"empty", ""},
		{"control char in value", "v=STSv1; id=a; x=a\x01b"},
	}
	for _, tc := range invalid {
		t.Run("invalid/"+tc.name, func(t *testing.T) {
			r, err := ParseRecord(tc.in)
			if err == nil {
				t.Fatalf("ParseRecord(%q) = %+v, want error", tc.in, r)
			}
			if !errors.Is(err, ErrRecordSyntax) {
				t.Errorf("error %v does not wrap ErrRecordSyntax", err)
			}
		})
	}
}

// fakeTXT is a TXTResolver answering from a map, for the pure tests.
type fakeTXT struct {
	records map[string][][]string
	err     map[string]error
	queries []string
}

func (f *fakeTXT) LookupTXT(_ context.Context, name string) ([][]string, error) {
	f.queries = append(f.queries, name)
	if err := f.err[name]; err != nil {
		return nil, err
	}
	if r, ok := f.records[name]; ok {
		return r, nil
	}
	return nil, fmt.Errorf("%s: %w", name, dnsclient.ErrNotFound)
}

func TestLookupRecord(t *testing.T) {
	tests := []struct {
		name    string
		records [][]string
		err     error
		wantID  string
		wantErr error
	}{
		{"one record", [][]string{{"v=STSv1; id=a1"}}, nil, "a1", nil},
		{"strings joined without spaces (§3.1)", [][]string{{"v=STSv1; id=ab", "cd"}}, nil, "abcd", nil},
		{"non-STS record ignored", [][]string{{"v=STSv1; id=1"}, {"bogus"}}, nil, "1", nil},
		{"SPF beside STS", [][]string{{"v=spf1 -all"}, {"v=STSv1; id=1"}}, nil, "1", nil},
		{"two STS records", [][]string{{"v=STSv1; id=1"}, {"v=STSv1; id=2"}}, nil, "", ErrMultipleRecords},
		{"no STS record", [][]string{{"bogus"}, {"more"}}, nil, "", ErrNoRecord},
		{"v=STSv10 is not ours", [][]string{{"v=STSv10; id=1"}}, nil, "", ErrNoRecord},
		{"invalid STS record", [][]string{{"v=STSv1; id=bad-id"}}, nil, "", ErrRecordSyntax},
		{"bare v=STSv1 reported invalid", [][]string{{"v=STSv1"}}, nil, "", ErrRecordSyntax},
		{"NXDOMAIN", nil, dnsclient.ErrNotFound, "", ErrNoRecord},
		{"NODATA", nil, dnsclient.ErrNoData, "", ErrNoRecord},
		{"SERVFAIL", nil, dnsclient.ErrTemporary, "", ErrDNS},
		{"unclassified error is temporary", nil, errors.New("boom"), "", ErrDNS},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := &fakeTXT{records: map[string][][]string{}, err: map[string]error{}}
			if tc.records != nil {
				r.records["_mta-sts.ex.test"] = tc.records
			}
			if tc.err != nil {
				r.err["_mta-sts.ex.test"] = fmt.Errorf("lookup: %w", tc.err)
			}
			rec, err := LookupRecord(context.Background(), r, "ex.test")
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if rec.ID != tc.wantID {
				t.Errorf("id = %q, want %q", rec.ID, tc.wantID)
			}
			if len(r.queries) != 1 || r.queries[0] != "_mta-sts.ex.test" {
				t.Errorf("queries = %v", r.queries)
			}
		})
	}
}

var recordSeeds = []string{
	"v=STSv1; id=20160831085700Z;", "v=STSv1; \t id=20160831085700Z  \t;", "v=STSv1; id=a",
	"v=STSv1; id=a; more=a; ext=2", "v=STSv1 ; id=foo; unrelated=1", "v=STSv0", "v=STSv10", "v=STSv1",
	"v=STSv1;", "v=STSv1; ext=1", "v=STSv1; id=", "v=STSv1; id=test-123", "v=STSv1; id=a; more=",
	"v=STSv1; id=a; 1%=a", "v=STSv1; id=a; test==", "v=STSv1; id=a;;", "v=STSv1; id=foo include=foo.com",
	"id=a; v=STSv1;", "azazaza;asdasd", "v=STSv1;id=a1;id=b2",
}

// FuzzParseRecord: never panics; a parsed record has a valid id, and
// re-serializing it parses to the same record.
func FuzzParseRecord(f *testing.F) {
	for _, s := range recordSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := ParseRecord(s)
		if err != nil {
			if !errors.Is(err, ErrRecordSyntax) {
				t.Fatalf("error does not wrap ErrRecordSyntax: %v", err)
			}
			return
		}
		if !ValidID(r.ID) {
			t.Fatalf("accepted invalid id %q from %q", r.ID, s)
		}
		out := "v=STSv1; id=" + r.ID
		for k, v := range r.Extensions {
			out += "; " + k + "=" + v
		}
		r2, err := ParseRecord(out)
		if err != nil {
			t.Fatalf("round trip of %q as %q: %v", s, out, err)
		}
		if r2.ID != r.ID || fmt.Sprint(r2.Extensions) != fmt.Sprint(r.Extensions) {
			t.Fatalf("round trip of %q: %+v != %+v", s, r2, r)
		}
	})
}
