package mtasts

import (
	"errors"
	"strings"
	"unicode"
)

// The module cannot depend on golang.org/x/text, which golang.org/x/net/idna
// needs, so this file holds the little IDNA this package uses: turning a
// U-label host name (from an SMTPUTF8 recipient domain, say) into A-labels
// so that it can be compared with policy patterns, which RFC 8461 §3.2
// requires to be A-labels. It lower-cases and Punycode-encodes (RFC 3492)
// each non-ASCII label; it does not apply NFC normalization or the full
// IDNA2008 rules, so an unusual U-label may fail to convert, and then it
// simply does not match: the safe direction.

var errNotIDN = errors.New("not a valid internationalized domain name")

// toASCII converts a host name with U-labels to A-labels.
func toASCII(host string) (string, error) {
	labels := strings.Split(host, ".")
	for i, l := range labels {
		if isASCII(l) {
			labels[i] = strings.ToLower(l)
			continue
		}
		l = strings.ToLower(l)
		for _, r := range l {
			if r == unicode.ReplacementChar || !(unicode.IsLetter(r) || unicode.IsDigit(r) || unicode.IsMark(r) || r == '-') {
				return "", errNotIDN
			}
		}
		a, ok := punycodeEncode(l)
		if !ok {
			return "", errNotIDN
		}
		labels[i] = "xn--" + a
	}
	return strings.Join(labels, "."), nil
}

// punycodeEncode implements the encoding procedure of RFC 3492 §6.3.
func punycodeEncode(label string) (string, bool) {
	const (
		base        = 36
		tmin        = 1
		tmax        = 26
		skew        = 38
		damp        = 700
		initialBias = 72
		initialN    = 128
	)
	adapt := func(delta, numPoints int, first bool) int {
		if first {
			delta /= damp
		} else {
			delta /= 2
		}
		delta += delta / numPoints
		k := 0
		for delta > ((base-tmin)*tmax)/2 {
			delta /= base - tmin
			k += base
		}
		return k + (base-tmin+1)*delta/(delta+skew)
	}
	digit := func(d int) byte {
		if d < 26 {
			return byte('a' + d)
		}
		return byte('0' + d - 26)
	}
	runes := []rune(label)
	if len(runes) > 63 {
		return "", false
	}
	var out []byte
	for _, r := range runes {
		if r < 0x80 {
			out = append(out, byte(r))
		}
	}
	b := len(out)
	h := b
	if b > 0 {
		out = append(out, '-')
	}
	n, delta, bias := initialN, 0, initialBias
	for h < len(runes) {
		m := int(unicode.MaxRune) + 1
		for _, r := range runes {
			if int(r) >= n && int(r) < m {
				m = int(r)
			}
		}
		delta += (m - n) * (h + 1) // bounded: ≤ 63 runes, rune ≤ 0x10FFFF
		n = m
		for _, r := range runes {
			if int(r) < n {
				delta++
			}
			if int(r) != n {
				continue
			}
			q := delta
			for k := base; ; k += base {
				t := k - bias
				if t < tmin {
					t = tmin
				} else if t > tmax {
					t = tmax
				}
				if q < t {
					break
				}
				out = append(out, digit(t+(q-t)%(base-t)))
				q = (q - t) / (base - t)
			}
			out = append(out, digit(q))
			bias = adapt(delta, h+1, h == b)
			delta = 0
			h++
		}
		delta++
		n++
	}
	return string(out), true
}
