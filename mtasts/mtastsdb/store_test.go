package mtastsdb

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/mtasts"
)

func TestCacheSurvivesReopen(t *testing.T) {
	ce := newCacheEnv(t, nil)
	ps := ce.stsDomain("ex.test", "a1", enforceMX1)
	ce.get(t, "ex.test")
	// The policy host fails and the TXT record vanishes; the relay restarts.
	ps.SetResponse(500, "text/plain", "", nil)
	ce.w.DNS.RemoveName("_mta-sts.ex.test")
	ce.c = ce.open(t, nil)
	ce.clock.Advance(time.Hour)
	res := ce.get(t, "ex.test")
	if res.Policy == nil || res.Policy.Mode != mtasts.ModeEnforce || res.ID != "a1" || !res.Policy.Matches("mx1.ex.test") {
		t.Fatalf("after restart: %+v (RFC 8461 §3.3: the cached policy MUST apply)", res)
	}
	if res.Failure == nil {
		t.Error("missing TXT with a cached enforce policy not reported")
	}
	if ps.Count() != 1 {
		t.Errorf("%d GETs", ps.Count())
	}
	if got := res.Policy.Lines; len(got) != 4 || got[0] != "version: STSv1" {
		t.Errorf("lines after reload %q", got)
	}
	// The file is JSON named after the domain, and no temporary is left.
	files, _ := os.ReadDir(ce.dir)
	if len(files) != 1 || files[0].Name() != "ex.test.json" {
		t.Errorf("files %v", files)
	}
}

func TestCacheCorruptFileSkipped(t *testing.T) {
	ce := newCacheEnv(t, nil)
	os.WriteFile(filepath.Join(ce.dir, "bad.test.json"), []byte("{nope"), 0o600)
	os.WriteFile(filepath.Join(ce.dir, ".x.json.123.tmp"), []byte("partial"), 0o600)
	c := ce.open(t, nil)
	if len(c.Entries()) != 0 {
		t.Errorf("entries %v", c.Entries())
	}
	if ce.logs.FilterMessage("mtasts_cache_load").Len() != 1 {
		t.Error("corrupt file not logged")
	}
	if _, err := os.Stat(filepath.Join(ce.dir, ".x.json.123.tmp")); !os.IsNotExist(err) {
		t.Error("temporary file left")
	}
}
