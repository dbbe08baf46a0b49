package mtasts

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/stsrelay/stsrelay/internal/certexpiry"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// PolicyReport is the MTA-STS policy half of `stsrelay check DOMAIN`:
// what discovery (RFC 8461 §3.1), the fetch (§3.3) and the parser (§3.2)
// found. Its JSON field names are stable.
type PolicyReport struct {
	Domain string    `json:"domain"`
	TXT    TXTReport `json:"txt"`
	// Fetch is nil when no fetch was tried (no MTA-STS TXT record).
	Fetch *FetchReport `json:"fetch,omitempty"`
	// Policy is the parsed policy, nil when none was fetched or it is
	// invalid.
	Policy *PolicySummary `json:"policy,omitempty"`
	// Parsed is the policy fetched, as parsed (nil with Policy).
	Parsed *Policy `json:"-"`
	// SyntaxErrors lists every problem of the policy body.
	SyntaxErrors []SyntaxProblem `json:"syntax_errors,omitempty"`
	// Problems are findings that break MTA-STS for senders.
	Problems []string `json:"problems"`
	// Advice are remarks that break nothing today.
	Advice []string `json:"advice"`
	// OK is true when Problems is empty. A domain without MTA-STS is OK
	// (with an advice saying so).
	OK bool `json:"ok"`
}

// TXTReport describes the "_mta-sts" TXT records.
type TXTReport struct {
	Name string `json:"name"`
	// Records are all TXT records at Name, character-strings joined.
	Records []string `json:"records"`
	// Count is the number of records beginning with v=STSv1.
	Count   int    `json:"count"`
	Present bool   `json:"present"`
	Valid   bool   `json:"valid"`
	ID      string `json:"id,omitempty"`
	IDValid bool   `json:"id_valid"`
	// Temporary is true when the lookup failed temporarily.
	Temporary bool   `json:"temporary,omitempty"`
	Error     string `json:"error,omitempty"`
}

// FetchReport describes the HTTPS fetch of the policy.
type FetchReport struct {
	URL         string `json:"url"`
	HTTPStatus  int    `json:"http_status,omitempty"`
	Location    string `json:"location,omitempty"`
	ContentType string `json:"content_type,omitempty"`
	Size        int    `json:"size"`
	// TLSCertOK: the policy host's certificate is valid for
	// mta-sts.<domain> under the Web PKI.
	TLSCertOK    bool      `json:"tls_cert_ok"`
	TLSCertError string    `json:"tls_cert_error,omitempty"`
	CertNames    []string  `json:"cert_names,omitempty"`
	CertNotAfter time.Time `json:"cert_not_after,omitzero"`
	// CertDaysLeft is the number of whole days until CertNotAfter
	// (negative once expired); absent when no certificate was seen.
	CertDaysLeft *int              `json:"cert_days_left,omitempty"`
	OK           bool              `json:"ok"`
	ResultType   tlsrpt.ResultType `json:"result_type,omitempty"`
	Error        string            `json:"error,omitempty"`
}

// PolicySummary is a parsed policy.
type PolicySummary struct {
	Mode          Mode     `json:"mode"`
	MX            []string `json:"mx"`
	MaxAgeSeconds int64    `json:"max_age"`
	Lines         []string `json:"lines"`
}

// SyntaxProblem is one problem of a policy body; Line 0 concerns the
// whole policy.
type SyntaxProblem struct {
	Line    int    `json:"line"`
	Message string `json:"message"`
}

// CheckPolicy checks the MTA-STS setup of domain as a sender would see it
// and reports every finding. It does not use or change any cache.
func CheckPolicy(ctx context.Context, r TXTResolver, f *Fetcher, domain string) *PolicyReport {
	rep := &PolicyReport{Domain: domain, Problems: []string{}, Advice: []string{}}
	defer func() { rep.OK = len(rep.Problems) == 0 }()

	d, ok := NormalizeDomain(domain)
	if !ok {
		rep.problem("%q is not a domain name (address literals and IP addresses have no MTA-STS policy, RFC 8461 §3.4)", domain)
		return rep
	}
	rep.Domain = d
	if f == nil {
		f = &Fetcher{}
	}
	if !rep.checkRecord(ctx, r, d) {
		return rep
	}
	p, ok := rep.checkFetch(ctx, f, d)
	if !ok {
		return rep
	}
	rep.Parsed = p
	rep.Policy = &PolicySummary{Mode: p.Mode, MX: p.MX, MaxAgeSeconds: int64(p.MaxAge / time.Second), Lines: p.Lines}
	if rep.Policy.MX == nil {
		rep.Policy.MX = []string{}
	}
	rep.adviseOnPolicy(p)
	return rep
}

// problem adds a problem (the check fails) to rep.
func (rep *PolicyReport) problem(format string, args ...any) {
	rep.Problems = append(rep.Problems, fmt.Sprintf(format, args...))
}

// advise adds advice (a warning or a note) to rep.
func (rep *PolicyReport) advise(format string, args ...any) {
	rep.Advice = append(rep.Advice, fmt.Sprintf(format, args...))
}

// checkRecord looks up the MTA-STS TXT record of d (RFC 8461 §3.1) and
// reports on it in rep.TXT. It returns false when d publishes no record,
// so that there is no policy to fetch.
func (rep *PolicyReport) checkRecord(ctx context.Context, r TXTResolver, d string) bool {
	rep.TXT.Name = "_mta-sts." + d
	rec, raw, err := lookupRecord(ctx, r, d)
	rep.TXT.Records = raw
	if rep.TXT.Records == nil {
		rep.TXT.Records = []string{}
	}
	for _, s := range raw {
		if isSTSRecord(s) {
			rep.TXT.Count++
		}
	}
	rep.TXT.Present = rep.TXT.Count > 0
	switch {
	case err == nil:
		rep.TXT.Valid = true
		rep.TXT.ID = rec.ID
		rep.TXT.IDValid = true
	case errors.Is(err, ErrDNS):
		rep.TXT.Temporary = true
		rep.TXT.Error = err.Error()
		rep.problem("TXT lookup of %s failed temporarily: %v", rep.TXT.Name, err)
	case errors.Is(err, ErrNoRecord):
		rep.TXT.Error = err.Error()
		for _, s := range raw {
			if strings.HasPrefix(strings.ToLower(s), "v=stsv1") || strings.Contains(s, "id=") {
				rep.problem("TXT record %q looks like MTA-STS but does not begin with %q (case-sensitive, RFC 8461 §3.1)", s, stsVersion)
			}
		}
		rep.advise("%s publishes no MTA-STS record: senders do not require TLS for it", d)
		return false
	case errors.Is(err, ErrMultipleRecords):
		rep.TXT.Error = err.Error()
		rep.problem("%d TXT records begin with v=STSv1 at %s; exactly one is allowed, so senders see no policy (RFC 8461 §3.1)", rep.TXT.Count, rep.TXT.Name)
	default:
		rep.TXT.Error = err.Error()
		if rep.TXT.Count == 1 {
			for _, s := range raw {
				if isSTSRecord(s) {
					rep.TXT.ID, rep.TXT.IDValid = recordID(s)
				}
			}
		}
		rep.problem("invalid MTA-STS TXT record, so senders see no policy: %v", err)
	}
	return true
}

// checkFetch fetches the policy of d (RFC 8461 §3.3) and reports on the
// fetch and the policy host's certificate in rep.Fetch. It is done
// whenever a v=STSv1 record exists or DNS failed, to show the whole
// picture; it returns the policy, or false when the fetch failed.
func (rep *PolicyReport) checkFetch(ctx context.Context, f *Fetcher, d string) (*Policy, bool) {
	fr := f.fetch(ctx, d)
	fe := &FetchReport{URL: fr.URL, HTTPStatus: fr.Status, Location: fr.Location, ContentType: fr.ContentType, Size: len(fr.Body)}
	rep.Fetch = fe
	if len(fr.PeerCerts) > 0 {
		leaf := fr.PeerCerts[0]
		fe.CertNames = leaf.DNSNames
		fe.CertNotAfter = leaf.NotAfter.UTC()
		days := certexpiry.DaysLeft(leaf.NotAfter, time.Now())
		fe.CertDaysLeft = &days
		fe.TLSCertOK = fr.CertErr == nil
		if fr.CertErr != nil {
			fe.TLSCertError = fr.CertErr.Error()
		} else if certexpiry.Soon(days) {
			rep.advise("the certificate of mta-sts.%s expires in %d day(s) (%s)", d, days, fe.CertNotAfter.Format(time.RFC3339))
		}
	}
	if fr.Err != nil {
		fe.ResultType = fr.Err.ResultType
		fe.Error = fr.Err.Error()
		rep.problem("policy fetch failed (%s): %v", fr.Err.ResultType, fr.Err.Err)
		for _, p := range fr.Problems {
			rep.SyntaxErrors = append(rep.SyntaxErrors, SyntaxProblem{Line: p.Line, Message: p.Msg})
		}
		if fr.Status/100 == 3 {
			rep.advise("serve the policy directly with 200 at %s: senders never follow redirects (RFC 8461 §3.3)", fr.URL)
		}
		return nil, false
	}
	fe.OK = true
	return fr.Policy, true
}

// adviseOnPolicy adds the advice about a fetched policy p to rep: what
// its mode means and whether its max_age is sensible.
func (rep *PolicyReport) adviseOnPolicy(p *Policy) {
	switch p.Mode {
	case ModeEnforce:
		rep.advise("mode enforce: senders refuse MX hosts that are not listed in the policy or lack valid STARTTLS; keep the mx lines in step with the MX records")
	case ModeTesting:
		rep.advise("mode testing: failures are only reported through TLS-RPT; switch to enforce once reports show no failures")
	case ModeNone:
		rep.advise("mode none: senders treat the domain as having no policy (RFC 8461 §8.3); remove the TXT record and policy once earlier policies have expired")
	}
	for _, l := range p.Lines {
		if v, ok := strings.CutPrefix(l, "max_age:"); ok {
			if n, err := strconv.ParseUint(strings.TrimSpace(v), 10, 64); err == nil && n > uint64(MaxMaxAge/time.Second) {
				rep.advise("max_age %d is above the maximum 31557600; senders cap it", n)
			}
			break
		}
	}
	if p.MaxAge < 24*time.Hour {
		rep.advise("max_age %d s is under a day; RFC 8461 §3.2 expects weeks or more, so that cached policies outlast an attack on refresh", int64(p.MaxAge/time.Second))
	}
}

// recordID extracts the id of a record that failed to parse, for display.
func recordID(s string) (string, bool) {
	for f := range strings.SplitSeq(s, ";") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(f), "id="); ok {
			return v, ValidID(v)
		}
	}
	return "", false
}
