package tlsrpt

import (
	"bytes"
	"compress/gzip"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
	"time"
)

// MediaTypeGzip is the media type of a gzip-compressed report (RFC 8460
// §6.5), for both transports.
const MediaTypeGzip = "application/tlsrpt+gzip"

// dateTimeFormat is RFC 3339 in UTC with whole seconds, as in the §4.4
// example: 2016-04-01T23:59:59Z.
const dateTimeFormat = "2006-01-02T15:04:05Z"

// Report is the aggregate report of RFC 8460 §4.4, for one policy domain and
// one period. The JSON field names and shapes are the RFC's: policies,
// policy-string, mx-host and failure-details are always arrays; counts are
// integers.
type Report struct {
	OrganizationName string         `json:"organization-name"`
	DateRange        DateRange      `json:"date-range"`
	ContactInfo      string         `json:"contact-info"`
	ReportID         string         `json:"report-id"`
	Policies         []PolicyResult `json:"policies"`
}

// DateRange is the period covered, RFC 3339 date-times in UTC; End is the
// last second of the period (…T23:59:59Z for a day).
type DateRange struct {
	StartDatetime string `json:"start-datetime"`
	EndDatetime   string `json:"end-datetime"`
}

// PolicyResult is one element of "policies": a policy applied and the
// sessions that applied it.
type PolicyResult struct {
	Policy         PolicyDesc      `json:"policy"`
	Summary        Summary         `json:"summary"`
	FailureDetails []FailureDetail `json:"failure-details"`
}

// PolicyDesc is the "policy" object.
type PolicyDesc struct {
	PolicyType   PolicyType `json:"policy-type"`
	PolicyString []string   `json:"policy-string"`
	PolicyDomain string     `json:"policy-domain"`
	MXHost       []string   `json:"mx-host"`
}

// Summary is the "summary" object (§4.2).
type Summary struct {
	TotalSuccessfulSessionCount int64 `json:"total-successful-session-count"`
	TotalFailureSessionCount    int64 `json:"total-failure-session-count"`
}

// FailureDetail is one element of "failure-details" (§4.3, §4.4). The
// address and host fields are left out only when the failure happened
// before any MX was tried (e.g. sts-policy-fetch-error); receiving-mx-helo,
// additional-information and failure-reason-code are optional. Every
// string is bounded and printable ASCII (tlsrptdb.Recorder.Record sees to it).
type FailureDetail struct {
	ResultType            ResultType `json:"result-type"`
	SendingMTAIP          string     `json:"sending-mta-ip,omitempty"`
	ReceivingMXHostname   string     `json:"receiving-mx-hostname,omitempty"`
	ReceivingMXHelo       string     `json:"receiving-mx-helo,omitempty"`
	ReceivingIP           string     `json:"receiving-ip,omitempty"`
	FailedSessionCount    int64      `json:"failed-session-count"`
	AdditionalInformation string     `json:"additional-information,omitempty"`
	FailureReasonCode     string     `json:"failure-reason-code,omitempty"`
}

// ReportOptions are the report's metadata.
type ReportOptions struct {
	// OrganizationName is "organization-name".
	OrganizationName string
	// ContactInfo is "contact-info", an addr-spec; a "mailto:" prefix (as
	// in the default tlsrpt.contact_info) is removed.
	ContactInfo string
	// Submitter is the reporting domain: the relay's hostname. It names
	// the report-id's right-hand side.
	Submitter string
}

// BuildReport makes the report for pc (one policy domain, one period) with
// a new unique report-id "<start-unix>.<policy-domain>.<random>@<submitter>".
func BuildReport(opts ReportOptions, pc PolicyCounts) *Report {
	policies := pc.Policies
	if policies == nil {
		policies = []PolicyResult{}
	}
	return &Report{
		OrganizationName: opts.OrganizationName,
		DateRange: DateRange{
			StartDatetime: pc.PeriodStart.UTC().Format(dateTimeFormat),
			EndDatetime:   pc.PeriodEnd.UTC().Add(-time.Second).Format(dateTimeFormat),
		},
		ContactInfo: ContactAddress(opts.ContactInfo),
		ReportID:    fmt.Sprintf("%d.%s.%s@%s", pc.PeriodStart.Unix(), pc.PolicyDomain, newUnique(), NormDomain(opts.Submitter)),
		Policies:    policies,
	}
}

// ContactAddress is contact as an addr-spec: without a "mailto:" prefix.
func ContactAddress(contact string) string {
	contact = strings.TrimSpace(contact)
	if len(contact) >= 7 && strings.EqualFold(contact[:7], "mailto:") {
		return contact[7:]
	}
	return contact
}

// newUnique is 16 random hex digits: the report-id's and the filename's
// unique part (§5.1 unique-id = 1*(ALPHA / DIGIT)).
func newUnique() string {
	var b [8]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// unique is the random part of the report-id BuildReport made.
func (r *Report) unique() string {
	left, _, _ := strings.Cut(r.ReportID, "@")
	if i := strings.LastIndexByte(left, '.'); i >= 0 {
		left = left[i+1:]
	}
	for _, c := range left {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z') {
			return ""
		}
	}
	return left
}

// period parses the date range back.
func (r *Report) period() (start, end time.Time, err error) {
	start, err = time.Parse(dateTimeFormat, r.DateRange.StartDatetime)
	if err == nil {
		end, err = time.Parse(dateTimeFormat, r.DateRange.EndDatetime)
	}
	return start, end, err
}

// Filename is the §5.1 report filename
// "<submitter>!<policy-domain>!<begin>!<end>!<unique>.json.gz", with Unix
// timestamps of the first and last second of the period.
func (r *Report) Filename(submitter, policyDomain string) string {
	start, end, _ := r.period()
	name := fmt.Sprintf("%s!%s!%d!%d", fileSafe(NormDomain(submitter)), fileSafe(policyDomain), start.Unix(), end.Unix())
	if u := r.unique(); u != "" {
		name += "!" + fileSafe(u)
	}
	return name + ".json.gz"
}

// fileSafe keeps a filename field (§5.3) to printable ASCII without the
// field separator "!", path separators, quotes or line breaks, whatever
// a domain name or configured host name held: the name goes into a
// Content-Disposition header and onto disks.
func fileSafe(s string) string {
	return strings.Map(func(r rune) rune {
		if r <= ' ' || r >= 0x7f || strings.ContainsRune("!/\\\"';", r) {
			return '_'
		}
		return r
	}, s)
}

// Gzip is the report as gzip-compressed JSON (§5.2), the body of both
// transports.
func (r *Report) Gzip() ([]byte, error) {
	data, err := json.Marshal(r)
	if err != nil {
		return nil, err
	}
	var buf bytes.Buffer
	zw := gzip.NewWriter(&buf)
	if _, err := zw.Write(data); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// PolicyCounts is what the report for one policy domain and period will
// say: the §4.4 "policies" array with summaries and failure details.
type PolicyCounts struct {
	// PeriodStart is the first second of the period; PeriodEnd the first
	// second after it. Both UTC.
	PeriodStart time.Time `json:"period_start"`
	PeriodEnd   time.Time `json:"period_end"`
	// PolicyDomain is the recipient domain.
	PolicyDomain string `json:"policy_domain"`
	// Successful and Failed total the sessions over all policies.
	Successful int64 `json:"successful"`
	Failed     int64 `json:"failed"`
	// Policies are the report's policy entries, one per policy applied in
	// the period (it may change, or be missing for part of it).
	Policies []PolicyResult `json:"policies"`
}
