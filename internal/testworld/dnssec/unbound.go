package dnssec

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// DefaultUnboundIP is the loopback address StartUnbound listens on.
const DefaultUnboundIP = "127.0.53.2"

// unboundStartTimeout bounds how long unbound may take to answer its first
// query; queryTimeout bounds one query of Unbound.Query.
const (
	unboundStartTimeout = 10 * time.Second
	queryTimeout        = 5 * time.Second
)

// UnboundPath finds the unbound binary: on $PATH, else in the sbin
// directories, which are not always on a test's $PATH.
func UnboundPath() (string, error) {
	if p, err := exec.LookPath("unbound"); err == nil {
		return p, nil
	}
	for _, p := range []string{"/usr/sbin/unbound", "/usr/local/sbin/unbound", "/opt/homebrew/sbin/unbound"} {
		if fi, err := os.Stat(p); err == nil && !fi.IsDir() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", errors.New("dnssec: unbound not found on $PATH nor in /usr/sbin, /usr/local/sbin (apt-get install unbound)")
}

// Unbound is a running unbound(8) validating resolver for a Server's tree.
type Unbound struct {
	addr   string
	dir    string
	cmd    *exec.Cmd
	exited chan struct{} // closed when the process has exited
	stderr *syncBuffer
}

// StartUnbound starts unbound on a free port of DefaultUnboundIP, validating
// the tree of root (see the package comment), and stops it when the test
// ends. It fails the test if unbound is not installed.
func StartUnbound(tb testing.TB, root *Server) *Unbound {
	tb.Helper()
	return StartUnboundAt(tb, root, DefaultUnboundIP)
}

// StartUnboundAt is StartUnbound on a free port of ip.
func StartUnboundAt(tb testing.TB, root *Server, ip string) *Unbound {
	tb.Helper()
	path, err := UnboundPath()
	if err != nil {
		tb.Fatal(err)
	}
	dir := tb.TempDir()
	var errs []string
	for try := 0; try < 3; try++ { // the free port may be taken before unbound binds it
		port, err := freePort(ip)
		if err != nil {
			tb.Fatal(err)
		}
		u := &Unbound{addr: net.JoinHostPort(ip, fmt.Sprint(port)), dir: dir, exited: make(chan struct{}), stderr: &syncBuffer{}}
		conf := filepath.Join(dir, "unbound.conf")
		if err := os.WriteFile(conf, []byte(u.config(root, ip, port)), 0o644); err != nil {
			tb.Fatal(err)
		}
		os.Remove(u.logPath())
		u.cmd = exec.Command(path, "-d", "-c", conf)
		u.cmd.Dir = dir
		u.cmd.Stdout = u.stderr
		u.cmd.Stderr = u.stderr
		if err := u.cmd.Start(); err != nil {
			tb.Fatalf("dnssec: start %s: %v", path, err)
		}
		go func() { u.cmd.Wait(); close(u.exited) }()
		if err := u.waitReady(); err != nil {
			u.Close()
			errs = append(errs, fmt.Sprintf("%v\n%s%s", err, u.stderr, u.Log()))
			continue
		}
		tb.Cleanup(func() {
			u.Close()
			if tb.Failed() {
				tb.Logf("unbound log (%s):\n%s", u.logPath(), u.Log())
			}
		})
		return u
	}
	tb.Fatalf("dnssec: unbound did not start:\n%s", strings.Join(errs, "\n---\n"))
	return nil
}

// config is unbound.conf for the tree of root, listening on ip:port.
func (u *Unbound) config(root *Server, ip string, port int) string {
	var b strings.Builder
	fmt.Fprintf(&b, `server:
	verbosity: 1
	interface: %s
	port: %d
	interface-automatic: no
	do-ip4: yes
	do-ip6: no
	do-udp: yes
	do-tcp: yes
	access-control: 127.0.0.0/8 allow
	do-not-query-localhost: no
	num-threads: 1
	so-reuseport: no
	chroot: ""
	username: ""
	directory: %q
	pidfile: %q
	use-syslog: no
	logfile: %q
	log-servfail: yes
	module-config: "validator iterator"
	trust-anchor: %q
	trust-anchor-signaling: no
	root-key-sentinel: no
	harden-dnssec-stripped: yes
	val-log-level: 2
	val-bogus-ttl: 0
	cache-max-ttl: 0
	cache-max-negative-ttl: 0
	prefetch: no
	qname-minimisation: no
	aggressive-nsec: no
	target-fetch-policy: "0 0 0 0 0"
`, ip, port, u.dir, filepath.Join(u.dir, "unbound.pid"), u.logPath(), strings.Join(strings.Fields(root.TrustAnchor()), " "))
	// unbound answers some names itself (RFC 6761: test., invalid.,
	// localhost., onion., ...); turn that off for every name of the tree.
	seen := map[string]bool{}
	for _, z := range root.Zones() {
		for n := z.Name(); n != "." && !seen[n]; n = parentName(n) {
			seen[n] = true
			fmt.Fprintf(&b, "\tlocal-zone: %q nodefault\n", n)
		}
	}
	b.WriteString("\nremote-control:\n\tcontrol-enable: no\n")
	for _, z := range root.Zones() {
		fmt.Fprintf(&b, "\nstub-zone:\n\tname: %q\n\tstub-addr: %s@%d\n\tstub-prime: no\n", z.Name(), root.IP(), root.Port())
	}
	return b.String()
}

func (u *Unbound) logPath() string { return filepath.Join(u.dir, "unbound.log") }

// waitReady waits until unbound answers a query.
func (u *Unbound) waitReady() error {
	deadline := time.Now().Add(unboundStartTimeout)
	c := &dns.Client{Timeout: 200 * time.Millisecond}
	m := new(dns.Msg)
	m.SetQuestion(".", dns.TypeSOA)
	for time.Now().Before(deadline) {
		select {
		case <-u.exited:
			return fmt.Errorf("unbound exited: %v", u.cmd.ProcessState)
		default:
		}
		if _, _, err := c.Exchange(m, u.addr); err == nil {
			return nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	return fmt.Errorf("unbound did not answer on %s within %v", u.addr, unboundStartTimeout)
}

// Addr is unbound's "ip:port", for UDP and TCP alike.
func (u *Unbound) Addr() string { return u.addr }

// Log is unbound's log file so far.
func (u *Unbound) Log() string {
	b, _ := os.ReadFile(u.logPath())
	return string(b)
}

// Close stops unbound: SIGTERM, then SIGKILL after a few seconds, to
// exactly the process started. It is called when the test ends.
func (u *Unbound) Close() {
	select {
	case <-u.exited:
		return
	default:
	}
	u.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-u.exited:
	case <-time.After(3 * time.Second):
		u.cmd.Process.Kill()
		<-u.exited
	}
}

// Query asks unbound for name and qtype with RD, AD and DO set (EDNS0, 4096
// bytes), over UDP and again over TCP if the answer is truncated.
func (u *Unbound) Query(name string, qtype uint16) (*dns.Msg, error) {
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	m.RecursionDesired = true
	m.AuthenticatedData = true
	m.SetEdns0(4096, true)
	c := &dns.Client{Timeout: queryTimeout}
	r, _, err := c.Exchange(m, u.addr)
	if err == nil && r.Truncated {
		c.Net = "tcp"
		r, _, err = c.Exchange(m, u.addr)
	}
	return r, err
}

// freePort is a port free for both UDP and TCP on ip, at the time of asking.
func freePort(ip string) (int, error) {
	for tries := 0; tries < 20; tries++ {
		pc, err := net.ListenPacket("udp", net.JoinHostPort(ip, "0"))
		if err != nil {
			return 0, fmt.Errorf("dnssec: listen udp %s: %w", ip, err)
		}
		port := pc.LocalAddr().(*net.UDPAddr).Port
		l, err := net.Listen("tcp", net.JoinHostPort(ip, fmt.Sprint(port)))
		pc.Close()
		if err == nil {
			l.Close()
			return port, nil
		}
	}
	return 0, fmt.Errorf("dnssec: no free port on %s", ip)
}

// syncBuffer is a bytes.Buffer safe for the process's writes and our reads.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
