package mtasts

import "github.com/stsrelay/stsrelay/internal/domain"

// toASCII converts a host name with U-labels to A-labels (IDNA2008 with
// UTS #46 mapping and NFC, through internal/domain), so that it can be
// compared with policy patterns, which RFC 8461 §3.2 requires to be
// A-labels. A name that cannot convert does not match: the safe
// direction.
func toASCII(host string) (string, error) {
	d, err := domain.Parse(host)
	if err != nil {
		return "", err
	}
	return d.ASCII(), nil
}
