package mtasts

import (
	"strings"

	"github.com/stsrelay/stsrelay/internal/message"
)

// Matches reports whether host, an MX record name, is allowed by one of
// the policy's "mx" patterns (RFC 8461 §4.1). Matching follows RFC 6125:
// ASCII case-insensitive, a trailing root dot ignored on either side, and
// a "*." pattern matches exactly one whole leftmost label: "*.ex.test"
// matches "mail.ex.test" but neither "ex.test" nor "a.b.ex.test".
//
// Host must be the MX record name, not a CNAME target or an address. A
// host in U-label form is converted to A-labels first (the patterns are
// A-labels, §3.2). Malformed or overlong input never matches. For an ASCII
// host Matches does not allocate.
func (p *Policy) Matches(host string) bool {
	if p == nil {
		return false
	}
	host, ok := matchableHost(host)
	if !ok {
		return false
	}
	if len(p.pats) == len(p.MX) {
		for _, pat := range p.pats {
			if pat.matches(host) {
				return true
			}
		}
		return false
	}
	// A Policy built by hand rather than by ParsePolicy: normalize the
	// patterns on the fly (still without allocating).
	for _, m := range p.MX {
		m = strings.TrimSuffix(m, ".")
		pat := mxPattern{domain: m}
		if rest, ok := strings.CutPrefix(m, "*."); ok {
			pat = mxPattern{wildcard: true, domain: rest}
		}
		if pat.domain != "" && pat.matches(host) {
			return true
		}
	}
	return false
}

// MatchesPattern reports whether host, an MX record name, is allowed by
// the one "mx" pattern, by the rules of Policy.Matches (`stsrelay check`
// asks it of each pattern of a policy). A malformed pattern matches
// nothing.
func MatchesPattern(pattern, host string) bool {
	pat, msg := parseMXPattern(pattern)
	if msg != "" {
		return false
	}
	host, ok := matchableHost(host)
	return ok && pat.matches(host)
}

// matchableHost is host as patterns are matched against it: without a
// trailing dot, in A-labels; ok is false for a name that cannot be an MX
// host.
func matchableHost(host string) (string, bool) {
	host = strings.TrimSuffix(host, ".")
	if !message.IsASCII(host) {
		a, err := toASCII(host)
		if err != nil {
			return "", false
		}
		host = a
	}
	return host, validHostname(host)
}

// matches compares a valid ASCII host name with the pattern.
func (pat mxPattern) matches(host string) bool {
	if !pat.wildcard {
		return asciiEqualFold(host, pat.domain)
	}
	// "*." + domain: host is exactly one label, a dot, then domain.
	dot := strings.IndexByte(host, '.')
	if dot <= 0 {
		return false
	}
	return asciiEqualFold(host[dot+1:], pat.domain)
}

// asciiEqualFold is strings.EqualFold restricted to ASCII: no Unicode
// folding (the Kelvin sign must not match "k").
func asciiEqualFold(a, b string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := 0; i < len(a); i++ {
		x, y := a[i], b[i]
		if x == y {
			continue
		}
		if 'A' <= x && x <= 'Z' {
			x += 'a' - 'A'
		}
		if 'A' <= y && y <= 'Z' {
			y += 'a' - 'A'
		}
		if x != y {
			return false
		}
	}
	return true
}

// validHostname accepts what can be an MX name in DNS: 1-253 octets of
// labels 1-63 octets long, of letters, digits, "-" and "_" (the last
// tolerated as real DNS data holds it; no pattern can contain it).
func validHostname(h string) bool {
	if len(h) == 0 || len(h) > 253 {
		return false
	}
	labelLen := 0
	for i := 0; i < len(h); i++ {
		c := h[i]
		switch {
		case c == '.':
			if labelLen == 0 {
				return false
			}
			labelLen = 0
			continue
		case isAlnum(c) || c == '-' || c == '_':
		default:
			return false
		}
		labelLen++
		if labelLen > 63 {
			return false
		}
	}
	return labelLen > 0
}
