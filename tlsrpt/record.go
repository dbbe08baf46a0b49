package tlsrpt

import (
	"context"
	"errors"
	"fmt"
	"net/mail"
	"net/url"
	"slices"
	"strings"

	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/internal/domain"
	"github.com/stsrelay/stsrelay/internal/txtrec"
)

// TXTResolver is dnsclient.TXTResolver, the module's one TXT lookup
// interface, under the name this package's API has used.
type TXTResolver = dnsclient.TXTResolver

// Errors of LookupRecord, wrapped; use errors.Is. All but ErrDNS mean "this
// domain does not do TLSRPT" (RFC 8460 §3).
var (
	// ErrNoRecord: no TXT record at _smtp._tls.<domain> begins with
	// "v=TLSRPTv1" (including NXDOMAIN and NODATA).
	ErrNoRecord = errors.New("no TLSRPT record")
	// ErrMultipleRecords: more than one record begins with "v=TLSRPTv1".
	ErrMultipleRecords = errors.New("more than one TLSRPT record")
	// ErrRecordSyntax: the one TLSRPT record is invalid or names no usable
	// (mailto: or https:) rua.
	ErrRecordSyntax = errors.New("invalid TLSRPT record")
	// ErrDNS: the lookup failed temporarily; try again later.
	ErrDNS = errors.New("TLSRPT record lookup failed")
)

// MaxRUA is how many report URIs of one record are used. RFC 8460 §3 lets
// a sender pick ("MAY" send to each); without a bound a record listing 25
// mailboxes makes 25 report mails out of one delivered message.
const MaxRUA = 5

// Record is a parsed TLSRPT policy record (RFC 8460 §3).
type Record struct {
	// Raw is the record text, its strings joined without spaces.
	Raw string
	// RUAs are the supported report URIs, in the order published, without
	// duplicates, at most MaxRUA.
	RUAs []RUA
	// Ignored lists rua URIs that were skipped: another scheme than
	// mailto/https, or not parseable. For the checker and logs.
	Ignored []string
	// Excess lists supported rua URIs beyond the first MaxRUA, which are
	// not used.
	Excess []string
	// Extensions are the unknown fields, ignored as §3 requires.
	Extensions map[string]string
}

// RUA is one aggregate report destination.
type RUA struct {
	// URI is the URI as published.
	URI string `json:"uri"`
	// Scheme is "mailto" or "https".
	Scheme string `json:"scheme"`
	// Address is the mailbox of a mailto: URI (RFC 6068), decoded.
	Address string `json:"address,omitempty"`
}

// RecordName is the DNS name of the TLSRPT record of domain (RFC 8460 §3).
func RecordName(domain string) string {
	return "_smtp._tls." + NormDomain(domain)
}

// LookupRecord discovers the TLSRPT policy of domain (RFC 8460 §3): the TXT
// records at _smtp._tls.<domain>, each one's strings joined without spaces;
// those not beginning with "v=TLSRPTv1" are discarded, and unless exactly
// one remains the domain does not do TLSRPT. That one must parse and name at
// least one mailto: or https: URI.
func LookupRecord(ctx context.Context, r TXTResolver, domain string) (*Record, error) {
	name := RecordName(domain)
	txts, err := r.LookupTXT(ctx, name)
	if err != nil {
		if dnsclient.IsNotFound(err) {
			return nil, fmt.Errorf("%s: %w: %v", name, ErrNoRecord, err)
		}
		return nil, fmt.Errorf("%s: %w: %w", name, ErrDNS, err)
	}
	var candidates []string
	for _, strs := range txts {
		// §3: multiple strings are concatenated without adding spaces.
		txt := strings.Join(strs, "")
		if isTLSRPTRecord(txt) {
			candidates = append(candidates, txt)
		}
	}
	switch len(candidates) {
	case 0:
		return nil, fmt.Errorf("%s: %w", name, ErrNoRecord)
	case 1:
	default:
		return nil, fmt.Errorf("%s: %w (%d)", name, ErrMultipleRecords, len(candidates))
	}
	rec, err := ParseRecord(candidates[0])
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	return rec, nil
}

// isTLSRPTRecord reports whether txt begins with the version field
// "v=TLSRPTv1" followed by a field delimiter or the end (§3: records that do
// not begin with "v=TLSRPTv1;" are discarded; the ABNF allows WSP before the
// ";").
func isTLSRPTRecord(txt string) bool {
	rest, ok := strings.CutPrefix(txt, "v=TLSRPTv1")
	if !ok {
		return false
	}
	rest = strings.TrimLeft(rest, " \t")
	return rest == "" || rest[0] == ';'
}

// ParseRecord parses one TLSRPT record (RFC 8460 §3):
//
//	tlsrpt-record = tlsrpt-version 1*(field-delim tlsrpt-field) [field-delim]
//	field-delim   = *WSP ";" *WSP
//
// The version must come first and rua is required. rua is a comma list of
// URIs; mailto: and https: are kept, other schemes ignored (Record.Ignored).
// Unknown fields are ignored. Errors wrap ErrRecordSyntax.
func ParseRecord(txt string) (*Record, error) {
	bad := func(format string, args ...any) (*Record, error) {
		return nil, fmt.Errorf("%w: %s", ErrRecordSyntax, fmt.Sprintf(format, args...))
	}
	fields := strings.Split(txt, ";")
	if strings.Trim(fields[0], " \t") != "v=TLSRPTv1" {
		return bad("record must begin with v=TLSRPTv1")
	}
	rec := &Record{Raw: txt}
	sawRUA := false
	var distinct []RUA // every supported rua seen
	for i, f := range fields[1:] {
		f = strings.Trim(f, " \t")
		if f == "" {
			if i == len(fields)-2 {
				continue // the optional trailing delimiter
			}
			return bad("empty field")
		}
		name, value, ok := strings.Cut(f, "=")
		if !ok || !txtrec.ValidExtName(name) {
			return bad("field %q is not name=value", f)
		}
		switch name {
		case "v":
			return bad("v= must appear once, first")
		case "rua":
			if sawRUA {
				return bad("rua appears twice")
			}
			sawRUA = true
			for u := range strings.SplitSeq(value, ",") {
				u = strings.Trim(u, " \t")
				if u == "" {
					return bad("empty rua URI")
				}
				if rua, ok := parseRUA(u); ok {
					switch {
					case slices.ContainsFunc(distinct, rua.same):
						// The same destination twice: one report.
						continue
					case len(rec.RUAs) >= MaxRUA:
						rec.Excess = append(rec.Excess, u)
					default:
						rec.RUAs = append(rec.RUAs, rua)
					}
					distinct = append(distinct, rua)
				} else {
					rec.Ignored = append(rec.Ignored, u)
				}
			}
		default:
			if value == "" || strings.ContainsAny(value, " \t=") {
				return bad("invalid value in %q", f)
			}
			if rec.Extensions == nil {
				rec.Extensions = map[string]string{}
			}
			rec.Extensions[name] = value
		}
	}
	if !sawRUA {
		return bad("rua is required")
	}
	if len(rec.RUAs) == 0 {
		return bad("no mailto: or https: URI in rua (ignored: %s)", strings.Join(rec.Ignored, ", "))
	}
	return rec, nil
}

// same reports whether a and b name the same destination: the same
// mailbox (domain case-insensitive), or the same https URI.
func (a RUA) same(b RUA) bool {
	if a.Scheme != b.Scheme {
		return false
	}
	if a.Scheme == "mailto" {
		la, da, _ := strings.Cut(a.Address, "@")
		lb, db, _ := strings.Cut(b.Address, "@")
		return la == lb && strings.EqualFold(da, db)
	}
	return a.URI == b.URI
}

// parseRUA accepts mailto: URIs with one valid address and https: URIs with
// a host. Commas, "!" and ";" inside a URI arrive percent-encoded (§3).
func parseRUA(s string) (RUA, bool) {
	u, err := url.Parse(s)
	if err != nil {
		return RUA{}, false
	}
	switch strings.ToLower(u.Scheme) {
	case "mailto":
		// RFC 6068: mailto:addr[?hfields]; url.Parse puts addr in Opaque.
		enc := u.Opaque
		if enc == "" {
			return RUA{}, false
		}
		addr, err := url.PathUnescape(enc)
		if err != nil {
			return RUA{}, false
		}
		a, err := mail.ParseAddress(addr)
		if err != nil || a.Name != "" || !strings.Contains(a.Address, "@") {
			return RUA{}, false
		}
		return RUA{URI: s, Scheme: "mailto", Address: a.Address}, true
	case "https":
		if u.Host == "" || u.Hostname() == "" || u.User != nil {
			return RUA{}, false
		}
		return RUA{URI: s, Scheme: "https"}, true
	}
	return RUA{}, false
}

// NormDomain lowercases name and drops a trailing dot (domain.Key, under
// the name this package's users know).
func NormDomain(name string) string { return domain.Key(name) }
