package tlsrptsend

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"syscall"
	"time"

	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// ErrRUAAddressRefused is wrapped by the error of posting to an https: rua
// whose host has no address the relay may connect to (see
// Options.AllowPrivateRUA). The rua is given up at once.
var ErrRUAAddressRefused = errors.New("https rua address refused")

// ipResolver is the part of *dnsclient.Resolver that resolves endpoint
// names through the relay's own DNS client.
type ipResolver interface {
	LookupIP(ctx context.Context, host string, wantV6 bool) ([]net.IP, error)
}

// ruaDialer opens the TCP connections of https: reports. It resolves the
// name itself and checks each address in the dialer's Control hook, right
// before connect(2): the address checked is the address connected to,
// whatever DNS said earlier (rebinding).
type ruaDialer struct {
	resolver     tlsrpt.TXTResolver // used when it is also an ipResolver
	timeout      time.Duration
	allowPrivate bool
	httpsPort    int
}

// DialContext is the http.Transport's dial function.
func (d *ruaDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	if d.httpsPort != 0 && port == "443" {
		port = strconv.Itoa(d.httpsPort)
	}
	var ips []netip.Addr
	if ip, err := netip.ParseAddr(host); err == nil {
		ips = []netip.Addr{ip}
	} else if ips, err = d.lookup(ctx, host); err != nil {
		return nil, fmt.Errorf("dial %s: %w", host, err)
	}
	if len(ips) == 0 {
		return nil, fmt.Errorf("dial %s: no addresses", host)
	}
	nd := net.Dialer{Timeout: d.timeout, Control: d.control}
	var errs []error
	for _, ip := range ips {
		c, err := nd.DialContext(ctx, network, net.JoinHostPort(ip.String(), port))
		if err == nil {
			return c, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	// The error wraps ErrRUAAddressRefused only when every address was
	// refused, not when a public one was merely unreachable.
	refused := 0
	for _, e := range errs {
		if errors.Is(e, ErrRUAAddressRefused) {
			refused++
		}
	}
	if refused == len(errs) {
		return nil, fmt.Errorf("dial %s: %w", host, errs[0])
	}
	return nil, fmt.Errorf("dial %s: %w", host, errors.Join(errs...))
}

func (d *ruaDialer) lookup(ctx context.Context, host string) ([]netip.Addr, error) {
	if r, ok := d.resolver.(ipResolver); ok {
		ips, err := r.LookupIP(ctx, host, dnsclient.HasIPv6Route())
		if err != nil {
			return nil, err
		}
		out := make([]netip.Addr, 0, len(ips))
		for _, ip := range ips {
			if a, ok := netip.AddrFromSlice(ip); ok {
				out = append(out, a.Unmap())
			}
		}
		return out, nil
	}
	return net.DefaultResolver.LookupNetIP(ctx, "ip", host)
}

// control refuses a connection to a non-public address unless allowed.
func (d *ruaDialer) control(_, address string, _ syscall.RawConn) error {
	if d.allowPrivate {
		return nil
	}
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return fmt.Errorf("%w: %q is not an address", ErrRUAAddressRefused, address)
	}
	if !PublicAddr(ap.Addr()) {
		return fmt.Errorf("%w: %s is not a public address (tlsrpt.allow_private_rua)", ErrRUAAddressRefused, ap.Addr())
	}
	return nil
}

// nonPublic are the IPv4 ranges besides those netip classifies that no
// report endpoint on the Internet has: "this network" (RFC 791), shared
// address space for carrier-grade NAT (RFC 6598), the IETF protocol
// assignments block (RFC 6890), benchmarking (RFC 2544), and the reserved
// block with the limited broadcast address (RFC 1112 §4).
var nonPublic = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("100.64.0.0/10"),
	netip.MustParsePrefix("192.0.0.0/24"),
	netip.MustParsePrefix("198.18.0.0/15"),
	netip.MustParsePrefix("240.0.0.0/4"),
}

// nat64 is the well-known NAT64 prefix (RFC 6052): the IPv4 address it
// embeds is checked.
var nat64 = netip.MustParsePrefix("64:ff9b::/96")

// PublicAddr reports whether a is an address an https: report endpoint
// may have by default: not loopback, private (RFC 1918, RFC 4193
// fc00::/7), link-local, unspecified, multicast, nor one of the other
// non-public IPv4 ranges above. IPv4-mapped IPv6 addresses and the NAT64
// prefix are judged by the IPv4 address they hold.
func PublicAddr(a netip.Addr) bool {
	a = a.Unmap()
	if a.Is6() && nat64.Contains(a) {
		b := a.As16()
		a = netip.AddrFrom4([4]byte(b[12:16]))
	}
	if !a.IsValid() || a.IsLoopback() || a.IsPrivate() || a.IsUnspecified() ||
		a.IsLinkLocalUnicast() || a.IsLinkLocalMulticast() || a.IsInterfaceLocalMulticast() || a.IsMulticast() {
		return false
	}
	if a.Is4() {
		for _, p := range nonPublic {
			if p.Contains(a) {
				return false
			}
		}
	}
	return true
}

// newHTTPClient is the client of https: reports: Web PKI verification
// against opts.RootCAs, the ruaDialer's address checks, no proxy, no
// keep-alives, and no redirects followed (a 3xx is a failed attempt).
func newHTTPClient(opts Options) *http.Client {
	rd := &ruaDialer{
		resolver:     opts.Resolver,
		timeout:      opts.Timeout,
		allowPrivate: opts.AllowPrivateRUA,
		httpsPort:    opts.HTTPSPort,
	}
	transport := &http.Transport{
		Proxy:               nil,
		DialContext:         rd.DialContext,
		TLSClientConfig:     &tls.Config{RootCAs: opts.RootCAs, MinVersion: tls.VersionTLS12},
		TLSHandshakeTimeout: opts.Timeout,
		DisableKeepAlives:   true,
		ForceAttemptHTTP2:   true,
	}
	return &http.Client{
		Transport: transport,
		Timeout:   opts.Timeout,
		// Never follow redirects: a 3xx is a failed attempt.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// post sends the gzip report to an https: rua (§5.4): any 2xx is success;
// redirects are not followed.
func (rp *Reporter) post(ctx context.Context, uri string, gz []byte) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, uri, bytes.NewReader(gz))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", tlsrpt.MediaTypeGzip)
	req.Header.Set("User-Agent", "stsrelay-tlsrpt")
	resp, err := rp.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		if loc := resp.Header.Get("Location"); loc != "" {
			return fmt.Errorf("HTTP %s (redirect to %s not followed)", tlsrpt.Bound(resp.Status, 64), tlsrpt.Bound(loc, 255))
		}
		return fmt.Errorf("HTTP %s", tlsrpt.Bound(resp.Status, 64))
	}
	return nil
}
