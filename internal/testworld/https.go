package testworld

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"strings"
	"sync"
	"time"

	domainpkg "github.com/stsrelay/stsrelay/internal/domain"
)

// maxLoggedBody bounds how much of a request body an HTTPS server keeps.
const maxLoggedBody = 16 << 20

// Request is one request an HTTPS server received.
type Request struct {
	Host       string // Host header, without port
	Method     string
	Path       string
	RawQuery   string
	SNI        string // TLS server name the client sent
	Header     http.Header
	Body       []byte
	RemoteAddr string
	Time       time.Time
}

// HTTPSServer is an HTTPS (HTTP/1.1) server on ip:World.HTTPSPort() with one
// certificate, serving a handler per Host and logging every request.
type HTTPSServer struct {
	ip     string
	addr   string
	srv    *http.Server
	done   chan struct{}
	served chan struct{}
	once   sync.Once

	mu       sync.Mutex
	handlers map[string]http.Handler
	reqs     []Request
}

// NewHTTPS starts an HTTPS server on ip ("" takes World.NextIP) presenting
// cert. It stops when the test ends.
func (w *World) NewHTTPS(ip string, cert *Cert) *HTTPSServer {
	if w.t != nil {
		w.t.Helper()
	}
	h, err := w.StartHTTPS(ip, cert)
	if err != nil {
		w.fatalf("%v", err)
	}
	return h
}

// StartHTTPS is NewHTTPS returning its error.
func (w *World) StartHTTPS(ip string, cert *Cert) (*HTTPSServer, error) {
	if cert == nil {
		return nil, errors.New("testworld: NewHTTPS needs a certificate")
	}
	auto := ip == ""
	if auto {
		var err error
		if ip, err = w.nextIP(); err != nil {
			return nil, err
		}
	}
	port, err := w.port(&w.httpsPort)
	if err != nil {
		return nil, err
	}
	l, ip, err := w.listenShared(ip, auto, port)
	if err != nil {
		return nil, err
	}
	h := &HTTPSServer{
		ip:       ip,
		addr:     l.Addr().String(),
		done:     make(chan struct{}),
		served:   make(chan struct{}),
		handlers: map[string]http.Handler{},
	}
	h.srv = &http.Server{
		Handler:           http.HandlerFunc(h.serve),
		ReadHeaderTimeout: 30 * time.Second,
		ErrorLog:          log.New(io.Discard, "", 0), // bad-certificate tests make handshakes fail on purpose
		BaseContext:       func(net.Listener) context.Context { return h.ctx() },
	}
	tlsConfig := &tls.Config{
		Certificates: []tls.Certificate{cert.TLS},
		NextProtos:   []string{"http/1.1"},
	}
	go func() {
		defer close(h.served)
		h.srv.Serve(tls.NewListener(l, tlsConfig))
	}()
	w.onClose(h.Close)
	return h, nil
}

// ctx is a context that ends when the server closes, so that handlers
// dripping or stalling stop at once.
func (h *HTTPSServer) ctx() context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		<-h.done
		cancel()
	}()
	return ctx
}

// Addr is the server's "ip:port".
func (h *HTTPSServer) Addr() string { return h.addr }

// IP is the server's address.
func (h *HTTPSServer) IP() string { return h.ip }

// Close stops the server at once, dropping open requests. It is called
// automatically when the test ends.
func (h *HTTPSServer) Close() {
	h.once.Do(func() {
		close(h.done)
		h.srv.Close()
		select {
		case <-h.served:
		case <-time.After(shutdownTimeout):
		}
	})
}

// Handle serves requests for host (the Host header, port ignored, any case)
// with handler. Host "" is the fallback for hosts without a handler;
// without one such requests get 404.
func (h *HTTPSServer) Handle(host string, handler http.Handler) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.handlers[strings.ToLower(host)] = handler
}

// Requests is the log of requests received, oldest first.
func (h *HTTPSServer) Requests() []Request {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]Request(nil), h.reqs...)
}

func (h *HTTPSServer) serve(rw http.ResponseWriter, r *http.Request) {
	host := r.Host
	if hh, _, err := net.SplitHostPort(host); err == nil {
		host = hh
	}
	host = strings.ToLower(host)
	body, _ := io.ReadAll(io.LimitReader(r.Body, maxLoggedBody))
	r.Body = io.NopCloser(bytes.NewReader(body))
	req := Request{
		Host:       host,
		Method:     r.Method,
		Path:       r.URL.Path,
		RawQuery:   r.URL.RawQuery,
		Header:     r.Header.Clone(),
		Body:       body,
		RemoteAddr: r.RemoteAddr,
		Time:       time.Now(),
	}
	if r.TLS != nil {
		req.SNI = r.TLS.ServerName
	}
	h.mu.Lock()
	h.reqs = append(h.reqs, req)
	handler, ok := h.handlers[host]
	if !ok {
		handler, ok = h.handlers[""]
	}
	h.mu.Unlock()
	if !ok {
		http.Error(rw, "testworld: no handler for host "+host, http.StatusNotFound)
		return
	}
	handler.ServeHTTP(rw, r)
}

// PolicyServer is the MTA-STS policy host mta-sts.<domain> (RFC 8461 §3.2):
// an HTTPSServer whose answer at /.well-known/mta-sts.txt the test sets.
// Until SetPolicy or another Set method is called it answers 404. Other
// paths always get 404. SetPolicy, SetResponse, SetRedirect, SetSlowDrip and
// SetEndless each replace the answer; SetStall and SetHugeHeaders modify
// whatever answer is set and stay until changed.
type PolicyServer struct {
	*HTTPSServer
	domain string
	host   string

	mu   sync.Mutex
	resp policyResponse
}

// policyMode is what the policy host does with a request.
type policyMode int

const (
	policyFixed    policyMode = iota // status, headers and body
	policySlowDrip                   // 200, then one byte per interval
	policyEndless                    // 200, then an endless body
)

type policyResponse struct {
	mode        policyMode
	status      int
	contentType string // "" sends no Content-Type at all
	body        string
	headers     map[string]string
	interval    time.Duration
	hugeHeaders int
	stall       time.Duration
}

// PolicyPath is where RFC 8461 §3.2 puts the policy.
const PolicyPath = "/.well-known/mta-sts.txt"

// PolicyHost starts the policy host of domain: it publishes an A record for
// mta-sts.<domain> on a new address and serves HTTPS there with a
// certificate of the given kind for that name (for CertIPOnly, for the
// address). The TXT record _mta-sts.<domain> is left to the test.
func (w *World) PolicyHost(domain string, kind CertKind) *PolicyServer {
	if w.t != nil {
		w.t.Helper()
	}
	p, err := w.StartPolicyHost(domain, kind)
	if err != nil {
		w.fatalf("%v", err)
	}
	return p
}

// StartPolicyHost is PolicyHost returning its error.
func (w *World) StartPolicyHost(domain string, kind CertKind) (*PolicyServer, error) {
	domain = domainpkg.Key(domain)
	host := "mta-sts." + domain
	ip, err := w.nextIP()
	if err != nil {
		return nil, err
	}
	name := host
	if kind == CertIPOnly {
		name = ip
	}
	cert, err := w.CA.IssueCert(kind, name)
	if err != nil {
		return nil, err
	}
	h, err := w.StartHTTPS(ip, cert)
	if err != nil {
		return nil, err
	}
	w.DNS.SetA(host, h.IP())
	p := &PolicyServer{
		HTTPSServer: h,
		domain:      domain,
		host:        host,
		resp:        policyResponse{status: http.StatusNotFound, contentType: "text/plain", body: "no policy set\n"},
	}
	h.Handle("", p) // the policy host answers whatever Host the client names; the log shows it
	return p, nil
}

// Domain is the policy domain.
func (p *PolicyServer) Domain() string { return p.domain }

// Host is mta-sts.<domain>.
func (p *PolicyServer) Host() string { return p.host }

// URL is the policy URL on the world's HTTPS port.
func (p *PolicyServer) URL() string {
	_, port, _ := net.SplitHostPort(p.Addr())
	return "https://" + net.JoinHostPort(p.host, port) + PolicyPath
}

func (p *PolicyServer) set(r policyResponse) {
	p.mu.Lock()
	defer p.mu.Unlock()
	r.stall, r.hugeHeaders = p.resp.stall, p.resp.hugeHeaders
	p.resp = r
}

// SetPolicy serves body with 200 and Content-Type text/plain.
func (p *PolicyServer) SetPolicy(body string) {
	p.set(policyResponse{status: http.StatusOK, contentType: "text/plain", body: body})
}

// SetResponse serves any status, Content-Type ("" for none at all), body
// and extra headers.
func (p *PolicyServer) SetResponse(status int, contentType, body string, extraHeaders map[string]string) {
	h := map[string]string{}
	for k, v := range extraHeaders {
		h[k] = v
	}
	p.set(policyResponse{status: status, contentType: contentType, body: body, headers: h})
}

// SetRedirect answers 301 with Location, which RFC 8461 §3.3 forbids
// following.
func (p *PolicyServer) SetRedirect(location string) {
	p.set(policyResponse{status: http.StatusMovedPermanently, contentType: "text/plain", body: "moved\n",
		headers: map[string]string{"Location": location}})
}

// SetSlowDrip answers 200 text/plain and then sends the body set before
// (or a policy-like filler) one byte per interval, forever, until the client
// hangs up.
func (p *PolicyServer) SetSlowDrip(interval time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.resp.mode, p.resp.interval = policySlowDrip, interval
	p.resp.status, p.resp.contentType = http.StatusOK, "text/plain"
}

// SetEndless answers 200 text/plain with a body that never ends, to test
// the client's size limit (RFC 8461 §3.3).
func (p *PolicyServer) SetEndless() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.resp.mode = policyEndless
	p.resp.status, p.resp.contentType = http.StatusOK, "text/plain"
}

// SetHugeHeaders adds about n bytes of extra response headers (X-Pad-N, 1000
// bytes each) to whatever is served.
func (p *PolicyServer) SetHugeHeaders(n int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.resp.hugeHeaders = n
}

// SetStall holds every reply back for d (0 turns it off) before serving
// what is set; the wait ends early if the client hangs up.
func (p *PolicyServer) SetStall(d time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.resp.stall = d
}

// Count is the number of requests received.
func (p *PolicyServer) Count() int {
	p.HTTPSServer.mu.Lock()
	defer p.HTTPSServer.mu.Unlock()
	return len(p.HTTPSServer.reqs)
}

// ServeHTTP implements the policy host's behaviour.
func (p *PolicyServer) ServeHTTP(rw http.ResponseWriter, r *http.Request) {
	p.mu.Lock()
	resp := p.resp
	p.mu.Unlock()
	ctx := r.Context()

	if !sleepOrDone(resp.stall, ctx.Done()) {
		abort()
	}
	if r.URL.Path != PolicyPath {
		http.NotFound(rw, r)
		return
	}
	h := rw.Header()
	for i := 0; i*1000 < resp.hugeHeaders; i++ {
		h.Set(fmt.Sprintf("X-Pad-%d", i), strings.Repeat("x", 1000))
	}
	for k, v := range resp.headers {
		h.Set(k, v)
	}
	if resp.contentType == "" {
		h["Content-Type"] = nil // stop net/http from sniffing one
	} else {
		h.Set("Content-Type", resp.contentType)
	}
	rc := http.NewResponseController(rw)

	switch resp.mode {
	case policySlowDrip:
		body := resp.body
		if body == "" || resp.status != http.StatusOK {
			body = "version: STSv1\nmode: enforce\nmx: mx.invalid\nmax_age: 86400\n"
		}
		rw.WriteHeader(http.StatusOK)
		rc.Flush()
		tick := time.NewTicker(max(resp.interval, time.Millisecond))
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-ctx.Done():
				abort()
			case <-tick.C:
			}
			if _, err := rw.Write([]byte{body[i%len(body)]}); err != nil {
				abort()
			}
			if rc.Flush() != nil {
				abort()
			}
		}
	case policyEndless:
		rw.WriteHeader(http.StatusOK)
		chunk := []byte("version: STSv1\n" + strings.Repeat("mx: endless.invalid\n", 1600))
		for ctx.Err() == nil {
			if _, err := rw.Write(chunk); err != nil {
				abort()
			}
		}
		abort()
	default:
		rw.WriteHeader(resp.status)
		io.WriteString(rw, resp.body)
	}
}

// abort ends a response that was cut short (client gone, server closing)
// by dropping the connection: returning normally would let net/http finish
// the response cleanly, and the client would take a partial body for a whole
// one.
func abort() { panic(http.ErrAbortHandler) }

// ReportReceiver is an HTTPS sink for TLS-RPT reports (RFC 8460 §3): it
// answers POSTs with a status the test sets (200 by default) and keeps them.
type ReportReceiver struct {
	*HTTPSServer
	host string

	mu     sync.Mutex
	status int
}

// ReportPath is the path ReportReceiver.URL names.
const ReportPath = "/report"

// ReportReceiver starts a report sink for host: an A record for host on a
// new address and an HTTPS server there with a valid certificate for host.
// It accepts POSTs at any path; URL gives https://host/report.
func (w *World) ReportReceiver(host string) *ReportReceiver {
	if w.t != nil {
		w.t.Helper()
	}
	r, err := w.StartReportReceiver(host)
	if err != nil {
		w.fatalf("%v", err)
	}
	return r
}

// StartReportReceiver is ReportReceiver returning its error.
func (w *World) StartReportReceiver(host string) (*ReportReceiver, error) {
	host = domainpkg.Key(host)
	cert, err := w.CA.IssueCert(CertValid, host)
	if err != nil {
		return nil, err
	}
	h, err := w.StartHTTPS("", cert)
	if err != nil {
		return nil, err
	}
	w.DNS.SetA(host, h.IP())
	r := &ReportReceiver{HTTPSServer: h, host: host, status: http.StatusOK}
	h.Handle("", r)
	return r, nil
}

// URL is the rua URL to publish as it would be on the Internet, without a
// port: https://host/report. The receiver listens on World.HTTPSPort.
func (r *ReportReceiver) URL() string { return "https://" + r.host + ReportPath }

// URLWithPort is the rua URL with the world's HTTPS port in it, for a relay
// that takes the port from the URL.
func (r *ReportReceiver) URLWithPort() string {
	_, port, _ := net.SplitHostPort(r.Addr())
	return "https://" + net.JoinHostPort(r.host, port) + ReportPath
}

// SetStatus sets the status code answered to POSTs.
func (r *ReportReceiver) SetStatus(code int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.status = code
}

// Reports is the POST requests received, oldest first.
func (r *ReportReceiver) Reports() []Request {
	var out []Request
	for _, q := range r.Requests() {
		if q.Method == http.MethodPost {
			out = append(out, q)
		}
	}
	return out
}

// ServeHTTP implements the sink.
func (r *ReportReceiver) ServeHTTP(rw http.ResponseWriter, req *http.Request) {
	if req.Method != http.MethodPost {
		rw.Header().Set("Allow", http.MethodPost)
		http.Error(rw, "POST only", http.StatusMethodNotAllowed)
		return
	}
	r.mu.Lock()
	status := r.status
	r.mu.Unlock()
	rw.WriteHeader(status)
}
