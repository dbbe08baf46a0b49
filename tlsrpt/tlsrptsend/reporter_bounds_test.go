package tlsrptsend

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/domain"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// Issue #9 finding 6: a 240-octet policy domain gets a report like any
// other, its job file name stays short, and it holds up no one.
func TestLongPolicyDomain(t *testing.T) {
	e := newEnv(t)
	long := strings.Repeat("a", 63) + "." + strings.Repeat("b", 63) + "." + strings.Repeat("c", 63) + "." + strings.Repeat("d", 43) + ".test"
	if len(long) != 240 || !domain.CanPrefix(domain.MustParse(long), "_smtp._tls") {
		t.Fatalf("test domain of %d octets", len(long))
	}
	rr := e.w.ReportReceiver("rua.rep.test")
	for _, d := range []string{"a.test", long, "z.test"} {
		e.w.DNS.SetTXT("_smtp._tls."+d, []string{"v=TLSRPTv1; rua=" + rr.URL()})
		e.recordDay1(d)
	}
	e.clock.Set(afterDay1)
	e.sendDue()
	if n := len(rr.Reports()); n != 3 {
		t.Fatalf("%d reports, want 3", n)
	}
	ents, err := os.ReadDir(filepath.Join(e.dir, reportsDir))
	if err != nil {
		t.Fatal(err)
	}
	for _, ent := range ents {
		if len(ent.Name()) > 255-16 {
			t.Errorf("job file name of %d bytes", len(ent.Name()))
		}
	}
	// The jobs load again after a restart.
	e.restart()
	if n := len(e.rp.Reports()); n != 3 {
		t.Errorf("%d jobs after restart", n)
	}
}

// A policy domain whose job cannot be written is skipped with a warning
// and tried again at the next passes; the other domains' reports go out.
// After maxJobTries it is given up.
func TestJobWriteFailureSkipsDomain(t *testing.T) {
	e := newEnv(t)
	rr := e.w.ReportReceiver("rua.rep.test")
	for _, d := range []string{"a.test", "late.test", "never.test", "z.test"} {
		e.w.DNS.SetTXT("_smtp._tls."+d, []string{"v=TLSRPTv1; rua=" + rr.URL()})
		e.recordDay1(d)
	}
	// A non-empty directory where the job file goes: rename fails.
	block := func(d string) string {
		p := filepath.Join(e.dir, reportsDir, jobName(day1.Unix(), d))
		if err := os.MkdirAll(filepath.Join(p, "x"), 0o750); err != nil {
			t.Fatal(err)
		}
		return p
	}
	lateDir := block("late.test")
	block("never.test")

	e.clock.Set(afterDay1)
	e.sendDue()
	if n := len(rr.Reports()); n != 2 {
		t.Fatalf("%d reports, want 2 (a.test, z.test)", n)
	}
	if n := e.logs.FilterMessage("tlsrpt_report_job_failed").Len(); n != 2 {
		t.Errorf("%d tlsrpt_report_job_failed warnings, want 2", n)
	}
	var pending []string
	for _, pc := range e.rec.Pending() {
		pending = append(pending, pc.PolicyDomain)
	}
	if strings.Join(pending, ",") != "late.test,never.test" {
		t.Errorf("pending = %v", pending)
	}
	// Sessions of the closed day are refused even for the kept domains.
	e.rec.Record(at(okSession, day1.Add(time.Hour)))

	// The next day's report is not held up either.
	day2 := at(okSession, day1.Add(25*time.Hour))
	day2.PolicyDomain = "a.test"
	e.rec.Record(day2)
	e.clock.Set(afterDay1.Add(24 * time.Hour))
	os.RemoveAll(lateDir)
	e.sendDue()
	if n := len(rr.Reports()); n != 4 {
		t.Fatalf("%d reports, want 4 (late.test, and a.test of day 2)", n)
	}
	for range maxJobTries {
		e.clock.Advance(time.Minute)
		e.sendDue()
	}
	if n := e.logs.FilterMessage("tlsrpt_report_dropped").Len(); n != 1 {
		t.Errorf("%d tlsrpt_report_dropped, want 1", n)
	}
	if p := e.rec.Pending(); len(p) != 0 {
		t.Errorf("pending after giving up = %+v", p)
	}
	if n := len(rr.Reports()); n != 4 {
		t.Errorf("%d reports", n)
	}
}

// Issue #9 finding 8: an https rua on a loopback address is refused by
// default, whether named by host name or address, and given up at once.
func TestPrivateRUARefused(t *testing.T) {
	e := newEnv(t)
	e.opts.AllowPrivateRUA = false
	e.restart()
	rr := e.w.ReportReceiver("rua.rep.test")
	e.w.DNS.SetTXT("_smtp._tls.ex.test", []string{"v=TLSRPTv1; rua=" + rr.URL()})
	ipURL := strings.Replace(rr.URLWithPort(), "rua.rep.test", "127.0.0.1", 1)
	e.w.DNS.SetTXT("_smtp._tls.ip.test", []string{"v=TLSRPTv1; rua=" + ipURL})
	e.recordDay1("ex.test")
	e.recordDay1("ip.test")
	e.clock.Set(afterDay1)
	e.sendDue()
	if n := len(rr.Requests()); n != 0 {
		t.Errorf("%d requests reached the loopback receiver", n)
	}
	logs := e.sentLogs()
	if len(logs) != 2 {
		t.Fatalf("logs = %+v", logs)
	}
	for _, l := range logs {
		if fieldOf(l, "result") != SendDropped || !strings.Contains(fieldOf(l, "error"), "not a public address") {
			t.Errorf("log = %+v", l.ContextMap())
		}
	}
	for _, r := range e.rp.Reports() {
		if !r.Done || r.Outcome != SendDropped {
			t.Errorf("job %s: %+v", r.PolicyDomain, r)
		}
	}
}

// Issue #9 finding 8: more than MaxRUA rua: the first five are used and
// the rest logged.
func TestRUACapped(t *testing.T) {
	e := newEnv(t)
	q := &memQueue{}
	e.opts.Enqueue = q.EnqueueReport
	e.restart()
	var ruas []string
	for i := range 25 {
		ruas = append(ruas, "mailto:r"+strings.Repeat("x", i)+"@rep.test")
	}
	// One TXT record of several character-strings (at most 255 octets each).
	txt := "v=TLSRPTv1; rua=" + strings.Join(ruas, ",")
	var strs []string
	for len(txt) > 200 {
		strs, txt = append(strs, txt[:200]), txt[200:]
	}
	e.w.DNS.SetTXT("_smtp._tls.ex.test", append(strs, txt))
	e.recordDay1("ex.test")
	e.clock.Set(afterDay1)
	e.sendDue()
	if n := len(q.List()); n != tlsrpt.MaxRUA {
		t.Errorf("%d report mails, want %d", n, tlsrpt.MaxRUA)
	}
	if n := e.logs.FilterMessage("tlsrpt_rua_excess").Len(); n != 1 {
		t.Errorf("%d tlsrpt_rua_excess warnings", n)
	}
}

func TestPublicAddr(t *testing.T) {
	for s, want := range map[string]bool{
		"192.0.2.1": true, "8.8.8.8": true, "2001:4860:4860::8888": true,
		"127.0.0.1": false, "127.1.2.3": false, "::1": false,
		"10.1.2.3": false, "172.16.0.1": false, "172.31.255.255": false, "192.168.1.1": false,
		"fc00::1": false, "fd12:3456::1": false,
		"169.254.169.254": false, "fe80::1": false,
		"0.0.0.0": false, "::": false, "0.1.2.3": false,
		"224.0.0.1": false, "239.1.2.3": false, "ff02::1": false, "ff05::2": false,
		"255.255.255.255": false, "100.64.0.1": false,
		"::ffff:127.0.0.1": false, "::ffff:10.0.0.1": false, "::ffff:8.8.8.8": true,
		"64:ff9b::7f00:1": false, "64:ff9b::808:808": true,
		"172.32.0.1": true, "11.0.0.1": true,
	} {
		if got := PublicAddr(netip.MustParseAddr(s)); got != want {
			t.Errorf("PublicAddr(%s) = %v, want %v", s, got, want)
		}
	}
}
