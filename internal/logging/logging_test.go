package logging

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap/zapcore"

	"github.com/stsrelay/stsrelay/internal/config"
)

func TestParseLevel(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want zapcore.Level
		ok   bool
	}{
		{"debug", zapcore.DebugLevel, true},
		{"info", zapcore.InfoLevel, true},
		{"warn", zapcore.WarnLevel, true},
		{"error", zapcore.ErrorLevel, true},
		{"loud", 0, false},
	} {
		got, err := ParseLevel(tc.in)
		if (err == nil) != tc.ok || (tc.ok && got != tc.want) {
			t.Errorf("ParseLevel(%q) = %v, %v", tc.in, got, err)
		}
	}
}

// A reload changes the level of the logger in use.
func TestNewLeveledChangesLevel(t *testing.T) {
	path := filepath.Join(t.TempDir(), "log")
	log, level, closeFn, err := NewLeveled(config.Log{Level: "info", Format: "json", Output: path})
	if err != nil {
		t.Fatal(err)
	}
	log.Debug("hidden")
	level.SetLevel(zapcore.DebugLevel)
	log.Debug("shown")
	closeFn()
	b, _ := os.ReadFile(path)
	if s := string(b); strings.Contains(s, "hidden") || !strings.Contains(s, "shown") {
		t.Errorf("log = %q", s)
	}
}

// NewWriter writes the same JSON lines to any writer.
func TestNewWriter(t *testing.T) {
	var b strings.Builder
	log, level, err := NewWriter(config.Log{Level: "info"}, &b)
	if err != nil {
		t.Fatal(err)
	}
	log.Debug("hidden")
	level.SetLevel(zapcore.DebugLevel)
	log.Debug("shown")
	if s := b.String(); strings.Contains(s, "hidden") || !strings.HasPrefix(s, `{"level":"debug","ts":"`) || !strings.Contains(s, `"msg":"shown"`) {
		t.Errorf("log = %q", s)
	}
	if _, _, err := NewWriter(config.Log{Level: "loud"}, &b); err == nil {
		t.Error("bad level accepted")
	}
}
