package relay

import (
	"net/netip"
	"strings"
	"testing"
	"time"

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

func TestValidAddress(t *testing.T) {
	for _, tc := range []struct {
		addr string
		ok   bool
	}{
		{"a@example.com", true},
		{"a.b+c@sub.example.co.uk", true},
		{"a@[192.0.2.1]", true},
		{"a@[IPv6:2001:db8::1]", true},
		{"a@bücher.example", true},
		{"a@localhost", true},
		{"a@", false},
		{"@example.com", false},
		{"a@example..com", false},
		{"a@-example.com", false},
		{"a@example-.com", false},
		{"a@exa_mple.com", false},
		{"a@example.com.", false},
		{"a@[]", false},
		{"a b@example.com", false}, // was "a b"@example.com
		{"a\"b@example.com", false},
		{"a@b@example.com", false},
		{"a@" + strings.Repeat("x", 64) + ".com", false},
	} {
		if got := validAddress(tc.addr); got != tc.ok {
			t.Errorf("validAddress(%q) = %v, want %v", tc.addr, got, tc.ok)
		}
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
