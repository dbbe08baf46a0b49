package delivery

import (
	"context"
	"crypto/x509"
	"errors"
	"net"
	"time"

	"github.com/stsrelay/stsrelay/delivery/policy"
	"github.com/stsrelay/stsrelay/internal/certexpiry"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// ProbeOptions configure Probe.
type ProbeOptions struct {
	Hostname       string // EHLO name
	Port           int
	ConnectTimeout time.Duration
	CommandTimeout time.Duration
	Roots          *x509.CertPool
	Now            func() time.Time
}

// ProbeResult is what one MX address showed: whether it offers STARTTLS
// and whether its certificate passes the RFC 8461 §4.2 checks for host.
type ProbeResult struct {
	Host         string    `json:"host"`
	IP           string    `json:"ip"`
	Connected    bool      `json:"connected"`
	Greeting     string    `json:"greeting,omitempty"`
	STARTTLS     bool      `json:"starttls"`
	TLSVersion   string    `json:"tls_version,omitempty"`
	CertVerified bool      `json:"cert_verified"`
	ResultType   string    `json:"result_type,omitempty"`
	CertError    string    `json:"cert_error,omitempty"`
	CertNames    []string  `json:"cert_names,omitempty"`
	CertNotAfter time.Time `json:"cert_not_after,omitzero"`
	CertDaysLeft *int      `json:"cert_days_left,omitempty"`
	Error        string    `json:"error,omitempty"`
	// Chain is the certificate chain the server presented, leaf first
	// (tls.ConnectionState.PeerCertificates), for checks such as DANE
	// TLSA matching; nil without a TLS session. Not in the JSON.
	Chain []*x509.Certificate `json:"-"`
}

// Probe connects to ip as the relay would for MX host, does STARTTLS
// when offered, checks the certificate against host and says QUIT. It
// sends no mail. It is the MX half of `stsrelay check`.
func Probe(ctx context.Context, host string, ip net.IP, o ProbeOptions) ProbeResult {
	if o.Now == nil {
		o.Now = time.Now
	}
	res := ProbeResult{Host: host, IP: ip.String()}
	s, err := dial(ctx, host, ip.String(), dialOptions{Hostname: o.Hostname, Port: o.Port,
		ConnectTimeout: o.ConnectTimeout, CommandTimeout: o.CommandTimeout, Roots: o.Roots,
		Now: o.Now})
	if err != nil {
		var se *sessionError
		if errors.As(err, &se) {
			res.Connected = se.Stage != "connect"
			if se.TLS != nil {
				res.STARTTLS = true
				rt, _ := policy.Classify(*se.TLS)
				res.ResultType = string(rt)
			}
		}
		res.Error = err.Error()
		return res
	}
	defer s.close()
	res.Connected = true
	res.Greeting = s.helo
	res.STARTTLS = s.tls
	if !s.tls {
		res.ResultType = string(tlsrpt.ResultSTARTTLSNotSupported)
		return res
	}
	res.TLSVersion = tlsVersionName(s.version)
	res.CertVerified = s.state.CertError == nil
	if !res.CertVerified {
		rt, _ := policy.Classify(s.state)
		res.ResultType, res.CertError = string(rt), s.state.CertError.Error()
	}
	if st, ok := s.c.ConnectionState(); ok {
		res.Chain = st.PeerCertificates
	}
	if s.leaf != nil {
		res.CertNames = s.leaf.DNSNames
		res.CertNotAfter = s.leaf.NotAfter
		days := certexpiry.DaysLeft(s.leaf.NotAfter, o.Now())
		res.CertDaysLeft = &days
	}
	return res
}
