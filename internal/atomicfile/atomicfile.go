// Package atomicfile replaces small state files durably: write to a
// temporary file beside the target, fsync it, rename it over the target,
// fsync the directory. A crash leaves either the old or the new contents,
// never a mix, and once Write returns the new contents survive a crash.
package atomicfile

import (
	"os"
	"path/filepath"
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
