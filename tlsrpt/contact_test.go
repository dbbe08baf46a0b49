package tlsrpt

import "testing"

// RFC 8460 §5.3: the contact's domain is the submitter's, or a parent of
// it no higher than the organisational domain.
func TestContactMatchesSubmitter(t *testing.T) {
	for _, tc := range []struct {
		name, contact, host string
		want                bool
	}{
		{"same domain", "mailto:postmaster@relay.example.net", "relay.example.net", true},
		{"organisational parent", "mailto:postmaster@example.net", "relay.example.net", true},
		{"intermediate parent", "postmaster@mail.example.net", "relay.mail.example.net", true},
		{"case and trailing dot", "mailto:PM@Example.NET.", "Relay.example.net", true},
		{"public suffix refused", "mailto:pm@net", "relay.example.net", false},
		{"public suffix co.uk refused", "mailto:pm@co.uk", "relay.example.co.uk", false},
		{"sibling refused", "mailto:pm@other.example.net", "relay.example.net", false},
		{"other organisation", "mailto:x@other.test", "relay.r.test", false},
		{"suffix without dot boundary", "mailto:pm@ample.net", "relay.example.net", false},
		{"no address", "https://example.net/contact", "relay.example.net", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := ContactMatchesSubmitter(tc.contact, tc.host); got != tc.want {
				t.Errorf("ContactMatchesSubmitter(%q, %q) = %v, want %v", tc.contact, tc.host, got, tc.want)
			}
		})
	}
}

// SetDKIM (a reload) signs the reports composed afterwards with the new
// key; a key that cannot be read changes nothing.
func TestSetDKIM(t *testing.T) {
	e := newEnv(t)
	st := &memQueue{}
	e.opts.Queue = st
	e.restart() // unsigned
	keyFile, pubRecord := writeDKIMKey(t, "ed25519")
	if err := e.rp.SetDKIM(&DKIMOptions{Domain: "relay.example.net", Selector: "tls", KeyFile: keyFile + ".missing"}); err == nil {
		t.Fatal("SetDKIM accepted a missing key file")
	}
	if e.rp.dkim.Load() != nil {
		t.Fatal("a refused SetDKIM changed the key")
	}
	if err := e.rp.SetDKIM(&DKIMOptions{Domain: "relay.example.net", Selector: "tls", KeyFile: keyFile}); err != nil {
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
