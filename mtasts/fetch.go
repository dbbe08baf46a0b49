package mtasts

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/stsrelay/stsrelay/internal/domain"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// Defaults of Fetcher.
const (
	DefaultHTTPSPort      = 443
	DefaultFetchTimeout   = time.Minute // RFC 8461 §3.3 suggests one minute
	DefaultMaxPolicyBytes = 64 << 10    // RFC 8461 §3.3 suggests 64 KB
	maxResponseHeader     = 16 << 10
)

// Fetcher fetches policies over HTTPS (RFC 8461 §3.3). The zero value
// works with the defaults. A Fetcher is safe for concurrent use.
type Fetcher struct {
	// HTTPSPort is the policy host's port; 0 means 443. Only tests use
	// another.
	HTTPSPort int
	// Timeout bounds the whole fetch: connection, TLS, headers and body.
	// 0 means DefaultFetchTimeout.
	Timeout time.Duration
	// MaxBytes bounds the body; a larger body is an error, not truncated.
	// 0 means DefaultMaxPolicyBytes.
	MaxBytes int64
	// RootCAs are trusted in addition to the system roots
	// (tls.extra_root_ca_file). Nil: the system roots only.
	RootCAs *x509.CertPool
	// DialAddr, when set, opens the TCP connection to addr
	// ("mta-sts.<domain>:port") in place of the default dialer, e.g. to
	// resolve through the relay's own DNS client. It should honour ctx.
	DialAddr func(ctx context.Context, network, addr string) (net.Conn, error)
}

// fetchResult is everything one fetch observed, for Fetch and the checker.
type fetchResult struct {
	URL         string
	Status      int
	Location    string
	ContentType string
	Body        []byte
	PeerCerts   []*x509.Certificate // as presented, verified or not
	CertErr     error               // nil when the chain verified
	Policy      *Policy
	Problems    []*SyntaxError
	Err         *Failure
}

// Fetch fetches and parses the policy of domain (RFC 8461 §3.3): a GET of
// https://mta-sts.<domain>/.well-known/mta-sts.txt with SNI and Host
// mta-sts.<domain>; the certificate must be valid for that name under the
// Web PKI (system roots plus RootCAs); redirects are not followed; only a
// 200 response with media type text/plain is accepted; no HTTP caching,
// proxy or keep-alive is used; body size and total time are bounded.
//
// It returns the body whenever one was read, even with an error (for the
// checker). Errors are *Failure.
func (f *Fetcher) Fetch(ctx context.Context, domain string) (*Policy, []byte, error) {
	r := f.fetch(ctx, domain)
	if r.Err != nil {
		return nil, r.Body, r.Err
	}
	return r.Policy, r.Body, nil
}

func (f *Fetcher) fetch(ctx context.Context, domain string) *fetchResult {
	res := &fetchResult{}
	fail := func(rt tlsrpt.ResultType, reason string, sentinel error, format string, args ...any) *fetchResult {
		res.Err = &Failure{ResultType: rt, Reason: reason, Err: fmt.Errorf("fetch MTA-STS policy of %s: %w: %s", domain, sentinel, fmt.Sprintf(format, args...))}
		return res
	}
	d, ok := NormalizeDomain(domain)
	if !ok {
		return fail(tlsrpt.ResultSTSPolicyFetchError, "invalid-domain", ErrPolicyFetch, "invalid domain name %q", domain)
	}
	domain = d
	host := "mta-sts." + domain
	port := f.HTTPSPort
	if port == 0 {
		port = DefaultHTTPSPort
	}
	timeout := f.Timeout
	if timeout <= 0 {
		timeout = DefaultFetchTimeout
	}
	maxBytes := f.MaxBytes
	if maxBytes <= 0 {
		maxBytes = DefaultMaxPolicyBytes
	}
	u := url.URL{Scheme: "https", Host: host, Path: "/.well-known/mta-sts.txt"}
	if port != 443 {
		u.Host = net.JoinHostPort(host, strconv.Itoa(port))
	}
	res.URL = u.String()

	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	// RFC 8461 §3.3: the certificate must be valid for the DNS-ID
	// mta-sts.<domain> and chain to a trusted root. We verify by hand so
	// that RootCAs adds to the system roots instead of replacing them,
	// and so that the checker can see the certificate even when it fails.
	// Go's verification matches SAN DNS names only (never the CN) and
	// allows "*" only as a whole leftmost label, as §3.3 requires.
	extra := f.RootCAs
	tlsConfig := &tls.Config{
		ServerName:         host, // SNI, RFC 8461 §7.1
		MinVersion:         tls.VersionTLS12,
		InsecureSkipVerify: true, // replaced by VerifyConnection below
		VerifyConnection: func(cs tls.ConnectionState) error {
			res.PeerCerts = cs.PeerCertificates
			err := verifyPeer(cs.PeerCertificates, host, extra)
			res.CertErr = err
			if err != nil {
				return &webPKIError{err: err}
			}
			return nil
		},
	}
	dial := f.DialAddr
	if dial == nil {
		dial = (&net.Dialer{}).DialContext
	}
	transport := &http.Transport{
		Proxy:                  nil, // never a proxy from the environment
		DialContext:            dial,
		TLSClientConfig:        tlsConfig,
		TLSHandshakeTimeout:    timeout,
		ResponseHeaderTimeout:  timeout,
		DisableKeepAlives:      true,
		DisableCompression:     true,
		MaxResponseHeaderBytes: maxResponseHeader,
	}
	defer transport.CloseIdleConnections()
	client := &http.Client{
		Transport: transport,
		// RFC 8461 §3.3: 3xx redirects MUST NOT be followed.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, res.URL, nil)
	if err != nil {
		return fail(tlsrpt.ResultSTSPolicyFetchError, "http-request", ErrPolicyFetch, "%v", err)
	}
	req.Host = host // no port, even when testing on another one
	req.Header.Set("User-Agent", "stsrelay")
	// No conditional headers, no cache: RFC 8461 §3.3 forbids HTTP caching.

	resp, err := client.Do(req)
	if err != nil {
		var we *webPKIError
		if errors.As(err, &we) || isCertError(err) {
			if res.CertErr == nil {
				res.CertErr = err
			}
			_, reason := tlsrpt.Classify(res.CertErr)
			return fail(tlsrpt.ResultSTSWebPKIInvalid, reason, ErrWebPKI, "%s: %v", host, res.CertErr)
		}
		if ctx.Err() != nil {
			return fail(tlsrpt.ResultSTSPolicyFetchError, "http-timeout", ErrPolicyFetch, "GET %s: no response within %v", res.URL, timeout)
		}
		return fail(tlsrpt.ResultSTSPolicyFetchError, "http-connect", ErrPolicyFetch, "GET %s: %v", res.URL, unwrapURLError(err))
	}
	defer resp.Body.Close()
	res.Status = resp.StatusCode
	res.ContentType = resp.Header.Get("Content-Type")
	if resp.StatusCode/100 == 3 {
		res.Location = resp.Header.Get("Location")
		return fail(tlsrpt.ResultSTSPolicyFetchError, "http-redirect", ErrPolicyFetch, "GET %s: HTTP %d redirect to %q not followed (RFC 8461 §3.3)", res.URL, resp.StatusCode, res.Location)
	}
	if resp.StatusCode != http.StatusOK {
		return fail(tlsrpt.ResultSTSPolicyFetchError, "http-status-"+strconv.Itoa(resp.StatusCode%1000), ErrPolicyFetch, "GET %s: HTTP status %d, only 200 is valid (RFC 8461 §3.3)", res.URL, resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBytes+1))
	if err != nil {
		if ctx.Err() != nil {
			return fail(tlsrpt.ResultSTSPolicyFetchError, "http-timeout", ErrPolicyFetch, "GET %s: body not complete within %v", res.URL, timeout)
		}
		return fail(tlsrpt.ResultSTSPolicyFetchError, "http-body", ErrPolicyFetch, "GET %s: reading body: %v", res.URL, err)
	}
	if int64(len(body)) > maxBytes {
		res.Body = body[:maxBytes]
		return fail(tlsrpt.ResultSTSPolicyFetchError, "policy-too-large", ErrPolicyFetch, "GET %s: body larger than %d bytes", res.URL, maxBytes)
	}
	res.Body = body
	// RFC 8461 §3.2: the media type SHOULD be checked; parameters are
	// ignored. A missing Content-Type is rejected too.
	if mt, _, err := mime.ParseMediaType(res.ContentType); (err != nil && !errors.Is(err, mime.ErrInvalidMediaParameter)) || mt != "text/plain" {
		return fail(tlsrpt.ResultSTSPolicyInvalid, "content-type", ErrPolicySyntax, "GET %s: media type must be text/plain, got Content-Type %q", res.URL, res.ContentType)
	}
	p, problems := parsePolicy(body)
	if len(problems) > 0 {
		res.Problems = problems
		res.Err = &Failure{ResultType: tlsrpt.ResultSTSPolicyInvalid, Reason: "policy-syntax", Err: fmt.Errorf("fetch MTA-STS policy of %s: %w", domain, problems[0])}
		return res
	}
	res.Policy = p
	return res
}

// webPKIError marks a certificate that failed verification.
type webPKIError struct{ err error }

func (e *webPKIError) Error() string { return e.err.Error() }
func (e *webPKIError) Unwrap() error { return e.err }

// verifyPeer verifies the chain for DNS-ID host against the system roots,
// then, if that fails, against extra.
func verifyPeer(certs []*x509.Certificate, host string, extra *x509.CertPool) error {
	if len(certs) == 0 {
		return errors.New("no certificate presented")
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1:] {
		inter.AddCert(c)
	}
	opts := x509.VerifyOptions{DNSName: host, Intermediates: inter}
	_, err := certs[0].Verify(opts) // Roots nil: the system pool
	if err == nil {
		return nil
	}
	if extra != nil {
		opts.Roots = extra
		_, err2 := certs[0].Verify(opts)
		if err2 == nil {
			return nil
		}
		// Prefer the error against the extra roots when the chain
		// reaches them: it says the more specific thing (expired,
		// wrong name) rather than "unknown authority".
		var ua x509.UnknownAuthorityError
		if !errors.As(err2, &ua) {
			err = err2
		}
	}
	return err
}

func isCertError(err error) bool {
	var (
		ua  x509.UnknownAuthorityError
		ci  x509.CertificateInvalidError
		hn  x509.HostnameError
		cve *tls.CertificateVerificationError
	)
	return errors.As(err, &ua) || errors.As(err, &ci) || errors.As(err, &hn) || errors.As(err, &cve)
}

func unwrapURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// NormalizeDomain gives a policy domain's A-label form (UTS #46 mapping and NFC
// through internal/domain), lower-cased, without a trailing dot. It
// reports false for address literals, IP addresses, names that cannot be
// domains, and names too long to carry "_mta-sts." (a 245–253 octet name,
// whose TXT record cannot exist): those have no policy (RFC 8461 §3.4).
func NormalizeDomain(d string) (string, bool) {
	dd, err := domain.Parse(d)
	if err != nil || !domain.CanPrefix(dd, "_mta-sts") {
		return "", false
	}
	a := dd.ASCII()
	if strings.Trim(a, "0123456789.") == "" || !validHostname(a) {
		return "", false // an IPv4 address
	}
	return a, true
}
