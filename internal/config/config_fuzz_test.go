package config

import (
	"bytes"
	"os"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"
)

// FuzzParse: the loader on arbitrary TOML. It must never panic; an error
// names the file ("config F…", one line); a configuration it accepts
// survives a round trip through TOML (as the e2e harness writes its
// configurations) unchanged.
func FuzzParse(f *testing.F) {
	if data, err := os.ReadFile("../../config.example.toml"); err == nil {
		f.Add(data)
	}
	for _, s := range []string{
		"",
		"hostname = \"relay.example.net\"\n[delivery]\ndata_timeout = \"1s\"\nshutdown_timeout = \"2s\"\n",
		"[submission]\ntrusted_networks = [\"10.0.0.0/8\", \"::ffff:10.1.2.3\"]\n",
		"[queue]\nretry_schedule = [\"5m\", 10]\n",
		"[delivery]\ncommand_timeout = 5\n",
		"[[submission.users]]\nusername = \"a\"\npassword_hash = \"$2a$10$abc\"\n",
		"[dns]\nservers = [\"[::1]:53\"]\ntrust_ad = \"always\"\n",
		"unknown = 1\n",
		"[log]\nlevel = \"debug\"\nformat = \"console\"\noutput = \"stdout\"\n",
		"a.b.c = 1\n[a]\n",
		"[submission]\nmax_message_bytes = 9223372036854775807\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		const path = "fuzz.toml"
		cfg, err := Parse(path, data)
		if err != nil {
			msg := err.Error()
			if !strings.HasPrefix(msg, "config "+path) {
				t.Fatalf("error does not name the file: %q", msg)
			}
			return
		}
		if cfg.Path != path {
			t.Fatalf("Path %q", cfg.Path)
		}
		out, err := toml.Marshal(cfg)
		if err != nil {
			t.Fatalf("an accepted configuration does not marshal: %v", err)
		}
		again, err := Parse(path, out)
		if err != nil {
			t.Fatalf("an accepted configuration does not parse after a round trip: %v\n%s", err, out)
		}
		out2, err := toml.Marshal(again)
		if err != nil || !bytes.Equal(out, out2) {
			t.Fatalf("configuration changed through a round trip (%v):\n%s\n---\n%s", err, out, out2)
		}
	})
}
