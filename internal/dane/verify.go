package dane

import (
	"bytes"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/internal/domain"
)

// Errors returned (wrapped) by Verify. Test them with errors.Is.
var (
	// ErrNoCertificate: the server presented no certificate.
	ErrNoCertificate = errors.New("dane: server presented no certificate")
	// ErrNoUsableRecords: none of the TLSA records is usable for SMTP
	// (RFC 7672 §3.1.3). The caller still requires TLS but cannot
	// authenticate the server (RFC 7672 §2.2).
	ErrNoUsableRecords = errors.New("dane: no usable TLSA records")
	// ErrNoMatch: no usable record matches the presented chain.
	ErrNoMatch = errors.New("dane: no TLSA record matches the certificate chain")
	// ErrNameMismatch: a DANE-TA(2) record matched and the chain verified,
	// but the leaf does not carry any of the reference identifiers
	// (RFC 7672 §3.2.2).
	ErrNameMismatch = errors.New("dane: certificate name does not match")
	// ErrExpired: a DANE-TA(2) record matched and a path to it exists, but
	// a certificate on that path is outside its validity period at the
	// time of the check.
	ErrExpired = errors.New("dane: certificate outside its validity period")
)

// Outcome of checking one record, in increasing order of "how close the
// chain came to matching"; Verify reports the closest one.
const (
	outMatch        = iota
	outNoMatch      // the record matches no certificate it may match
	outNoChain      // DANE-TA matched a certificate, but the leaf does not chain to it
	outExpired      // DANE-TA path found, but a date check failed
	outNameMismatch // DANE-TA path valid, but the names do not match
)

// Verify checks the chain a server presented (leaf first, as in
// tls.ConnectionState.PeerCertificates) against TLSA records, per
// RFC 7672 §3. Records that are not Usable are skipped; any one usable
// record that matches authenticates the server.
//
//   - DANE-EE(3) (RFC 7672 §3.1.1, §3.2.1): the leaf's certificate or
//     SubjectPublicKeyInfo, per the selector and matching type, equals
//     the association data. Names and validity dates are ignored.
//   - DANE-TA(2) (RFC 7672 §3.1.2, §3.2.2; RFC 7671 §5.2): a certificate in
//     the presented chain matches the record (the server must include the
//     trust anchor in its chain, RFC 7671 §5.2.2); the leaf must chain to
//     that certificate as the only root under ordinary X.509 path
//     validation at time now (dates, signatures, basic constraints; any
//     extended key usage is accepted); and the leaf's DNS-ID SANs (its
//     subject CN if it has no DNS SANs) must match one of names, the
//     reference identifiers (RFC 7672 §3.2.3: the TLSA base domain and,
//     where they differ, the MX host name or others the caller accepts).
//     A wildcard is honoured only as the whole leftmost label and matches
//     exactly one label. If the record matches the leaf itself, the leaf
//     is its own trust anchor and dates and names are still checked.
//
// Verify returns nil when the server is authenticated. Otherwise the error
// wraps ErrNoUsableRecords (checked first), ErrNoCertificate, ErrNoMatch,
// ErrExpired or ErrNameMismatch; when several records fail differently the
// one that came closest to matching is reported (names, then dates, then
// no match).
func Verify(rrs []*dns.TLSA, chain []*x509.Certificate, names []string, now time.Time) error {
	usable := UsableRecords(rrs)
	if len(usable) == 0 {
		if present := nonNil(rrs); len(present) > 0 {
			return fmt.Errorf("%w (%s)", ErrNoUsableRecords, shortRecords(present))
		}
		return fmt.Errorf("%w (none)", ErrNoUsableRecords)
	}
	chain = nonNilCerts(chain)
	if len(chain) == 0 {
		return ErrNoCertificate
	}
	best, bestErr := outNoMatch, error(nil)
	for _, r := range usable {
		out, err := checkRecord(r, chain, names, now)
		if out == outMatch {
			return nil
		}
		if out > best || (out == best && bestErr == nil) {
			best, bestErr = out, err
		}
	}
	switch best {
	case outNoChain:
		return fmt.Errorf("%w (%s; a trust anchor is present but the leaf does not chain to it)", ErrNoMatch, shortRecords(usable))
	case outExpired, outNameMismatch:
		return bestErr
	}
	return fmt.Errorf("%w (%s)", ErrNoMatch, shortRecords(usable))
}

// Match reports, per record, whether that record alone authenticates the
// chain under the rules of Verify (for a checker tool: which records still
// match the live certificate after a rollover). Unusable records, and all
// records when the chain is empty, report false.
func Match(rrs []*dns.TLSA, chain []*x509.Certificate, names []string, now time.Time) []bool {
	out := make([]bool, len(rrs))
	chain = nonNilCerts(chain)
	if len(chain) == 0 {
		return out
	}
	for i, r := range rrs {
		if !Usable(r) {
			continue
		}
		res, _ := checkRecord(r, chain, names, now)
		out[i] = res == outMatch
	}
	return out
}

// checkRecord checks one usable record against a non-empty chain.
func checkRecord(r *dns.TLSA, chain []*x509.Certificate, names []string, now time.Time) (int, error) {
	want, _ := hex.DecodeString(r.Certificate) // Usable checked the hex
	switch r.Usage {
	case UsageDANEEE:
		// RFC 7672 §3.1.1: only the leaf; names and dates ignored (§3.2.1).
		if certMatches(r, want, chain[0]) {
			return outMatch, nil
		}
		return outNoMatch, nil
	case UsageDANETA:
		return checkTA(r, want, chain, names, now)
	}
	return outNoMatch, nil
}

// checkTA applies a DANE-TA(2) record (RFC 7672 §3.1.2, §3.2.2).
func checkTA(r *dns.TLSA, want []byte, chain []*x509.Certificate, names []string, now time.Time) (int, error) {
	best, bestErr := outNoMatch, error(nil)
	for i, c := range chain {
		if !certMatches(r, want, c) {
			continue
		}
		path, expired := taPath(chain, i, now)
		var out int
		var err error
		switch {
		case path == nil:
			out = outNoChain
		case expired:
			out, err = outExpired, expiredError(path, now)
		case !nameMatches(chain[0], names):
			out, err = outNameMismatch, nameError(chain[0], names)
		default:
			return outMatch, nil
		}
		if out > best {
			best, bestErr = out, err
		}
	}
	return best, bestErr
}

// taPath verifies the leaf against chain[ta] as the only root, with the
// other presented certificates as intermediates. It returns the path found
// and whether that path fails only on dates; path is nil when the leaf does
// not chain to the trust anchor at all.
func taPath(chain []*x509.Certificate, ta int, now time.Time) (path []*x509.Certificate, expired bool) {
	roots := x509.NewCertPool()
	roots.AddCert(chain[ta])
	inter := x509.NewCertPool()
	for j, c := range chain {
		if j != 0 && j != ta {
			inter.AddCert(c)
		}
	}
	if now.IsZero() {
		now = time.Now()
	}
	chains, err := chain[0].Verify(x509.VerifyOptions{
		Roots:         roots,
		Intermediates: inter,
		CurrentTime:   now,
		// RFC 7672 imposes no key-usage policy; the trust anchor is the
		// domain's own assertion.
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err == nil {
		return chains[0], false
	}
	// Classify the failure: is there a path to the trust anchor when dates
	// are disregarded, with a certificate on it outside its validity?
	checks := 0
	if p := datelessPath(chain, ta, []*x509.Certificate{chain[0]}, &checks); p != nil && outsideValidity(p, now) != nil {
		return p, true
	}
	return nil, false
}

// maxSignatureChecks bounds datelessPath's work on a hostile chain.
const maxSignatureChecks = 64

// datelessPath finds a path from the last certificate of path up to
// chain[ta] through the presented certificates, checking issuer names,
// signatures and that each issuer is a CA, but not dates.
func datelessPath(chain []*x509.Certificate, ta int, path []*x509.Certificate, checks *int) []*x509.Certificate {
	c := path[len(path)-1]
	if c.Equal(chain[ta]) {
		return path
	}
	for _, p := range chain {
		if slices.ContainsFunc(path, p.Equal) || !bytes.Equal(c.RawIssuer, p.RawSubject) {
			continue
		}
		if *checks++; *checks > maxSignatureChecks {
			return nil
		}
		if c.CheckSignatureFrom(p) != nil {
			continue
		}
		if found := datelessPath(chain, ta, append(slices.Clip(path), p), checks); found != nil {
			return found
		}
	}
	return nil
}

// outsideValidity returns the first certificate of path that is not valid
// at now, or nil.
func outsideValidity(path []*x509.Certificate, now time.Time) *x509.Certificate {
	for _, c := range path {
		if now.Before(c.NotBefore) || now.After(c.NotAfter) {
			return c
		}
	}
	return nil
}

// certMatches compares a certificate's association data with want
// (RFC 6698 §2.1.2, §2.1.3).
func certMatches(r *dns.TLSA, want []byte, c *x509.Certificate) bool {
	got, ok := associationData(r.Selector, r.MatchingType, c)
	return ok && bytes.Equal(got, want)
}

// certNames returns the presented identifiers RFC 7672 §3.2.2 checks: the
// DNS-ID SANs, or the subject CN when there are none.
func certNames(c *x509.Certificate) []string {
	if len(c.DNSNames) > 0 {
		return c.DNSNames
	}
	if c.Subject.CommonName != "" {
		return []string{c.Subject.CommonName}
	}
	return nil
}

func nameMatches(leaf *x509.Certificate, names []string) bool {
	for _, presented := range certNames(leaf) {
		for _, ref := range names {
			if matchName(presented, ref) {
				return true
			}
		}
	}
	return false
}

func normalizeName(n string) string {
	return domain.Key(strings.TrimSpace(n))
}

// matchName matches one presented identifier against one reference
// identifier. A wildcard is accepted only as the complete leftmost label
// ("*.example.com"), matches exactly one non-empty label, and needs at
// least two labels after it. A "*" anywhere else is never a wildcard.
func matchName(presented, ref string) bool {
	p, h := normalizeName(presented), normalizeName(ref)
	if p == "" || h == "" || strings.Contains(h, "*") {
		return false
	}
	if p == h {
		return true
	}
	suffix, ok := strings.CutPrefix(p, "*.")
	if !ok || strings.Contains(suffix, "*") || !strings.Contains(suffix, ".") {
		return false
	}
	label, rest, ok := strings.Cut(h, ".")
	return ok && label != "" && rest == suffix
}

func expiredError(path []*x509.Certificate, now time.Time) error {
	if now.IsZero() {
		now = time.Now()
	}
	c := outsideValidity(path, now)
	switch {
	case c == nil:
		return ErrExpired
	case now.After(c.NotAfter):
		return fmt.Errorf("%w (%s expired %s)", ErrExpired, certLabel(c), c.NotAfter.UTC().Format(time.RFC3339))
	default:
		return fmt.Errorf("%w (%s not valid before %s)", ErrExpired, certLabel(c), c.NotBefore.UTC().Format(time.RFC3339))
	}
}

func nameError(leaf *x509.Certificate, names []string) error {
	want := "no reference identifiers"
	if len(names) > 0 {
		want = strings.Join(names, ", ")
	}
	have := certNames(leaf)
	desc := "no names"
	switch {
	case len(have) > 3:
		desc = strings.Join(have[:3], ", ") + fmt.Sprintf(", +%d more", len(have)-3)
	case len(have) > 0:
		desc = strings.Join(have, ", ")
	}
	return fmt.Errorf("%w %s (certificate has %s)", ErrNameMismatch, want, desc)
}

func certLabel(c *x509.Certificate) string {
	if c.Subject.CommonName != "" {
		return "CN=" + c.Subject.CommonName
	}
	if len(c.DNSNames) > 0 {
		return c.DNSNames[0]
	}
	return "certificate serial " + c.SerialNumber.String()
}

func nonNilCerts(chain []*x509.Certificate) []*x509.Certificate {
	if len(chain) == 0 || chain[0] == nil {
		return nil
	}
	out := make([]*x509.Certificate, 0, len(chain))
	for _, c := range chain {
		if c != nil {
			out = append(out, c)
		}
	}
	return out
}

func nonNil(rrs []*dns.TLSA) []*dns.TLSA {
	out := make([]*dns.TLSA, 0, len(rrs))
	for _, r := range rrs {
		if r != nil {
			out = append(out, r)
		}
	}
	return out
}
