package mtasts

import (
	"strings"
	"testing"

	"github.com/stsrelay/stsrelay/internal/message"
)

func mustPolicy(t testing.TB, mx ...string) *Policy {
	t.Helper()
	body := "version: STSv1\nmode: enforce\nmax_age: 86400\n"
	for _, m := range mx {
		body += "mx: " + m + "\n"
	}
	p, err := ParsePolicy([]byte(body))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestMatches(t *testing.T) {
	tests := []struct {
		name string
		mx   []string
		host string
		want bool
	}{
		{"exact", []string{"mx1.ex.test"}, "mx1.ex.test", true},
		{"wildcard one label", []string{"*.ex.test"}, "mail.ex.test", true},
		{"wildcard does not match the bare domain", []string{"*.ex.test"}, "ex.test", false},
		{"wildcard does not match two labels", []string{"*.ex.test"}, "a.b.ex.test", false},
		{"wildcard is not a suffix match", []string{"*.example.com"}, "foo.bar.example.com", false},
		{"wildcard not glued to a label", []string{"*.example.com"}, "xexample.com", false},
		{"case-insensitive host", []string{"mx1.ex.test"}, "MX1.EX.TEST", true},
		{"case-insensitive pattern", []string{"MX1.Ex.Test"}, "mx1.ex.test", true},
		{"trailing dot on host", []string{"mx1.ex.test"}, "MX1.EX.TEST.", true},
		{"trailing dot on pattern", []string{"mx1.ex.test."}, "mx1.ex.test", true},
		{"trailing dots both", []string{"a.b."}, "a.b.", true},
		{"policy set: a.example", []string{"a.example", "*.b.example"}, "a.example", true},
		{"policy set: sub.b.example", []string{"a.example", "*.b.example"}, "sub.b.example", true},
		{"policy set: b.example", []string{"a.example", "*.b.example"}, "b.example", false},
		{"policy set: sub.sub.b.example", []string{"a.example", "*.b.example"}, "sub.sub.b.example", false},
		{"policy set: other", []string{"a.example", "*.b.example"}, "other", false},
		{"*.com", []string{"*.com"}, "abc.com", true},
		{"without dots", []string{"*.example.org"}, "without-dots", false},
		{"mx0 vs parent", []string{"special.example.org", "*.example.org"}, "mx0.special.example.org", false},
		{"mx0 vs own wildcard", []string{"*.special.example.org"}, "mx0.special.example.org", true},
		{"U-label host vs A-label pattern", []string{"x.xn--aca-6ma.com"}, "x.ñaca.com", true},
		{"U-label host, upper case", []string{"xn--aca-6ma.com"}, "Ñaca.com", true},
		{"ASCII lookalike", []string{"x.xn--aca-6ma.com"}, "x.naca.com", false},
		{"bogus punycode", []string{"example.org"}, "xn-9999999999a.org", false},
		// UTS #46 maps the Kelvin sign to "k" (as resolvers do): the
		// same name, so the same match.
		{"Kelvin sign maps to k (UTS #46)", []string{"k.test"}, "\u212a.test", true},
		{"empty host", []string{"a.test"}, "", false},
		{"only a dot", []string{"a.test"}, ".", false},
		{"leading dot", []string{"*.b.cc.com"}, ".b.cc.com", false},
		{"empty first label vs wildcard", []string{"*.ex.test"}, ".ex.test", false},
		{"space in host", []string{"*.ex.test"}, "a b.ex.test", false},
		{"IP address", []string{"*.0.2.1"}, "192.0.2.1", true}, // a syntactic match; delivery passes names, not IPs
		{"bracketed literal", []string{"ex.test"}, "[192.0.2.1]", false},
		{"overlong host", []string{"*.test"}, strings.Repeat("a", 300) + ".test", false},
		{"overlong label", []string{"*.test"}, strings.Repeat("a", 64) + ".test", false},
		{"double dot", []string{"a.test"}, "a..test", false},
		{"NUL byte", []string{"a.test"}, "a.test\x00", false},
		{"invalid UTF-8", []string{"a.test"}, "a\xff.test", false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := mustPolicy(t, tc.mx...)
			if got := p.Matches(tc.host); got != tc.want {
				t.Errorf("%q.Matches(%q) = %v, want %v", tc.mx, tc.host, got, tc.want)
			}
			// A Policy built by hand must match the same way.
			hand := &Policy{Mode: ModeEnforce, MX: tc.mx}
			if got := hand.Matches(tc.host); got != tc.want {
				t.Errorf("hand-built %q.Matches(%q) = %v, want %v", tc.mx, tc.host, got, tc.want)
			}
			// The policy matches when one of its patterns does.
			matched := false
			for _, m := range tc.mx {
				matched = matched || MatchesPattern(m, tc.host)
			}
			if matched != tc.want {
				t.Errorf("MatchesPattern over %q, %q = %v, want %v", tc.mx, tc.host, matched, tc.want)
			}
		})
	}
	for _, bad := range []string{"", "*", "a.*.test", "a b.test", "*.ñ.test"} {
		if MatchesPattern(bad, "a.test") || MatchesPattern(bad, "x.ñ.test") {
			t.Errorf("malformed pattern %q matched", bad)
		}
	}
	var nilPolicy *Policy
	if nilPolicy.Matches("a.test") {
		t.Error("nil policy matched")
	}
}

func TestMatchesDoesNotAllocate(t *testing.T) {
	p := mustPolicy(t, "mx1.ex.test", "*.mail.ex.test", "backup.ex.test")
	hosts := []string{"MX9.MAIL.EX.TEST.", "backup.ex.test", "nope.ex.test", "a.b.mail.ex.test"}
	n := testing.AllocsPerRun(1000, func() {
		for _, h := range hosts {
			p.Matches(h)
		}
	})
	if n != 0 {
		t.Errorf("Matches allocates %v times per run", n)
	}
}

func TestPunycode(t *testing.T) {
	for in, want := range map[string]string{
		"ñaca.com":    "xn--aca-6ma.com",
		"bücher.test": "xn--bcher-kva.test",
		"BÜCHER.test": "xn--bcher-kva.test",
		"例え.テスト":      "xn--r8jz45g.xn--zckzah",
		"münchen.de":  "xn--mnchen-3ya.de",
		"Ｂücher.test": "xn--bcher-kva.test", // fullwidth, mapped (UTS #46)
	} {
		got, err := toASCII(in)
		if err != nil || got != want {
			t.Errorf("toASCII(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	for _, bad := range []string{"ü\x00.test", "\xff.test", "a_ü.test", "ü-.test"} {
		if got, err := toASCII(bad); err == nil {
			t.Errorf("toASCII(%q) = %q, want error", bad, got)
		}
	}
}

// FuzzMatches: never panics; a host matches an exact pattern iff equal
// ignoring ASCII case and a trailing dot, and a wildcard iff one extra
// leftmost label.
func FuzzMatches(f *testing.F) {
	seeds := [][2]string{
		{"*.example.com", "mail.example.com"}, {"*.example.com", "example.com"}, {"*.example.com", "a.b.example.com"},
		{"a.example", "A.EXAMPLE."}, {"*.com", "abc.com"}, {"abc.*.com", "abc.x.com"}, {"*.*.com", "x.abc.com"},
		{"x.xn--aca-6ma.com", "x.ñaca.com"}, {"example.org", "xn-9999999999a.org"}, {".aa.b.cc.com", "x.aa.b.cc.com"},
		{"*.example.org", "without-dots"}, {"a.test", strings.Repeat("a.", 200)},
	}
	for _, s := range seeds {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, pattern, host string) {
		hand := &Policy{Mode: ModeEnforce, MX: []string{pattern}}
		hand.Matches(host) // must not panic, whatever the pattern
		p, err := ParsePolicy([]byte("version: STSv1\nmode: enforce\nmax_age: 1\nmx: " + pattern + "\n"))
		if err != nil || len(p.MX) != 1 {
			return // invalid, or the pattern held a line break
		}
		pattern = p.MX[0]
		got := p.Matches(host)
		if (&Policy{MX: p.MX}).Matches(host) != got {
			t.Fatalf("parsed and hand-built policies disagree on %q vs %q", pattern, host)
		}
		h := strings.TrimSuffix(host, ".")
		pat := strings.TrimSuffix(strings.TrimSpace(pattern), ".")
		if !message.IsASCII(h) || !validHostname(h) {
			return
		}
		var want bool
		if rest, ok := strings.CutPrefix(pat, "*."); ok {
			i := strings.IndexByte(h, '.')
			want = i > 0 && strings.EqualFold(h[i+1:], rest)
		} else {
			want = strings.EqualFold(h, pat)
		}
		if got != want {
			t.Fatalf("Matches(%q, %q) = %v, want %v", pattern, host, got, want)
		}
	})
}
