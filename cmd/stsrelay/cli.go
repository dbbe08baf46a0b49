package main

// What the commands share: flags, the configuration, the control client,
// and output safe for a terminal.

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"
	"unicode"
	"unicode/utf8"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/control"
)

const defaultConfig = "/etc/stsrelay/stsrelay.toml"

// parseFlags parses flags wherever they stand among the arguments
// ("queue show ID -json" and "queue -json show ID" alike) and returns the
// positional arguments.
func parseFlags(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, &usageError{err.Error()}
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

// commonFlags are -config and -json.
type commonFlags struct {
	config string
	json   bool
}

func newFlagSet(name string, cf *commonFlags) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.StringVar(&cf.config, "config", defaultConfig, "configuration file")
	fs.BoolVar(&cf.json, "json", false, "print JSON")
	return fs
}

func loadConfig(path string) (*config.Config, error) {
	return config.Load(path)
}

// termSafe is s as the CLI prints it in tables and text: as is when
// every rune is printable, else quoted with Go escapes (strconv.Quote), so
// that a remote server's reply, a policy file or an address cannot send
// escape sequences (ESC ] 0; … BEL retitles a terminal, and worse) or
// bidirectional overrides to the operator's terminal, nor break a table
// with a tab or newline.
func termSafe(s string) string {
	for _, r := range s {
		if r == utf8.RuneError || !unicode.IsPrint(r) {
			return strconv.Quote(s)
		}
	}
	return s
}

// jsonTermWriter is where -json output goes: encoding/json escapes C0
// controls (ESC included) but passes DEL and the C1 controls
// U+0080–U+009F through, which some terminals act on (U+009B is CSI); they
// become \u escapes here. json.Encoder hands over each value in one Write,
// so no rune is split between calls.
type jsonTermWriter struct{ w io.Writer }

func (j jsonTermWriter) Write(p []byte) (int, error) {
	var b []byte
	for i := 0; i < len(p); {
		r, n := utf8.DecodeRune(p[i:])
		if r == 0x7f || r >= 0x80 && r <= 0x9f {
			if b == nil {
				b = append(make([]byte, 0, len(p)+16), p[:i]...)
			}
			b = fmt.Appendf(b, `\u%04x`, r)
		} else if b != nil {
			b = append(b, p[i:i+n]...)
		}
		i += n
	}
	if b == nil {
		return j.w.Write(p)
	}
	if _, err := j.w.Write(b); err != nil {
		return 0, err
	}
	return len(p), nil
}

// jsonOut is the encoder for -json output on standard output.
func jsonOut() *json.Encoder {
	return json.NewEncoder(jsonTermWriter{os.Stdout})
}

// controlClient is the control API of the relay running on cfg.
func controlClient(cfg *config.Config) control.Client { return control.Client{DataDir: cfg.DataDir} }
