package delivery

import (
	"context"
	"errors"
	"testing"

	"github.com/miekg/dns"

	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/internal/testworld"
	"github.com/stsrelay/stsrelay/internal/testworld/worldres"
)

func worldResolver(t *testing.T, w *testworld.World) *dnsclient.Resolver {
	t.Helper()
	return worldres.New(t, w)
}

func hostNames(hs []Host) []string {
	var out []string
	for _, h := range hs {
		out = append(out, h.Name)
	}
	return out
}

// RFC 5321 §5.1, RFC 7505: how a domain's destinations are found and how
// failures are classed.
func TestRoute(t *testing.T) {
	w := testworld.New(t)
	r := worldResolver(t, w)
	ctx := context.Background()
	d := w.DNS
	d.SetMX("pref.test", testworld.MX{Pref: 20, Host: "b.pref.test"}, testworld.MX{Pref: 10, Host: "a.pref.test"})
	d.SetA("a.pref.test", "192.0.2.1")
	d.SetA("b.pref.test", "192.0.2.2")
	d.SetA("implicit.test", "192.0.2.3")
	d.SetNullMX("null.test")
	d.SetMX("mixednull.test", testworld.MX{Pref: 0, Host: "."}, testworld.MX{Pref: 10, Host: "a.pref.test"})
	d.SetMX("deadtargets.test", testworld.MX{Pref: 10, Host: "nx1.nowhere.test"}, testworld.MX{Pref: 20, Host: "nx2.nowhere.test"})
	d.SetMX("tempfail.test", testworld.MX{Pref: 10, Host: "sf.tempfail.test"})
	d.SetServFail("sf.tempfail.test", dns.TypeANY, true)
	d.SetServFail("servfail.test", dns.TypeMX, true)
	d.SetMX("self.test", testworld.MX{Pref: 10, Host: "relay.self.test"})
	d.SetA("relay.self.test", "192.0.2.9")
	d.SetCNAME("alias.test", "pref.test")

	tests := []struct {
		name      string
		domain    string
		want      []string
		permanent bool
		enhanced  string
		implicit  bool
	}{
		{name: "preference order", domain: "pref.test", want: []string{"a.pref.test", "b.pref.test"}},
		{name: "implicit MX when no MX record (SMTP-5.1-d)", domain: "implicit.test", want: []string{"implicit.test"}, implicit: true},
		{name: "CNAME at the domain is followed (SMTP-5.1-a)", domain: "alias.test", want: []string{"a.pref.test", "b.pref.test"}},
		{name: "null MX fails at once (NULLMX-3-a)", domain: "null.test", permanent: true, enhanced: "5.1.10"},
		{name: "null MX mixed with real MX uses the others (NULLMX-3-b)", domain: "mixednull.test", want: []string{"a.pref.test"}},
		{name: "NXDOMAIN is permanent (SMTP-5.1-b)", domain: "nxdomain.test", permanent: true, enhanced: "5.1.2"},
		{name: "SERVFAIL is temporary (SMTP-5.1-c)", domain: "servfail.test", enhanced: "4.4.3"},
		{name: "MX targets that do not exist: permanent (SMTP-5.1-f)", domain: "deadtargets.test", permanent: true, enhanced: "5.4.4"},
		{name: "MX target lookups failing temporarily: temporary (SMTP-5.1-f)", domain: "tempfail.test", enhanced: "4.4.3"},
		{name: "the relay itself is never a destination", domain: "self.test", permanent: true, enhanced: "5.4.6"},
		{name: "address literal needs no DNS (RFC 5321 §4.1.3)", domain: "[192.0.2.7]", want: []string{"192.0.2.7"}, implicit: true},
		{name: "bad address literal", domain: "[nonsense]", permanent: true, enhanced: "5.1.2"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			hosts, err := route(ctx, r, tc.domain, "relay.self.test", false, false)
			if tc.enhanced != "" {
				var re *routeError
				if !errors.As(err, &re) {
					t.Fatalf("err = %v, want a routeError", err)
				}
				if re.Permanent != tc.permanent || re.Enhanced != tc.enhanced {
					t.Fatalf("got permanent=%v %s (%s), want permanent=%v %s", re.Permanent, re.Enhanced, re.Msg, tc.permanent, tc.enhanced)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			got := hostNames(hosts)
			if len(got) != len(tc.want) {
				t.Fatalf("hosts %v, want %v", got, tc.want)
			}
			for i := range got {
				if got[i] != tc.want[i] {
					t.Fatalf("hosts %v, want %v", got, tc.want)
				}
				if len(hosts[i].IPs) == 0 {
					t.Errorf("host %s has no addresses", got[i])
				}
				if hosts[i].Implicit != tc.implicit {
					t.Errorf("host %s implicit=%v", got[i], hosts[i].Implicit)
				}
			}
		})
	}
}

// RFC 5321 §5.1 (SMTP-5.1-g): equal preferences in random order, the
// higher preference never first.
func TestRouteRandomizesEqualPreferences(t *testing.T) {
	w := testworld.New(t)
	r := worldResolver(t, w)
	w.DNS.SetMX("eq.test", testworld.MX{Pref: 10, Host: "a.eq.test"}, testworld.MX{Pref: 10, Host: "b.eq.test"}, testworld.MX{Pref: 20, Host: "c.eq.test"})
	for _, h := range []string{"a.eq.test", "b.eq.test", "c.eq.test"} {
		w.DNS.SetA(h, "192.0.2.1")
	}
	first := map[string]int{}
	const n = 60
	for range n {
		hosts, err := route(context.Background(), r, "eq.test", "relay.test", false, false)
		if err != nil {
			t.Fatal(err)
		}
		first[hosts[0].Name]++
		if hosts[2].Name != "c.eq.test" {
			t.Fatalf("preference 20 not last: %v", hostNames(hosts))
		}
	}
	if first["a.eq.test"] < n/6 || first["b.eq.test"] < n/6 {
		t.Errorf("equal preferences not shuffled: first counts %v over %d lookups", first, n)
	}
}

// The bound on hosts tried per attempt.
func TestRouteBoundsHosts(t *testing.T) {
	w := testworld.New(t)
	r := worldResolver(t, w)
	var mxs []testworld.MX
	for i := range 9 {
		h := string(rune('a'+i)) + ".many.test"
		mxs = append(mxs, testworld.MX{Pref: uint16(10 + i), Host: h})
		w.DNS.SetA(h, "192.0.2.1", "192.0.2.2", "192.0.2.3")
	}
	w.DNS.SetMX("many.test", mxs...)
	hosts, err := route(context.Background(), r, "many.test", "relay.test", false, false)
	if err != nil {
		t.Fatal(err)
	}
	if len(hosts) != maxHostsPerAttempt {
		t.Errorf("%d hosts, want %d", len(hosts), maxHostsPerAttempt)
	}
	for _, h := range hosts {
		if len(h.IPs) > maxIPsPerHost {
			t.Errorf("%s: %d addresses, want at most %d", h.Name, len(h.IPs), maxIPsPerHost)
		}
	}
}
