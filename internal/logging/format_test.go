package logging

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/internal/config"
)

// JSON lines with "ts" in RFC 3339 UTC, "level" and "msg", appended to a
// file that already has lines.
func TestJSONToFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "relay.log")
	if err := os.WriteFile(path, []byte("earlier\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	log, closeFn, err := New(config.Log{Level: "warn", Output: path})
	if err != nil {
		t.Fatal(err)
	}
	log.Info("below the level")
	log.Warn("queue_full", zap.String("domain", "example.com"))
	closeFn()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
	if len(lines) != 2 || lines[0] != "earlier" {
		t.Fatalf("file = %q, want the earlier line and one entry", b)
	}
	var e map[string]any
	if err := json.Unmarshal([]byte(lines[1]), &e); err != nil {
		t.Fatalf("not JSON: %q: %v", lines[1], err)
	}
	if e["level"] != "warn" || e["msg"] != "queue_full" || e["domain"] != "example.com" {
		t.Fatalf("entry = %v", e)
	}
	ts, _ := e["ts"].(string)
	if tm, err := time.Parse(time.RFC3339Nano, ts); err != nil || !strings.HasSuffix(ts, "Z") || time.Since(tm) > time.Minute {
		t.Fatalf("ts = %q (%v), want RFC 3339 UTC of now", ts, err)
	}
}

func TestConsoleFormat(t *testing.T) {
	path := filepath.Join(t.TempDir(), "relay.log")
	log, closeFn, err := New(config.Log{Level: "info", Format: "console", Output: path})
	if err != nil {
		t.Fatal(err)
	}
	log.Info("started", zap.Int("workers", 3))
	closeFn()
	b, _ := os.ReadFile(path)
	s := string(b)
	if strings.HasPrefix(s, "{") || !strings.Contains(s, "\tinfo\tstarted\t") || !strings.Contains(s, `"workers": 3`) {
		t.Fatalf("console line = %q", s)
	}
}

func TestNewErrors(t *testing.T) {
	if _, _, err := New(config.Log{Level: "loud"}); err == nil || !strings.Contains(err.Error(), "log.level") {
		t.Fatalf("bad level: %v", err)
	}
	bad := filepath.Join(t.TempDir(), "no", "such", "dir", "log")
	if _, _, err := New(config.Log{Level: "info", Output: bad}); err == nil || !strings.Contains(err.Error(), "log.output") {
		t.Fatalf("unwritable output: %v", err)
	}
}
