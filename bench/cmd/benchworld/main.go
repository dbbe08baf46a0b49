// Command benchworld is the loopback "Internet" of the Postfix/stsrelay
// benchmark (bench/run.sh). It serves, all on 127.0.0.0/8:
//
//   - an authoritative DNS zone (internal/testworld's DNS server, UDP and TCP) for a handful of
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
	"crypto/tls"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/internal/testworld"
)

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

	// The test CA of internal/testworld (the one the tests use); its
	// issued files go to a temporary directory, the root to DIR/ca.pem.
	caDir, err := os.MkdirTemp("", "benchworld-ca-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(caDir)
	ca, err := testworld.NewCA(caDir)
	if err != nil {
		log.Fatal(err)
	}
	mx, err := ca.IssueCert(testworld.CertValid, "mx.tls.bench.test", "mx.sts.bench.test", "mx.wan.bench.test", "mx.wannc.bench.test")
	if err != nil {
		log.Fatal(err)
	}
	sts, err := ca.IssueCert(testworld.CertValid, "mta-sts.sts.bench.test")
	if err != nil {
		log.Fatal(err)
	}
	mxCert, stsCert := mx.TLS, sts.TLS

	// DNS: the test kit's authoritative server (internal/testworld).
	dnsSrv, err := testworld.NewDNSServer(*dnsAddr)
	if err != nil {
		log.Fatalf("benchworld: dns: %v", err)
	}
	defer dnsSrv.Close()
	dnsSrv.SetTTL(300)
	dnsSrv.SetA("mx.plain.bench.test", *plainIP)
	dnsSrv.SetA("mx.tls.bench.test", *tlsIP)
	dnsSrv.SetA("mx.sts.bench.test", *tlsIP)
	dnsSrv.SetA("mx.down.bench.test", *downIP)
	dnsSrv.SetA("mta-sts.sts.bench.test", *httpsIP)
	dnsSrv.SetA("mx.wan.bench.test", *wanIP)
	dnsSrv.SetA("mx.wannc.bench.test", *wanNCIP)
	for _, d := range []string{"plain", "tls", "sts", "down", "wan", "wannc"} {
		dnsSrv.SetMX(d+".bench.test", testworld.MX{Pref: 10, Host: "mx." + d + ".bench.test"})
	}
	dnsSrv.SetTXT("_mta-sts.sts.bench.test", []string{"v=STSv1; id=" + *policyID + ";"})

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
	if err := os.WriteFile(filepath.Join(*dir, "ca.pem"), ca.RootPEM(), 0o644); err != nil {
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
