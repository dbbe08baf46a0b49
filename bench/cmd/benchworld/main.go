// Command benchworld is the loopback "Internet" of the Postfix/stsrelay
// benchmark (bench/run.sh). It serves, all on 127.0.0.0/8:
//
//   - an authoritative DNS zone (miekg/dns, UDP and TCP) for a handful of
//     destination domains:
//     plain.bench.test  MX mx.plain.bench.test -> -plain-ip (Postfix's smtp-sink)
//     tls.bench.test    MX mx.tls.bench.test   -> -tls-ip   (this program's STARTTLS sink)
//     sts.bench.test    MX mx.sts.bench.test   -> -tls-ip   (same sink, MTA-STS enforce)
//     down.bench.test   MX mx.down.bench.test  -> -down-ip  (nothing listens: accept-only)
//     wan.bench.test    MX mx.wan.bench.test   -> -wan-ip   (bench/cmd/latencyproxy in front of -wan-sink)
//     wannc.bench.test  MX mx.wannc.bench.test -> -wannc-ip (latencyproxy in front of -wan-sink-nochunking)
//     plus _mta-sts.sts.bench.test TXT and mta-sts.sts.bench.test A -> -https-ip;
//   - a test CA (written to DIR/ca.pem) and, signed by it, the certificates
//     of the STARTTLS sink (mx.tls.bench.test, mx.sts.bench.test) and of the
//     MTA-STS policy host;
//   - the STARTTLS sink: a go-smtp server on -tls-ip:-smtp-port that reads
//     and discards every message and counts it;
//   - with -wan-sink / -wan-sink-nochunking, the WAN sinks (wansink.go): a
//     small STARTTLS SMTP server of our own, with the same certificate,
//     advertising PIPELINING and, on -wan-sink only, CHUNKING (go-smtp's
//     server cannot switch CHUNKING off); they count into the same counter;
//   - the HTTPS policy host on -https-ip:-https-port serving an "enforce"
//     policy that lists mx.sts.bench.test;
//   - GET http://-http/count: the number of messages the sinks have accepted.
//
// It writes DIR/ready when everything listens and runs until SIGINT/SIGTERM.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"flag"
	"fmt"
	"io"
	"log"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/emersion/go-smtp"
	"github.com/miekg/dns"
)

const zone = "bench.test."

func main() {
	dir := flag.String("dir", ".", "directory for ca.pem and the ready file")
	dnsAddr := flag.String("dns", "127.0.0.1:5353", "DNS listen address (UDP and TCP)")
	plainIP := flag.String("plain-ip", "127.0.0.3", "address of the plain sink (smtp-sink)")
	tlsIP := flag.String("tls-ip", "127.0.0.4", "address of the STARTTLS sink (this program)")
	downIP := flag.String("down-ip", "127.0.0.6", "address where nothing listens")
	httpsIP := flag.String("https-ip", "127.0.0.5", "address of the MTA-STS policy host")
	smtpPort := flag.Int("smtp-port", 2525, "STARTTLS sink port (on -tls-ip)")
	httpsPort := flag.Int("https-port", 8443, "policy host port (on -https-ip)")
	httpAddr := flag.String("http", "127.0.0.1:8089", "counter endpoint (GET /count)")
	policyID := flag.String("policy-id", "bench1", "MTA-STS TXT id")
	wanIP := flag.String("wan-ip", "127.0.0.7", "address of mx.wan.bench.test (the latency proxy in front of -wan-sink)")
	wanNCIP := flag.String("wannc-ip", "127.0.0.8", "address of mx.wannc.bench.test (the latency proxy in front of -wan-sink-nochunking)")
	wanSinkAddr := flag.String("wan-sink", "", "host:port of a WAN sink that advertises CHUNKING (empty: none)")
	wanNCSinkAddr := flag.String("wan-sink-nochunking", "", "host:port of a WAN sink that does not advertise CHUNKING (empty: none)")
	flag.Parse()

	for _, a := range []string{*dnsAddr, *httpAddr, *plainIP, *tlsIP, *downIP, *httpsIP, *wanIP, *wanNCIP, *wanSinkAddr, *wanNCSinkAddr} {
		if a == "" {
			continue
		}
		h := a
		if hh, _, err := net.SplitHostPort(a); err == nil {
			h = hh
		}
		ip := net.ParseIP(h)
		if ip == nil || !ip.IsLoopback() || ip.To4() == nil {
			log.Fatalf("benchworld: %s is not an IPv4 loopback address", a)
		}
	}

	ca, err := newCA()
	if err != nil {
		log.Fatal(err)
	}
	mxCert, err := ca.issue("mx.tls.bench.test", "mx.sts.bench.test", "mx.wan.bench.test", "mx.wannc.bench.test")
	if err != nil {
		log.Fatal(err)
	}
	stsCert, err := ca.issue("mta-sts.sts.bench.test")
	if err != nil {
		log.Fatal(err)
	}

	// DNS.
	z := newZone()
	z.a("mx.plain.bench.test.", *plainIP)
	z.a("mx.tls.bench.test.", *tlsIP)
	z.a("mx.sts.bench.test.", *tlsIP)
	z.a("mx.down.bench.test.", *downIP)
	z.a("mta-sts.sts.bench.test.", *httpsIP)
	z.a("mx.wan.bench.test.", *wanIP)
	z.a("mx.wannc.bench.test.", *wanNCIP)
	for _, d := range []string{"plain", "tls", "sts", "down", "wan", "wannc"} {
		z.mx(d+".bench.test.", "mx."+d+".bench.test.")
	}
	z.txt("_mta-sts.sts.bench.test.", "v=STSv1; id="+*policyID+";")
	var servers []*dns.Server
	for _, netw := range []string{"udp", "tcp"} {
		s := &dns.Server{Addr: *dnsAddr, Net: netw, Handler: z}
		started := make(chan error, 1)
		s.NotifyStartedFunc = func() { started <- nil }
		go func() {
			if err := s.ListenAndServe(); err != nil {
				started <- err
			}
		}()
		if err := <-started; err != nil {
			log.Fatalf("benchworld: dns %s: %v", netw, err)
		}
		servers = append(servers, s)
	}

	// STARTTLS sink.
	var count atomic.Int64
	srv := smtp.NewServer(smtp.BackendFunc(func(c *smtp.Conn) (smtp.Session, error) {
		return &sinkSession{count: &count}, nil
	}))
	srv.Addr = net.JoinHostPort(*tlsIP, fmt.Sprint(*smtpPort))
	srv.Domain = "mx.tls.bench.test"
	srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{mxCert}}
	srv.MaxMessageBytes = 64 << 20
	srv.MaxRecipients = 1000
	srv.ReadTimeout = 5 * time.Minute
	srv.WriteTimeout = 5 * time.Minute
	srv.ErrorLog = log.New(io.Discard, "", 0)
	smtpLn, err := net.Listen("tcp", srv.Addr)
	if err != nil {
		log.Fatalf("benchworld: sink: %v", err)
	}
	go srv.Serve(smtpLn)

	// WAN sinks.
	var wanLns []net.Listener
	for _, ws := range []struct {
		addr, name string
		chunking   bool
	}{{*wanSinkAddr, "mx.wan.bench.test", true}, {*wanNCSinkAddr, "mx.wannc.bench.test", false}} {
		if ws.addr == "" {
			continue
		}
		ln, err := net.Listen("tcp", ws.addr)
		if err != nil {
			log.Fatalf("benchworld: wan sink: %v", err)
		}
		wanLns = append(wanLns, ln)
		s := &wanSink{name: ws.name, chunking: ws.chunking, count: &count,
			tls: &tls.Config{Certificates: []tls.Certificate{mxCert}}}
		go s.serve(ln)
	}

	// MTA-STS policy host.
	policy := "version: STSv1\r\nmode: enforce\r\nmx: mx.sts.bench.test\r\nmax_age: 86400\r\n"
	hmux := http.NewServeMux()
	hmux.HandleFunc("/.well-known/mta-sts.txt", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		io.WriteString(w, policy)
	})
	hsrv := &http.Server{Handler: hmux, TLSConfig: &tls.Config{Certificates: []tls.Certificate{stsCert}}}
	hln, err := net.Listen("tcp", net.JoinHostPort(*httpsIP, fmt.Sprint(*httpsPort)))
	if err != nil {
		log.Fatalf("benchworld: https: %v", err)
	}
	go hsrv.ServeTLS(hln, "", "")

	// Counter.
	cmux := http.NewServeMux()
	cmux.HandleFunc("/count", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%d\n", count.Load())
	})
	csrv := &http.Server{Handler: cmux}
	cln, err := net.Listen("tcp", *httpAddr)
	if err != nil {
		log.Fatalf("benchworld: counter: %v", err)
	}
	go csrv.Serve(cln)

	// Only now that every listener is ours: a second benchworld that
	// failed to bind must not overwrite the running one's CA.
	if err := os.WriteFile(filepath.Join(*dir, "ca.pem"), ca.pem, 0o644); err != nil {
		log.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(*dir, "ready"), []byte("ready\n"), 0o644); err != nil {
		log.Fatal(err)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	<-sig
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	for _, s := range servers {
		s.ShutdownContext(ctx)
	}
	srv.Close()
	for _, ln := range wanLns {
		ln.Close()
	}
	hsrv.Shutdown(ctx)
	csrv.Shutdown(ctx)
}

// sinkSession accepts any envelope, discards the body and counts it.
type sinkSession struct {
	count *atomic.Int64
}

func (s *sinkSession) Reset()                               {}
func (s *sinkSession) Logout() error                        { return nil }
func (s *sinkSession) Mail(string, *smtp.MailOptions) error { return nil }
func (s *sinkSession) Rcpt(string, *smtp.RcptOptions) error { return nil }
func (s *sinkSession) Data(r io.Reader) error {
	if _, err := io.Copy(io.Discard, r); err != nil {
		return err
	}
	s.count.Add(1)
	return nil
}

// zoneData is a tiny authoritative zone.
type zoneData struct {
	rrs map[string][]dns.RR // by owner name, lower case, fully qualified
}

func newZone() *zoneData { return &zoneData{rrs: map[string][]dns.RR{}} }

func (z *zoneData) add(rr dns.RR) {
	n := strings.ToLower(rr.Header().Name)
	z.rrs[n] = append(z.rrs[n], rr)
}

func (z *zoneData) a(name, ip string) {
	z.add(&dns.A{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: 300}, A: net.ParseIP(ip).To4()})
}

func (z *zoneData) mx(name, host string) {
	z.add(&dns.MX{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeMX, Class: dns.ClassINET, Ttl: 300}, Preference: 10, Mx: host})
}

func (z *zoneData) txt(name, s string) {
	z.add(&dns.TXT{Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeTXT, Class: dns.ClassINET, Ttl: 300}, Txt: []string{s}})
}

func (z *zoneData) soa() dns.RR {
	return &dns.SOA{Hdr: dns.RR_Header{Name: zone, Rrtype: dns.TypeSOA, Class: dns.ClassINET, Ttl: 60},
		Ns: "ns." + zone, Mbox: "hostmaster." + zone, Serial: 1, Refresh: 3600, Retry: 600, Expire: 86400, Minttl: 60}
}

func (z *zoneData) ServeDNS(w dns.ResponseWriter, req *dns.Msg) {
	m := new(dns.Msg)
	m.SetReply(req)
	m.Authoritative = true
	m.RecursionAvailable = true
	if len(req.Question) != 1 {
		m.Rcode = dns.RcodeFormatError
		w.WriteMsg(m)
		return
	}
	q := req.Question[0]
	name := strings.ToLower(q.Name)
	if !dns.IsSubDomain(zone, name) {
		m.Rcode = dns.RcodeRefused
		w.WriteMsg(m)
		return
	}
	rrs, ok := z.rrs[name]
	if !ok {
		// Empty non-terminals (e.g. bench.test itself) are NODATA, the
		// rest NXDOMAIN.
		nx := true
		for n := range z.rrs {
			if dns.IsSubDomain(name, n) {
				nx = false
				break
			}
		}
		if nx {
			m.Rcode = dns.RcodeNameError
		}
		m.Ns = append(m.Ns, z.soa())
		w.WriteMsg(m)
		return
	}
	for _, rr := range rrs {
		if rr.Header().Rrtype == q.Qtype || q.Qtype == dns.TypeANY {
			m.Answer = append(m.Answer, dns.Copy(rr))
		}
	}
	if len(m.Answer) == 0 {
		m.Ns = append(m.Ns, z.soa())
	}
	w.WriteMsg(m)
}

// testCA is a throwaway certificate authority.
type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newCA() (*testCA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "stsrelay bench test CA"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(7 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

var serial atomic.Int64

func (ca *testCA) issue(names ...string) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(100 + serial.Add(1)),
		Subject:      pkix.Name{CommonName: names[0]},
		DNSNames:     names,
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(7 * 24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{der, ca.cert.Raw}, PrivateKey: key}, nil
}
