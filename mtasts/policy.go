package mtasts

import (
	"bytes"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/stsrelay/stsrelay/internal/txtrec"
)

// Mode is a policy's "mode" (RFC 8461 §5).
type Mode string

// The three modes of RFC 8461 §5.
const (
	// ModeEnforce: never deliver to an MX that fails MX matching,
	// certificate validation or STARTTLS.
	ModeEnforce Mode = "enforce"
	// ModeTesting: deliver anyway, report failures with TLS-RPT.
	ModeTesting Mode = "testing"
	// ModeNone: treat the domain as having no active policy (§8.3).
	ModeNone Mode = "none"
)

// MaxMaxAge is the largest max_age RFC 8461 §3.2 allows: 31557600 s
// (a Julian year). Larger values are capped to it (see ParsePolicy).
const MaxMaxAge = 31557600 * time.Second

// Policy is a parsed MTA-STS policy (RFC 8461 §3.2). A Policy returned by
// this package is shared and must not be modified.
type Policy struct {
	Mode Mode
	// MX holds the "mx" patterns in order, as written in the policy.
	MX []string
	// MaxAge is the policy lifetime, capped at MaxMaxAge.
	MaxAge time.Duration
	// Lines are the policy's lines as fetched, with the CR of CRLF
	// removed and trailing blank lines dropped: the "policy-string" of an
	// RFC 8460 §4.4 report.
	Lines []string

	// pats are the MX patterns normalized for Matches (lower case, no
	// trailing dot), precomputed so that matching never allocates.
	pats []mxPattern
}

// SyntaxError is one problem in a policy body. It wraps ErrPolicySyntax.
type SyntaxError struct {
	// Line is the 1-based line number; 0 for a problem of the whole
	// policy (such as a missing required field).
	Line int
	Msg  string
}

func (e *SyntaxError) Error() string {
	if e.Line == 0 {
		return fmt.Sprintf("%v: %s", ErrPolicySyntax, e.Msg)
	}
	return fmt.Sprintf("%v: line %d: %s", ErrPolicySyntax, e.Line, e.Msg)
}

// Unwrap returns ErrPolicySyntax.
func (e *SyntaxError) Unwrap() error { return ErrPolicySyntax }

var utf8BOM = []byte{0xEF, 0xBB, 0xBF}

// ParsePolicy parses a policy body per the ABNF of RFC 8461 §3.2:
//
//	sts-policy-record = sts-policy-field *WSP *(sts-policy-term sts-policy-field *WSP) [sts-policy-term]
//	sts-policy-field  = key ":" *WSP value
//	sts-policy-term   = LF / CRLF
//
// Rules applied:
//   - lines end with LF or CRLF, the last one optionally with nothing; a
//     CR not followed by LF is invalid, as is whitespace before a key;
//   - "version: STSv1", "mode" (enforce|testing|none) and "max_age" (1-10
//     digits) are required, case-sensitive, anywhere in the body;
//   - "mx" is required at least once unless mode is none; each mx line
//     holds exactly one pattern ["*."]Domain (RFC 5321 Domain, in A-label
//     form: a U-label is an error that says so);
//   - of a repeated non-mx key only the first counts, but every line must
//     still be valid; mx lines accumulate;
//   - unknown keys are ignored when their name and value are well-formed.
//
// Deviations, all towards accepting policies seen in the wild:
//   - blank (or whitespace-only) lines at the end are accepted, though the
//     strict ABNF forbids them (checklist STS-3.2-g);
//   - max_age above 31557600 is capped to it (errata 7282 leaves it
//     unspecified) rather than rejected;
//   - a trailing dot on an mx pattern is ignored.
//
// A UTF-8 byte order mark is rejected with a message that names it. Errors
// are *SyntaxError values carrying the line number; when there are several
// problems the first is returned.
func ParsePolicy(b []byte) (*Policy, error) {
	p, problems := parsePolicy(b)
	if len(problems) > 0 {
		return nil, problems[0]
	}
	return p, nil
}

// parsePolicy returns the policy, or every problem found.
func parsePolicy(b []byte) (*Policy, []*SyntaxError) {
	var problems []*SyntaxError
	bad := func(line int, format string, args ...any) {
		problems = append(problems, &SyntaxError{Line: line, Msg: fmt.Sprintf(format, args...)})
	}
	if len(b) == 0 {
		bad(0, "empty policy")
		return nil, problems
	}
	if bytes.HasPrefix(b, utf8BOM) {
		bad(1, "policy begins with a UTF-8 byte order mark (EF BB BF), which RFC 8461 §3.2 does not allow; save the file without BOM")
		return nil, problems
	}

	// Split on LF; strip the CR of a CRLF. The final terminator is
	// optional (errata 6253), so a trailing LF makes no extra line.
	var lines []string
	for s := string(b); s != ""; {
		i := strings.IndexByte(s, '\n')
		var line string
		if i < 0 {
			line, s = s, "" // a CR left at the end is a bare CR: invalid
		} else {
			line, s = strings.TrimSuffix(s[:i], "\r"), s[i+1:]
		}
		lines = append(lines, line)
	}
	// Leniency: drop trailing blank lines.
	last := len(lines)
	for last > 0 && strings.Trim(lines[last-1], " \t") == "" {
		last--
	}
	lines = lines[:last]
	if len(lines) == 0 {
		bad(0, "policy has only blank lines")
		return nil, problems
	}

	p := &Policy{Lines: lines}
	var haveVersion, haveMode, haveMaxAge bool
	seen := map[string]bool{} // keys present, valid or not
	for i, line := range lines {
		n := i + 1
		if line == "" || strings.Trim(line, " \t") == "" {
			bad(n, "blank line (only allowed at the end of the policy)")
			continue
		}
		if k := strings.IndexByte(line, '\r'); k >= 0 {
			bad(n, "carriage return not followed by line feed (lines end with LF or CRLF)")
			continue
		}
		if line[0] == ' ' || line[0] == '\t' {
			bad(n, "whitespace before the key")
			continue
		}
		colon := strings.IndexByte(line, ':')
		if colon < 0 {
			bad(n, "no \":\": expected \"key: value\"")
			continue
		}
		key := line[:colon]
		seen[key] = true
		value := strings.TrimRight(strings.TrimLeft(line[colon+1:], " \t"), " \t")
		switch key {
		case "":
			bad(n, "empty key before \":\"")
		case "version":
			if value != "STSv1" {
				bad(n, "version must be \"STSv1\" (case-sensitive), got %q", value)
			} else if !haveVersion {
				haveVersion = true
			}
		case "mode":
			switch m := Mode(value); m {
			case ModeEnforce, ModeTesting, ModeNone:
				if !haveMode {
					p.Mode, haveMode = m, true
				}
			default:
				bad(n, "mode must be one of enforce, testing, none (case-sensitive), got %q", value)
			}
		case "max_age":
			if len(value) < 1 || len(value) > 10 || strings.Trim(value, "0123456789") != "" {
				bad(n, "max_age must be 1 to 10 digits (seconds), got %q", value)
				break
			}
			secs, _ := strconv.ParseUint(value, 10, 64) // ≤ 10 digits: fits
			// errata 7282: cap, don't reject. Cap before converting:
			// 10 digits of seconds overflow a Duration.
			secs = min(secs, uint64(MaxMaxAge/time.Second))
			d := time.Duration(secs) * time.Second
			if !haveMaxAge {
				p.MaxAge, haveMaxAge = d, true
			}
		case "mx":
			pat, err := parseMXPattern(value)
			if err != "" {
				bad(n, "%s", err)
				break
			}
			p.MX = append(p.MX, value)
			p.pats = append(p.pats, pat)
		default:
			if !txtrec.ValidExtName(key) {
				bad(n, "invalid key %q (1-32 of letters, digits, \"_-.\", starting with a letter or digit)", key)
			} else if msg := checkExtValue(value); msg != "" {
				bad(n, "value of %q: %s", key, msg)
			}
		}
	}
	// Missing fields; a present but invalid one was reported already.
	if !seen["version"] {
		bad(0, "no \"version: STSv1\" line")
	}
	if !seen["mode"] {
		bad(0, "no \"mode\" line (keys are case-sensitive)")
	}
	if !seen["max_age"] {
		bad(0, "no \"max_age\" line")
	}
	if haveVersion && haveMode && haveMaxAge && p.Mode != ModeNone && len(p.MX) == 0 && len(problems) == 0 {
		bad(0, "mode %s requires at least one \"mx\" line", p.Mode)
	}
	if len(problems) > 0 {
		return nil, problems
	}
	return p, nil
}

// checkExtValue checks sts-policy-ext-value: visible characters (UTF-8
// allowed) and spaces, no control characters, not empty. Leading and
// trailing whitespace has already been removed.
func checkExtValue(v string) string {
	if v == "" {
		return "empty value"
	}
	if !utf8.ValidString(v) {
		return "not valid UTF-8"
	}
	for i := 0; i < len(v); i++ {
		if c := v[i]; c < 0x20 || c == 0x7f {
			return fmt.Sprintf("control character %#02x", c)
		}
	}
	return ""
}

// mxPattern is an "mx" value normalized for matching.
type mxPattern struct {
	wildcard bool   // "*." prefix
	domain   string // lower case, without "*." and trailing dot
}

// parseMXPattern checks sts-policy-mx-value = ["*."] Domain (RFC 8461
// §3.2, Domain from RFC 5321 §4.1.2) and returns it normalized, or a
// message saying what is wrong.
func parseMXPattern(v string) (mxPattern, string) {
	if v == "" {
		return mxPattern{}, "empty mx value"
	}
	for i := 0; i < len(v); i++ {
		if v[i] >= 0x80 {
			msg := fmt.Sprintf("mx %q is not ASCII: internationalized names must be written as A-labels (RFC 8461 §3.2)", v)
			if a, err := toASCII(strings.TrimPrefix(v, "*.")); err == nil {
				if strings.HasPrefix(v, "*.") {
					a = "*." + a
				}
				msg += fmt.Sprintf(", e.g. %q", a)
			}
			return mxPattern{}, msg
		}
	}
	if strings.ContainsAny(v, " \t,;") {
		return mxPattern{}, fmt.Sprintf("mx %q: one pattern per \"mx:\" line (RFC 8461 §3.2)", v)
	}
	var pat mxPattern
	d := strings.TrimSuffix(v, ".")
	if rest, ok := strings.CutPrefix(d, "*."); ok {
		pat.wildcard = true
		d = rest
	}
	if strings.Contains(d, "*") {
		return mxPattern{}, fmt.Sprintf("mx %q: \"*\" is allowed only as the whole leftmost label, as in \"*.example.com\"", v)
	}
	if msg := checkDomain(d); msg != "" {
		return mxPattern{}, fmt.Sprintf("mx %q: %s", v, msg)
	}
	pat.domain = strings.ToLower(d)
	return pat, ""
}

// checkDomain checks an RFC 5321 §4.1.2 Domain: dot-separated labels of
// letters, digits and hyphens, each starting and ending with a letter or
// digit; with the DNS limits of 63 octets a label and 253 a name.
func checkDomain(d string) string {
	if d == "" {
		return "empty domain"
	}
	if len(d) > 253 {
		return "domain longer than 253 characters"
	}
	for label := range strings.SplitSeq(d, ".") {
		switch {
		case label == "":
			return "empty label"
		case len(label) > 63:
			return fmt.Sprintf("label %q longer than 63 characters", label)
		case !isAlnum(label[0]) || !isAlnum(label[len(label)-1]):
			return fmt.Sprintf("label %q must start and end with a letter or digit", label)
		}
		for i := 0; i < len(label); i++ {
			if c := label[i]; !isAlnum(c) && c != '-' {
				return fmt.Sprintf("invalid character %q in label %q", c, label)
			}
		}
	}
	return ""
}
