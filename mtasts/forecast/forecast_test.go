package forecast

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/testworld"
)

func newClock() *testworld.Clock {
	return testworld.NewClock(time.Date(2026, 3, 10, 12, 30, 0, 0, time.UTC))
}

// A testing domain with one good and one bad MX: the counts, the reasons,
// the verdict, and the same after a restart.
func TestTestingDomainGoodAndBadMX(t *testing.T) {
	dir := t.TempDir()
	clk := newClock()
	var metric []string
	c, err := Open(Options{Dir: dir, Now: clk.Now, OnRefusal: func(r string) { metric = append(metric, r) }})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 10; i++ {
		c.Record(Session{Time: clk.Now(), Domain: "Rollout.Example.", Mode: ModeTesting, MX: "mx1.rollout.example"})
	}
	for i := 0; i < 3; i++ {
		c.Record(Session{Time: clk.Now(), Domain: "rollout.example", Mode: ModeTesting, MX: "mx3.rollout.example", Refused: true, Reason: "certificate-expired"})
	}
	// Two days ago: in the week, not in the day.
	old := clk.Now().Add(-48 * time.Hour)
	c.Record(Session{Time: old, Domain: "rollout.example", Mode: ModeTesting, MX: "mx9.rollout.example", Refused: true, Reason: ReasonMXNotInPolicy})
	// Eight days ago: gone.
	c.Record(Session{Time: clk.Now().Add(-8 * Day), Domain: "rollout.example", Mode: ModeTesting, MX: "mx1.rollout.example"})

	check := func(c *Counter) {
		t.Helper()
		s, ok := c.Summary("rollout.example")
		if !ok {
			t.Fatal("no summary")
		}
		if s.Mode != ModeTesting {
			t.Errorf("mode %q", s.Mode)
		}
		if s.Testing.Day.Sessions != 13 || s.Testing.Day.Refused != 3 {
			t.Errorf("day: %+v", s.Testing.Day)
		}
		if s.Testing.Week.Sessions != 14 || s.Testing.Week.Refused != 4 {
			t.Errorf("week: %+v", s.Testing.Week)
		}
		if got := s.Testing.Week.ByReason; got["certificate-expired"] != 3 || got[ReasonMXNotInPolicy] != 1 {
			t.Errorf("by reason: %v", got)
		}
		if len(s.Testing.Week.ByMX) != 2 || s.Testing.Week.ByMX[0].MX != "mx3.rollout.example" || s.Testing.Week.ByMX[0].Count != 3 {
			t.Errorf("by MX: %+v", s.Testing.Week.ByMX)
		}
		if s.Safe {
			t.Error("safe with refusals")
		}
		want := "not yet: 3 sessions to mx3.rollout.example failed certificate-expired; last on 2026-03-10T12:30:00Z (4 of 14 sessions in 7 days would have been refused)"
		if s.Verdict != want {
			t.Errorf("verdict\n got %q\nwant %q", s.Verdict, want)
		}
		if s.Enforce.Week.Sessions != 0 {
			t.Errorf("enforce figures for a testing domain: %+v", s.Enforce)
		}
	}
	check(c)
	if fmt.Sprint(metric) != "[certificate-expired certificate-expired certificate-expired mx-not-in-policy]" {
		t.Errorf("metric calls %v", metric)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	// A restart keeps them.
	c2, err := Open(Options{Dir: dir, Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	check(c2)
	// A day later the day window is empty; the week still holds them.
	clk.Advance(25 * time.Hour)
	s, _ := c2.Summary("rollout.example")
	if s.Testing.Day.Sessions != 0 || s.Testing.Week.Sessions != 14 {
		t.Errorf("after a day: %+v", s.Testing)
	}
}

func TestSafeVerdictAndThousands(t *testing.T) {
	clk := newClock()
	c, _ := Open(Options{Now: clk.Now})
	for i := 0; i < 12408; i++ {
		c.Record(Session{Time: clk.Now(), Domain: "fine.example", Mode: ModeTesting, MX: "mx.fine.example"})
	}
	s, _ := c.Summary("fine.example")
	if !s.Safe || s.Verdict != "safe to enforce: 0 of 12,408 sessions in 7 days would have been refused" {
		t.Errorf("%v %q", s.Safe, s.Verdict)
	}
	for n, want := range map[int64]string{0: "0", 999: "999", 1000: "1,000", 1234567: "1,234,567", -1000: "-1,000"} {
		if got := Thousands(n); got != want {
			t.Errorf("Thousands(%d) = %q", n, got)
		}
	}
}

// A domain that switches to enforce counts actual refusals from then on;
// its testing figures stay for the week, and the metric counts only the
// forecast.
func TestSwitchToEnforce(t *testing.T) {
	clk := newClock()
	var metric int
	c, _ := Open(Options{Now: clk.Now, OnRefusal: func(string) { metric++ }})
	c.Record(Session{Domain: "sw.example", Mode: ModeTesting, MX: "mx.sw.example", Refused: true, Reason: "certificate-not-trusted"})
	clk.Advance(time.Hour)
	c.Record(Session{Domain: "sw.example", Mode: ModeEnforce, MX: "mx.sw.example", Refused: true, Reason: "certificate-not-trusted"})
	c.Record(Session{Domain: "sw.example", Mode: ModeEnforce, MX: "mx2.sw.example"})
	s, _ := c.Summary("sw.example")
	if s.Mode != ModeEnforce || s.Enforce.Week.Sessions != 2 || s.Enforce.Week.Refused != 1 || s.Testing.Week.Refused != 1 {
		t.Errorf("%+v", s)
	}
	if !strings.HasPrefix(s.Verdict, "enforce in force: 1 of 2 sessions in 7 days refused; most: 1 to mx.sw.example failed certificate-not-trusted") {
		t.Errorf("verdict %q", s.Verdict)
	}
	if metric != 1 {
		t.Errorf("metric counted %d, want 1 (testing only)", metric)
	}
}

func TestBounds(t *testing.T) {
	dir := t.TempDir()
	clk := newClock()
	c, _ := Open(Options{Dir: dir, Now: clk.Now, MaxDomains: 5})
	for i := 0; i < 8; i++ {
		clk.Advance(time.Second)
		c.Record(Session{Domain: fmt.Sprintf("d%d.example", i), Mode: ModeTesting, MX: "mx"})
	}
	if n := len(c.Summaries()); n != 5 {
		t.Fatalf("%d domains kept, want 5", n)
	}
	if _, ok := c.Summary("d0.example"); ok {
		t.Error("least recent domain not evicted")
	}
	if _, ok := c.Summary("d7.example"); !ok {
		t.Error("newest domain missing")
	}
	// Many MX hosts: pairs stay bounded, counts stay right.
	for i := 0; i < 100; i++ {
		c.Record(Session{Domain: "many.example", Mode: ModeTesting, MX: fmt.Sprintf("mx%d.many.example", i), Refused: true, Reason: "certificate-expired"})
	}
	s, _ := c.Summary("many.example")
	if s.Testing.Week.Refused != 100 || len(s.Testing.Week.ByMX) > maxPairs {
		t.Errorf("refused %d, %d MX pairs", s.Testing.Week.Refused, len(s.Testing.Week.ByMX))
	}
	var total int64
	for _, m := range s.Testing.Week.ByMX {
		total += m.Count
	}
	if total != 100 {
		t.Errorf("pairs sum to %d", total)
	}
	// Sessions in none or unknown modes are not counted.
	c.Record(Session{Domain: "none.example", Mode: "none"})
	if _, ok := c.Summary("none.example"); ok {
		t.Error("mode none counted")
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "counts.json")); err != nil {
		t.Fatal(err)
	}
	// A corrupt file is an error, not silently lost counts.
	os.WriteFile(filepath.Join(dir, "counts.json"), []byte("{"), 0o600)
	if _, err := Open(Options{Dir: dir}); err == nil {
		t.Error("corrupt counts file: no error")
	}
}

func TestNoData(t *testing.T) {
	clk := newClock()
	c, _ := Open(Options{Now: clk.Now})
	c.Record(Session{Domain: "quiet.example", Mode: ModeTesting, MX: "mx"})
	clk.Advance(6 * Day)
	c.Record(Session{Domain: "other.example", Mode: ModeTesting, MX: "mx"})
	clk.Advance(Day + time.Hour)
	s, ok := c.Summary("quiet.example")
	if ok && s.Testing.Week.Sessions != 0 {
		t.Errorf("old sessions still counted: %+v", s)
	}
	if ok && s.Verdict != "no data: no sessions in testing mode in 7 days" {
		t.Errorf("verdict %q", s.Verdict)
	}
}
