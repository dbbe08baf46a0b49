package tlsrptsend

import (
	"testing"

	"github.com/stsrelay/stsrelay/tlsrpt"
)

// SetDKIM (a reload) signs the reports composed afterwards with the new
// key; a key that cannot be read changes nothing.
func TestSetDKIM(t *testing.T) {
	e := newEnv(t)
	st := &memQueue{}
	e.opts.Enqueue = st.EnqueueReport
	e.restart() // unsigned
	keyFile, pubRecord := writeDKIMKey(t, "ed25519")
	if err := e.rp.SetDKIM(&tlsrpt.DKIMOptions{Domain: "relay.example.net", Selector: "tls", KeyFile: keyFile + ".missing"}); err == nil {
		t.Fatal("SetDKIM accepted a missing key file")
	}
	if e.rp.dkim.Load() != nil {
		t.Fatal("a refused SetDKIM changed the key")
	}
	if err := e.rp.SetDKIM(&tlsrpt.DKIMOptions{Domain: "relay.example.net", Selector: "tls", KeyFile: keyFile}); err != nil {
		t.Fatal(err)
	}
	e.w.DNS.SetTXT("_smtp._tls.ex.test", []string{"v=TLSRPTv1;rua=mailto:tls-reports@rep.test"})
	e.recordDay1("ex.test")
	e.clock.Set(afterDay1)
	e.sendDue()
	msgs := st.List()
	if len(msgs) != 1 {
		t.Fatalf("%d messages queued", len(msgs))
	}
	checkReportMail(t, msgs[0].Body, pubRecord)
}
