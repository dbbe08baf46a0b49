package atomicfile

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestWriteReplaces(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state.json")
	if err := Write(path, []byte("one")); err != nil {
		t.Fatal(err)
	}
	if err := Write(path, []byte("two")); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(path); err != nil || string(b) != "two" {
		t.Fatalf("contents = %q, %v; want two", b, err)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(ents) != 1 {
		t.Fatalf("directory holds %d entries, want only the target (no temporary left)", len(ents))
	}
}

func TestWriteNoDirLeavesTargetAlone(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "missing", "state.json")
	if err := Write(path, []byte("x")); err == nil {
		t.Fatal("Write into a missing directory succeeded")
	}
	// A rename that fails leaves no temporary behind.
	target := filepath.Join(dir, "target")
	if err := os.Mkdir(target, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(target, "f"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := WriteNoDirSync(target, []byte("x")); err == nil {
		t.Fatal("rename over a non-empty directory succeeded")
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if IsTemp(e.Name()) {
			t.Fatalf("temporary %s left after a failed write", e.Name())
		}
	}
}

func TestIsTemp(t *testing.T) {
	for name, want := range map[string]bool{
		".state.json.123.tmp": true,
		"state.json":          false,
		".state.json":         false,
		"state.tmp":           false,
	} {
		if IsTemp(name) != want {
			t.Errorf("IsTemp(%q) = %v", name, !want)
		}
	}
}

func TestReadDirJSON(t *testing.T) {
	dir := t.TempDir()
	for name, data := range map[string]string{
		"b.json":            `{"b":1}`,
		"a.json":            `{"a":1}`,
		".hidden.json":      `{}`,
		"notes.txt":         "x",
		".a.json.99999.tmp": "partial",
	} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "sub.json"), 0o755); err != nil {
		t.Fatal(err)
	}
	var got []string
	err := ReadDirJSON(dir, func(path string, data []byte, err error) error {
		if err != nil {
			return err
		}
		got = append(got, filepath.Base(path)+"="+string(data))
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{`a.json={"a":1}`, `b.json={"b":1}`}; !slices.Equal(got, want) {
		t.Fatalf("read %q, want %q", got, want)
	}
	if _, err := os.Stat(filepath.Join(dir, ".a.json.99999.tmp")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("leftover temporary not removed: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "notes.txt")); err != nil {
		t.Fatalf("other file touched: %v", err)
	}

	// fn's error stops the walk and comes back.
	stop := errors.New("stop")
	n := 0
	err = ReadDirJSON(dir, func(string, []byte, error) error { n++; return stop })
	if !errors.Is(err, stop) || n != 1 {
		t.Fatalf("ReadDirJSON = %v after %d calls, want stop after 1", err, n)
	}
	if err := ReadDirJSON(filepath.Join(dir, "none"), func(string, []byte, error) error { return nil }); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing directory: %v", err)
	}
}

func TestSyncDir(t *testing.T) {
	if err := SyncDir(t.TempDir()); err != nil {
		t.Fatal(err)
	}
	if err := SyncDir(filepath.Join(t.TempDir(), "none")); err == nil {
		t.Fatal("SyncDir of a missing directory succeeded")
	}
}
