package tlsrpt

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/textproto"
	"os"
	"strconv"
	"strings"
	"syscall"
)

// Classify maps the error that ended a session's TLS negotiation to its
// RFC 8460 result type (§4.3) and a short, stable failure-reason-code
// (§4.3.1, §4.3.3). err is what the STARTTLS command, the TLS handshake or
// the certificate verification returned: a *textproto.Error for a reply
// other than 220 to STARTTLS, a crypto/x509 verification error (directly,
// as x509.Certificate.Verify returns it, or inside a
// *tls.CertificateVerificationError), a tls.AlertError or
// tls.RecordHeaderError, or the network error that cut the handshake.
//
// The reason code never holds a time, a port, an address or text the peer
// sent, so sessions failing the same way aggregate into one
// failure-details entry; the error's own text belongs in the log line.
// Classify(nil) is ("", "").
//
// Certificate failures map to their §4.3.1 types: an expired certificate
// to certificate-expired, a name mismatch to certificate-host-mismatch,
// an untrusted chain to certificate-not-trusted. A certificate that is
// not yet valid has no type of its own and is validation-failure, as is
// every failure of the handshake itself. A refused STARTTLS (e.g. 454) is
// starttls-not-supported.
func Classify(err error) (ResultType, string) {
	if err == nil {
		return "", ""
	}
	var (
		reply   *textproto.Error
		host    x509.HostnameError
		inv     x509.CertificateInvalidError
		unknown x509.UnknownAuthorityError
		roots   x509.SystemRootsError
		algo    x509.InsecureAlgorithmError
		constr  x509.ConstraintViolationError
		verify  *tls.CertificateVerificationError
		alert   tls.AlertError
		header  tls.RecordHeaderError
		netErr  net.Error
		opErr   *net.OpError
	)
	switch {
	case errors.As(err, &reply):
		code := "invalid"
		if reply.Code >= 100 && reply.Code <= 599 {
			code = strconv.Itoa(reply.Code)
		}
		return ResultSTARTTLSNotSupported, "starttls-reply-" + code
	case errors.As(err, &host):
		return ResultCertificateHostMismatch, "certificate-host-mismatch"
	case errors.As(err, &inv):
		return classifyInvalid(inv)
	case errors.As(err, &unknown):
		if selfSigned(unknown.Cert) {
			return ResultCertificateNotTrusted, "certificate-self-signed"
		}
		return ResultCertificateNotTrusted, "certificate-unknown-authority"
	case errors.As(err, &roots):
		return ResultCertificateNotTrusted, "certificate-no-roots"
	case errors.As(err, &algo):
		return ResultCertificateNotTrusted, "certificate-insecure-algorithm"
	case errors.As(err, &constr):
		return ResultCertificateNotTrusted, "certificate-constraint-violation"
	case errors.As(err, &verify):
		return ResultCertificateNotTrusted, "certificate-verification-failed"
	case errors.As(err, &alert):
		return ResultValidationFailure, "tls-alert-" + alertName(alert.Error())
	case errors.As(err, &opErr) && opErr.Op == "remote error" && opErr.Err != nil:
		// An alert the server sent over TCP: crypto/tls returns it as
		// *net.OpError{Op: "remote error"} around its unexported alert
		// type (tls.AlertError is for QUIC). The text is crypto/tls's
		// name for the alert number, never the peer's.
		return ResultValidationFailure, "tls-alert-" + alertName(opErr.Err.Error())
	case errors.As(err, &header):
		// The server's reply was not a TLS record: it answered in
		// plaintext, or something else is listening.
		return ResultValidationFailure, "tls-record-header-invalid"
	case errors.Is(err, context.Canceled):
		return ResultValidationFailure, "canceled-during-handshake"
	case errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, context.DeadlineExceeded),
		errors.As(err, &netErr) && netErr.Timeout():
		return ResultValidationFailure, "io-timeout-during-handshake"
	case errors.Is(err, syscall.ECONNRESET):
		return ResultValidationFailure, "connection-reset-during-handshake"
	case errors.Is(err, syscall.EPIPE):
		return ResultValidationFailure, "broken-pipe-during-handshake"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return ResultValidationFailure, "eof-during-handshake"
	case errors.Is(err, net.ErrClosed), errors.Is(err, io.ErrClosedPipe):
		return ResultValidationFailure, "connection-closed-during-handshake"
	}
	// crypto/tls reports what it refused itself (and then sends the
	// server an alert) as plain errors; their wording has been stable for
	// many releases. Only the fixed code below is ever reported.
	msg := err.Error()
	for _, m := range localTLSErrors {
		if strings.Contains(msg, m.text) {
			return ResultValidationFailure, m.code
		}
	}
	if errors.As(err, &opErr) {
		return ResultValidationFailure, "network-error-during-handshake"
	}
	return ResultValidationFailure, "tls-handshake-failed"
}

var localTLSErrors = []struct{ text, code string }{
	{"unsupported protocol version", "tls-unsupported-protocol-version"},
	{"server chose an unconfigured cipher suite", "tls-unsupported-cipher-suite"},
	{"no cipher suite supported by both", "tls-no-common-cipher-suite"},
	{"CurvePreferences includes unsupported curve", "tls-unsupported-curve"},
	{"server selected unsupported curve", "tls-unsupported-curve"},
	{"server selected unadvertised ALPN protocol", "tls-unexpected-alpn"},
	{"invalid signature by the server certificate", "tls-invalid-server-signature"},
	{"received unexpected handshake message", "tls-unexpected-handshake-message"},
	{"server sent an incorrect Finished message", "tls-bad-finished"},
	{"unsupported certificate", "certificate-unsupported"},
	{"failed to parse certificate", "certificate-unparseable"},
}

// classifyInvalid maps x509.CertificateInvalidError by its Reason.
func classifyInvalid(e x509.CertificateInvalidError) (ResultType, string) {
	switch e.Reason {
	case x509.Expired:
		// crypto/x509 uses one Reason for both ends of the validity
		// period; only its Detail tells them apart ("current time … is
		// before …" for a certificate not valid yet).
		if strings.Contains(e.Detail, " is before ") {
			return ResultValidationFailure, "certificate-not-yet-valid"
		}
		return ResultCertificateExpired, "certificate-expired"
	case x509.NotAuthorizedToSign:
		return ResultCertificateNotTrusted, "certificate-issuer-not-a-ca"
	case x509.CANotAuthorizedForThisName, x509.NameConstraintsWithoutSANs, x509.UnconstrainedName, x509.TooManyConstraints:
		return ResultCertificateNotTrusted, "certificate-name-constraints-violated"
	case x509.TooManyIntermediates:
		return ResultCertificateNotTrusted, "certificate-chain-too-long"
	case x509.IncompatibleUsage, x509.CANotAuthorizedForExtKeyUsage:
		return ResultCertificateNotTrusted, "certificate-incompatible-usage"
	case x509.NameMismatch:
		return ResultCertificateNotTrusted, "certificate-issuer-name-mismatch"
	case x509.NoValidChains:
		return ResultCertificateNotTrusted, "certificate-no-valid-chains"
	}
	return ResultCertificateNotTrusted, "certificate-invalid"
}

// selfSigned reports whether c is signed by its own key under its own
// name (a self-signed leaf, the common "snakeoil" MX certificate).
func selfSigned(c *x509.Certificate) bool {
	if c == nil || string(c.RawIssuer) != string(c.RawSubject) {
		return false
	}
	return c.CheckSignature(c.SignatureAlgorithm, c.RawTBSCertificate, c.Signature) == nil
}

// alertName is an alert's name as crypto/tls spells it ("tls: handshake
// failure"), in lower case with hyphens: "handshake-failure".
func alertName(text string) string {
	return reasonCode(strings.TrimPrefix(text, "tls: "))
}

// reasonCode turns s into lower-case letters, digits and single hyphens.
func reasonCode(s string) string {
	var b strings.Builder
	hyphen := false
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c >= 'a' && c <= 'z' || c >= '0' && c <= '9':
			if hyphen && b.Len() > 0 {
				b.WriteByte('-')
			}
			hyphen = false
			b.WriteByte(c)
		case c >= 'A' && c <= 'Z':
			if hyphen && b.Len() > 0 {
				b.WriteByte('-')
			}
			hyphen = false
			b.WriteByte(c + 'a' - 'A')
		default:
			hyphen = true
		}
	}
	if b.Len() == 0 {
		return "unknown"
	}
	return b.String()
}
