// Package txtrec holds the syntax that the MTA-STS TXT record (RFC 8461
// §3.1) and the TLSRPT TXT record (RFC 8460 §3) share: the "key=value; …"
// extension names. It is a leaf: it imports nothing of the module.
package txtrec

// ValidExtName checks an extension name, sts-ext-name (RFC 8461 §3.1, and
// sts-policy-ext-name of §3.2) and tlsrpt-ext-name (RFC 8460 §3), which
// have the same ABNF: (ALPHA / DIGIT) *31(ALPHA / DIGIT / "_" / "-" / ".").
func ValidExtName(s string) bool {
	if len(s) == 0 || len(s) > 32 || !isAlnum(s[0]) {
		return false
	}
	for i := 1; i < len(s); i++ {
		c := s[i]
		if !isAlnum(c) && c != '_' && c != '-' && c != '.' {
			return false
		}
	}
	return true
}

func isAlnum(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9'
}
