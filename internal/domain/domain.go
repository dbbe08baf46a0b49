// Package domain is the relay's one representation of a domain name: the
// A-label (ASCII) form used for DNS, MTA-STS policies, TLS-RPT reports and
// file names, and the U-label (Unicode) form, used only where people read
// it (RFC 5890 §2.3.2.1).
package domain

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"

	"golang.org/x/net/idna"
)

// Limits of a DNS name (RFC 1035 §2.3.4, RFC 2181 §11): 63 octets per
// label and 255 octets in wire form, which is 253 characters of text
// without the trailing dot.
const (
	MaxLabelLen = 63
	MaxNameLen  = 253
)

// ErrInvalid is wrapped by every error of Parse.
var ErrInvalid = errors.New("invalid domain name")

// Domain is a parsed domain name. The zero Domain is "no domain".
// Domains compare equal with == exactly when they are the same name.
type Domain struct {
	ascii   string // lower-case A-labels, no trailing dot
	unicode string // U-labels; equal to ascii when the name has no IDN label
}

// Parse parses a domain name given as A-labels, U-labels or a mix, as a
// recipient domain, MX host or policy domain is written. It applies the
// UTS #46 lookup processing of golang.org/x/net/idna's Lookup profile
// (case folding, width and compatibility mapping, NFC; the dotted forms
// "。" "．" "｡" count as dots) and then the DNS limits: no empty label,
// labels of at most 63 octets, at most 253 octets in all (in A-label form,
// without the trailing dot, which is dropped). Address literals ("[…]")
// and names that look like IPv4 addresses are not domain names (see
// IsLiteral).
//
// Names made only of ASCII letters, digits, hyphens and dots, with no
// "xn--" label, are only lower-cased and checked against the host name
// syntax of RFC 1123 §2.1 / RFC 5321 §4.1.2 (Let-dig [Ldh-str]); UTS #46's
// extra CheckHyphens rule, which refuses "--" in the third and fourth
// positions ("r3---sn-….example"), does not apply to them, since such
// names exist and are valid host names.
func Parse(s string) (Domain, error) {
	bad := func(format string, args ...any) (Domain, error) {
		return Domain{}, fmt.Errorf("%w %q: %s", ErrInvalid, clip(s), fmt.Sprintf(format, args...))
	}
	if s == "" {
		return bad("empty")
	}
	if IsLiteral(s) {
		return bad("an address literal is not a domain name")
	}
	if len(s) > 4*(MaxNameLen+1) {
		// Longer than any name can be even in U-labels of 4-byte
		// characters: refuse before any mapping work.
		return bad("longer than %d octets", MaxNameLen)
	}
	var ascii string
	if plainASCII(s) {
		ascii = strings.ToLower(s)
	} else {
		a, err := idna.Lookup.ToASCII(s)
		if err != nil {
			return bad("%v", err)
		}
		ascii = a
	}
	ascii = strings.TrimSuffix(ascii, ".")
	if ascii == "" {
		return bad("empty")
	}
	if len(ascii) > MaxNameLen {
		return bad("%d octets, more than %d", len(ascii), MaxNameLen)
	}
	idn := false
	labels := strings.Split(ascii, ".")
	for _, l := range labels {
		switch {
		case l == "":
			return bad("empty label")
		case len(l) > MaxLabelLen:
			return bad("label of %d octets, more than %d", len(l), MaxLabelLen)
		case !ldh(l):
			return bad("label %q is not letters, digits and inner hyphens", clip(l))
		}
		if strings.HasPrefix(l, "xn--") {
			idn = true
		}
	}
	if allDigits(labels[len(labels)-1]) {
		return bad("looks like an IP address; write an address literal as [192.0.2.1]")
	}
	d := Domain{ascii: ascii, unicode: ascii}
	if idn {
		// Validates the xn-- labels too (Punycode that decodes to a
		// disallowed or ASCII-only label is refused).
		u, err := idna.Lookup.ToUnicode(ascii)
		if err != nil {
			return bad("%v", err)
		}
		d.unicode = u
	}
	return d, nil
}

// MustParse is Parse for names known to be valid (tests, constants); it
// panics on an error.
func MustParse(s string) Domain {
	d, err := Parse(s)
	if err != nil {
		panic(err)
	}
	return d
}

// ASCII is the name in A-labels, lower case, without a trailing dot: the
// form for DNS queries, policies, reports, logs and files.
func (d Domain) ASCII() string { return d.ascii }

// Unicode is the name in U-labels, for people; for a name without IDN
// labels it is ASCII().
func (d Domain) Unicode() string { return d.unicode }

// IsIDN reports whether the name has an internationalized (xn--) label.
func (d Domain) IsIDN() bool { return d.ascii != d.unicode }

// IsZero reports whether d is the zero Domain.
func (d Domain) IsZero() bool { return d.ascii == "" }

// String is the A-label form.
func (d Domain) String() string { return d.ascii }

// MarshalText writes the A-label form, so that a Domain in persisted JSON
// is a plain string.
func (d Domain) MarshalText() ([]byte, error) { return []byte(d.ascii), nil }

// UnmarshalText parses text with Parse; empty text is the zero Domain.
func (d *Domain) UnmarshalText(text []byte) error {
	if len(text) == 0 {
		*d = Domain{}
		return nil
	}
	p, err := Parse(string(text))
	if err != nil {
		return err
	}
	*d = p
	return nil
}

// IsLiteral reports whether s is an address literal ("[192.0.2.1]",
// "[IPv6:2001:db8::1]", RFC 5321 §4.1.3) rather than a domain name. It
// only looks at the brackets; address literals have no MTA-STS policy
// (RFC 8461 §3.4) and no TLS-RPT record.
func IsLiteral(s string) bool {
	return len(s) >= 2 && s[0] == '[' && s[len(s)-1] == ']'
}

// CanPrefix reports whether label + "." + d is still a valid DNS name:
// every label of label (it may hold dots, as "_smtp._tls" does) between 1
// and 63 octets, and the whole at most 253. A domain of 245–253 octets has
// no room for "_mta-sts.", so it cannot publish an MTA-STS record: callers
// treat it as having no policy rather than deferring on a failed lookup.
// label is not checked against the host name syntax, since the labels
// prefixed in practice begin with "_".
func CanPrefix(d Domain, label string) bool {
	if d.IsZero() || label == "" || len(label)+1+len(d.ascii) > MaxNameLen {
		return false
	}
	for l := range strings.SplitSeq(label, ".") {
		if l == "" || len(l) > MaxLabelLen {
			return false
		}
	}
	return true
}

// Bounds of FileName.
const (
	// MaxFileNameLen is the longest name FileName returns, well below
	// the 255 bytes most file systems allow, so that callers may add a
	// prefix and a suffix ("<period>_" … ".json").
	MaxFileNameLen = 200
	// hashedPrefixLen is how much of a long name a hashed name keeps, for
	// people listing the directory.
	hashedPrefixLen = 100
	// hashHexLen is the number of hex digits of SHA-256 kept: 128 bits.
	hashHexLen = 32
)

// FileName returns a file name for the domain asciiDomain (an A-label
// name, as Domain.ASCII gives): the name itself when it is at most
// MaxFileNameLen bytes of lower-case letters, digits, '-' and '.' not
// beginning with '.'; otherwise a prefix of it made safe, '~', and 32 hex
// digits of its SHA-256. The two forms cannot collide, since '~' never
// appears in the first. The result is never empty, never longer than
// MaxFileNameLen, never "." or "..", and has no '/', NUL or upper-case
// letter (so it is also distinct on case-insensitive file systems).
func FileName(asciiDomain string) string {
	if safeFileName(asciiDomain) {
		return asciiDomain
	}
	sum := sha256.Sum256([]byte(asciiDomain))
	var sb strings.Builder
	for i := 0; i < len(asciiDomain) && sb.Len() < hashedPrefixLen; i++ {
		c := asciiDomain[i]
		switch {
		case c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '.' && i > 0:
			sb.WriteByte(c)
		default:
			sb.WriteByte('_')
		}
	}
	sb.WriteByte('~')
	sb.WriteString(hex.EncodeToString(sum[:])[:hashHexLen])
	return sb.String()
}

func safeFileName(s string) bool {
	if s == "" || len(s) > MaxFileNameLen || s[0] == '.' {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '.') {
			return false
		}
	}
	return true
}

// plainASCII: only letters, digits, '-' and '.', and no "xn--" label
// (which needs IDNA validation).
func plainASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '.') {
			return false
		}
		if (i == 0 || s[i-1] == '.') && len(s)-i >= 4 && strings.EqualFold(s[i:i+4], "xn--") {
			return false
		}
	}
	return true
}

// ldh: RFC 1123 §2.1 label, lower case: letters and digits, with hyphens
// inside only.
func ldh(l string) bool {
	if l[0] == '-' || l[len(l)-1] == '-' {
		return false
	}
	for i := 0; i < len(l); i++ {
		c := l[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

func allDigits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return s != ""
}

// clip shortens s for error messages: a peer may send a megabyte.
func clip(s string) string {
	const n = 80
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// Key is the relay's one lenient normaliser, for names that need not be
// valid domains (configured domains, MX host names from DNS, cache and map
// keys, "*"): s lower-cased, without a trailing dot. It never fails and
// does not map U-labels to A-labels; use Parse for a checked Domain. For a
// valid ASCII name, Key(s) == Parse(s).ASCII(). It allocates only when s
// has upper-case or non-ASCII letters.
func Key(s string) string {
	s = strings.TrimSuffix(s, ".")
	for i := 0; i < len(s); i++ {
		if c := s[i]; c >= 'A' && c <= 'Z' || c >= 0x80 {
			return strings.ToLower(s)
		}
	}
	return s
}
