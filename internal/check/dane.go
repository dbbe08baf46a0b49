package check

// The DNSSEC / DANE part of the check (RFC 7672): whether the resolver's
// AD bit is believed, whether the MX RRset and each MX host's addresses
// are DNSSEC-secure, the TLSA records at _25._tcp.<host> and whether they
// match the certificate each MX address serves now. The classic DANE
// outage is a certificate (key) rollover without a TLSA update: the relay
// itself keeps working, and every DANE sender defers.

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/delivery"
	"github.com/stsrelay/stsrelay/internal/dane"
	"github.com/stsrelay/stsrelay/internal/dnsclient"
)

// DNSSEC is the "dnssec" object of `check -json`.
type DNSSEC struct {
	// ADTrusted: the resolver believes the AD bit of its servers'
	// answers (dns.trust_ad; by default only from servers on a loopback
	// address). Without it nothing is known to be secure and DANE is
	// not assessed (every MX's dane.status is "unknown").
	ADTrusted bool `json:"ad_trusted"`
	// Servers are the DNS servers asked.
	Servers []string `json:"servers"`
	// MXSecure: the domain's MX RRset (for an implicit MX, the denial of
	// MX records) is DNSSEC-secure (RFC 7672 §2.2.1).
	MXSecure bool `json:"mx_secure"`
}

// Values of DANE.Status.
const (
	DANEUnknown       = "unknown"        // AD bit not trusted: cannot tell
	DANEInsecure      = "insecure"       // MX, addresses or TLSA not DNSSEC-secure: no DANE
	DANENone          = "none"           // secure, no TLSA records: no DANE
	DANEDNSSECFailed  = "dnssec-failed"  // TLSA lookup failed in a secure zone: DANE senders defer
	DANETLSRequired   = "tls-required"   // secure TLSA, none usable: TLS without authentication
	DANENoCertificate = "no-certificate" // usable TLSA, but no address presented a certificate
	DANEMismatch      = "mismatch"       // an address serves a certificate no usable TLSA matches
	DANEAuthenticated = "authenticated"  // every certificate served is matched by a usable TLSA
)

// DANE is the "dane" object of each MX in `check -json`. Its field
// names are stable:
//
//   - status: one of "unknown" (the resolver's AD bit is not trusted),
//     "insecure" (the MX RRset, the host's addresses or the TLSA RRset is
//     not DNSSEC-secure, so DANE does not apply), "none" (secure, but no
//     TLSA records), "dnssec-failed" (the TLSA lookup failed in a secure
//     zone: DANE senders defer), "tls-required" (secure TLSA records, none
//     usable: TLS required, server not authenticated), "no-certificate"
//     (usable records, but no address presented a certificate),
//     "mismatch" (an address serves a certificate no usable record
//     matches: DANE senders fail), "authenticated" (every certificate
//     served matches a usable record).
//   - addresses_secure: the host's address records are DNSSEC-secure.
//   - base_domain: the TLSA base domain used (the host, or the name its
//     address records' CNAME chain led to, RFC 7672 §2.2.2).
//   - tlsa_name: the owner of the TLSA records (after any CNAME), or the
//     name asked.
//   - tlsa_secure: the TLSA answer (or its denial) is DNSSEC-secure.
//   - tlsa_error: why the TLSA lookup gave no records, if it did not.
//   - records: each TLSA record, "U S M data", whether it is usable for
//     SMTP (RFC 7672 §3.1.3), and the addresses whose certificate chain
//     it authenticates now.
//   - certificates: per address that presented a certificate (when there
//     are TLSA records): whether a usable record authenticates it, the
//     DANE verification error if not, and the "3 1 1" record that would
//     match its certificate.
type DANE struct {
	Status          string     `json:"status"`
	AddressesSecure bool       `json:"addresses_secure"`
	BaseDomain      string     `json:"base_domain"`
	TLSAName        string     `json:"tlsa_name"`
	TLSASecure      bool       `json:"tlsa_secure"`
	TLSAError       string     `json:"tlsa_error,omitempty"`
	Records         []TLSA     `json:"records"`
	Certificates    []DANECert `json:"certificates"`
}

type TLSA struct {
	Record  string   `json:"record"`
	Usable  bool     `json:"usable"`
	Matches []string `json:"matches"`
}

type DANECert struct {
	IP              string `json:"ip"`
	Authenticated   bool   `json:"authenticated"`
	Error           string `json:"error,omitempty"`
	SuggestedRecord string `json:"suggested_record"`
}

// Authenticates reports whether DANE applies to the MX and authenticates
// the certificate served at ip.
func (d *DANE) Authenticates(ip string) bool {
	if d.Status != DANEAuthenticated && d.Status != DANEMismatch {
		return false
	}
	for _, c := range d.Certificates {
		if c.IP == ip {
			return c.Authenticated
		}
	}
	return false
}

// assessDANE looks up the TLSA records of MX host and matches them
// against the chains its addresses presented. trusted is the resolver's
// TrustsAD, mxSecure and addrSecure the DNSSEC status of the MX RRset and
// of host's addresses, addrName the owner of those addresses after any
// CNAME.
func assessDANE(ctx context.Context, res *dnsclient.Resolver, host string, trusted, mxSecure, addrSecure bool, addrName string, addrs []delivery.ProbeResult, now time.Time) DANE {
	d := DANE{AddressesSecure: addrSecure, BaseDomain: host, Records: []TLSA{}, Certificates: []DANECert{}}
	// RFC 7672 §2.2.2: with secure address records reached through a
	// CNAME, the expanded name is tried first as TLSA base domain, then
	// the MX host name.
	var t dnsclient.TLSAResult
	var err error
	if addrSecure && addrName != "" && addrName != host {
		t, err = res.LookupTLSA(ctx, addrName)
		if (err == nil && t.Secure) || dnsclient.IsTemporary(err) || (err != nil && !errors.Is(err, dnsclient.ErrNotFound) && !errors.Is(err, dnsclient.ErrNoData)) {
			d.BaseDomain = addrName
		} else {
			t, err = res.LookupTLSA(ctx, host)
		}
	} else {
		t, err = res.LookupTLSA(ctx, host)
	}
	d.TLSAName, d.TLSASecure = t.Name, t.Secure
	if err != nil {
		d.TLSAError = err.Error()
	}
	for _, r := range t.Records {
		d.Records = append(d.Records, TLSA{Record: dane.PolicyStrings([]*dns.TLSA{r})[0], Usable: dane.Usable(r), Matches: []string{}})
	}
	usable := len(dane.UsableRecords(t.Records)) > 0
	if len(t.Records) > 0 {
		names := []string{d.BaseDomain}
		if host != d.BaseDomain {
			names = append(names, host)
		}
		for _, a := range addrs {
			if len(a.Chain) == 0 {
				continue
			}
			c := DANECert{IP: a.IP, SuggestedRecord: dane.PolicyStrings([]*dns.TLSA{dane.Record(3, 1, 1, a.Chain[0])})[0]}
			for i, m := range dane.Match(t.Records, a.Chain, names, now) {
				if m {
					d.Records[i].Matches = append(d.Records[i].Matches, a.IP)
					c.Authenticated = true
				}
			}
			if !c.Authenticated && usable {
				if verr := dane.Verify(t.Records, a.Chain, names, now); verr != nil {
					c.Error = verr.Error()
				}
			}
			d.Certificates = append(d.Certificates, c)
		}
	}
	switch {
	case !trusted:
		d.Status = DANEUnknown
	case !mxSecure || !addrSecure:
		d.Status = DANEInsecure
	case err != nil && !errors.Is(err, dnsclient.ErrNotFound) && !errors.Is(err, dnsclient.ErrNoData):
		d.Status = DANEDNSSECFailed
	case err != nil:
		d.Status = DANENone
	case !t.Secure:
		d.Status = DANEInsecure
	case !usable:
		d.Status = DANETLSRequired
	case len(d.Certificates) == 0:
		d.Status = DANENoCertificate
	case slices.ContainsFunc(d.Certificates, func(c DANECert) bool { return !c.Authenticated }):
		d.Status = DANEMismatch
	default:
		d.Status = DANEAuthenticated
	}
	return d
}

// daneFindings adds the problems (errors: the check fails) and advice
// (warnings, notes) of one MX's DANE assessment to rep.
func daneFindings(rep *Report, mx *MX) {
	d := &mx.DANE
	switch d.Status {
	case DANEUnknown:
		if len(d.Records) > 0 {
			rep.Advice = append(rep.Advice, fmt.Sprintf("MX %s: TLSA records at %s found, but DNSSEC cannot be assessed (the resolver's AD bit is not trusted, see dns.trust_ad)", mx.Host, d.TLSAName))
		}
	case DANEInsecure:
		if len(d.Records) > 0 {
			rep.Advice = append(rep.Advice, fmt.Sprintf("MX %s: TLSA ignored: zone not signed (%s is not DNSSEC-secure, RFC 7672 §2.2)", mx.Host, rep.InsecurePart(d)))
		}
	case DANEDNSSECFailed:
		rep.Problems = append(rep.Problems, fmt.Sprintf("MX %s: TLSA lookup at %s: DNSSEC lookup failed (bogus?) — DANE senders defer (%s)", mx.Host, d.TLSAName, d.TLSAError))
	case DANETLSRequired:
		rep.Advice = append(rep.Advice, fmt.Sprintf("MX %s: no usable TLSA record at %s: TLS required but unauthenticated (usages 0/1 are not used for SMTP, RFC 7672 §3.1.3)", mx.Host, d.TLSAName))
	case DANEMismatch:
		suggested := map[string]bool{}
		for _, c := range d.Certificates {
			if c.Authenticated {
				continue
			}
			rep.Problems = append(rep.Problems, fmt.Sprintf("MX %s [%s]: TLSA for %s does not match the certificate now served — delivery from DANE senders fails (certificate rolled over without updating TLSA?)", mx.Host, c.IP, d.BaseDomain))
			if !suggested[c.SuggestedRecord] {
				suggested[c.SuggestedRecord] = true
				rep.Advice = append(rep.Advice, fmt.Sprintf("MX %s: the TLSA record for the certificate now served at %s is %s. IN TLSA %s", mx.Host, c.IP, d.TLSAOwner(), c.SuggestedRecord))
			}
		}
	}
}

// InsecurePart names what keeps DANE off for an MX (of r) that has TLSA
// records.
func (r *Report) InsecurePart(d *DANE) string {
	switch {
	case !r.DNSSEC.MXSecure:
		return "the MX RRset of " + r.Domain
	case !d.AddressesSecure:
		return "the address records of " + d.BaseDomain
	}
	return "the TLSA RRset " + d.TLSAName
}

// TLSAOwner is the name the TLSA records of d belong at: the base
// domain's, before any CNAME of the TLSA name itself.
func (d *DANE) TLSAOwner() string { return "_25._tcp." + d.BaseDomain }
