package delivery

import (
	"context"
	"errors"

	"github.com/stsrelay/stsrelay/delivery/policy"
	"github.com/stsrelay/stsrelay/internal/dane"
	"github.com/stsrelay/stsrelay/internal/dnsclient"
)

// discoverDANE looks up the TLSA records of MX host (RFC 7672 §2.2),
// whose MX RRset and address records the caller found DNSSEC-secure;
// expanded is the name that holds the addresses after CNAME expansion.
//
//   - RFC 7672 §2.2.2: when the addresses came through a (secure) CNAME
//     chain, the expanded name is the first candidate TLSA base domain
//     and the original name the second; otherwise the host name alone.
//   - A secure RRset decides: usable records make DANE mandatory and
//     authenticate the server (§3); only unusable ones (§3.1.3) still
//     make TLS mandatory, without authentication (§2.2).
//   - Records that are not secure are ignored, as if there were none
//     (§2.2), as is a denial: the next candidate, then no DANE.
//   - Any other outcome (SERVFAIL, which a validating resolver answers
//     for bogus data, a timeout) leaves it unknown whether DANE applies:
//     the host must not be used (§2.2), and TLS-RPT records
//     dnssec-invalid (RFC 8460 §4.3.2.1).
//
// The base domain is the name queried, not the owner of the records
// after a CNAME at _25._tcp (RFC 7672 §2.2.3).
func discoverDANE(ctx context.Context, r Resolver, host, expanded string) policy.DANE {
	bases := []string{host}
	if expanded != "" && expanded != host {
		bases = []string{expanded, host}
	}
	for _, base := range bases {
		res, err := r.LookupTLSA(ctx, base)
		switch {
		case err == nil && res.Secure && len(res.Records) > 0:
			st := policy.DANEUnusable
			if len(dane.UsableRecords(res.Records)) > 0 {
				st = policy.DANEUsable
			}
			return policy.DANE{Status: st, Base: base, Records: res.Records}
		case err == nil, errors.Is(err, dnsclient.ErrNoData), errors.Is(err, dnsclient.ErrNotFound):
		default:
			return policy.DANE{Status: policy.DANELookupFailed, Base: base, Err: err}
		}
	}
	return policy.DANE{}
}

// daneNames are the reference identifiers a DANE-TA(2) chain's leaf must
// carry one of (RFC 7672 §3.2.3): the TLSA base domain and, where it
// differs, the MX host name.
func daneNames(base, host string) []string {
	if base == host {
		return []string{base}
	}
	return []string{base, host}
}
