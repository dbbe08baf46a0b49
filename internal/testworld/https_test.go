package testworld

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// worldClient is an HTTP client that resolves names with the Go resolver
// pointed at the world's DNS server, trusts the world's CA and, like an
// MTA-STS fetcher, does not follow redirects.
func worldClient(t *testing.T, w *World, timeout time.Duration) *http.Client {
	t.Helper()
	resolver := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, w.DNS.Addr())
	}}
	dialer := &net.Dialer{Timeout: 2 * time.Second, Resolver: resolver}
	tr := &http.Transport{
		DialContext:            dialer.DialContext,
		TLSClientConfig:        &tls.Config{RootCAs: w.CA.Pool()},
		MaxResponseHeaderBytes: 64 << 10,
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{
		Transport:     tr,
		Timeout:       timeout,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

const testPolicy = "version: STSv1\nmode: enforce\nmx: mx1.ex.test\nmax_age: 86400\n"

func TestPolicyHostServesPolicy(t *testing.T) {
	t.Parallel()
	w := New(t)
	p := w.PolicyHost("Ex.Test", CertValid)
	p.SetPolicy(testPolicy)
	c := worldClient(t, w, 5*time.Second)

	resp, err := c.Get(p.URL())
	if err != nil {
		t.Fatalf("GET %s: %v", p.URL(), err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/plain" || string(body) != testPolicy {
		t.Errorf("got %d %q %q", resp.StatusCode, resp.Header.Get("Content-Type"), body)
	}
	if !strings.HasPrefix(p.URL(), "https://mta-sts.ex.test:") || !strings.HasSuffix(p.URL(), "/.well-known/mta-sts.txt") {
		t.Errorf("URL %s", p.URL())
	}

	if resp, err := c.Get(strings.Replace(p.URL(), PolicyPath, "/other", 1)); err != nil || resp.StatusCode != 404 {
		t.Errorf("other path: %v %v, want 404", resp, err)
	} else {
		resp.Body.Close()
	}

	reqs := p.Requests()
	if len(reqs) != 2 || p.Count() != 2 {
		t.Fatalf("%d requests logged, Count %d, want 2", len(reqs), p.Count())
	}
	r := reqs[0]
	if r.Method != "GET" || r.Host != "mta-sts.ex.test" || r.Path != PolicyPath || r.SNI != "mta-sts.ex.test" || r.Header.Get("User-Agent") == "" {
		t.Errorf("logged request %+v", r)
	}
	if n := w.DNS.CountQueries("mta-sts.ex.test", 1 /* A */); n == 0 {
		t.Errorf("the client did not look the policy host up in the world's DNS")
	}
}

func TestPolicyHostCertificates(t *testing.T) {
	t.Parallel()
	w := New(t)
	c := worldClient(t, w, 5*time.Second)
	tests := []struct {
		kind  CertKind
		check func(error) bool
	}{
		{CertExpired, func(err error) bool {
			var e x509.CertificateInvalidError
			return errors.As(err, &e) && e.Reason == x509.Expired
		}},
		{CertWrongName, func(err error) bool { var e x509.HostnameError; return errors.As(err, &e) }},
		{CertCNOnly, func(err error) bool { var e x509.HostnameError; return errors.As(err, &e) }},
		{CertIPOnly, func(err error) bool { var e x509.HostnameError; return errors.As(err, &e) }},
		{CertSelfSigned, func(err error) bool { var e x509.UnknownAuthorityError; return errors.As(err, &e) }},
		{CertUnknownCA, func(err error) bool { var e x509.UnknownAuthorityError; return errors.As(err, &e) }},
	}
	for _, tc := range tests {
		t.Run(tc.kind.String(), func(t *testing.T) {
			p := w.PolicyHost(tc.kind.String()+".test", tc.kind)
			p.SetPolicy(testPolicy)
			_, err := c.Get(p.URL())
			if !tc.check(err) {
				t.Errorf("GET with a %v certificate: %v", tc.kind, err)
			}
		})
	}
}

func TestPolicyHostResponses(t *testing.T) {
	t.Parallel()
	w := New(t)
	p := w.PolicyHost("ex.test", CertValid)
	c := worldClient(t, w, 5*time.Second)

	get := func() (*http.Response, string) {
		t.Helper()
		resp, err := c.Get(p.URL())
		if err != nil {
			t.Fatalf("GET: %v", err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp, string(b)
	}

	if resp, _ := get(); resp.StatusCode != 404 {
		t.Errorf("before SetPolicy: %d, want 404", resp.StatusCode)
	}

	p.SetResponse(200, "", testPolicy, map[string]string{"ETag": `"v1"`, "Cache-Control": "max-age=3600"})
	resp, body := get()
	if _, ok := resp.Header["Content-Type"]; ok || body != testPolicy || resp.Header.Get("ETag") != `"v1"` {
		t.Errorf("no-Content-Type response: headers %v body %q", resp.Header, body)
	}

	p.SetResponse(500, "text/html", "<p>oops</p>", nil)
	if resp, body := get(); resp.StatusCode != 500 || resp.Header.Get("Content-Type") != "text/html" || body != "<p>oops</p>" {
		t.Errorf("got %d %q %q", resp.StatusCode, resp.Header.Get("Content-Type"), body)
	}

	target := w.PolicyHost("other.test", CertValid)
	target.SetPolicy(testPolicy)
	p.SetRedirect(target.URL())
	if resp, _ := get(); resp.StatusCode != 301 || resp.Header.Get("Location") != target.URL() {
		t.Errorf("redirect: %d Location %q", resp.StatusCode, resp.Header.Get("Location"))
	}
	if target.Count() != 0 {
		t.Errorf("redirect target got %d requests", target.Count())
	}

	p.SetPolicy(testPolicy)
	p.SetHugeHeaders(100_000)
	if _, err := c.Get(p.URL()); err == nil || !strings.Contains(err.Error(), "header") {
		t.Errorf("huge headers against a 64 KiB limit: %v", err)
	}
	p.SetHugeHeaders(0)
	if resp, body := get(); resp.StatusCode != 200 || body != testPolicy {
		t.Errorf("after SetHugeHeaders(0): %d %q", resp.StatusCode, body)
	}
}

func TestPolicyHostEndlessBody(t *testing.T) {
	t.Parallel()
	w := New(t)
	p := w.PolicyHost("ex.test", CertValid)
	p.SetEndless()
	resp, err := worldClient(t, w, 5*time.Second).Get(p.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	n, err := io.Copy(io.Discard, io.LimitReader(resp.Body, 1<<20))
	if err != nil || n != 1<<20 {
		t.Errorf("read %d bytes (%v), want a full MiB of an endless body", n, err)
	}
}

func TestPolicyHostSlowDripAndStallAreBounded(t *testing.T) {
	t.Parallel()
	w := New(t)
	p := w.PolicyHost("ex.test", CertValid)
	p.SetPolicy(testPolicy)

	p.SetSlowDrip(50 * time.Millisecond)
	start := time.Now()
	resp, err := worldClient(t, w, 500*time.Millisecond).Get(p.URL())
	if err != nil {
		t.Fatalf("headers should come at once: %v", err)
	}
	body, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err == nil {
		t.Errorf("slow drip ended by itself with %q", body)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("client timeout took %v", d)
	}
	if len(body) < 2 || !strings.HasPrefix(testPolicy, string(body)) {
		t.Errorf("dripped %q, want a prefix of the policy", body)
	}

	p.SetStall(time.Hour)
	start = time.Now()
	if _, err := worldClient(t, w, 200*time.Millisecond).Get(p.URL()); err == nil {
		t.Errorf("stalled request succeeded")
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("stall: client gave up after %v", d)
	}
}

func TestHTTPSCloseEndsStalledRequests(t *testing.T) {
	t.Parallel()
	w := New(t)
	for _, mode := range []string{"stall", "drip"} {
		t.Run(mode, func(t *testing.T) {
			p := w.PolicyHost(mode+".test", CertValid)
			p.SetPolicy(testPolicy)
			if mode == "stall" {
				p.SetStall(time.Hour)
			} else {
				p.SetSlowDrip(time.Second)
			}
			errc := make(chan error, 1)
			go func() {
				resp, err := worldClient(t, w, 0).Get(p.URL())
				if err == nil {
					_, err = io.ReadAll(resp.Body)
					resp.Body.Close()
				}
				errc <- err
			}()
			for p.Count() == 0 {
				time.Sleep(10 * time.Millisecond)
			}
			start := time.Now()
			p.Close()
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("Close took %v", d)
			}
			select {
			case err := <-errc:
				if err == nil {
					t.Errorf("request finished cleanly although the server closed mid-way")
				}
			case <-time.After(3 * time.Second):
				t.Fatalf("client still waiting after Close")
			}
		})
	}
}

func TestHTTPSServerPerHostHandlers(t *testing.T) {
	t.Parallel()
	w := New(t)
	h := w.NewHTTPS("", w.CA.Issue(CertValid, "a.test", "b.test"))
	w.DNS.SetA("a.test", h.IP())
	w.DNS.SetA("b.test", h.IP())
	for _, host := range []string{"a.test", "b.test"} {
		h.Handle(host, http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) { io.WriteString(rw, "I am "+host) }))
	}
	c := worldClient(t, w, 5*time.Second)
	for _, host := range []string{"a.test", "b.test"} {
		_, port, _ := net.SplitHostPort(h.Addr())
		resp, err := c.Get("https://" + net.JoinHostPort(host, port) + "/x?y=1")
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(b) != "I am "+host {
			t.Errorf("%s answered %q", host, b)
		}
	}
	if reqs := h.Requests(); len(reqs) != 2 || reqs[1].Host != "b.test" || reqs[1].SNI != "b.test" || reqs[1].RawQuery != "y=1" {
		t.Errorf("log %+v", reqs)
	}
}

func TestReportReceiver(t *testing.T) {
	t.Parallel()
	w := New(t)
	r := w.ReportReceiver("rua.test")
	if r.URL() != "https://rua.test/report" {
		t.Errorf("URL %s", r.URL())
	}
	c := worldClient(t, w, 5*time.Second)
	report := []byte{0x1f, 0x8b, 1, 2, 3}
	post := func() int {
		t.Helper()
		resp, err := c.Post(r.URLWithPort(), "application/tlsrpt+gzip", bytes.NewReader(report))
		if err != nil {
			t.Fatalf("POST: %v", err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := post(); code != 200 {
		t.Errorf("POST: %d, want 200", code)
	}
	r.SetStatus(503)
	if code := post(); code != 503 {
		t.Errorf("POST after SetStatus(503): %d", code)
	}
	if resp, err := c.Get(r.URLWithPort()); err != nil || resp.StatusCode != 405 {
		t.Errorf("GET: %v %v, want 405", resp, err)
	} else {
		resp.Body.Close()
	}
	reps := r.Reports()
	if len(reps) != 2 {
		t.Fatalf("%d reports, want the 2 POSTs", len(reps))
	}
	if got := reps[0]; !bytes.Equal(got.Body, report) || got.Header.Get("Content-Type") != "application/tlsrpt+gzip" || got.Path != ReportPath || got.SNI != "rua.test" {
		t.Errorf("report %+v", got)
	}
}
