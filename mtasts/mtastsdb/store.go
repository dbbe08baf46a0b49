package mtastsdb

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/internal/atomicfile"
	"github.com/stsrelay/stsrelay/internal/domain"
	"github.com/stsrelay/stsrelay/mtasts"
)

// fileEntry is the on-disk form of an entry: data_dir/mtasts/<domain>.json.
// The policy is kept as fetched and parsed again on load.
type fileEntry struct {
	Domain      string    `json:"domain"`
	ID          string    `json:"id"`
	Policy      string    `json:"policy"`
	Fetched     time.Time `json:"fetched"`
	LastUsed    time.Time `json:"last_used"`
	LastError   string    `json:"last_error,omitempty"`
	LastErrorAt time.Time `json:"last_error_at,omitzero"`
}

// persist writes the current state of d to disk, or removes its file when
// nothing is cached. Errors are logged: the in-memory cache still works.
func (c *Cache) persist(d string) {
	if c.dir == "" {
		return
	}
	c.diskMu.Lock()
	defer c.diskMu.Unlock()
	c.mu.RLock()
	e := c.entries[d]
	var fe fileEntry
	var used int64
	if e != nil {
		fe, used = fileEntryOf(e)
	}
	c.mu.RUnlock()
	path := c.filePath(d)
	if e == nil {
		c.removeFile(d, path)
		return
	}
	if c.writeFile(d, path, fe) {
		e.persistedUsed.Store(used)
	}
}

// fileEntryOf is the on-disk form of e, and the last-use time it holds.
// c.mu is held.
func fileEntryOf(e *entry) (fileEntry, int64) {
	used := e.lastUsed.Load()
	fe := fileEntry{Domain: e.domain, ID: e.id, Policy: string(e.body), Fetched: e.fetched.UTC(),
		LastUsed: time.Unix(0, used).UTC(), LastError: e.lastError, LastErrorAt: e.lastErrorAt.UTC()}
	if e.lastErrorAt.IsZero() {
		fe.LastErrorAt = time.Time{}
	}
	return fe, used
}

// filePath is the file of domain d: data_dir/mtasts/<domain>.json.
func (c *Cache) filePath(d string) string {
	return filepath.Join(c.dir, domain.FileName(d)+".json")
}

// removeFile removes the file of d, if there is one.
func (c *Cache) removeFile(d, path string) {
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		c.log.Error("mtasts_cache_write", zap.String("domain", d), zap.Error(err))
	} else if err == nil {
		atomicfile.SyncDir(c.dir)
	}
}

// writeFile replaces the file of d with fe, and reports whether it did.
func (c *Cache) writeFile(d, path string, fe fileEntry) bool {
	data, err := json.MarshalIndent(fe, "", "  ")
	if err == nil {
		err = atomicfile.Write(path, append(data, '\n'))
	}
	if err != nil {
		c.log.Error("mtasts_cache_write", zap.String("domain", d), zap.Error(err))
		return false
	}
	return true
}

// openDir creates the cache directory if needed and loads what it holds.
func (c *Cache) openDir() error {
	if err := os.MkdirAll(c.dir, 0o700); err != nil {
		return fmt.Errorf("mtasts cache: %w", err)
	}
	return c.load()
}

// load reads every stored entry. A file that cannot be read or whose
// policy no longer parses is logged and skipped (and left in place for the
// operator); leftover temporary files are removed.
func (c *Cache) load() error {
	err := atomicfile.ReadDirJSON(c.dir, func(path string, data []byte, err error) error {
		var e *entry
		if err == nil {
			e, err = c.loadFile(path, data)
		}
		if err != nil {
			c.log.Warn("mtasts_cache_load", zap.String("file", filepath.Base(path)), zap.Error(err))
			return nil
		}
		c.entries[e.domain] = e
		return nil
	})
	if err != nil {
		return fmt.Errorf("mtasts cache: %w", err)
	}
	return nil
}

func (c *Cache) loadFile(path string, data []byte) (*entry, error) {
	var fe fileEntry
	if err := json.Unmarshal(data, &fe); err != nil {
		return nil, err
	}
	d, ok := mtasts.NormalizeDomain(fe.Domain)
	if !ok || d != fe.Domain || filepath.Base(path) != domain.FileName(d)+".json" {
		return nil, fmt.Errorf("domain %q does not match the file name", fe.Domain)
	}
	if !mtasts.ValidID(fe.ID) && fe.ID != "" {
		return nil, fmt.Errorf("invalid id %q", fe.ID)
	}
	p, err := mtasts.ParsePolicy([]byte(fe.Policy))
	if err != nil {
		return nil, err
	}
	e := &entry{domain: d, id: fe.ID, policy: p, body: []byte(fe.Policy), fetched: fe.Fetched,
		lastError: fe.LastError, lastErrorAt: fe.LastErrorAt}
	e.lastUsed.Store(fe.LastUsed.UnixNano())
	e.persistedUsed.Store(fe.LastUsed.UnixNano())
	return e, nil
}
