package relay

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/queue"
)

func TestAuthThrottleSchedule(t *testing.T) {
	th := newAuthThrottle()
	ip := netip.MustParseAddr("192.0.2.7")
	now := time.Unix(1_700_000_000, 0)
	want := []time.Duration{0, 0, time.Second, 2 * time.Second, 4 * time.Second, 8 * time.Second, 10 * time.Second, 10 * time.Second}
	for i, w := range want {
		n, d := th.fail(ip, now)
		if n != i+1 || d != w {
			t.Errorf("failure %d: got (%d, %v), want (%d, %v)", i+1, n, d, i+1, w)
		}
		now = now.Add(time.Second)
	}
	// Another client is not affected.
	if _, d := th.fail(netip.MustParseAddr("192.0.2.8"), now); d != 0 {
		t.Errorf("other client delayed %v", d)
	}
	// After a quiet period the count starts over.
	if n, d := th.fail(ip, now.Add(th.quiet+time.Second)); n != 1 || d != 0 {
		t.Errorf("after quiet period: (%d, %v), want (1, 0)", n, d)
	}
}

func TestAuthThrottleIPv6Per64(t *testing.T) {
	th := newAuthThrottle()
	now := time.Unix(1_700_000_000, 0)
	th.fail(netip.MustParseAddr("2001:db8::1"), now)
	th.fail(netip.MustParseAddr("2001:db8::2"), now)
	if n, _ := th.fail(netip.MustParseAddr("2001:db8::ffff:3"), now); n != 3 {
		t.Errorf("same /64 counted as %d failures, want 3", n)
	}
	if n, _ := th.fail(netip.MustParseAddr("2001:db8:0:1::1"), now); n != 1 {
		t.Errorf("other /64 counted as %d failures, want 1", n)
	}
}

func TestAuthThrottleBounded(t *testing.T) {
	th := newAuthThrottle()
	th.maxEntries = 100
	now := time.Unix(1_700_000_000, 0)
	for i := range 1000 {
		ip := netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)})
		th.fail(ip, now.Add(time.Duration(i)*time.Millisecond))
	}
	if n := len(th.clients); n > th.maxEntries {
		t.Errorf("%d entries, bound %d", n, th.maxEntries)
	}
	// The most recent client is still remembered.
	if _, ok := th.clients[netip.AddrFrom4([4]byte{10, 0, 3, 231})]; !ok {
		t.Error("most recent client evicted")
	}
}

func TestLoginServer(t *testing.T) {
	var gotU, gotP string
	l := &loginServer{auth: func(u, p string) error { gotU, gotP = u, p; return nil }}
	if ch, done, err := l.Next(nil); string(ch) != "Username:" || done || err != nil {
		t.Fatalf("step 1: %q %v %v", ch, done, err)
	}
	if ch, done, err := l.Next([]byte("user")); string(ch) != "Password:" || done || err != nil {
		t.Fatalf("step 2: %q %v %v", ch, done, err)
	}
	if _, done, err := l.Next([]byte("pw")); !done || err != nil || gotU != "user" || gotP != "pw" {
		t.Fatalf("step 3: %v %v %q %q", done, err, gotU, gotP)
	}
	if _, _, err := l.Next([]byte("more")); err == nil {
		t.Error("response after completion accepted")
	}
}

func TestCheckAddress(t *testing.T) {
	bad := errBadRcpt
	for _, tc := range []struct {
		name string
		addr string
		want *smtp.SMTPError
	}{
		{"plain", "a@example.com", nil},
		{"dots and plus", "a.b+c@sub.example.co.uk", nil},
		{"IPv4 literal", "a@[192.0.2.1]", nil},
		{"IPv6 literal", "a@[IPv6:2001:db8::1]", nil},
		{"IPv6 tag in lower case", "a@[ipv6:2001:db8::1]", nil},
		{"internationalized domain", "a@bücher.example", nil},
		{"single label", "a@localhost", nil},
		{"no domain", "a@", bad},
		{"no local part", "@example.com", bad},
		{"empty label", "a@example..com", bad},
		{"label starting with hyphen", "a@-example.com", bad},
		{"label ending with hyphen", "a@example-.com", bad},
		{"underscore", "a@exa_mple.com", bad},
		{"trailing dot", "a@example.com.", bad},
		{"space in local part", "a b@example.com", bad}, // was "a b"@example.com
		{"quote in local part", "a\"b@example.com", bad},
		{"two at signs", "a@b@example.com", bad},
		{"label over 63", "a@" + strings.Repeat("x", 64) + ".com", bad},
		// RFC 5321 §4.1.3: only IPv4 and IPv6: literals.
		{"empty literal", "a@[]", errAddrLiteral},
		{"literal that is a name", "a@[example.com]", errAddrLiteral},
		{"IPv6 literal without tag", "a@[2001:db8::1]", errAddrLiteral},
		{"IPv4 literal with tag", "a@[IPv6:192.0.2.1]", errAddrLiteral},
		{"IPv6 literal with zone", "a@[IPv6:fe80::1%eth0]", errAddrLiteral},
		{"general literal", "a@[x-tag:whatever]", errAddrLiteral},
		{"IPv4 literal with trailing junk", "a@[1.2.3.4/../../etc]", errAddrLiteral},
		{"short IPv4 literal", "a@[1.2.3]", errAddrLiteral},
		// Control characters anywhere: 501 5.1.3.
		{"issue 11 literal", "x@[1.2.3.4\x01\x1bP\rX-Injected:yes/../../etc]", errAddrControl},
		{"CR in local part", "a\rb@example.com", errAddrControl},
		{"ESC in domain", "a@exa\x1bmple.com", errAddrControl},
		{"DEL", "a\x7f@example.com", errAddrControl},
		{"C1 control in IDN", "a@b\u0085ücher.example", errAddrControl},
		{"invalid UTF-8", "a@b\xffcher.example", errAddrControl},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := checkAddress(tc.addr, bad); got != tc.want {
				t.Errorf("checkAddress(%q) = %v, want %v", tc.addr, got, tc.want)
			}
		})
	}
}

func TestReceivedHeader(t *testing.T) {
	s := &Server{hostname: "relay.example.net"}
	now := time.Date(2024, 3, 1, 12, 30, 0, 0, time.UTC)
	one := []queue.RcptSpec{{Addr: "r@example.com"}}
	two := []queue.RcptSpec{{Addr: "r@example.com"}, {Addr: "s@example.com"}}
	for _, tc := range []struct {
		name string
		ss   *session
		env  queue.Envelope
		want string
	}{
		{"authenticated over TLS, one recipient",
			&session{s: s, helo: "app.example", ip: netip.MustParseAddr("192.0.2.1"), tls: true},
			queue.Envelope{User: "app", Rcpts: one},
			"Received: from app.example ([192.0.2.1])\r\n\tby relay.example.net (stsrelay) with ESMTPSA\r\n\tfor <r@example.com>; Fri, 01 Mar 2024 12:30:00 +0000\r\n"},
		{"trusted, IPv6, two recipients",
			&session{s: s, helo: "app.example", ip: netip.MustParseAddr("2001:db8::1")},
			queue.Envelope{Rcpts: two},
			"Received: from app.example ([IPv6:2001:db8::1])\r\n\tby relay.example.net (stsrelay) with ESMTP; Fri, 01 Mar 2024 12:30:00 +0000\r\n"},
		{"hostile HELO, SMTPUTF8",
			&session{s: s, helo: "evil)\r\nX-Injected: yes", ip: netip.MustParseAddr("192.0.2.1"), tls: true},
			queue.Envelope{SMTPUTF8: true, Rcpts: []queue.RcptSpec{{Addr: "ü@example.com"}}},
			"Received: from evil___X-Injected:_yes ([192.0.2.1])\r\n\tby relay.example.net (stsrelay) with UTF8SMTPS\r\n\tfor <ü@example.com>; Fri, 01 Mar 2024 12:30:00 +0000\r\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.ss.receivedHeader(tc.env, now); got != tc.want {
				t.Errorf("got\n%q\nwant\n%q", got, tc.want)
			}
		})
	}
}
