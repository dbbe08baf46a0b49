package tlsrpt

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/textproto"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/testworld"
)

// handshake runs a real TLS handshake over loopback TCP (buffered, unlike
// net.Pipe, so that both sides may write at once): server runs on one
// end, a client with config client on the other. It returns the client's
// error.
func handshake(t *testing.T, client *tls.Config, server func(net.Conn)) error {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer s.Close()
		server(s)
	}()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	tc := tls.Client(c, client)
	err = tc.Handshake()
	c.Close()
	<-done
	return err
}

func tlsServer(cfg *tls.Config) func(net.Conn) {
	return func(c net.Conn) {
		c.SetDeadline(time.Now().Add(10 * time.Second))
		tls.Server(c, cfg).Handshake()
	}
}

var reasonSyntax = regexp.MustCompile(`^[a-z][a-z0-9-]*$`)

// Classify on the genuine error values of real handshakes and
// verifications: one stable code per kind of failure, no times or peer
// text (RPT-4-f, RPT-4-g; issue #9 finding 1).
func TestClassify(t *testing.T) {
	w := testworld.New(t)
	client := func() *tls.Config {
		return &tls.Config{RootCAs: w.CA.Pool(), ServerName: "mx.test", MinVersion: tls.VersionTLS12}
	}
	withCert := func(kind testworld.CertKind) func(net.Conn) {
		return tlsServer(&tls.Config{Certificates: []tls.Certificate{w.CA.Issue(kind, "mx.test").TLS}})
	}
	// delivery verifies itself after an unverified handshake.
	verifyLeaf := func(kind testworld.CertKind) error {
		leaf := w.CA.Issue(kind, "mx.test").Leaf
		_, err := leaf.Verify(x509VerifyOptions(w, "mx.test"))
		return err
	}
	tests := []struct {
		name   string
		err    func() error
		result ResultType
		reason string
	}{
		{"expired certificate", func() error { return handshake(t, client(), withCert(testworld.CertExpired)) },
			ResultCertificateExpired, "certificate-expired"},
		{"expired certificate, verified by the caller", func() error { return verifyLeaf(testworld.CertExpired) },
			ResultCertificateExpired, "certificate-expired"},
		{"expired certificate, wrapped", func() error {
			return fmt.Errorf("mx.test: %w", handshake(t, client(), withCert(testworld.CertExpired)))
		}, ResultCertificateExpired, "certificate-expired"},
		{"certificate not yet valid", func() error { return handshake(t, client(), withCert(testworld.CertNotYetValid)) },
			ResultValidationFailure, "certificate-not-yet-valid"},
		{"certificate for another host", func() error { return handshake(t, client(), withCert(testworld.CertWrongName)) },
			ResultCertificateHostMismatch, "certificate-host-mismatch"},
		{"certificate with only a CN", func() error { return verifyLeaf(testworld.CertCNOnly) },
			ResultCertificateHostMismatch, "certificate-host-mismatch"},
		{"unknown CA", func() error { return handshake(t, client(), withCert(testworld.CertUnknownCA)) },
			ResultCertificateNotTrusted, "certificate-unknown-authority"},
		{"self-signed", func() error { return handshake(t, client(), withCert(testworld.CertSelfSigned)) },
			ResultCertificateNotTrusted, "certificate-self-signed"},
		{"self-signed, verified by the caller", func() error { return verifyLeaf(testworld.CertSelfSigned) },
			ResultCertificateNotTrusted, "certificate-self-signed"},
		{"handshake failure alert: no common cipher suite", func() error {
			cl := client()
			cl.MaxVersion = tls.VersionTLS12
			cl.CipherSuites = []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256}
			return handshake(t, cl, tlsServer(&tls.Config{
				Certificates: []tls.Certificate{w.CA.Issue(testworld.CertValid, "mx.test").TLS},
				MaxVersion:   tls.VersionTLS12,
				CipherSuites: []uint16{tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384},
			}))
		}, ResultValidationFailure, "tls-alert-handshake-failure"},
		{"protocol version alert", func() error {
			return handshake(t, client(), tlsServer(&tls.Config{
				Certificates: []tls.Certificate{w.CA.Issue(testworld.CertValid, "mx.test").TLS},
				MaxVersion:   tls.VersionTLS11,
			}))
		}, ResultValidationFailure, "tls-alert-protocol-version-not-supported"},
		{"server answers in plaintext", func() error {
			return handshake(t, client(), func(c net.Conn) {
				go io.Copy(io.Discard, c)
				c.Write([]byte("554 5.7.0 no TLS for you, port 25 at 10:42:01\r\n"))
				time.Sleep(100 * time.Millisecond)
			})
		}, ResultValidationFailure, "tls-record-header-invalid"},
		{"server closes during the handshake", func() error {
			return handshake(t, client(), func(c net.Conn) {
				c.Read(make([]byte, 64<<10)) // the whole ClientHello
			})
		}, ResultValidationFailure, "eof-during-handshake"},
		{"server stalls", func() error {
			c, s := net.Pipe()
			defer s.Close()
			defer c.Close()
			go io.Copy(io.Discard, s)
			c.SetDeadline(time.Now().Add(50 * time.Millisecond))
			return tls.Client(c, client()).Handshake()
		}, ResultValidationFailure, "io-timeout-during-handshake"},
		{"handshake context deadline", func() error {
			c, s := net.Pipe()
			defer s.Close()
			defer c.Close()
			go io.Copy(io.Discard, s)
			ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
			defer cancel()
			return tls.Client(c, client()).HandshakeContext(ctx)
		}, ResultValidationFailure, "io-timeout-during-handshake"},
		{"connection reset", func() error { return resetHandshake(t, client()) },
			ResultValidationFailure, "connection-reset-during-handshake"},
		{"454 to STARTTLS", func() error {
			tp := textproto.NewReader(bufio.NewReader(strings.NewReader("454 4.7.0 TLS not available at 10:42:01 from [192.0.2.1]:25\r\n")))
			_, _, err := tp.ReadResponse(220)
			return err
		}, ResultSTARTTLSNotSupported, "starttls-reply-454"},
		{"unknown error", func() error { return errors.New("something 10:42:01 [192.0.2.1]:25") },
			ResultValidationFailure, "tls-handshake-failed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.err()
			if err == nil {
				t.Fatal("no error")
			}
			rt, reason := Classify(err)
			if rt != tt.result || reason != tt.reason {
				t.Errorf("Classify(%T %q) = %s, %s; want %s, %s", err, err, rt, reason, tt.result, tt.reason)
			}
			if !rt.Valid() || !reasonSyntax.MatchString(reason) || len(reason) > MaxReasonLen {
				t.Errorf("Classify(%q) = %q, %q: not a valid type and short code", err, rt, reason)
			}
		})
	}
	if rt, reason := Classify(nil); rt != "" || reason != "" {
		t.Errorf("Classify(nil) = %q, %q", rt, reason)
	}
}

// resetHandshake: a loopback server that reads the ClientHello and resets
// the connection (SO_LINGER 0).
func resetHandshake(t *testing.T, cfg *tls.Config) error {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		c.SetDeadline(time.Now().Add(5 * time.Second))
		c.Read(make([]byte, 4096))
		c.(*net.TCPConn).SetLinger(0)
		c.Close()
	}()
	c, err := net.DialTimeout("tcp", ln.Addr().String(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	return tls.Client(c, cfg).Handshake()
}

func TestAlertName(t *testing.T) {
	for a, want := range map[tls.AlertError]string{
		40: "handshake-failure", 42: "bad-certificate", 70: "protocol-version-not-supported", 200: "alert-200",
	} {
		if got := alertName(a.Error()); got != want {
			t.Errorf("alertName(%d) = %q, want %q", a, got, want)
		}
	}
}

func x509VerifyOptions(w *testworld.World, host string) x509.VerifyOptions {
	return x509.VerifyOptions{Roots: w.CA.Pool(), DNSName: host}
}
