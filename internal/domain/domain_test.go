package domain

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	label63 := strings.Repeat("a", 63)
	// 4 labels of 63 plus 3 dots = 255; trim to build exact lengths.
	name253 := label63 + "." + label63 + "." + label63 + "." + strings.Repeat("b", 61)
	name254 := name253 + "c"
	tests := []struct {
		name, in   string
		ascii, uni string
		idn        bool
		wantErr    string // substring; "" means valid
	}{
		{"plain name", "example.com", "example.com", "example.com", false, ""},
		{"upper case is folded", "MX1.Example.COM", "mx1.example.com", "mx1.example.com", false, ""},
		{"trailing dot is dropped", "example.com.", "example.com", "example.com", false, ""},
		{"U-label becomes an A-label", "bücher.test", "xn--bcher-kva.test", "bücher.test", true, ""},
		{"A-label stays, Unicode form derived", "xn--bcher-kva.test", "xn--bcher-kva.test", "bücher.test", true, ""},
		{"upper-case A-label", "XN--BCHER-KVA.test", "xn--bcher-kva.test", "bücher.test", true, ""},
		{"upper-case U-label is folded (UTS 46)", "BÜCHER.test", "xn--bcher-kva.test", "bücher.test", true, ""},
		{"fullwidth letters map to ASCII", "ｅｘａｍｐｌｅ.com", "example.com", "example.com", false, ""},
		{"ideographic full stop is a dot", "bücher。test", "xn--bcher-kva.test", "bücher.test", true, ""},
		{"NFC: decomposed ü composes", "bu\u0308cher.test", "xn--bcher-kva.test", "bücher.test", true, ""},
		{"hyphens in 3rd and 4th position of an ASCII name", "r3---sn-abc.example", "r3---sn-abc.example", "r3---sn-abc.example", false, ""},
		{"single label", "localhost", "localhost", "localhost", false, ""},
		{"label of 63 octets", label63 + ".test", label63 + ".test", label63 + ".test", false, ""},
		{"name of 253 octets", name253, name253, name253, false, ""},
		{"name of 253 octets with trailing dot", name253 + ".", name253, name253, false, ""},

		{"empty", "", "", "", false, "empty"},
		{"only a dot", ".", "", "", false, "empty"},
		{"label of 64 octets", strings.Repeat("a", 64) + ".test", "", "", false, "label of 64 octets"},
		{"name of 254 octets", name254, "", "", false, "254 octets"},
		{"empty label inside", "a..test", "", "", false, "empty label"},
		{"leading dot", ".example.com", "", "", false, "empty label"},
		{"two trailing dots", "example.com..", "", "", false, "empty label"},
		{"underscore", "_mta-sts.example.com", "", "", false, ""},
		{"space", "exa mple.com", "", "", false, ""},
		{"leading hyphen", "-a.test", "", "", false, "inner hyphens"},
		{"trailing hyphen", "a-.test", "", "", false, "inner hyphens"},
		{"address literal", "[192.0.2.1]", "", "", false, "address literal"},
		{"IPv6 literal", "[IPv6:2001:db8::1]", "", "", false, "address literal"},
		{"bare IPv4 address", "192.0.2.1", "", "", false, "IP address"},
		{"control character", "exa\x00mple.com", "", "", false, ""},
		{"bad Punycode", "xn--a.test", "", "", false, ""},
		{"Punycode that decodes to ASCII", "xn--bcher-kv.test", "", "", false, ""},
		{"U-label name too long in A-labels", strings.Repeat("ü", 60) + ".test", "", "", false, "label of"},
		{"huge input", strings.Repeat("a", 1<<20), "", "", false, "longer than"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := Parse(tt.in)
			if tt.ascii == "" {
				if err == nil {
					t.Fatalf("Parse(%q) = %q, want an error", tt.in, d.ASCII())
				}
				if !errors.Is(err, ErrInvalid) {
					t.Errorf("error %v does not wrap ErrInvalid", err)
				}
				if !strings.Contains(err.Error(), tt.wantErr) {
					t.Errorf("error %q does not mention %q", err, tt.wantErr)
				}
				if len(err.Error()) > 300 {
					t.Errorf("error message of %d bytes: the input must be clipped", len(err.Error()))
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse(%q): %v", tt.in, err)
			}
			if d.ASCII() != tt.ascii || d.String() != tt.ascii || d.Unicode() != tt.uni || d.IsIDN() != tt.idn {
				t.Errorf("Parse(%q) = ascii %q unicode %q idn %v, want %q %q %v", tt.in, d.ASCII(), d.Unicode(), d.IsIDN(), tt.ascii, tt.uni, tt.idn)
			}
			// Parsing either form again gives the same Domain.
			for _, again := range []string{d.ASCII(), d.Unicode()} {
				if d2, err := Parse(again); err != nil || d2 != d {
					t.Errorf("Parse(%q) = %+v, %v; want %+v", again, d2, err, d)
				}
			}
		})
	}
}

func TestIsLiteral(t *testing.T) {
	for in, want := range map[string]bool{
		"[192.0.2.1]": true, "[IPv6:::1]": true, "example.com": false, "[": false, "": false, "192.0.2.1": false,
	} {
		if got := IsLiteral(in); got != want {
			t.Errorf("IsLiteral(%q) = %v", in, got)
		}
	}
}

// A domain of 245 octets or more has no room for "_mta-sts." (9 octets):
// callers treat it as having no policy.
func TestCanPrefix(t *testing.T) {
	long := func(n int) Domain { // a valid name of exactly n octets
		var parts []string
		for n > 0 {
			l := min(n, 63)
			if n-l == 1 { // avoid a 1-octet remainder that needs 2 with the dot
				l--
			}
			parts = append(parts, strings.Repeat("a", l))
			n -= l
			if n > 0 {
				n-- // the dot
			}
		}
		d := MustParse(strings.Join(parts, "."))
		if len(d.ASCII()) != len(strings.Join(parts, ".")) {
			t.Fatal("length")
		}
		return d
	}
	tests := []struct {
		name  string
		d     Domain
		label string
		want  bool
	}{
		{"short domain", MustParse("example.com"), "_mta-sts", true},
		{"two labels", MustParse("example.com"), "_smtp._tls", true},
		{"244-octet domain fits _mta-sts", long(244), "_mta-sts", true},
		{"245-octet domain does not fit _mta-sts", long(245), "_mta-sts", false},
		{"253-octet domain", long(253), "_mta-sts", false},
		{"243-octet domain does not fit _smtp._tls", long(243), "_smtp._tls", false},
		{"242-octet domain fits _smtp._tls", long(242), "_smtp._tls", true},
		{"empty label", MustParse("example.com"), "", false},
		{"empty inner label", MustParse("example.com"), "a..b", false},
		{"label over 63", MustParse("example.com"), strings.Repeat("x", 64), false},
		{"zero Domain", Domain{}, "_mta-sts", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := CanPrefix(tt.d, tt.label); got != tt.want {
				t.Errorf("CanPrefix(%d octets, %q) = %v, want %v", len(tt.d.ASCII()), tt.label, got, tt.want)
			}
		})
	}
}

func TestFileName(t *testing.T) {
	long := strings.Repeat("a", 63) + "." + strings.Repeat("b", 63) + "." + strings.Repeat("c", 63) + "." + strings.Repeat("d", 61)
	tests := []struct {
		name, in string
		same     bool // returned unchanged
	}{
		{"short safe name", "example.com", true},
		{"IDN A-label", "xn--bcher-kva.test", true},
		{"200 octets", strings.Repeat("a", 200), true},
		{"240-octet domain", long[:240], false},
		{"253-octet domain", long, false},
		{"upper case", "Example.com", false},
		{"slash", "a/b", false},
		{"dot dot", "..", false},
		{"dot", ".", false},
		{"leading dot", ".hidden", false},
		{"percent", "a%2fb", false},
		{"NUL", "a\x00b", false},
		{"empty", "", false},
		{"U-label", "bücher.test", false},
	}
	seen := map[string]string{}
	dir := t.TempDir()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := FileName(tt.in)
			if (got == tt.in) != tt.same {
				t.Errorf("FileName(%q) = %q", tt.in, got)
			}
			if got == "" || got == "." || got == ".." || len(got) > MaxFileNameLen || strings.ContainsAny(got, "/\x00") || got != strings.ToLower(got) {
				t.Errorf("FileName(%q) = %q is not a safe name", tt.in, got)
			}
			if FileName(tt.in) != got {
				t.Error("not deterministic")
			}
			if prev, ok := seen[got]; ok {
				t.Errorf("FileName(%q) = FileName(%q) = %q", tt.in, prev, got)
			}
			seen[got] = tt.in
			// The name, with the prefix and suffix callers add, can be
			// created on this file system.
			if err := os.WriteFile(filepath.Join(dir, "1773446400_"+got+".json"), nil, 0o600); err != nil {
				t.Error(err)
			}
		})
	}
}

func TestDomainJSON(t *testing.T) {
	type doc struct {
		D Domain `json:"d"`
		E Domain `json:"e"`
	}
	data, err := json.Marshal(doc{D: MustParse("bücher.test")})
	if err != nil || string(data) != `{"d":"xn--bcher-kva.test","e":""}` {
		t.Fatalf("Marshal = %s, %v", data, err)
	}
	var back doc
	if err := json.Unmarshal(data, &back); err != nil || back.D.Unicode() != "bücher.test" || !back.E.IsZero() {
		t.Fatalf("Unmarshal = %+v, %v", back, err)
	}
	if err := json.Unmarshal([]byte(`{"d":"a..b"}`), &back); err == nil {
		t.Error("invalid name accepted")
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"example.com", "bücher.test", "xn--bcher-kva.test", "a..b", "[1.2.3.4]", "ＥＸ.test"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		d, err := Parse(s)
		if err != nil {
			return
		}
		a := d.ASCII()
		if a == "" || len(a) > MaxNameLen || a != strings.ToLower(a) || strings.HasSuffix(a, ".") {
			t.Fatalf("Parse(%q) = %q", s, a)
		}
		d2, err := Parse(a)
		if err != nil || d2 != d {
			t.Fatalf("Parse(Parse(%q).ASCII()) = %+v, %v; want %+v", s, d2, err, d)
		}
		if fn := FileName(a); len(fn) > MaxFileNameLen {
			t.Fatalf("FileName too long")
		}
	})
}
