package dane

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"errors"
	"math/big"
	"net"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// now is the reference instant of every test.
var now = time.Date(2026, 3, 1, 12, 0, 0, 0, time.UTC)

type testCert struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

type certOpts struct {
	cn        string
	dnsNames  []string
	ca        bool
	notBefore time.Time
	notAfter  time.Time
}

// issue creates a certificate signed by parent, or self-signed if parent is nil.
func issue(t *testing.T, o certOpts, parent *testCert) *testCert {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 62))
	if err != nil {
		t.Fatal(err)
	}
	if o.notBefore.IsZero() {
		o.notBefore = now.Add(-time.Hour)
	}
	if o.notAfter.IsZero() {
		o.notAfter = now.Add(24 * time.Hour)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: o.cn},
		DNSNames:              o.dnsNames,
		NotBefore:             o.notBefore,
		NotAfter:              o.notAfter,
		BasicConstraintsValid: true,
		IsCA:                  o.ca,
	}
	if o.ca {
		tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature
	} else {
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	}
	signer, signerKey := tmpl, key
	if parent != nil {
		signer, signerKey = parent.cert, parent.key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer, &key.PublicKey, signerKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCert{cert: cert, key: key}
}

// pkiWorld is a root CA, an intermediate CA and a leaf for mx.example.com.
type pkiWorld struct {
	root, inter, leaf *testCert
}

func newWorld(t *testing.T) *pkiWorld {
	t.Helper()
	root := issue(t, certOpts{cn: "Test Root CA", ca: true}, nil)
	inter := issue(t, certOpts{cn: "Test Intermediate CA", ca: true}, root)
	leaf := issue(t, certOpts{cn: "mx.example.com", dnsNames: []string{"mx.example.com"}}, inter)
	return &pkiWorld{root: root, inter: inter, leaf: leaf}
}

func chainOf(cs ...*testCert) []*x509.Certificate {
	out := make([]*x509.Certificate, len(cs))
	for i, c := range cs {
		out[i] = c.cert
	}
	return out
}

func tlsa(u, s, m uint8, data string) *dns.TLSA {
	return &dns.TLSA{Hdr: dns.RR_Header{Rrtype: dns.TypeTLSA, Class: dns.ClassINET}, Usage: u, Selector: s, MatchingType: m, Certificate: data}
}

var mxNames = []string{"mx.example.com"}

func TestUsable(t *testing.T) {
	h32 := strings.Repeat("ab", 32)
	h64 := strings.Repeat("cd", 64)
	tests := []struct {
		name string
		r    *dns.TLSA
		want bool
	}{
		{"3 1 1", tlsa(3, 1, 1, h32), true},
		{"3 0 1", tlsa(3, 0, 1, h32), true},
		{"2 0 1", tlsa(2, 0, 1, h32), true},
		{"2 1 2", tlsa(2, 1, 2, h64), true},
		{"3 0 0 non-empty", tlsa(3, 0, 0, "3082"), true},
		{"uppercase hex", tlsa(3, 1, 1, strings.ToUpper(h32)), true},
		{"PKIX-TA 0", tlsa(0, 0, 1, h32), false},
		{"PKIX-EE 1", tlsa(1, 1, 1, h32), false},
		{"usage 4", tlsa(4, 1, 1, h32), false},
		{"usage 255", tlsa(255, 1, 1, h32), false},
		{"selector 2", tlsa(3, 2, 1, h32), false},
		{"selector 255", tlsa(3, 255, 1, h32), false},
		{"matching type 3", tlsa(3, 1, 3, h32), false},
		{"matching type 255", tlsa(3, 1, 255, h32), false},
		{"sha256 too short", tlsa(3, 1, 1, h32[:62]), false},
		{"sha256 too long", tlsa(3, 1, 1, h32+"00"), false},
		{"sha256 with sha512 length", tlsa(3, 1, 1, h64), false},
		{"sha512 with sha256 length", tlsa(3, 1, 2, h32), false},
		{"full empty", tlsa(3, 0, 0, ""), false},
		{"bad hex", tlsa(3, 1, 1, strings.Repeat("zz", 32)), false},
		{"odd hex", tlsa(3, 0, 0, "abc"), false},
		{"nil", nil, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := Usable(tc.r); got != tc.want {
				t.Errorf("Usable(%v) = %v, want %v", tc.r, got, tc.want)
			}
		})
	}
}

func TestUsableRecords(t *testing.T) {
	h32 := strings.Repeat("ab", 32)
	a, b, c, d := tlsa(3, 1, 1, h32), tlsa(0, 0, 1, h32), tlsa(2, 0, 1, h32), tlsa(3, 1, 2, h32)
	got := UsableRecords([]*dns.TLSA{a, b, nil, c, d})
	if len(got) != 2 || got[0] != a || got[1] != c {
		t.Fatalf("UsableRecords = %v, want [a c] in order", got)
	}
	if got := UsableRecords(nil); len(got) != 0 {
		t.Fatalf("UsableRecords(nil) = %v", got)
	}
}

func TestRecord(t *testing.T) {
	w := newWorld(t)
	c := w.leaf.cert
	// Independent computation for 3 1 1.
	sum := sha256.Sum256(c.RawSubjectPublicKeyInfo)
	r := Record(3, 1, 1, c)
	if r.Certificate != hex.EncodeToString(sum[:]) {
		t.Fatalf("3 1 1 data = %s, want %x", r.Certificate, sum)
	}
	if r.Hdr.Rrtype != dns.TypeTLSA || r.Usage != 3 || r.Selector != 1 || r.MatchingType != 1 {
		t.Fatalf("record fields wrong: %+v", r)
	}
	// Cross-check every selector/matching type against miekg/dns's own helper.
	for _, s := range []uint8{0, 1} {
		for _, m := range []uint8{0, 1, 2} {
			want, err := dns.CertificateToDANE(s, m, c)
			if err != nil {
				t.Fatal(err)
			}
			if got := Record(2, s, m, c).Certificate; got != want {
				t.Errorf("Record(2,%d,%d) = %.16s…, want %.16s…", s, m, got, want)
			}
		}
	}
	sum512 := sha512.Sum512(c.Raw)
	if got := Record(3, 0, 2, c).Certificate; got != hex.EncodeToString(sum512[:]) {
		t.Errorf("3 0 2 data mismatch")
	}
	for _, bad := range []*dns.TLSA{Record(3, 2, 1, c), Record(3, 1, 7, c), Record(3, 1, 1, nil)} {
		if bad.Certificate != "" || Usable(bad) {
			t.Errorf("Record with bad parameters should be empty and unusable: %v", bad)
		}
	}
}

func TestVerifyDANEEE(t *testing.T) {
	w := newWorld(t)
	other := newWorld(t)
	// A self-signed leaf that is expired and carries the wrong name.
	stale := issue(t, certOpts{cn: "wrong.example.net", dnsNames: []string{"wrong.example.net"},
		notBefore: now.Add(-48 * time.Hour), notAfter: now.Add(-24 * time.Hour)}, nil)
	// A self-signed leaf not yet valid, wrong name, no SANs.
	future := issue(t, certOpts{cn: "future.invalid", notBefore: now.Add(24 * time.Hour), notAfter: now.Add(48 * time.Hour)}, nil)

	tests := []struct {
		name    string
		rrs     []*dns.TLSA
		chain   []*x509.Certificate
		wantErr error
	}{
		{"3 1 1", []*dns.TLSA{Record(3, 1, 1, w.leaf.cert)}, chainOf(w.leaf, w.inter), nil},
		{"3 0 1", []*dns.TLSA{Record(3, 0, 1, w.leaf.cert)}, chainOf(w.leaf, w.inter), nil},
		{"3 1 2", []*dns.TLSA{Record(3, 1, 2, w.leaf.cert)}, chainOf(w.leaf), nil},
		{"3 0 2", []*dns.TLSA{Record(3, 0, 2, w.leaf.cert)}, chainOf(w.leaf), nil},
		{"3 0 0 full", []*dns.TLSA{Record(3, 0, 0, w.leaf.cert)}, chainOf(w.leaf), nil},
		{"3 1 0 full SPKI", []*dns.TLSA{Record(3, 1, 0, w.leaf.cert)}, chainOf(w.leaf), nil},
		{"uppercase data", []*dns.TLSA{tlsa(3, 1, 1, strings.ToUpper(Record(3, 1, 1, w.leaf.cert).Certificate))}, chainOf(w.leaf), nil},
		{"mismatch: other key", []*dns.TLSA{Record(3, 1, 1, other.leaf.cert)}, chainOf(w.leaf, w.inter), ErrNoMatch},
		{"mismatch: EE record names the intermediate", []*dns.TLSA{Record(3, 1, 1, w.inter.cert)}, chainOf(w.leaf, w.inter), ErrNoMatch},
		{"mismatch: 3 0 1 of another certificate",
			[]*dns.TLSA{Record(3, 0, 1, other.leaf.cert)}, chainOf(w.leaf), ErrNoMatch},
		{"expired self-signed wrong-name cert passes", []*dns.TLSA{Record(3, 1, 1, stale.cert)}, chainOf(stale), nil},
		{"not-yet-valid cert without SANs passes", []*dns.TLSA{Record(3, 0, 1, future.cert)}, chainOf(future), nil},
		{"second record matches", []*dns.TLSA{Record(3, 1, 1, other.leaf.cert), Record(3, 1, 1, w.leaf.cert)}, chainOf(w.leaf), nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := Verify(tc.rrs, tc.chain, mxNames, now)
			checkErr(t, err, tc.wantErr)
		})
	}
}

func TestVerifyDANETA(t *testing.T) {
	w := newWorld(t)
	other := newWorld(t)
	wild := issue(t, certOpts{cn: "wild", dnsNames: []string{"*.example.com"}}, w.inter)
	cnOnly := issue(t, certOpts{cn: "mx.example.com"}, w.inter)
	cnButSAN := issue(t, certOpts{cn: "mx.example.com", dnsNames: []string{"other.example.com"}}, w.inter)
	expiredLeaf := issue(t, certOpts{cn: "mx.example.com", dnsNames: []string{"mx.example.com"},
		notBefore: now.Add(-48 * time.Hour), notAfter: now.Add(-time.Minute)}, w.inter)
	expiredInter := issue(t, certOpts{cn: "Expired Intermediate", ca: true,
		notBefore: now.Add(-48 * time.Hour), notAfter: now.Add(-time.Hour)}, w.root)
	leafUnderExpired := issue(t, certOpts{cn: "mx.example.com", dnsNames: []string{"mx.example.com"}}, expiredInter)
	selfSigned := issue(t, certOpts{cn: "mx.example.com", dnsNames: []string{"mx.example.com"}}, nil)
	notCA := issue(t, certOpts{cn: "leafish", dnsNames: []string{"leafish.example.com"}}, w.root)
	underNotCA := issue(t, certOpts{cn: "mx.example.com", dnsNames: []string{"mx.example.com"}}, notCA)

	full := chainOf(w.leaf, w.inter, w.root)
	tests := []struct {
		name    string
		rrs     []*dns.TLSA
		chain   []*x509.Certificate
		names   []string
		wantErr error
	}{
		{"2 0 1 root presented", []*dns.TLSA{Record(2, 0, 1, w.root.cert)}, full, mxNames, nil},
		{"2 0 1 intermediate presented", []*dns.TLSA{Record(2, 0, 1, w.inter.cert)}, chainOf(w.leaf, w.inter), mxNames, nil},
		{"2 1 1 SPKI of the intermediate", []*dns.TLSA{Record(2, 1, 1, w.inter.cert)}, chainOf(w.leaf, w.inter), mxNames, nil},
		{"2 1 2 SPKI of the root", []*dns.TLSA{Record(2, 1, 2, w.root.cert)}, full, mxNames, nil},
		{"2 0 0 full root", []*dns.TLSA{Record(2, 0, 0, w.root.cert)}, full, mxNames, nil},
		{"chain out of order", []*dns.TLSA{Record(2, 0, 1, w.root.cert)}, chainOf(w.leaf, w.root, w.inter), mxNames, nil},
		{"MX host name as second reference identifier", []*dns.TLSA{Record(2, 0, 1, w.inter.cert)}, chainOf(w.leaf, w.inter),
			[]string{"mx-cname-target.example.net", "mx.example.com"}, nil},
		{"names compared case-insensitively, trailing dot", []*dns.TLSA{Record(2, 0, 1, w.inter.cert)}, chainOf(w.leaf, w.inter),
			[]string{"MX.Example.COM."}, nil},
		{"wrong name", []*dns.TLSA{Record(2, 0, 1, w.inter.cert)}, chainOf(w.leaf, w.inter), []string{"mail.example.net"}, ErrNameMismatch},
		{"no names given", []*dns.TLSA{Record(2, 0, 1, w.inter.cert)}, chainOf(w.leaf, w.inter), nil, ErrNameMismatch},
		{"wildcard leftmost label", []*dns.TLSA{Record(2, 0, 1, w.inter.cert)}, chainOf(wild, w.inter), mxNames, nil},
		{"wildcard does not match two labels", []*dns.TLSA{Record(2, 0, 1, w.inter.cert)}, chainOf(wild, w.inter),
			[]string{"a.mx.example.com"}, ErrNameMismatch},
		{"wildcard does not match the parent", []*dns.TLSA{Record(2, 0, 1, w.inter.cert)}, chainOf(wild, w.inter),
			[]string{"example.com"}, ErrNameMismatch},
		{"CN fallback without DNS SANs", []*dns.TLSA{Record(2, 0, 1, w.inter.cert)}, chainOf(cnOnly, w.inter), mxNames, nil},
		{"CN ignored when DNS SANs exist", []*dns.TLSA{Record(2, 0, 1, w.inter.cert)}, chainOf(cnButSAN, w.inter), mxNames, ErrNameMismatch},
		{"expired leaf", []*dns.TLSA{Record(2, 0, 1, w.inter.cert)}, chainOf(expiredLeaf, w.inter), mxNames, ErrExpired},
		{"expired intermediate under a root TA", []*dns.TLSA{Record(2, 0, 1, w.root.cert)},
			chainOf(leafUnderExpired, expiredInter, w.root), mxNames, ErrExpired},
		{"TA not presented in the chain", []*dns.TLSA{Record(2, 0, 1, w.root.cert)}, chainOf(w.leaf, w.inter), mxNames, ErrNoMatch},
		{"TA of another hierarchy", []*dns.TLSA{Record(2, 0, 1, other.root.cert)}, full, mxNames, ErrNoMatch},
		{"TA presented but leaf not issued under it", []*dns.TLSA{Record(2, 0, 1, w.inter.cert)},
			chainOf(other.leaf, w.inter), mxNames, ErrNoMatch},
		{"TA issuer is not a CA", []*dns.TLSA{Record(2, 0, 1, w.root.cert)}, chainOf(underNotCA, notCA, w.root), mxNames, ErrNoMatch},
		{"TA matching a self-signed leaf, name ok", []*dns.TLSA{Record(2, 0, 1, selfSigned.cert)}, chainOf(selfSigned), mxNames, nil},
		{"TA matching a self-signed leaf, wrong name", []*dns.TLSA{Record(2, 0, 1, selfSigned.cert)}, chainOf(selfSigned),
			[]string{"other.example.com"}, ErrNameMismatch},
		{"TA is not EE: 3 1 1 of the intermediate does not pass", []*dns.TLSA{Record(3, 1, 1, w.inter.cert)}, full, mxNames, ErrNoMatch},
		{"name mismatch reported over no match", []*dns.TLSA{Record(3, 1, 1, other.leaf.cert), Record(2, 0, 1, w.inter.cert)},
			chainOf(w.leaf, w.inter), []string{"other.example.org"}, ErrNameMismatch},
		{"any matching record wins over a failing TA", []*dns.TLSA{Record(2, 0, 1, w.inter.cert), Record(3, 1, 1, w.leaf.cert)},
			chainOf(w.leaf, w.inter), []string{"other.example.org"}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := Verify(tc.rrs, tc.chain, tc.names, now)
			checkErr(t, err, tc.wantErr)
		})
	}

	// The expired leaf passes at an instant inside its validity: `now` is used.
	if err := Verify([]*dns.TLSA{Record(2, 0, 1, w.inter.cert)}, chainOf(expiredLeaf, w.inter), mxNames, now.Add(-30*time.Minute)); err != nil {
		t.Errorf("expired leaf at an earlier now: %v", err)
	}
}

func TestVerifyUnusableAndEmpty(t *testing.T) {
	w := newWorld(t)
	leaf := w.leaf.cert
	spki := Record(3, 1, 1, leaf).Certificate
	// Records whose data would match, but whose parameters are unusable.
	unusable := []*dns.TLSA{
		tlsa(0, 1, 1, spki),
		tlsa(1, 1, 1, spki),
		tlsa(3, 2, 1, spki),
		tlsa(3, 1, 3, spki),
		tlsa(3, 1, 1, spki[:40]),
		tlsa(3, 1, 2, spki),
	}
	for i, r := range unusable {
		err := Verify([]*dns.TLSA{r}, chainOf(w.leaf), mxNames, now)
		if !errors.Is(err, ErrNoUsableRecords) {
			t.Errorf("record %d (%v): err = %v, want ErrNoUsableRecords", i, r, err)
		}
	}
	if err := Verify(unusable, chainOf(w.leaf), mxNames, now); !errors.Is(err, ErrNoUsableRecords) {
		t.Errorf("all unusable: err = %v, want ErrNoUsableRecords", err)
	}
	if err := Verify(nil, chainOf(w.leaf), mxNames, now); !errors.Is(err, ErrNoUsableRecords) {
		t.Errorf("no records: err = %v, want ErrNoUsableRecords", err)
	}
	// An unusable matching record next to a usable non-matching one is not a match.
	mixed := []*dns.TLSA{tlsa(1, 1, 1, spki), Record(3, 1, 1, w.inter.cert)}
	if err := Verify(mixed, chainOf(w.leaf), mxNames, now); !errors.Is(err, ErrNoMatch) {
		t.Errorf("mixed: err = %v, want ErrNoMatch", err)
	}
	good := []*dns.TLSA{Record(3, 1, 1, leaf)}
	for name, chain := range map[string][]*x509.Certificate{"nil": nil, "empty": {}, "nil leaf": {nil, w.inter.cert}} {
		if err := Verify(good, chain, mxNames, now); !errors.Is(err, ErrNoCertificate) {
			t.Errorf("%s chain: err = %v, want ErrNoCertificate", name, err)
		}
	}
}

func TestErrorMessages(t *testing.T) {
	w := newWorld(t)
	other := newWorld(t)
	r := Record(3, 1, 1, other.leaf.cert)
	err := Verify([]*dns.TLSA{r}, chainOf(w.leaf), mxNames, now)
	want := "dane: no TLSA record matches the certificate chain (3 1 1 " + r.Certificate[:8] + "…)"
	if err == nil || err.Error() != want {
		t.Errorf("no-match message = %q, want %q", err, want)
	}
	err = Verify([]*dns.TLSA{Record(2, 0, 1, w.inter.cert)}, chainOf(w.leaf, w.inter), []string{"mail.example.net"}, now)
	if err == nil || err.Error() != "dane: certificate name does not match mail.example.net (certificate has mx.example.com)" {
		t.Errorf("name-mismatch message = %q", err)
	}
	expired := issue(t, certOpts{cn: "old.example.com", dnsNames: []string{"old.example.com"},
		notBefore: now.Add(-48 * time.Hour), notAfter: time.Date(2026, 2, 28, 0, 0, 0, 0, time.UTC)}, w.inter)
	err = Verify([]*dns.TLSA{Record(2, 1, 1, w.inter.cert)}, chainOf(expired, w.inter), []string{"old.example.com"}, now)
	if err == nil || err.Error() != "dane: certificate outside its validity period (CN=old.example.com expired 2026-02-28T00:00:00Z)" {
		t.Errorf("expired message = %q", err)
	}
	err = Verify([]*dns.TLSA{tlsa(0, 0, 1, strings.Repeat("AB", 32))}, chainOf(w.leaf), mxNames, now)
	if err == nil || err.Error() != "dane: no usable TLSA records (0 0 1 abababab…)" {
		t.Errorf("unusable message = %q", err)
	}
	many := []*dns.TLSA{r, r, r, r, r}
	err = Verify(many, chainOf(w.leaf), mxNames, now)
	if err == nil || !strings.HasSuffix(err.Error(), ", +2 more)") || len(err.Error()) > 120 {
		t.Errorf("many-record message not summarised: %q", err)
	}
}

func TestMatch(t *testing.T) {
	w := newWorld(t)
	other := newWorld(t)
	tests := []struct {
		r    *dns.TLSA
		want bool
		why  string
	}{
		{Record(3, 1, 1, w.leaf.cert), true, "EE on the leaf"},
		{Record(3, 0, 0, w.leaf.cert), true, "EE full cert"},
		{Record(3, 1, 1, other.leaf.cert), false, "EE on another key"},
		{Record(3, 1, 1, w.inter.cert), false, "EE on the intermediate"},
		{Record(2, 0, 1, w.inter.cert), true, "TA on the presented intermediate"},
		{Record(2, 1, 2, w.inter.cert), true, "TA SPKI SHA-512 on the intermediate"},
		{Record(2, 0, 1, w.root.cert), false, "TA root not presented"},
		{Record(2, 1, 1, other.inter.cert), false, "TA of another hierarchy"},
		{Record(2, 0, 1, w.leaf.cert), true, "TA on the leaf itself: leaf is its own anchor, names and dates checked"},
		{Record(1, 1, 1, w.leaf.cert), false, "PKIX-EE unusable although the data matches"},
		{Record(3, 255, 1, w.leaf.cert), false, "unknown selector"},
		{tlsa(3, 1, 1, "00"), false, "wrong data length"},
		{nil, false, "nil record"},
	}
	rrs := make([]*dns.TLSA, len(tests))
	for i, tc := range tests {
		rrs[i] = tc.r
	}
	got := Match(rrs, chainOf(w.leaf, w.inter), mxNames, now)
	if len(got) != len(tests) {
		t.Fatalf("len = %d, want %d", len(got), len(tests))
	}
	for i, tc := range tests {
		if got[i] != tc.want {
			t.Errorf("record %d (%s): match = %v, want %v", i, tc.why, got[i], tc.want)
		}
	}
	// With a wrong name, DANE-TA records stop matching, DANE-EE ones do not.
	got = Match(rrs[:5], chainOf(w.leaf, w.inter), []string{"other.example.org"}, now)
	if want := []bool{true, true, false, false, false}; !slices.Equal(got, want) {
		t.Errorf("wrong name: got %v, want %v", got, want)
	}
	// After the validity period, only DANE-EE records still match.
	got = Match(rrs[:5], chainOf(w.leaf, w.inter), mxNames, now.Add(72*time.Hour))
	if want := []bool{true, true, false, false, false}; !slices.Equal(got, want) {
		t.Errorf("expired: got %v, want %v", got, want)
	}
	if got := Match(rrs, nil, mxNames, now); slices.Contains(got, true) || len(got) != len(rrs) {
		t.Errorf("empty chain: got %v, want all false", got)
	}
}

func TestPolicyStrings(t *testing.T) {
	h := strings.Repeat("0A1B", 16)
	got := PolicyStrings([]*dns.TLSA{tlsa(3, 1, 1, h), tlsa(2, 0, 1, "ff"), tlsa(0, 0, 0, ""), nil})
	want := []string{"3 1 1 " + strings.ToLower(h), "2 0 1 ff", "0 0 0 ", ""}
	if len(got) != len(want) {
		t.Fatalf("got %d strings, want %d", len(got), len(want))
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("[%d] = %q, want %q", i, got[i], want[i])
		}
	}
	if got := PolicyStrings(nil); len(got) != 0 {
		t.Errorf("PolicyStrings(nil) = %v", got)
	}
}

func TestMatchName(t *testing.T) {
	tests := []struct {
		presented, ref string
		want           bool
	}{
		{"mx.example.com", "mx.example.com", true},
		{"MX.example.com.", "mx.EXAMPLE.com", true},
		{"*.example.com", "mx.example.com", true},
		{"*.example.com", "a.mx.example.com", false},
		{"*.example.com", "example.com", false},
		{"*.example.com", ".example.com", false},
		{"*.com", "example.com", false},
		{"m*.example.com", "mx.example.com", false},
		{"*x.example.com", "mx.example.com", false},
		{"mx.*.com", "mx.example.com", false},
		{"*.*.example.com", "a.b.example.com", false},
		{"*.example.com", "*.example.com", false},
		{"", "mx.example.com", false},
		{"mx.example.com", "", false},
		{"mx.example.com", "mx.example.org", false},
	}
	for _, tc := range tests {
		if got := matchName(tc.presented, tc.ref); got != tc.want {
			t.Errorf("matchName(%q, %q) = %v, want %v", tc.presented, tc.ref, got, tc.want)
		}
	}
}

// handshake runs a TLS server presenting chain and a client with cfg over a
// net.Pipe, returning the SNI the server saw and the client's error.
func handshake(t *testing.T, chain []*testCert, cfg *tls.Config) (sni string, clientErr error) {
	t.Helper()
	cert := tls.Certificate{PrivateKey: chain[0].key, Leaf: chain[0].cert}
	for _, c := range chain {
		cert.Certificate = append(cert.Certificate, c.cert.Raw)
	}
	var mu sync.Mutex
	srvCfg := &tls.Config{
		GetCertificate: func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
			mu.Lock()
			sni = hello.ServerName
			mu.Unlock()
			return &cert, nil
		},
	}
	cConn, sConn := net.Pipe()
	deadline := time.Now().Add(10 * time.Second)
	_ = cConn.SetDeadline(deadline)
	_ = sConn.SetDeadline(deadline)
	srv := tls.Server(sConn, srvCfg)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Handshake()
		if srv.ConnectionState().HandshakeComplete {
			// Read until the client closes, so the client's TLS 1.3
			// handshake completes.
			buf := make([]byte, 1)
			_, _ = srv.Read(buf)
		}
		_ = srv.Close()
	}()
	cli := tls.Client(cConn, cfg)
	clientErr = cli.Handshake()
	if clientErr == nil {
		st := cli.ConnectionState()
		if len(st.PeerCertificates) != len(chain) {
			t.Errorf("client saw %d certificates, want %d", len(st.PeerCertificates), len(chain))
		}
	}
	_ = cli.Close()
	<-done
	mu.Lock()
	defer mu.Unlock()
	return sni, clientErr
}

func TestConfigHandshake(t *testing.T) {
	w := newWorld(t)
	other := newWorld(t)
	base := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: "base.invalid"}

	fixed := func() time.Time { return now }
	cases := []struct {
		name    string
		rrs     []*dns.TLSA
		names   []string
		nowFn   func() time.Time
		wantErr error
	}{
		// DANE-EE ignores dates, so the nil (time.Now) clock is fine here.
		{"DANE-EE match, nil clock", []*dns.TLSA{Record(3, 1, 1, w.leaf.cert)}, mxNames, nil, nil},
		{"DANE-EE mismatch", []*dns.TLSA{Record(3, 1, 1, other.leaf.cert)}, mxNames, nil, ErrNoMatch},
		{"DANE-TA match", []*dns.TLSA{Record(2, 0, 1, w.inter.cert)}, mxNames, fixed, nil},
		{"DANE-TA wrong name", []*dns.TLSA{Record(2, 0, 1, w.inter.cert)}, []string{"mail.example.net"}, fixed, ErrNameMismatch},
		{"DANE-TA with the clock after expiry", []*dns.TLSA{Record(2, 0, 1, w.inter.cert)}, mxNames,
			func() time.Time { return now.Add(48 * time.Hour) }, ErrExpired},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Config(base, "mx.example.com", tc.rrs, tc.names, tc.nowFn)
			sni, err := handshake(t, []*testCert{w.leaf, w.inter}, cfg)
			if sni != "mx.example.com" {
				t.Errorf("server saw SNI %q, want mx.example.com", sni)
			}
			if tc.wantErr == nil {
				if err != nil {
					t.Fatalf("handshake failed: %v", err)
				}
				return
			}
			if !errors.Is(err, tc.wantErr) {
				t.Fatalf("handshake err = %v, want %v", err, tc.wantErr)
			}
		})
	}
	if base.ServerName != "base.invalid" || base.InsecureSkipVerify || base.VerifyConnection != nil {
		t.Errorf("Config modified base: %+v", base)
	}
}

func TestConfigCopiesInputs(t *testing.T) {
	w := newWorld(t)
	rrs := []*dns.TLSA{Record(3, 1, 1, w.leaf.cert)}
	names := []string{"mx.example.com"}
	cfg := Config(nil, "mx.example.com", rrs, names, nil)
	if cfg.ServerName != "mx.example.com" || !cfg.InsecureSkipVerify || cfg.VerifyConnection == nil {
		t.Fatalf("Config(nil, …) = ServerName %q, InsecureSkipVerify %v", cfg.ServerName, cfg.InsecureSkipVerify)
	}
	rrs[0] = Record(3, 1, 1, newWorld(t).leaf.cert) // the caller reuses its slice
	if err := cfg.VerifyConnection(tls.ConnectionState{PeerCertificates: chainOf(w.leaf)}); err != nil {
		t.Errorf("VerifyConnection after caller mutated rrs: %v", err)
	}
	if err := cfg.VerifyConnection(tls.ConnectionState{}); !errors.Is(err, ErrNoCertificate) {
		t.Errorf("VerifyConnection without certificates: %v, want ErrNoCertificate", err)
	}
}

func checkErr(t *testing.T, err, want error) {
	t.Helper()
	if want == nil {
		if err != nil {
			t.Fatalf("Verify = %v, want nil", err)
		}
		return
	}
	if !errors.Is(err, want) {
		t.Fatalf("Verify = %v, want %v", err, want)
	}
	if !strings.HasPrefix(err.Error(), "dane: ") {
		t.Errorf("message %q lacks the dane: prefix", err)
	}
}
