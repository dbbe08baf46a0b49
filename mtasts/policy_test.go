package mtasts

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
	"time"
)

const basePolicy = "version: STSv1\nmode: enforce\nmx: mx1.ex.test\nmax_age: 86400\n"

func TestParsePolicyValid(t *testing.T) {
	tests := []struct {
		name   string
		in     string
		mode   Mode
		mx     []string
		maxAge time.Duration
	}{
		{"LF", basePolicy, ModeEnforce, []string{"mx1.ex.test"}, 86400 * time.Second},
		{"CRLF", strings.ReplaceAll(basePolicy, "\n", "\r\n"), ModeEnforce, []string{"mx1.ex.test"}, 86400 * time.Second},
		{"mixed LF and CRLF", "version: STSv1\r\nmode: enforce\nmx: mx1.ex.test\r\nmax_age: 86400", ModeEnforce, []string{"mx1.ex.test"}, 86400 * time.Second},
		{"no final newline (errata 6253)", strings.TrimSuffix(basePolicy, "\n"), ModeEnforce, []string{"mx1.ex.test"}, 86400 * time.Second},
		{"no space after colon", "version:STSv1\nmode:enforce\nmx:mx1.ex.test\nmax_age:86400", ModeEnforce, []string{"mx1.ex.test"}, 86400 * time.Second},
		{"tab after colon", "version:\tSTSv1\nmode:\tenforce\nmx:\tmx1.ex.test\nmax_age:\t86400\n", ModeEnforce, []string{"mx1.ex.test"}, 86400 * time.Second},
		{"trailing WSP on values", "version: STSv1 \nmode: enforce\t\nmx: *.example.com \nmax_age: 86400  \n", ModeEnforce, []string{"*.example.com"}, 86400 * time.Second},
		{"example from RFC 8461 §3.2", "version: STSv1\nmode: enforce\nmx: mail.example.com\nmx: *.example.net\nmx: backupmx.example.com\nmax_age: 604800\n",
			ModeEnforce, []string{"mail.example.com", "*.example.net", "backupmx.example.com"}, 604800 * time.Second},
		{"field order free", "max_age: 10\nmx: a.test\nmode: testing\nversion: STSv1\n", ModeTesting, []string{"a.test"}, 10 * time.Second},
		{"unknown key ignored", basePolicy + "foo: bar\n", ModeEnforce, []string{"mx1.ex.test"}, 86400 * time.Second},
		{"extension with spaces and UTF-8", basePolicy + "more: ext e  ns ion ünï\n", ModeEnforce, []string{"mx1.ex.test"}, 86400 * time.Second},
		{"duplicate mode: first wins", "version: STSv1\nmode: testing\nmode: enforce\nmx: a.test\nmax_age: 5\n", ModeTesting, []string{"a.test"}, 5 * time.Second},
		{"duplicate max_age: first wins", "version: STSv1\nmode: enforce\nmax_age: 5\nmax_age: 7\nmx: a.test\n", ModeEnforce, []string{"a.test"}, 5 * time.Second},
		{"duplicate version", "version: STSv1\nversion: STSv1\nmode: none\nmax_age: 5\n", ModeNone, nil, 5 * time.Second},
		{"mx lines accumulate", "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 5\nmx: *.b.test\n", ModeEnforce, []string{"a.test", "*.b.test"}, 5 * time.Second},
		{"mode none without mx", "version: STSv1\nmode: none\nmax_age: 86400\n", ModeNone, nil, 86400 * time.Second},
		{"mode testing", strings.Replace(basePolicy, "enforce", "testing", 1), ModeTesting, []string{"mx1.ex.test"}, 86400 * time.Second},
		{"max_age 0", "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 0\n", ModeEnforce, []string{"a.test"}, 0},
		{"max_age at maximum", "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557600\n", ModeEnforce, []string{"a.test"}, MaxMaxAge},
		{"max_age 31557601 capped (errata 7282)", "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601\n", ModeEnforce, []string{"a.test"}, MaxMaxAge},
		{"max_age 10 nines capped, no overflow", "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 9999999999\n", ModeEnforce, []string{"a.test"}, MaxMaxAge},
		{"max_age leading zeros", "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 0000000060\n", ModeEnforce, []string{"a.test"}, time.Minute},
		{"trailing blank lines accepted (lenient)", basePolicy + "\n\n", ModeEnforce, []string{"mx1.ex.test"}, 86400 * time.Second},
		{"trailing CRLF blank lines accepted", strings.ReplaceAll(basePolicy, "\n", "\r\n") + "\r\n \r\n", ModeEnforce, []string{"mx1.ex.test"}, 86400 * time.Second},
		{"mx trailing dot ignored", "version: STSv1\nmode: enforce\nmx: a.test.\nmax_age: 5\n", ModeEnforce, []string{"a.test."}, 5 * time.Second},
		{"mx A-label", "version: STSv1\nmode: enforce\nmx: xn--bcher-kva.test\nmax_age: 5\n", ModeEnforce, []string{"xn--bcher-kva.test"}, 5 * time.Second},
		{"mx single label, digits first", "version: STSv1\nmode: enforce\nmx: 1mx\nmx: *.com\nmax_age: 5\n", ModeEnforce, []string{"1mx", "*.com"}, 5 * time.Second},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p, err := ParsePolicy([]byte(tc.in))
			if err != nil {
				t.Fatalf("ParsePolicy: %v", err)
			}
			if p.Mode != tc.mode || !reflect.DeepEqual(p.MX, tc.mx) || p.MaxAge != tc.maxAge {
				t.Errorf("got mode %q mx %q max_age %v, want %q %q %v", p.Mode, p.MX, p.MaxAge, tc.mode, tc.mx, tc.maxAge)
			}
			if len(p.pats) != len(p.MX) {
				t.Errorf("patterns not precomputed: %d for %d mx", len(p.pats), len(p.MX))
			}
		})
	}
}

func TestParsePolicyLineEndingsEquivalent(t *testing.T) {
	lf := "version: STSv1\nmode: enforce\nmx: a.test\nmx: *.b.test\nmax_age: 600\n"
	variants := map[string]string{
		"LF":              lf,
		"CRLF":            strings.ReplaceAll(lf, "\n", "\r\n"),
		"mixed":           "version: STSv1\r\nmode: enforce\nmx: a.test\r\nmx: *.b.test\nmax_age: 600\r\n",
		"no final LF":     strings.TrimSuffix(lf, "\n"),
		"no final CRLF":   strings.TrimSuffix(strings.ReplaceAll(lf, "\n", "\r\n"), "\r\n"),
		"trailing blanks": lf + "\n\r\n",
	}
	want, err := ParsePolicy([]byte(lf))
	if err != nil {
		t.Fatal(err)
	}
	for name, v := range variants {
		p, err := ParsePolicy([]byte(v))
		if err != nil {
			t.Errorf("%s: %v", name, err)
			continue
		}
		if !reflect.DeepEqual(p, want) {
			t.Errorf("%s: %+v, want %+v", name, p, want)
		}
	}
	if !reflect.DeepEqual(want.Lines, []string{"version: STSv1", "mode: enforce", "mx: a.test", "mx: *.b.test", "max_age: 600"}) {
		t.Errorf("Lines = %q", want.Lines)
	}
}

func TestParsePolicyInvalid(t *testing.T) {
	const v, m, a = "version: STSv1\n", "mode: enforce\n", "max_age: 86400\n"
	const x = "mx: mx1.ex.test\n"
	tests := []struct {
		name string
		in   string
		line int    // 0: whole policy
		msg  string // part of the message
	}{
		{"empty", "", 0, "empty"},
		{"only blank lines", "\n\n", 0, "blank"},
		{"garbage", "garbage", 1, "no \":\""},
		{"BOM", "\ufeff" + basePolicy, 1, "byte order mark"},
		{"CR alone is not a terminator", "version: STSv1\rmode: enforce\rmx: a.test\rmax_age: 5\r", 1, "carriage return"},
		{"bare CR at the end", basePolicy[:len(basePolicy)-1] + "\r", 4, "carriage return"},
		{"version STSv0", "version: STSv0\n" + m + x + a, 1, "STSv1"},
		{"version STSv10", "version: STSv10\n" + m + x + a, 1, "STSv1"},
		{"version STSv2", "version: STSv2\n" + m + x + a, 1, "STSv1"},
		{"version lower case", "version: stsv1\n" + m + x + a, 1, "STSv1"},
		{"missing version", m + x + a, 0, "version"},
		{"missing mode", v + x + a, 0, "mode"},
		{"missing max_age", v + m + x, 0, "max_age"},
		{"mode bad", v + "mode: bad\n" + x + a, 2, "mode"},
		{"mode Enforce (case-sensitive)", v + "mode: Enforce\n" + x + a, 2, "mode"},
		{"mode strict", v + "mode: strict\n" + x + a, 2, "mode"},
		{"mode without colon", v + "mode none\n" + a, 2, "no \":\""},
		{"empty key", v + m + x + a + ": 8600\n", 5, "empty key"},
		{"max_age letters", v + m + x + "max_age: xxx\n", 4, "max_age"},
		{"max_age 11 digits", v + m + x + "max_age: 12345678901\n", 4, "max_age"},
		{"max_age negative", v + m + x + "max_age: -1\n", 4, "max_age"},
		{"max_age exponent", v + m + x + "max_age: 1e5\n", 4, "max_age"},
		{"max_age empty", v + m + x + "max_age:\n", 4, "max_age"},
		{"mx empty", v + m + "mx:\n" + a, 3, "empty"},
		{"two mx on one line", v + m + "mx: a.test, b.test\n" + a, 3, "one pattern"},
		{"two mx with space", v + m + "mx: a.test b.test\n" + a, 3, "one pattern"},
		{"mx *.*.x", v + m + "mx: *.*.example\n" + a, 3, "leftmost"},
		{"mx **.x", v + m + "mx: **.example\n" + a, 3, "leftmost"},
		{"mx mx*.x", v + m + "mx: mx*.example\n" + a, 3, "leftmost"},
		{"mx *example.com", v + m + "mx: *example.com\n" + a, 3, "leftmost"},
		{"mx lone *", v + m + "mx: *\n" + a, 3, "leftmost"},
		{"mx label ending with -", v + m + "mx: test.example-\n" + a, 3, "letter or digit"},
		{"mx **.x-", v + m + "mx: **.example-\n" + a, 3, "mx"},
		{"mx empty label", v + m + "mx: a..test\n" + a, 3, "empty label"},
		{"mx leading dot", v + m + "mx: .aa.b.cc.com\n" + a, 3, "empty label"},
		{"mx U-label", v + m + "mx: møx.example\n" + a, 3, "A-label"},
		{"mx underscore", v + m + "mx: a_b.test\n" + a, 3, "invalid character"},
		{"mx label over 63", v + m + "mx: " + strings.Repeat("a", 64) + ".test\n" + a, 3, "63"},
		{"enforce without mx", v + m + a, 0, "requires at least one"},
		{"testing without mx", v + "mode: testing\n" + a, 0, "requires at least one"},
		{"extension empty value", basePolicy + "ext:\n", 5, "empty value"},
		{"extension name over 32", basePolicy + strings.Repeat("e", 33) + ": x\n", 5, "invalid key"},
		{"extension name starting with _", basePolicy + "_bad: x\n", 5, "invalid key"},
		{"extension control char", basePolicy + "ext: a\x01b\n", 5, "control"},
		{"extension invalid UTF-8", basePolicy + "ext: a\xffb\n", 5, "UTF-8"},
		{"leading whitespace before key", v + " mode: enforce\n" + x + a, 2, "whitespace before"},
		{"blank line in the middle", v + m + "\n" + x + a, 3, "blank line"},
		{"leading blank line", "\n" + basePolicy, 1, "blank line"},
		{"duplicate mode still checked", v + m + "mode: bogus\n" + x + a, 3, "mode"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p, err := ParsePolicy([]byte(tc.in))
			if err == nil {
				t.Fatalf("ParsePolicy(%q) = %+v, want error", tc.in, p)
			}
			if !errors.Is(err, ErrPolicySyntax) {
				t.Errorf("error %v does not wrap ErrPolicySyntax", err)
			}
			var se *SyntaxError
			if !errors.As(err, &se) {
				t.Fatalf("error %T is not a *SyntaxError", err)
			}
			if se.Line != tc.line {
				t.Errorf("line = %d, want %d (%v)", se.Line, tc.line, err)
			}
			if !strings.Contains(err.Error(), tc.msg) {
				t.Errorf("error %q does not mention %q", err, tc.msg)
			}
			if tc.line > 0 && !strings.Contains(err.Error(), fmt.Sprintf("line %d:", tc.line)) {
				t.Errorf("error %q does not name line %d", err, tc.line)
			}
		})
	}
}

func TestParsePolicyULabelSuggestsALabel(t *testing.T) {
	_, err := ParsePolicy([]byte("version: STSv1\nmode: enforce\nmx: *.bücher.test\nmax_age: 5\n"))
	if err == nil || !strings.Contains(err.Error(), `"*.xn--bcher-kva.test"`) {
		t.Fatalf("err = %v, want a suggestion of the A-label", err)
	}
}

func TestParsePolicyAllProblems(t *testing.T) {
	_, problems := parsePolicy([]byte("version: STSv2\nmode: bad\nmx: a,b\n"))
	var got []int
	for _, p := range problems {
		got = append(got, p.Line)
	}
	// lines 1-3, then the missing max_age (version and mode are there, if invalid)
	if !reflect.DeepEqual(got, []int{1, 2, 3, 0}) {
		t.Errorf("problem lines = %v (%v)", got, problems)
	}
}

var policySeeds = []string{
	basePolicy,
	strings.ReplaceAll(basePolicy, "\n", "\r\n"),
	"version: STSv1\nmode: none\nmax_age: 86400",
	"version:STSv1\nmode:\ttesting\nmx: *.example.com \nmx: a.example\nmax_age: 31557601\nmore: ext e  ns ion\n",
	"\ufeffversion: STSv1\n", "version: STSv1\rmode: enforce\r", "mode none", ": 8600", "mx: a.test, b.test",
	"version: STSv1\nmode: enforce\nmx: *.*.x\nmax_age: 1\n", "version: STSv1\nmode: enforce\nmx: møx.example\nmax_age: 1\n",
	basePolicy + "\n\n", "garbage", "",
}

// FuzzParsePolicy: never panics; a parsed policy is consistent (mode
// known, mx present unless none, max_age capped, every mx a valid
// pattern) and parses the same from its Lines joined with CRLF.
func FuzzParsePolicy(f *testing.F) {
	for _, s := range policySeeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := ParsePolicy(b)
		if err != nil {
			var se *SyntaxError
			if !errors.As(err, &se) || !errors.Is(err, ErrPolicySyntax) {
				t.Fatalf("error %v is not a SyntaxError", err)
			}
			return
		}
		switch p.Mode {
		case ModeEnforce, ModeTesting:
			if len(p.MX) == 0 {
				t.Fatalf("mode %s without mx accepted", p.Mode)
			}
		case ModeNone:
		default:
			t.Fatalf("mode %q accepted", p.Mode)
		}
		if p.MaxAge < 0 || p.MaxAge > MaxMaxAge {
			t.Fatalf("max_age %v out of range", p.MaxAge)
		}
		for i, m := range p.MX {
			if !p.Matches(strings.Replace(strings.TrimSuffix(m, "."), "*", "x", 1)) {
				t.Fatalf("pattern %d %q does not match its own instance", i, m)
			}
		}
		p2, err := ParsePolicy([]byte(strings.Join(p.Lines, "\r\n")))
		if err != nil {
			t.Fatalf("re-parse of lines: %v", err)
		}
		if !reflect.DeepEqual(p, p2) {
			t.Fatalf("re-parse differs: %+v vs %+v", p, p2)
		}
	})
}
