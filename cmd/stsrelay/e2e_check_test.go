package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pelletier/go-toml/v2"

	"github.com/stsrelay/stsrelay/internal/check"
	"github.com/stsrelay/stsrelay/internal/testworld"
)

// checkReport is what `check -json` prints.
type checkReport = check.Report

// checkWorld publishes an enforce policy for ex.test with one MX whose
// certificate is of kind mxCert, and a TLS-RPT record.
func checkWorld(t *testing.T, mxCert testworld.CertKind) (*testworld.World, string) {
	w := testworld.New(t)
	mx := w.NewMX(testworld.MXOptions{Hostname: "mx1.ex.test", Cert: w.CA.Issue(mxCert, "mx1.ex.test")})
	w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
	w.DNS.SetA("mx1.ex.test", mx.IP())
	w.DNS.SetTXT("_mta-sts.ex.test", []string{"v=STSv1; id=c1"})
	w.DNS.SetTXT("_smtp._tls.ex.test", []string{"v=TLSRPTv1; rua=mailto:tlsrpt@ex.test"})
	pol := w.PolicyHost("ex.test", testworld.CertValid)
	pol.SetPolicy("version: STSv1\nmode: enforce\nmx: mx1.ex.test\nmx: *.backup.ex.test\nmax_age: 604800\n")
	return w, writeCheckConfig(t, w)
}

// writeCheckConfig writes the test configuration for w to a file, for
// `check -config`.
func writeCheckConfig(t *testing.T, w *testworld.World) string {
	t.Helper()
	cfg := testConfig(t, w)
	data, err := toml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "check.toml")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func runCheckCLI(t *testing.T, cfgPath string, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command(binPath, append([]string{"check", "-config", cfgPath}, args...)...)
	out, err := cmd.Output()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return string(out), code
}

// A sound enforce setup: exit 0, the JSON shows each part, and the stale
// pattern is advice, not a problem.
func TestE2ECheckSound(t *testing.T) {
	t.Parallel()
	_, cfgPath := checkWorld(t, testworld.CertValid)
	out, code := runCheckCLI(t, cfgPath, "-json", "ex.test")
	if code != 0 {
		t.Fatalf("exit %d, want 0:\n%s", code, out)
	}
	var rep checkReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("bad JSON: %v\n%s", err, out)
	}
	if !rep.OK || !rep.MTASTS.TXT.Valid || rep.MTASTS.TXT.ID != "c1" || rep.MTASTS.Policy == nil || rep.MTASTS.Policy.Mode != "enforce" {
		t.Errorf("policy part wrong: %+v", rep.MTASTS)
	}
	if len(rep.MX) != 1 || rep.MX[0].MatchesPolicy == nil || !*rep.MX[0].MatchesPolicy ||
		len(rep.MX[0].Addresses) != 1 || !rep.MX[0].Addresses[0].CertVerified || rep.MX[0].Addresses[0].CertDaysLeft == nil {
		t.Errorf("MX part wrong: %+v", rep.MX)
	}
	if !rep.TLSRPT.Valid || len(rep.TLSRPT.RUA) != 1 {
		t.Errorf("TLS-RPT part wrong: %+v", rep.TLSRPT)
	}
	stale := false
	for _, p := range rep.Patterns {
		if p.Pattern == "*.backup.ex.test" && !p.MatchesMX {
			stale = true
		}
	}
	if !stale {
		t.Errorf("stale pattern not reported: %+v", rep.Patterns)
	}
	human, code := runCheckCLI(t, cfgPath, "ex.test")
	if code != 0 || !strings.Contains(human, "Result: sound") {
		t.Errorf("human output (exit %d):\n%s", code, human)
	}
}

// An MX whose certificate is self-signed under an enforce policy is a
// problem: exit 1, and the problem names the MX and the result type.
func TestE2ECheckBadMXCert(t *testing.T) {
	t.Parallel()
	_, cfgPath := checkWorld(t, testworld.CertSelfSigned)
	out, code := runCheckCLI(t, cfgPath, "-json", "ex.test")
	if code != 1 {
		t.Fatalf("exit %d, want 1:\n%s", code, out)
	}
	var rep checkReport
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatal(err)
	}
	found := false
	for _, p := range rep.Problems {
		if strings.Contains(p, "mx1.ex.test") && strings.Contains(p, "certificate-not-trusted") {
			found = true
		}
	}
	if !found || rep.OK {
		t.Errorf("problems %q do not flag the self-signed MX", rep.Problems)
	}
}

// Usage errors exit 2.
func TestE2ECheckUsage(t *testing.T) {
	t.Parallel()
	out, err := exec.Command(binPath, "check").CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 {
		t.Fatalf("check without domain: %v\n%s", err, out)
	}
}
