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
// The world also runs outside `go test` (stsrelay demo): NewWorld and the
// Start… methods return errors instead of failing a test, and World.Close
// stops everything. The test helpers (New, NewMX, PolicyHost, CA.Issue, …)
// are thin wrappers over them that fail the test on error; on a world from
// NewWorld they panic instead, so code outside tests uses the Start…
// methods.
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

// Options configures a world made with NewWorld.
type Options struct {
	// Dir is where certificates, keys and the CA file are written. Empty:
	// a new temporary directory, removed by Close.
	Dir string
}

// shutdownTimeout bounds how long any server of the world may take to stop.
const shutdownTimeout = 5 * time.Second

// firstHost is the first host number NextIP hands out in the world's /24;
// lower numbers are left alone so that .0 and .1 never appear.
const firstHost = 10

// World is one test's loopback Internet. Create it with New (in a test) or
// NewWorld (anywhere); it is safe for concurrent use.
type World struct {
	// DNS is the world's DNS server. Point the relay's resolver at DNS.Addr().
	DNS *DNSServer
	// CA is the world's certificate authority. Its root is in CAFile.
	CA *CA

	t      testing.TB // nil for a world from NewWorld
	prefix [3]byte    // 127.a.b
	dir    string
	ownDir bool

	mu        sync.Mutex
	next      int
	mxPort    int
	httpsPort int
	caFile    string
	closers   []func()
	closed    bool
}

// New starts a world for t: it picks a random /24 inside 127.0.0.0/8, starts
// the DNS server on its first address and creates the test CA. Everything is
// stopped when t ends.
func New(t testing.TB) *World {
	t.Helper()
	w, err := newWorld(Options{Dir: t.TempDir()}, t)
	if err != nil {
		t.Fatal(err)
	}
	return w
}

// NewWorld starts a world outside a test: like New, but errors are
// returned, and the caller stops the world with Close.
func NewWorld(opts Options) (*World, error) {
	return newWorld(opts, nil)
}

func newWorld(opts Options, t testing.TB) (*World, error) {
	w := &World{
		t:      t,
		prefix: [3]byte{127, byte(1 + rand.IntN(254)), byte(rand.IntN(256))},
		next:   firstHost,
		dir:    opts.Dir,
	}
	if w.dir == "" {
		d, err := os.MkdirTemp("", "testworld-")
		if err != nil {
			return nil, fmt.Errorf("testworld: %w", err)
		}
		w.dir, w.ownDir = d, true
	} else if err := os.MkdirAll(w.dir, 0o755); err != nil {
		return nil, fmt.Errorf("testworld: %w", err)
	}
	fail := func(err error) (*World, error) {
		if t == nil {
			w.Close()
		}
		return nil, err
	}
	ca, err := NewCA(w.dir)
	if err != nil {
		return fail(err)
	}
	ca.t = t
	w.CA = ca
	f := filepath.Join(w.dir, "testworld-ca.pem")
	if err := os.WriteFile(f, w.CA.RootPEM(), 0o644); err != nil {
		return fail(fmt.Errorf("testworld: write CA file: %w", err))
	}
	w.caFile = f
	ip, err := w.nextIP()
	if err != nil {
		return fail(err)
	}
	d, err := newDNSServer(ip)
	if err != nil {
		return fail(err)
	}
	w.DNS = d
	w.onClose(d.Close)
	return w, nil
}

// onClose arranges for f to run when the world stops: at the end of the
// test (t.Cleanup, in the usual last-in-first-out order), or in Close.
func (w *World) onClose(f func()) {
	if w.t != nil {
		w.t.Cleanup(f)
		return
	}
	w.mu.Lock()
	closed := w.closed
	if !closed {
		w.closers = append(w.closers, f)
	}
	w.mu.Unlock()
	if closed {
		f()
	}
}

// Close stops every server of the world, last started first, and removes
// the world's temporary directory if NewWorld made it. For a world from
// New, the test's end does this and Close does nothing.
func (w *World) Close() {
	w.mu.Lock()
	closers := w.closers
	w.closers, w.closed = nil, true
	w.mu.Unlock()
	for i := len(closers) - 1; i >= 0; i-- {
		closers[i]()
	}
	if w.ownDir {
		os.RemoveAll(w.dir)
	}
}

// Dir is the directory holding the world's certificate files.
func (w *World) Dir() string { return w.dir }

// fatalf reports a failure of a test helper: it fails the test, or, on a
// world from NewWorld, panics (use the Start… methods there).
func (w *World) fatalf(format string, args ...any) {
	if w.t != nil {
		w.t.Helper()
		w.t.Fatalf(format, args...)
	}
	panic(fmt.Sprintf(format, args...))
}

// NextIP returns an address of the world's /24 that has not been handed out
// before, starting at 127.a.b.10.
func (w *World) NextIP() string {
	ip, err := w.nextIP()
	if err != nil {
		w.fatalf("%v", err)
	}
	return ip
}

func (w *World) nextIP() (string, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.next > 254 {
		return "", fmt.Errorf("testworld: all addresses of %d.%d.%d.0/24 are used", w.prefix[0], w.prefix[1], w.prefix[2])
	}
	ip := fmt.Sprintf("%d.%d.%d.%d", w.prefix[0], w.prefix[1], w.prefix[2], w.next)
	w.next++
	return ip, nil
}

// MXPort is the TCP port every MX server of the world listens on (the
// relay's delivery port). It is chosen on first use, by the kernel.
func (w *World) MXPort() int {
	p, err := w.port(&w.mxPort)
	if err != nil {
		w.fatalf("%v", err)
	}
	return p
}

// HTTPSPort is the TCP port every HTTPS server of the world listens on (the
// relay's MTA-STS HTTPS port). It is chosen on first use, by the kernel.
func (w *World) HTTPSPort() int {
	p, err := w.port(&w.httpsPort)
	if err != nil {
		w.fatalf("%v", err)
	}
	return p
}

// port returns *p, choosing it first if it is not set yet.
func (w *World) port(p *int) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if *p == 0 {
		n, err := w.pickPortLocked()
		if err != nil {
			return 0, err
		}
		*p = n
	}
	return *p, nil
}

// pickPortLocked asks the kernel for a free port on a fresh address of the
// world. The address is used up, so no server of the world can later hold
// the port on it by accident.
func (w *World) pickPortLocked() (int, error) {
	if w.next > 254 {
		return 0, errors.New("testworld: no address left to pick a port on")
	}
	ip := fmt.Sprintf("%d.%d.%d.%d", w.prefix[0], w.prefix[1], w.prefix[2], w.next)
	w.next++
	l, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		return 0, fmt.Errorf("testworld: pick a port: %w", err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	return port, nil
}

// listenShared listens on ip:port. When ip was chosen by the world (auto) and
// the port is taken on it (another process may use the same address by
// chance), it moves on to the next free address; an address the caller chose
// is not replaced.
func (w *World) listenShared(ip string, auto bool, port int) (net.Listener, string, error) {
	for tries := 0; ; tries++ {
		l, err := net.Listen("tcp", net.JoinHostPort(ip, fmt.Sprint(port)))
		if err == nil {
			return l, ip, nil
		}
		if !auto || !errors.Is(err, syscall.EADDRINUSE) || tries >= 10 {
			return nil, "", fmt.Errorf("testworld: listen on %s port %d: %w", ip, port, err)
		}
		if ip, err = w.nextIP(); err != nil {
			return nil, "", err
		}
	}
}

// CAFile is the path of a PEM file holding the root certificate of w.CA (not
// the "unknown" CA), for the relay's tls.extra_root_ca_file.
func (w *World) CAFile() string {
	w.mu.Lock()
	defer w.mu.Unlock()
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
