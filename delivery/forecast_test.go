package delivery

import (
	"crypto/x509"
	"testing"

	"github.com/stsrelay/stsrelay/delivery/policy"
	"github.com/stsrelay/stsrelay/mtasts"
	"github.com/stsrelay/stsrelay/mtasts/forecast"
)

func TestForecastSession(t *testing.T) {
	mk := func(mode string) *mtasts.Policy {
		p, err := mtasts.ParsePolicy([]byte("version: STSv1\nmode: " + mode + "\nmx: mx1.ex.test\nmx: mx2.ex.test\nmax_age: 86400\n"))
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := &policy.ConnState{STARTTLSOffered: true, TLS: true}
	expired := &policy.ConnState{STARTTLSOffered: true, TLS: true,
		CertError: x509.CertificateInvalidError{Reason: x509.Expired, Detail: "expired"}}
	plain := &policy.ConnState{}
	for _, tc := range []struct {
		name   string
		pin    policy.Policy
		mx     string
		st     *policy.ConnState
		ok     bool
		mode   string
		reason string // "" = not refused
	}{
		{"testing good", policy.Policy{STS: mk("testing")}, "mx1.ex.test", good, true, forecast.ModeTesting, ""},
		{"testing expired", policy.Policy{STS: mk("testing")}, "mx2.ex.test", expired, true, forecast.ModeTesting, "certificate-expired"},
		{"testing no starttls", policy.Policy{STS: mk("testing")}, "mx1.ex.test", plain, true, forecast.ModeTesting, "starttls-not-supported"},
		{"testing mx not listed", policy.Policy{STS: mk("testing")}, "mx9.ex.test", good, true, forecast.ModeTesting, forecast.ReasonMXNotInPolicy},
		{"testing requiretls ignored", policy.Policy{STS: mk("testing"), RequireTLS: true}, "mx1.ex.test", good, true, forecast.ModeTesting, ""},
		{"enforce never contacted", policy.Policy{STS: mk("enforce")}, "mx9.ex.test", nil, true, forecast.ModeEnforce, forecast.ReasonMXNotInPolicy},
		{"enforce refused", policy.Policy{STS: mk("enforce")}, "mx1.ex.test", expired, true, forecast.ModeEnforce, "certificate-expired"},
		{"enforce good", policy.Policy{STS: mk("enforce")}, "mx1.ex.test", good, true, forecast.ModeEnforce, ""},
		{"no policy", policy.Policy{}, "mx1.ex.test", good, false, "", ""},
		{"mode none", policy.Policy{STS: mk("none")}, "mx1.ex.test", good, false, "", ""},
		{"tls-required no", policy.Policy{STS: mk("enforce"), TLSRequiredNo: true}, "mx1.ex.test", plain, false, "", ""},
	} {
		s, ok := forecastSession(tc.pin, tc.mx, policy.DANE{}, tc.st)
		if ok != tc.ok || s.Mode != tc.mode || s.Refused != (tc.reason != "") || s.Reason != tc.reason {
			t.Errorf("%s: got ok=%v %+v, want ok=%v mode=%s reason=%q", tc.name, ok, s, tc.ok, tc.mode, tc.reason)
		}
		if ok && s.MX != tc.mx {
			t.Errorf("%s: MX %q", tc.name, s.MX)
		}
	}
}
