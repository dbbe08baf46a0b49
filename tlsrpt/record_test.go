package tlsrpt

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/internal/testworld"
	"github.com/stsrelay/stsrelay/internal/testworld/worldres"
)

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

func TestLookupRecord(t *testing.T) {
	const name = "_smtp._tls.ex.test"
	cases := []struct {
		name    string
		txt     [][]string
		dnsErr  error
		wantErr error
		want    []string // rua URIs kept
		ignored []string
	}{
		{name: "RPT-3-a mailto", txt: [][]string{{"v=TLSRPTv1;rua=mailto:reports@example.com"}},
			want: []string{"mailto:reports@example.com"}},
		{name: "RPT-3-a https with spaces", txt: [][]string{{"v=TLSRPTv1; rua=https://reporting.example.com/v1/tlsrpt"}},
			want: []string{"https://reporting.example.com/v1/tlsrpt"}},
		{name: "RPT-3-d multiple rua", txt: [][]string{{"v=TLSRPTv1; rua=mailto:r@rep.test , https://rua.test/r"}},
			want: []string{"mailto:r@rep.test", "https://rua.test/r"}},
		{name: "RPT-3-d unsupported scheme ignored", txt: [][]string{{"v=TLSRPTv1; rua=ftp://x.test/r,https://rua.test/r"}},
			want: []string{"https://rua.test/r"}, ignored: []string{"ftp://x.test/r"}},
		{name: "RPT-3-d only unsupported schemes", txt: [][]string{{"v=TLSRPTv1; rua=ftp://x.test/r"}},
			wantErr: ErrRecordSyntax},
		{name: "RPT-3-c strings joined without spaces", txt: [][]string{{"v=TLSRPTv1; rua=https://ru", "a.test/r"}},
			want: []string{"https://rua.test/r"}},
		{name: "RPT-3-c unknown field ignored", txt: [][]string{{"v=TLSRPTv1; x=1; rua=https://rua.test/r;"}},
			want: []string{"https://rua.test/r"}},
		{name: "trailing delimiter", txt: [][]string{{"v=TLSRPTv1; rua=https://rua.test/r ; "}},
			want: []string{"https://rua.test/r"}},
		{name: "RPT-3-b next to an SPF record", txt: [][]string{{"v=spf1 -all"}, {"v=TLSRPTv1; rua=https://rua.test/r"}},
			want: []string{"https://rua.test/r"}},
		{name: "RPT-3-b two records -> none", txt: [][]string{{"v=TLSRPTv1; rua=https://a.test/r"}, {"v=TLSRPTv1; rua=https://b.test/r"}},
			wantErr: ErrMultipleRecords},
		{name: "RPT-3-b bad version", txt: [][]string{{"v=TLSRPTv2; rua=https://rua.test/r"}}, wantErr: ErrNoRecord},
		{name: "RPT-3-b version prefix only", txt: [][]string{{"v=TLSRPTv10; rua=https://rua.test/r"}}, wantErr: ErrNoRecord},
		{name: "RPT-3-b version not first", txt: [][]string{{"rua=https://rua.test/r; v=TLSRPTv1"}}, wantErr: ErrNoRecord},
		{name: "RPT-3-a no rua", txt: [][]string{{"v=TLSRPTv1; x=1"}}, wantErr: ErrRecordSyntax},
		{name: "RPT-3-a version only", txt: [][]string{{"v=TLSRPTv1"}}, wantErr: ErrRecordSyntax},
		{name: "mailto with percent-encoded comma", txt: [][]string{{"v=TLSRPTv1; rua=mailto:a%2Cb@rep.test"}},
			wantErr: ErrRecordSyntax}, // "a,b@rep.test" is not one address
		{name: "mailto with query", txt: [][]string{{"v=TLSRPTv1; rua=mailto:tls@rep.test?subject=x"}},
			want: []string{"mailto:tls@rep.test?subject=x"}},
		{name: "NXDOMAIN", wantErr: ErrNoRecord},
		{name: "NODATA", dnsErr: fmt.Errorf("x: %w", dnsclient.ErrNoData), wantErr: ErrNoRecord},
		{name: "SERVFAIL is temporary", dnsErr: fmt.Errorf("x: %w", dnsclient.ErrTemporary), wantErr: ErrDNS},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := &fakeTXT{records: map[string][][]string{}, err: tc.dnsErr}
			if tc.txt != nil {
				f.records[name] = tc.txt
			}
			rec, err := LookupRecord(context.Background(), f, "Ex.Test.")
			if !slices.Equal(f.queries, []string{name}) {
				t.Errorf("queried %v, want [%s]", f.queries, name)
			}
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("err = %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, r := range rec.RUAs {
				got = append(got, r.URI)
			}
			if !slices.Equal(got, tc.want) {
				t.Errorf("rua = %v, want %v", got, tc.want)
			}
			if !slices.Equal(rec.Ignored, tc.ignored) {
				t.Errorf("ignored = %v, want %v", rec.Ignored, tc.ignored)
			}
		})
	}
}

func TestParseRecordMailtoAddress(t *testing.T) {
	rec, err := ParseRecord("v=TLSRPTv1;rua=mailto:tls%2Drpt@rep.test,https://rua.test/r")
	if err != nil {
		t.Fatal(err)
	}
	if rec.RUAs[0].Scheme != "mailto" || rec.RUAs[0].Address != "tls-rpt@rep.test" {
		t.Errorf("mailto rua = %+v", rec.RUAs[0])
	}
	if rec.RUAs[1].Scheme != "https" || rec.RUAs[1].Address != "" {
		t.Errorf("https rua = %+v", rec.RUAs[1])
	}
}

// TestLookupRecordRealDNS runs discovery through the production DNS client
// against the test world's DNS server, with the record split into two
// character-strings on the wire.
func TestLookupRecordRealDNS(t *testing.T) {
	w := testworld.New(t)
	res := worldres.New(t, w)
	w.DNS.SetTXT("_smtp._tls.ex.test", []string{"v=TLSRPTv1; rua=https://ru", "a.test/r"}, []string{"v=spf1 -all"})
	rec, err := LookupRecord(context.Background(), res, "ex.test")
	if err != nil {
		t.Fatal(err)
	}
	if len(rec.RUAs) != 1 || rec.RUAs[0].URI != "https://rua.test/r" {
		t.Errorf("rua = %+v", rec.RUAs)
	}
	if _, err := LookupRecord(context.Background(), res, "none.test"); !errors.Is(err, ErrNoRecord) {
		t.Errorf("missing record: err = %v, want ErrNoRecord", err)
	}
	w.DNS.SetTXT("_smtp._tls.two.test", []string{"v=TLSRPTv1; rua=https://a.test/"}, []string{"v=TLSRPTv1; rua=https://b.test/"})
	if _, err := LookupRecord(context.Background(), res, "two.test"); !errors.Is(err, ErrMultipleRecords) {
		t.Errorf("two records: err = %v, want ErrMultipleRecords", err)
	}
}

// Issue #9 finding 8: at most MaxRUA destinations are used; duplicates
// count once.
func TestParseRecordRUACap(t *testing.T) {
	var uris []string
	for i := range 25 {
		uris = append(uris, fmt.Sprintf("mailto:r%d@rep.test", i))
	}
	rec, err := ParseRecord("v=TLSRPTv1; rua=mailto:r0@REP.test," + strings.Join(uris, ",") + ",https://rua.test/r,https://rua.test/r")
	if err != nil {
		t.Fatal(err)
	}
	if len(rec.RUAs) != MaxRUA {
		t.Fatalf("%d rua used, want %d", len(rec.RUAs), MaxRUA)
	}
	for i, r := range rec.RUAs {
		if want := fmt.Sprintf("mailto:r%d@rep.test", i); i > 0 && r.URI != want {
			t.Errorf("rua %d = %s, want %s", i, r.URI, want)
		}
	}
	// 26 mailto (one a duplicate of r0) + 2 https (one duplicate): 26
	// distinct, 5 used.
	if len(rec.Excess) != 21 {
		t.Errorf("excess = %d: %v", len(rec.Excess), rec.Excess)
	}
	rec, err = ParseRecord("v=TLSRPTv1; rua=mailto:a@rep.test,mailto:a@rep.test,https://x.test/r")
	if err != nil || len(rec.RUAs) != 2 || len(rec.Excess) != 0 {
		t.Errorf("dedupe: %+v, %v", rec, err)
	}
}
