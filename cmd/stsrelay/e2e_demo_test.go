package main

// End-to-end tests of `stsrelay demo` and of the enforce forecast
// (`stsrelay policy forecast`, the FORECAST column of `policy list`, the
// forecast metric), driving the built binary.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/testworld"
	"github.com/stsrelay/stsrelay/mtasts/forecast"
)

// runDemoBinary runs `stsrelay demo args...` with a hard time limit.
func runDemoBinary(t *testing.T, args ...string) (stdout, stderr string, code int, took time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, binPath, append([]string{"demo"}, args...)...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	start := time.Now()
	err := cmd.Run()
	took = time.Since(start)
	if ctx.Err() != nil {
		t.Fatalf("demo did not finish within 60s:\n%s\n%s", out.String(), errb.String())
	}
	code = 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.String(), errb.String(), code, took
}

func TestE2EDemo(t *testing.T) {
	keep := filepath.Join(t.TempDir(), "kept")
	out, errOut, code, took := runDemoBinary(t, "-json", "-keep", keep)
	if code != 0 {
		t.Fatalf("demo exit %d, want 0\nstdout:\n%s\nstderr:\n%s", code, out, errOut)
	}
	// 15 s is the promise; the race detector slows the binary down.
	limit := 15 * time.Second
	if os.Getenv("STSRELAY_E2E_NORACE") == "" {
		limit = 30 * time.Second
	}
	if took > limit {
		t.Errorf("demo took %v, want under %v", took, limit)
	}
	var res demoResult
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatalf("demo -json output: %v\n%s", err, out)
	}
	if !res.OK {
		t.Errorf("ok = false")
	}
	want := map[string]string{
		"good.demo":    "delivered-verified-tls",
		"spoofed.demo": "refused",
		"rollout.demo": "delivered-recorded-failure",
		"plain.demo":   "delivered-opportunistic",
		"dane.demo":    "delivered-dane-authenticated",
	}
	for _, s := range res.Steps {
		if w, ok := want[s.Domain]; !ok || s.Outcome != w || !s.OK {
			t.Errorf("%s: outcome %q ok=%v, want %q; details %v", s.Domain, s.Outcome, s.OK, w, s.Details)
		}
		if len(s.Report) == 0 {
			t.Errorf("%s: no TLS-RPT report", s.Domain)
		}
		if s.Delivery == nil {
			t.Errorf("%s: no delivery line", s.Domain)
		}
		delete(want, s.Domain)
	}
	if len(want) != 0 {
		t.Errorf("steps missing: %v", want)
	}
	if len(res.LogLines) < 5 {
		t.Errorf("%d delivery log lines, want 5", len(res.LogLines))
	}
	// dane.demo: DANE authenticated the self-signed certificate of its MX
	// (RFC 7672 §3.1.1), and the TLSA base domain got a tlsa report with
	// the record as policy-string (RFC 8460 §3, §4.4).
	for _, s := range res.Steps {
		if s.Domain != "dane.demo" {
			continue
		}
		if s.Delivery["dane"] != "authenticated" || s.Delivery["tls_verified"] != false {
			t.Errorf("dane.demo delivery line %v: want dane authenticated, tls_verified false", s.Delivery)
		}
		var rep struct {
			Policies []struct {
				Policy struct {
					Type   string   `json:"policy-type"`
					String []string `json:"policy-string"`
					Domain string   `json:"policy-domain"`
				} `json:"policy"`
			} `json:"policies"`
		}
		if err := json.Unmarshal(s.Report, &rep); err != nil || len(rep.Policies) != 1 {
			t.Fatalf("dane.demo report: %v\n%s", err, s.Report)
		}
		p := rep.Policies[0].Policy
		if p.Type != "tlsa" || p.Domain != "mx.dane.demo" || len(p.String) != 1 || !strings.HasPrefix(p.String[0], "3 1 1 ") {
			t.Errorf("dane.demo report policy %+v, want tlsa for mx.dane.demo with one 3 1 1 record", p)
		}
	}
	for _, l := range res.LogLines {
		var m map[string]any
		if err := json.Unmarshal([]byte(l), &m); err != nil || m["msg"] != "delivery" {
			t.Errorf("log line is not a delivery line: %s", l)
		}
	}
	if len(res.Forecast) != 1 || !strings.HasPrefix(res.Forecast[0].Verdict, "not yet: 1 session to mx.rollout.demo failed certificate-expired") {
		t.Errorf("forecast %+v", res.Forecast)
	}
	// -keep leaves the config, the data and the log; the CLI reads them.
	for _, p := range []string{res.Config, res.DataDir, filepath.Join(keep, "stsrelay.log")} {
		if p == "" {
			t.Errorf("-keep: path missing from the output")
			continue
		}
		if _, err := os.Stat(p); err != nil {
			t.Errorf("-keep: %v", err)
		}
	}
	cmd := exec.Command(binPath, "queue", "list", "-json", "-config", res.Config)
	qout, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(qout), "someone@spoofed.demo") {
		t.Errorf("queue list on the kept data: %v\n%s", err, qout)
	}
	cmd = exec.Command(binPath, "policy", "forecast", "rollout.demo", "-config", res.Config)
	fout, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(fout), "rollout.demo: not yet: 1 session to mx.rollout.demo failed certificate-expired") {
		t.Errorf("policy forecast on the kept data: %v\n%s", err, fout)
	}
}

// TestE2EDemoText: the narration names the five outcomes and ends well.
func TestE2EDemoText(t *testing.T) {
	out, errOut, code, _ := runDemoBinary(t)
	if code != 0 {
		t.Fatalf("demo exit %d\n%s\n%s", code, out, errOut)
	}
	for _, s := range []string{"[OK ] good.demo", "[OK ] spoofed.demo", "[OK ] rollout.demo", "[OK ] plain.demo",
		"[OK ] dane.demo", "authenticated by the domain's TLSA record", `"policy-type": "tlsa"`, `"dane":"authenticated"`,
		"was sent nothing", "still in the queue", `"result-type": "certificate-not-trusted"`, `"msg":"delivery"`,
		"all steps behaved as expected"} {
		if !strings.Contains(out, s) {
			t.Errorf("output lacks %q\n%s", s, out)
		}
	}
}

// forecastOf runs `policy forecast DOMAIN -json`.
func forecastOf(t *testing.T, r *relayProc, domain string) forecast.Summary {
	t.Helper()
	out, code := r.cli("policy", "forecast", domain, "-json")
	if code != 0 {
		t.Fatalf("policy forecast %s: exit %d\n%s", domain, code, out)
	}
	var s forecast.Summary
	if err := json.Unmarshal([]byte(out), &s); err != nil {
		t.Fatalf("policy forecast -json: %v\n%s", err, out)
	}
	return s
}

// TestE2EForecast: a testing domain with one good and one bad MX host
// gets the right counts and verdict; the counts survive a restart; once
// the domain switches to enforce, actual refusals are counted.
func TestE2EForecast(t *testing.T) {
	w := testworld.New(t)
	pol := stsDomain(w, "fc.test", "t1", stsPolicy("testing", "good.fc.test", "bad.fc.test"))
	good := mxHost(w, "good.fc.test", testworld.MXOptions{Cert: w.CA.Issue(testworld.CertValid, "good.fc.test")})
	bad := mxHost(w, "bad.fc.test", testworld.MXOptions{Cert: w.CA.Issue(testworld.CertExpired, "bad.fc.test")})
	cfg := testConfig(t, w)
	cfg.Delivery.ConnectionReuseLimit = 1 // one session per message
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Metrics.Listen = ln.Addr().String()
	ln.Close()
	r := startRelay(t, cfg)

	send := func(prefix string, n int, result string) {
		t.Helper()
		for i := range n {
			rcpt := fmt.Sprintf("%s%d@fc.test", prefix, i)
			r.mustSubmit("s@client.test", []string{rcpt}, simpleMessage(prefix))
			r.waitResult(rcpt, result, 20*time.Second)
		}
	}
	// The bad host first, then the good one (DNS answers change; the
	// relay's DNS cache keeps answers for at most 1s in tests).
	w.DNS.SetMX("fc.test", testworld.MX{Pref: 10, Host: "bad.fc.test"})
	send("b", 2, "delivered")
	w.DNS.SetMX("fc.test", testworld.MX{Pref: 10, Host: "good.fc.test"})
	time.Sleep(1200 * time.Millisecond)
	send("g", 3, "delivered")
	if len(bad.Messages()) != 2 || len(good.Messages()) != 3 {
		t.Fatalf("bad MX got %d, good MX %d messages; want 2 and 3", len(bad.Messages()), len(good.Messages()))
	}

	check := func(when string) {
		t.Helper()
		s := forecastOf(t, r, "fc.test")
		if s.Mode != forecast.ModeTesting || s.Testing.Week.Sessions != 5 || s.Testing.Week.Refused != 2 ||
			s.Testing.Day.Sessions != 5 || s.Testing.Day.Refused != 2 || s.Testing.Week.ByReason["certificate-expired"] != 2 {
			t.Errorf("%s: counts %+v", when, s)
		}
		if s.Safe || !strings.HasPrefix(s.Verdict, "not yet: 2 sessions to bad.fc.test failed certificate-expired; last on ") ||
			!strings.HasSuffix(s.Verdict, "(2 of 5 sessions in 7 days would have been refused)") {
			t.Errorf("%s: verdict %q", when, s.Verdict)
		}
	}
	check("running")
	// The text form ends with the verdict; policy list has the column.
	out, code := r.cli("policy", "forecast")
	if code != 0 || !strings.Contains(out, "fc.test: not yet: 2 sessions to bad.fc.test failed certificate-expired") {
		t.Errorf("policy forecast: exit %d\n%s", code, out)
	}
	out, code = r.cli("policy", "list")
	if code != 0 || !strings.Contains(out, "FORECAST 7D") || !strings.Contains(out, "not yet 2/5") {
		t.Errorf("policy list: exit %d\n%s", code, out)
	}
	// check -config shows the relay's figures for the domain.
	out, _ = r.cli("check", "fc.test", "-json")
	var rep checkReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil || rep.Forecast == nil || rep.Forecast.Testing.Week.Refused != 2 {
		t.Errorf("check -config: forecast missing (%v)\n%s", err, out)
	}
	// The metric, without a domain label.
	body := httpGet(t, "http://"+cfg.Metrics.Listen+"/metrics")
	if !strings.Contains(body, `stsrelay_mtasts_forecast_refusals_total{reason="certificate-expired"} 2`) {
		t.Errorf("metric missing:\n%s", grepLines(body, "forecast"))
	}

	// Stopped: the CLI reads the files. Restarted: the counts are back.
	r.stop()
	check("stopped")
	if _, err := os.Stat(filepath.Join(cfg.DataDir, "forecast", "counts.json")); err != nil {
		t.Error(err)
	}
	r.start()
	check("restarted")

	// The domain switches to enforce: refusals are now real ones.
	pol.SetPolicy(stsPolicy("enforce", "good.fc.test", "bad.fc.test"))
	w.DNS.SetTXT("_mta-sts.fc.test", []string{"v=STSv1; id=e1"})
	if out, code := r.cli("policy", "refresh", "fc.test"); code != 0 {
		t.Fatalf("policy refresh: exit %d\n%s", code, out)
	}
	w.DNS.SetMX("fc.test", testworld.MX{Pref: 10, Host: "bad.fc.test"})
	time.Sleep(1200 * time.Millisecond)
	send("e", 1, "deferred")
	s := forecastOf(t, r, "fc.test")
	if s.Mode != forecast.ModeEnforce || s.Enforce.Week.Sessions != 1 || s.Enforce.Week.Refused != 1 ||
		s.Enforce.Week.ByReason["certificate-expired"] != 1 || s.Testing.Week.Refused != 2 {
		t.Errorf("after the switch: %+v", s)
	}
	if !strings.HasPrefix(s.Verdict, "enforce in force: 1 of 1 session in 7 days refused; most: 1 to bad.fc.test failed certificate-expired") {
		t.Errorf("verdict after the switch: %q", s.Verdict)
	}
	if len(bad.Messages()) != 2 {
		t.Errorf("enforce sent a message to the bad MX")
	}
	// An unknown domain is exit 1.
	if out, code := r.cli("policy", "forecast", "unknown.test"); code != 1 {
		t.Errorf("forecast of an unknown domain: exit %d, want 1\n%s", code, out)
	}
}

func httpGet(t *testing.T, url string) string {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}
