package smtpclient

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"testing/iotest"
)

func newTestReader(s string, maxLine, maxLines int) *replyReader {
	return &replyReader{br: bufio.NewReaderSize(strings.NewReader(s), 16), maxLine: maxLine, maxLines: maxLines}
}

func TestReadReply(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		in       string
		enhanced bool
		want     Reply
		proto    bool // want a *ProtocolError
	}{
		{"single line", "250 ok\r\n", false, Reply{Code: 250, Lines: []string{"ok"}}, false},
		{"code only (RFC 5321 §4.2: text optional)", "250\r\n", false, Reply{Code: 250, Lines: []string{""}}, false},
		{"multiline", "250-a\r\n250-b\r\n250 c\r\n", false, Reply{Code: 250, Lines: []string{"a", "b", "c"}}, false},
		{"bare LF line ends tolerated", "250-a\n250 b\n", false, Reply{Code: 250, Lines: []string{"a", "b"}}, false},
		{"enhanced code on every line (RFC 2034 §4)", "550-5.1.1 no\r\n550 5.1.1 user\r\n", true,
			Reply{Code: 550, Enhanced: "5.1.1", Lines: []string{"no", "user"}}, false},
		{"enhanced code on the last line only (go-smtp)", "250-a\r\n250 2.0.0 b\r\n", true,
			Reply{Code: 250, Enhanced: "2.0.0", Lines: []string{"a", "b"}}, false},
		{"enhanced code not parsed unless advertised", "550 5.1.1 no\r\n", false,
			Reply{Code: 550, Lines: []string{"5.1.1 no"}}, false},
		{"enhanced class must match the reply (RFC 3463 §3.1)", "550 2.1.1 odd\r\n", true,
			Reply{Code: 550, Lines: []string{"2.1.1 odd"}}, false},
		{"enhanced code with three-digit parts", "451 4.123.456 x\r\n", true,
			Reply{Code: 451, Enhanced: "4.123.456", Lines: []string{"x"}}, false},
		{"four-digit subject is not an enhanced code", "451 4.1234.5 x\r\n", true,
			Reply{Code: 451, Lines: []string{"4.1234.5 x"}}, false},
		{"control characters are replaced", "250 a\x1b[31mb\x00\r\n", false, Reply{Code: 250, Lines: []string{"a?[31mb?"}}, false},
		{"invalid UTF-8 is replaced", "250 a\xffb\r\n", false, Reply{Code: 250, Lines: []string{"a\ufffdb"}}, false},
		{"code changes within a reply", "250-a\r\n251 b\r\n", false, Reply{}, true},
		{"first digit out of range", "650 x\r\n", false, Reply{}, true},
		{"second digit out of range", "260 x\r\n", false, Reply{}, true},
		{"bad separator", "250_x\r\n", false, Reply{}, true},
		{"short line", "25\r\n", false, Reply{}, true},
		{"line too long", "250 " + strings.Repeat("x", 61) + "\r\n", false, Reply{}, true},
		{"too many lines", strings.Repeat("250-x\r\n", 5) + "250 x\r\n", false, Reply{}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := newTestReader(tt.in, 64, 5)
			got, err := r.readReply(tt.enhanced)
			var pe *ProtocolError
			if tt.proto {
				if !errors.As(err, &pe) {
					t.Fatalf("err = %v, want protocol error", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.Code != tt.want.Code || got.Enhanced != tt.want.Enhanced || strings.Join(got.Lines, "|") != strings.Join(tt.want.Lines, "|") {
				t.Errorf("got %#v, want %#v", got, tt.want)
			}
		})
	}
}

func TestReadReplyTruncated(t *testing.T) {
	t.Parallel()
	for _, in := range []string{"", "250-a\r\n", "250 no end"} {
		r := newTestReader(in, 64, 5)
		if _, err := r.readReply(false); !errors.Is(err, io.EOF) {
			t.Errorf("%q: err = %v, want EOF", in, err)
		}
	}
}

// TestReadLineBounded: a line without end is refused after reading about
// maxLine bytes, not after reading all of it.
func TestReadLineBounded(t *testing.T) {
	t.Parallel()
	src := &countingReader{r: io.LimitReader(zeros{}, 1<<30)}
	r := &replyReader{br: bufio.NewReaderSize(src, 4096), maxLine: 4096, maxLines: 10}
	var pe *ProtocolError
	if _, err := r.readReply(false); !errors.As(err, &pe) {
		t.Fatalf("err = %v", err)
	}
	if src.n > 3*4096 {
		t.Errorf("read %d bytes before refusing", src.n)
	}
}

type zeros struct{}

func (zeros) Read(p []byte) (int, error) {
	for i := range p {
		p[i] = '2'
	}
	return len(p), nil
}

type countingReader struct {
	r io.Reader
	n int
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += n
	return n, err
}

func TestParseExtensions(t *testing.T) {
	t.Parallel()
	lines := []string{"mx.test greets you", "PIPELINING", "size 1000", "AUTH PLAIN LOGIN", "bad_kw x",
		"-DASH", strings.Repeat("K", 65), "LONGPARAM " + strings.Repeat("p", 513), "pipelining again", "8BITMIME"}
	ext, size := parseExtensions(lines)
	want := map[string]string{"PIPELINING": "", "SIZE": "1000", "AUTH": "PLAIN LOGIN", "8BITMIME": ""}
	if len(ext) != len(want) {
		t.Errorf("ext = %q, want %q", ext, want)
	}
	for k, v := range want {
		if ext[k] != v {
			t.Errorf("ext[%s] = %q, want %q", k, ext[k], v)
		}
	}
	if size != 1000 {
		t.Errorf("size = %d", size)
	}
	many := []string{"mx"}
	for range 500 {
		many = append(many, "X"+strings.Repeat("A", len(many)%60)+string(rune('A'+len(many)%26)))
	}
	if ext, _ := parseExtensions(many); len(ext) > maxExtensions {
		t.Errorf("%d extensions kept", len(ext))
	}
}

func TestNormalize(t *testing.T) {
	t.Parallel()
	tests := []struct{ name, in, bdat, data string }{
		{"empty", "", "", ""},
		{"CRLF kept", "a\r\nb\r\n", "a\r\nb\r\n", "a\r\nb\r\n"},
		{"bare LF", "a\nb\n", "a\r\nb\r\n", "a\r\nb\r\n"},
		{"bare CR", "a\rb\r", "a\r\nb\r\n", "a\r\nb\r\n"},
		{"CR CR LF is two line ends", "a\r\r\nb", "a\r\n\r\nb\r\n", "a\r\n\r\nb\r\n"},
		{"final CRLF added", "a", "a\r\n", "a\r\n"},
		{"dot at start", ".a\r\n", ".a\r\n", "..a\r\n"},
		{"CR dot CRLF", "x\r.\r\n", "x\r\n.\r\n", "x\r\n..\r\n"},
		{"LF dot LF", "x\n.\n", "x\r\n.\r\n", "x\r\n..\r\n"},
		{"dot mid-line untouched", "a.b\r\n", "a.b\r\n", "a.b\r\n"},
		{"LF CR", "a\n\rb", "a\r\n\r\nb\r\n", "a\r\n\r\nb\r\n"},
		{"trailing bare CR", "a\r", "a\r\n", "a\r\n"},
	}
	readers := map[string]func(io.Reader) io.Reader{
		"whole":   func(r io.Reader) io.Reader { return r },
		"onebyte": iotest.OneByteReader,
		"half":    iotest.HalfReader,
	}
	for _, tt := range tests {
		for rname, wrap := range readers {
			got, err := io.ReadAll(Normalize(wrap(strings.NewReader(tt.in))))
			if err != nil || string(got) != tt.bdat {
				t.Errorf("%s/%s: Normalize = %q, %v; want %q", tt.name, rname, got, err, tt.bdat)
			}
			got, err = io.ReadAll(iotest.OneByteReader(newNormReader(wrap(strings.NewReader(tt.in)), true)))
			if err != nil || string(got) != tt.data {
				t.Errorf("%s/%s: dot-stuffed = %q, %v; want %q", tt.name, rname, got, err, tt.data)
			}
		}
		n, err := NormalizedSize(strings.NewReader(tt.in))
		if err != nil || n != int64(len(tt.bdat)) {
			t.Errorf("%s: NormalizedSize = %d, %v; want %d", tt.name, n, err, len(tt.bdat))
		}
	}
}

func TestNormalizeReadError(t *testing.T) {
	t.Parallel()
	boom := errors.New("disk gone")
	_, err := io.ReadAll(Normalize(io.MultiReader(strings.NewReader("abc"), iotest.ErrReader(boom))))
	var be *BodyError
	if !errors.As(err, &be) || !errors.Is(err, boom) {
		t.Errorf("err = %v, want BodyError wrapping %v", err, boom)
	}
}

// FuzzReadReply: whatever the bytes, the parser returns a well-formed
// reply within the bounds, or an error; it never panics.
func FuzzReadReply(f *testing.F) {
	for _, s := range []string{"250 ok\r\n", "250-a\r\n250 2.0.0 b\r\n", "550 5.1.1 x\r\n", "25", "250-\n250 \n", "421-4.3.2 a\r\n421 4.3.2 b\r\n"} {
		f.Add([]byte(s), true)
	}
	f.Fuzz(func(t *testing.T, data []byte, enhanced bool) {
		const maxLine, maxLines = 128, 8
		r := &replyReader{br: bufio.NewReaderSize(bytes.NewReader(data), 16), maxLine: maxLine, maxLines: maxLines}
		for range 100 {
			rep, err := r.readReply(enhanced)
			if err != nil {
				return
			}
			if rep.Code < 200 || rep.Code > 559 {
				t.Fatalf("code %d", rep.Code)
			}
			if len(rep.Lines) == 0 || len(rep.Lines) > maxLines {
				t.Fatalf("%d lines", len(rep.Lines))
			}
			for _, l := range rep.Lines {
				if len(l) > 3*maxLine {
					t.Fatalf("line of %d bytes", len(l))
				}
				if strings.ContainsAny(l, "\r\n\x00") {
					t.Fatalf("control characters in %q", l)
				}
			}
			if rep.Enhanced != "" {
				if !enhanced {
					t.Fatal("enhanced code without ENHANCEDSTATUSCODES")
				}
				if int(rep.Enhanced[0]-'0') != rep.Code/100 {
					t.Fatalf("enhanced %s with code %d", rep.Enhanced, rep.Code)
				}
			}
		}
	})
}
