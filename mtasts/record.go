package mtasts

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/internal/txtrec"
)

// Errors returned (wrapped) by this package. Use errors.Is.
var (
	// ErrNoRecord: no "_mta-sts" TXT record beginning with v=STSv1 exists.
	ErrNoRecord = errors.New("no MTA-STS TXT record")
	// ErrMultipleRecords: more than one v=STSv1 record (RFC 8461 §3.1).
	ErrMultipleRecords = errors.New("more than one MTA-STS TXT record")
	// ErrRecordSyntax: the one v=STSv1 record is not valid.
	ErrRecordSyntax = errors.New("invalid MTA-STS TXT record")
	// ErrDNS: the TXT lookup failed temporarily (SERVFAIL, timeout, ...).
	ErrDNS = errors.New("temporary DNS failure in MTA-STS discovery")
	// ErrPolicyFetch: the HTTPS fetch of the policy failed (network,
	// timeout, status other than 200, redirect, body too large).
	ErrPolicyFetch = errors.New("MTA-STS policy fetch failed")
	// ErrPolicySyntax: the fetched policy is not a valid policy, or was not
	// served as text/plain.
	ErrPolicySyntax = errors.New("invalid MTA-STS policy")
	// ErrWebPKI: the policy host's certificate did not validate.
	ErrWebPKI = errors.New("MTA-STS policy host certificate not valid")
)

// TXTResolver is dnsclient.TXTResolver, the module's one TXT lookup
// interface, under the name this package's API has used.
type TXTResolver = dnsclient.TXTResolver

// Record is a parsed "_mta-sts" TXT record (RFC 8461 §3.1).
type Record struct {
	// ID identifies the policy instance: 1-32 letters and digits.
	ID string
	// Extensions holds the fields other than v and id, first
	// occurrence of each name only. Nil when there are none.
	Extensions map[string]string
}

const stsVersion = "v=STSv1"

// ParseRecord parses an "_mta-sts" TXT record per the ABNF of RFC 8461
// §3.1:
//
//	sts-text-record = sts-version 1*(sts-field-delim sts-field) [sts-field-delim]
//	sts-field-delim = *WSP ";" *WSP
//	sts-version     = %s"v=STSv1"
//	sts-id          = %s"id=" 1*32(ALPHA / DIGIT)
//	sts-extension   = sts-ext-name "=" sts-ext-value
//
// The record must begin with v=STSv1 (case-sensitive) and hold an id.
// Unknown fields are ignored, and of a field given twice the first counts
// (§3.2, last paragraph). Two leniencies: whitespace after the last field
// with no ";" is accepted (the ABNF allows it only before a ";"), and so is
// "v=STSv1 ;" (errata 6285 discusses it; WSP before ";" is in the ABNF).
func ParseRecord(s string) (*Record, error) {
	if !strings.HasPrefix(s, stsVersion) {
		return nil, fmt.Errorf("%w: %q does not begin with %q (RFC 8461 §3.1)", ErrRecordSyntax, s, stsVersion)
	}
	rec := &Record{}
	haveID := false
	pos := len(stsVersion)
	for {
		j := skipWSP(s, pos)
		if j == len(s) {
			break // end, possibly after trailing whitespace
		}
		if s[j] != ';' {
			return nil, fmt.Errorf("%w: %q: expected \";\" at offset %d, found %q", ErrRecordSyntax, s, j, s[j])
		}
		j = skipWSP(s, j+1)
		if j == len(s) {
			break // optional trailing delimiter
		}
		// sts-field: name "=" value
		eq := j
		for eq < len(s) && s[eq] != '=' && s[eq] != ';' && s[eq] != ' ' && s[eq] != '\t' {
			eq++
		}
		name := s[j:eq]
		if eq == len(s) || s[eq] != '=' {
			return nil, fmt.Errorf("%w: %q: field %q has no \"=value\"", ErrRecordSyntax, s, name)
		}
		if !txtrec.ValidExtName(name) {
			return nil, fmt.Errorf("%w: %q: invalid field name %q (1-32 of letters, digits, \"_-.\", starting with a letter or digit)", ErrRecordSyntax, s, name)
		}
		vs := eq + 1
		ve := vs
		for ve < len(s) && isTXTValueChar(s[ve]) {
			ve++
		}
		value := s[vs:ve]
		if value == "" {
			return nil, fmt.Errorf("%w: %q: field %q has an empty value", ErrRecordSyntax, s, name)
		}
		if ve < len(s) && s[ve] != ';' && s[ve] != ' ' && s[ve] != '\t' {
			return nil, fmt.Errorf("%w: %q: invalid character %q in the value of %q", ErrRecordSyntax, s, s[ve], name)
		}
		pos = ve
		if name == "id" {
			if !ValidID(value) {
				return nil, fmt.Errorf("%w: %q: id %q must be 1-32 letters and digits", ErrRecordSyntax, s, value)
			}
			if !haveID {
				rec.ID = value
				haveID = true
			}
			continue
		}
		if rec.Extensions == nil {
			rec.Extensions = map[string]string{}
		}
		if _, dup := rec.Extensions[name]; !dup {
			rec.Extensions[name] = value
		}
	}
	if !haveID {
		return nil, fmt.Errorf("%w: %q has no id field", ErrRecordSyntax, s)
	}
	return rec, nil
}

// isSTSRecord reports whether a TXT record is an MTA-STS record at all:
// RFC 8461 §3.1 discards records that do not begin with "v=STSv1;". We
// also keep "v=STSv1" followed by whitespace or nothing, so that such a
// broken record is reported as invalid rather than silently absent; a
// longer version such as "v=STSv10" is not ours.
func isSTSRecord(s string) bool {
	if !strings.HasPrefix(s, stsVersion) {
		return false
	}
	if len(s) == len(stsVersion) {
		return true
	}
	c := s[len(stsVersion)]
	return c == ';' || c == ' ' || c == '\t'
}

// LookupRecord discovers the MTA-STS record of domain (RFC 8461 §3.1): it
// queries TXT at "_mta-sts.<domain>" (never a parent domain, §3.4; the
// resolver follows CNAMEs), joins each record's character-strings without
// spaces, discards records not beginning with v=STSv1, and parses the one
// that remains.
//
// Errors wrap ErrNoRecord (NXDOMAIN, NODATA or no STS record among the
// answers), ErrMultipleRecords, ErrRecordSyntax, or ErrDNS for a temporary
// failure (the caller must not conclude that the domain has no policy).
func LookupRecord(ctx context.Context, r TXTResolver, domain string) (*Record, error) {
	rec, _, err := lookupRecord(ctx, r, domain)
	return rec, err
}

// AnswerResolver is a TXTResolver that also says how long an answer holds
// and can skip its cache (*dnsclient.Resolver). The policy cache uses the
// TTL to decide when to look at the TXT record again (RFC 8461 §3.1, §5.1:
// a changed id is noticed once the record's TTL runs out), and the fresh
// lookup where a change must be seen now.
type AnswerResolver interface {
	TXTResolver
	LookupTXTAnswer(ctx context.Context, name string) (dnsclient.TXTAnswer, error)
	LookupTXTFresh(ctx context.Context, name string) (dnsclient.TXTAnswer, error)
}

// lookupTXT asks r for TXT at name; ttl is how long the outcome holds,
// -1 when r cannot say.
func lookupTXT(ctx context.Context, r TXTResolver, name string, fresh bool) (txts [][]string, ttl time.Duration, err error) {
	ar, ok := r.(AnswerResolver)
	if !ok {
		txts, err = r.LookupTXT(ctx, name)
		return txts, -1, err
	}
	lookup := ar.LookupTXTAnswer
	if fresh {
		lookup = ar.LookupTXTFresh
	}
	a, err := lookup(ctx, name)
	return a.Records, a.TTL, err
}

// lookupRecord is LookupRecord that also returns every TXT record found at
// the name, joined, for the checker.
func lookupRecord(ctx context.Context, r TXTResolver, domain string) (*Record, []string, error) {
	rec, raw, _, err := lookupRecordTTL(ctx, r, domain, false)
	return rec, raw, err
}

// LookupRecordTTL is LookupRecord for the policy cache: it also says how
// long the outcome holds (-1 when the resolver cannot say), and with
// fresh it skips the resolver's cache (both need an AnswerResolver).
func LookupRecordTTL(ctx context.Context, r TXTResolver, domain string, fresh bool) (*Record, time.Duration, error) {
	rec, _, ttl, err := lookupRecordTTL(ctx, r, domain, fresh)
	return rec, ttl, err
}

// lookupRecordTTL is lookupRecord that also says how long the outcome
// holds (-1: unknown), and can skip the resolver's cache.
func lookupRecordTTL(ctx context.Context, r TXTResolver, domain string, fresh bool) (rec *Record, raw []string, ttl time.Duration, err error) {
	rec, raw, ttl, err = lookupRecordAt(ctx, r, "_mta-sts."+domain, fresh)
	return
}

func lookupRecordAt(ctx context.Context, r TXTResolver, name string, fresh bool) (*Record, []string, time.Duration, error) {
	txts, ttl, err := lookupTXT(ctx, r, name, fresh)
	rec, raw, err := parseTXTAnswer(name, txts, err)
	return rec, raw, ttl, err
}

// parseTXTAnswer turns the TXT answer at name into the one STS record.
func parseTXTAnswer(name string, txts [][]string, err error) (*Record, []string, error) {
	if err != nil {
		if dnsclient.IsNotFound(err) {
			return nil, nil, fmt.Errorf("look up TXT %s: %w (%w)", name, ErrNoRecord, err)
		}
		return nil, nil, fmt.Errorf("look up TXT %s: %w (%w)", name, ErrDNS, err)
	}
	var raw, sts []string
	for _, parts := range txts {
		s := strings.Join(parts, "") // §3.1: concatenate without adding spaces
		raw = append(raw, s)
		if isSTSRecord(s) {
			sts = append(sts, s)
		}
	}
	switch len(sts) {
	case 0:
		return nil, raw, fmt.Errorf("TXT %s: %w among %d record(s)", name, ErrNoRecord, len(raw))
	case 1:
	default:
		return nil, raw, fmt.Errorf("TXT %s: %w (%d), so none applies (RFC 8461 §3.1)", name, ErrMultipleRecords, len(sts))
	}
	rec, err := ParseRecord(sts[0])
	if err != nil {
		return nil, raw, fmt.Errorf("TXT %s: %w", name, err)
	}
	return rec, raw, nil
}

func skipWSP(s string, i int) int {
	for i < len(s) && (s[i] == ' ' || s[i] == '\t') {
		i++
	}
	return i
}

func isAlnum(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
}

// isTXTValueChar checks sts-ext-value characters: %x21-3A / %x3C / %x3E-7E,
// that is printable ASCII except "=", ";" and space.
func isTXTValueChar(c byte) bool {
	return c >= 0x21 && c <= 0x7e && c != '=' && c != ';'
}

// ValidID checks sts-id's value: 1*32(ALPHA / DIGIT).
func ValidID(s string) bool {
	if len(s) == 0 || len(s) > 32 {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !isAlnum(s[i]) {
			return false
		}
	}
	return true
}
