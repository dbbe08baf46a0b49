package dnsclient

import (
	"context"

	"github.com/miekg/dns"
)

// TLSAResult is the outcome of a TLSA lookup for the SMTP service of one
// host (RFC 7672 §2.2).
type TLSAResult struct {
	// Records holds the TLSA records, when there are any, secure or not.
	// They are shared with the cache and other callers: do not modify
	// them (the slice itself is the caller's).
	Records []*dns.TLSA
	// Secure says the outcome is DNSSEC-secure (Answer.Secure): with
	// Records, that they may be used for DANE; with an error wrapping
	// ErrNotFound or ErrNoData, that the denial was. It is false for
	// records or denials without a trusted AD bit, and for failures.
	Secure bool
	// Name is the owner of Records after any CNAME, or with an error the
	// name asked ("_25._tcp.<host>"): lower case, without trailing dot.
	Name string
}

// LookupTLSA looks up the TLSA records of the SMTP service of host, at
// "_25._tcp.<host>." (RFC 7672 §2.2.3; host is the TLSA base domain, the
// caller chooses it), through the cache as the other lookups. For the
// caller's decision (RFC 7672 §2.2):
//
//   - records with Secure: DANE applies, with these records;
//   - records without Secure (no AD bit, or it is not trusted): the
//     records must be ignored, as if there were none;
//   - an error wrapping ErrNotFound or ErrNoData: no TLSA records, no
//     DANE; Secure says whether that denial was itself secure;
//   - an error wrapping ErrTemporary (SERVFAIL, which a validating
//     resolver also answers for bogus data, timeout, ...): the outcome is
//     unknown; a caller whose host addresses were secure must defer
//     rather than go on without DANE.
func (r *Resolver) LookupTLSA(ctx context.Context, host string) (TLSAResult, error) {
	qname := "_25._tcp." + canonicalName(host)
	e, _, err := r.resolve(ctx, qname, dns.TypeTLSA, false)
	if err != nil {
		return TLSAResult{Name: qname}, err
	}
	if e.err != nil {
		return TLSAResult{Secure: e.secure, Name: qname}, e.err
	}
	res := TLSAResult{
		Records: make([]*dns.TLSA, 0, len(e.ans.RRs)),
		Secure:  e.secure,
		Name:    canonicalName(e.ans.Name),
	}
	for _, rr := range e.ans.RRs {
		if t, ok := rr.(*dns.TLSA); ok {
			res.Records = append(res.Records, t)
		}
	}
	return res, nil
}
