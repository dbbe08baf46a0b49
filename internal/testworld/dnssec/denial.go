package dnssec

import (
	"fmt"
	"strings"

	"github.com/miekg/dns"
)

// cover is an NSEC whose span holds name (a child of parent) and every name
// below it, and nothing else: from the greatest name that sorts before name
// to the least one after its subtree, both children of parent (RFC 4470
// "minimally covering" NSEC; canonical order is RFC 4034 §6.1). The caller
// fills in the header's type, class and TTL.
func cover(name, parent string) *dns.NSEC {
	label := rawLabels(name)[0]
	room := 255 - wireLen(parent) - 1 // bytes left for one more label
	n := &dns.NSEC{NextDomain: join(succLabel(label), parent)}
	n.Hdr.Name = join(predLabel(label, room), parent)
	return n
}

// predLabel is the greatest label that sorts before l, at most max(room, 1)
// bytes long (and 63): l without its last byte if that is 0, else l with its
// last byte one less and then padded with 0xff. A letter that the decrement
// would make upper case, which compares as lower case, becomes '@' instead.
func predLabel(l []byte, room int) []byte {
	last := l[len(l)-1]
	p := append([]byte(nil), l[:len(l)-1]...)
	if last == 0 {
		if len(p) == 0 {
			return []byte{0} // nothing sorts before "\000"; never needed
		}
		return p
	}
	last--
	if 'A' <= last && last <= 'Z' {
		last = '@'
	}
	p = append(p, last)
	for len(p) < min(room, 63) {
		p = append(p, 0xff)
	}
	return p
}

// succLabel is the least label that sorts after l and all names below it:
// l followed by a 0 byte (or, for a full 63-byte label, l with its last
// byte below 0xff incremented and the rest cut off).
func succLabel(l []byte) []byte {
	if len(l) < 63 {
		return append(append([]byte(nil), l...), 0)
	}
	s := append([]byte(nil), l...)
	for len(s) > 1 && s[len(s)-1] == 0xff {
		s = s[:len(s)-1]
	}
	s[len(s)-1]++
	return s
}

// rawLabels splits a name into its labels as bytes, escapes resolved.
func rawLabels(name string) [][]byte {
	buf := make([]byte, 256)
	n, err := dns.PackDomainName(dns.Fqdn(name), buf, 0, nil, false)
	if err != nil {
		panic(fmt.Sprintf("dnssec: bad name %q: %v", name, err))
	}
	var ls [][]byte
	for i := 0; i < n && buf[i] != 0; i += int(buf[i]) + 1 {
		ls = append(ls, buf[i+1:i+1+int(buf[i])])
	}
	return ls
}

// wireLen is the length of name in wire form.
func wireLen(name string) int {
	n := 1
	for _, l := range rawLabels(name) {
		n += len(l) + 1
	}
	return n
}

// join prepends the raw label l to parent, in presentation form: bytes other
// than letters, digits, '-', '_' and '*' are written \DDD.
func join(l []byte, parent string) string {
	var b strings.Builder
	for _, c := range l {
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '-', c == '_', c == '*':
			b.WriteByte(c)
		default:
			fmt.Fprintf(&b, `\%03d`, c)
		}
	}
	if parent == "." {
		return b.String() + "."
	}
	return b.String() + "." + parent
}
