package testworld

import (
	"net"
	"os"
	"testing"
	"time"
)

// TestNewWorldStandalone: a world made without a test (as stsrelay demo
// makes one) starts its servers, reports errors instead of failing, and
// Close stops everything and removes its directory.
func TestNewWorldStandalone(t *testing.T) {
	w, err := NewWorld(Options{})
	if err != nil {
		t.Fatal(err)
	}
	dir := w.Dir()
	if _, err := os.Stat(w.CAFile()); err != nil {
		t.Fatalf("CA file: %v", err)
	}
	cert, err := w.CA.IssueCert(CertValid, "mx.solo.test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.CA.IssueCert(CertValid); err == nil {
		t.Error("IssueCert without a name: no error")
	}
	mx, err := w.StartMX(MXOptions{Hostname: "mx.solo.test", Cert: cert})
	if err != nil {
		t.Fatal(err)
	}
	pol, err := w.StartPolicyHost("solo.test", CertValid)
	if err != nil {
		t.Fatal(err)
	}
	rr, err := w.StartReportReceiver("reports.solo.test")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.StartHTTPS("", nil); err == nil {
		t.Error("StartHTTPS without a certificate: no error")
	}
	for _, a := range []string{mx.Addr(), pol.Addr(), rr.Addr()} {
		c, err := net.DialTimeout("tcp", a, time.Second)
		if err != nil {
			t.Fatalf("dial %s: %v", a, err)
		}
		c.Close()
	}
	w.Close()
	w.Close() // twice is fine
	for _, a := range []string{mx.Addr(), pol.Addr(), rr.Addr(), w.DNS.Addr()} {
		if c, err := net.DialTimeout("tcp", a, time.Second); err == nil {
			c.Close()
			t.Errorf("%s still listening after Close", a)
		}
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("world directory %s left after Close: %v", dir, err)
	}
	// Helpers on a standalone world panic rather than fail a test.
	func() {
		defer func() {
			if recover() == nil {
				t.Error("Issue without a name on a standalone world did not panic")
			}
		}()
		w.CA.Issue(CertValid)
	}()
}
