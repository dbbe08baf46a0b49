// Package atomicfile replaces small state files durably: write to a
// temporary file beside the target, fsync it, rename it over the target,
// fsync the directory. A crash leaves either the old or the new contents,
// never a mix, and once Write returns the new contents survive a crash.
package atomicfile

import (
	"os"
	"path/filepath"
	"strings"
)

// Write replaces path with data. The temporary file is named
// "."+base+".*.tmp" in the same directory; callers that list the
// directory should skip (or remove) such leftovers.
func Write(path string, data []byte) error {
	if err := WriteNoDirSync(path, data); err != nil {
		return err
	}
	return SyncDir(filepath.Dir(path))
}

// WriteNoDirSync is Write without the directory fsync, for callers that
// write several files and sync the directory once.
func WriteNoDirSync(path string, data []byte) error {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".*.tmp")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}

// SyncDir makes a directory's entries (created, renamed or removed
// files) durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// IsTemp reports whether name (a base name) is a leftover temporary file
// of Write: "."+base+".*.tmp".
func IsTemp(name string) bool {
	return strings.HasPrefix(name, ".") && strings.HasSuffix(name, ".tmp")
}

// ReadDirJSON is the module's one "load a directory of JSON files": it
// calls fn with the path and contents of every file (not directory) in
// dir whose name ends in ".json" and does not begin with ".", in name
// order, and removes the leftover temporary files of Write (IsTemp). readErr
// is the error reading that file, if any (data is then nil). An error of
// fn stops the walk and is returned: fn decides what a file it cannot use
// means (skip it, rename it aside, fail).
func ReadDirJSON(dir string, fn func(path string, data []byte, readErr error) error) error {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range ents {
		name := e.Name()
		if IsTemp(name) {
			os.Remove(filepath.Join(dir, name))
			continue
		}
		if e.IsDir() || !strings.HasSuffix(name, ".json") || strings.HasPrefix(name, ".") {
			continue
		}
		path := filepath.Join(dir, name)
		data, err := os.ReadFile(path)
		if err := fn(path, data, err); err != nil {
			return err
		}
	}
	return nil
}
