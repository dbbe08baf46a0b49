// Package testworld builds a small Internet on loopback for tests of the
// relay: an authoritative DNS server (miekg/dns), a test certificate
// authority, SMTP servers playing MX hosts (go-smtp) and HTTPS servers playing
// MTA-STS policy hosts and TLS-RPT report receivers (net/http).
//
// Every part is a real server speaking the real protocol on a 127.0.0.0/8
// address, so the code under test uses its production DNS client, SMTP client
// and HTTP client unchanged: only the addresses, the port numbers and the
// trusted roots differ from the Internet. Each World takes a random /24 inside
// 127.0.0.0/8, so test processes running in parallel do not collide, and every
// server it starts stops by itself when the test ends (t.Cleanup).
//
// A typical test:
//
//	w := testworld.New(t)
//	mx := w.NewMX(testworld.MXOptions{Hostname: "mx1.ex.test",
//		Cert: w.CA.Issue(testworld.CertValid, "mx1.ex.test")})
//	w.DNS.SetMX("ex.test", testworld.MX{Pref: 10, Host: "mx1.ex.test"})
//	w.DNS.SetA("mx1.ex.test", mx.IP())
//	// ... run the relay with dns server w.DNS.Addr(), delivery port
//	// w.MXPort(), extra roots w.CAFile() ...
//	got := mx.WaitMessages(t, 1, 10*time.Second)
//
// The MX servers of a world all listen on one shared port (MXPort) and the
// HTTPS servers on another (HTTPSPort), because the relay, like a real MTA,
// connects to one fixed port on whatever address DNS gives it.
package testworld

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"
)

// shutdownTimeout bounds how long any server of the world may take to stop.
const shutdownTimeout = 5 * time.Second

// firstHost is the first host number NextIP hands out in the world's /24;
// lower numbers are left alone so that .0 and .1 never appear.
const firstHost = 10

// World is one test's loopback Internet. Create it with New; it is safe for
// concurrent use.
type World struct {
	// DNS is the world's DNS server. Point the relay's resolver at DNS.Addr().
	DNS *DNSServer
	// CA is the world's certificate authority. Its root is in CAFile.
	CA *CA

	t      testing.TB
	prefix [3]byte // 127.a.b

	mu        sync.Mutex
	next      int
	mxPort    int
	httpsPort int
	caFile    string
}

// New starts a world for t: it picks a random /24 inside 127.0.0.0/8, starts
// the DNS server on its first address and creates the test CA. Everything is
// stopped when t ends.
func New(t testing.TB) *World {
	t.Helper()
	w := &World{
		t:      t,
		prefix: [3]byte{127, byte(1 + rand.IntN(254)), byte(rand.IntN(256))},
		next:   firstHost,
	}
	w.CA = newCA(t)
	w.DNS = newDNSServer(t, w.NextIP())
	return w
}

// NextIP returns an address of the world's /24 that has not been handed out
// before, starting at 127.a.b.10.
func (w *World) NextIP() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.next > 254 {
		w.t.Fatalf("testworld: all addresses of %d.%d.%d.0/24 are used", w.prefix[0], w.prefix[1], w.prefix[2])
	}
	ip := fmt.Sprintf("%d.%d.%d.%d", w.prefix[0], w.prefix[1], w.prefix[2], w.next)
	w.next++
	return ip
}

// MXPort is the TCP port every MX server of the world listens on (the
// relay's delivery port). It is chosen on first use, by the kernel.
func (w *World) MXPort() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.mxPort == 0 {
		w.mxPort = w.pickPortLocked()
	}
	return w.mxPort
}

// HTTPSPort is the TCP port every HTTPS server of the world listens on (the
// relay's MTA-STS HTTPS port). It is chosen on first use, by the kernel.
func (w *World) HTTPSPort() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.httpsPort == 0 {
		w.httpsPort = w.pickPortLocked()
	}
	return w.httpsPort
}

// pickPortLocked asks the kernel for a free port on a fresh address of the
// world. The address is used up, so no server of the world can later hold
// the port on it by accident.
func (w *World) pickPortLocked() int {
	if w.next > 254 {
		w.t.Fatalf("testworld: no address left to pick a port on")
	}
	ip := fmt.Sprintf("%d.%d.%d.%d", w.prefix[0], w.prefix[1], w.prefix[2], w.next)
	w.next++
	l, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		w.t.Fatalf("testworld: pick a port: %v", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	return port
}

// listenShared listens on ip:port. When ip was chosen by the world (auto) and
// the port is taken on it (another process may use the same address by
// chance), it moves on to the next free address; an address the caller chose
// is not replaced.
func (w *World) listenShared(ip string, auto bool, port int) (net.Listener, string) {
	w.t.Helper()
	for tries := 0; ; tries++ {
		l, err := net.Listen("tcp", net.JoinHostPort(ip, fmt.Sprint(port)))
		if err == nil {
			return l, ip
		}
		if !auto || !errors.Is(err, syscall.EADDRINUSE) || tries >= 10 {
			w.t.Fatalf("testworld: listen on %s port %d: %v", ip, port, err)
		}
		ip = w.NextIP()
	}
}

// CAFile is the path of a PEM file holding the root certificate of w.CA (not
// the "unknown" CA), for the relay's tls.extra_root_ca_file.
func (w *World) CAFile() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.caFile == "" {
		f := filepath.Join(w.t.TempDir(), "testworld-ca.pem")
		if err := os.WriteFile(f, w.CA.RootPEM(), 0o644); err != nil {
			w.t.Fatalf("testworld: write CA file: %v", err)
		}
		w.caFile = f
	}
	return w.caFile
}

// sleepOrDone waits for d, and reports false if done closed first: every
// scripted delay in the world uses it so that shutdown is never held up.
func sleepOrDone(d time.Duration, done <-chan struct{}) bool {
	if d <= 0 {
		return true
	}
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-tm.C:
		return true
	case <-done:
		return false
	}
}
