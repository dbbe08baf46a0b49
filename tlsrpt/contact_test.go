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
