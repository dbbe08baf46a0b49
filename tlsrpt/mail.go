package tlsrpt

import (
	"bytes"
	"crypto"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"mime"
	"mime/quotedprintable"
	"os"
	"strings"
	"time"

	"github.com/emersion/go-msgauth/dkim"
)

// DKIMOptions configure the DKIM signature of mailed reports (RFC 8460 §3:
// reports sent by mail MUST carry a valid DKIM signature of the reporting
// domain, without "l=").
type DKIMOptions struct {
	// Domain (d=) and Selector (s=). RFC 8460 §3: the key record SHOULD
	// declare the service type tlsrpt; publish "s=email:tlsrpt" (or "s=*"),
	// since many verifiers also insist on "email".
	Domain, Selector string
	// KeyFile is a PEM private key: RSA (PKCS #1 or #8) or Ed25519 (PKCS #8).
	KeyFile string
	// Signer, when set, is used instead of KeyFile.
	Signer crypto.Signer
}

// dkimHeaders are the signed header fields: RFC 6376 §5.4.1's recommended
// ones plus the TLS-Report-* fields (RFC 8460 §5.3 SHOULD).
var dkimHeaders = []string{
	"From", "To", "Subject", "Date", "Message-ID", "MIME-Version", "Content-Type",
	"TLS-Report-Domain", "TLS-Report-Submitter", "Auto-Submitted",
}

// LoadDKIMKey reads a PEM private key for DKIM signing: RSA ("RSA PRIVATE
// KEY", PKCS #1, or "PRIVATE KEY", PKCS #8) or Ed25519 (PKCS #8).
func LoadDKIMKey(path string) (crypto.Signer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("dkim key: %w", err)
	}
	blk, _ := pem.Decode(data)
	if blk == nil {
		return nil, fmt.Errorf("dkim key %s: no PEM block", path)
	}
	var key any
	switch blk.Type {
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(blk.Bytes)
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(blk.Bytes)
	default:
		return nil, fmt.Errorf("dkim key %s: unsupported PEM type %q", path, blk.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("dkim key %s: %w", path, err)
	}
	switch k := key.(type) {
	case *rsa.PrivateKey:
		if k.N.BitLen() < 1024 {
			return nil, fmt.Errorf("dkim key %s: RSA key of %d bits is too short", path, k.N.BitLen())
		}
		return k, nil
	case ed25519.PrivateKey:
		return k, nil
	}
	return nil, fmt.Errorf("dkim key %s: unsupported key type %T (want RSA or Ed25519)", path, key)
}

// MailReport is what ComposeMail needs.
type MailReport struct {
	From, To     string
	Submitter    string // domain
	PolicyDomain string
	Date         time.Time
	MessageID    string // without <>
	Report       *Report
	Gzip         []byte
	Filename     string
}

// NewMessageID returns a fresh Message-ID (without <>) for a report mail
// from submitter.
func NewMessageID(submitter string) string {
	return "tlsrpt." + newUnique() + "@" + submitter
}

// ComposeMail builds the report message of RFC 8460 §5.3: multipart/report
// with report-type="tlsrpt", a human-readable text/plain part and the
// application/tlsrpt+gzip report as a base64 attachment; TLS-Report-Domain,
// TLS-Report-Submitter and the §5.3 Subject; "TLS-Required: No" (RFC 8689
// §3) so that the report reaches a domain whose TLS is broken — the very
// case it reports. Lines end in CRLF. With sign set, a DKIM-Signature is
// prepended.
func ComposeMail(m MailReport, sign *DKIMOptions) ([]byte, error) {
	boundary := "tlsrpt-" + newUnique() + newUnique()
	var b bytes.Buffer
	h := func(name, value string) { fmt.Fprintf(&b, "%s: %s\r\n", name, value) }
	h("From", m.From)
	h("To", m.To)
	h("Date", m.Date.Format(time.RFC1123Z))
	h("Message-ID", "<"+m.MessageID+">")
	// §5.3 ABNF, folded as in the RFC's example.
	h("Subject", fmt.Sprintf("Report Domain: %s\r\n Submitter: %s\r\n Report-ID: <%s>",
		m.PolicyDomain, m.Submitter, m.Report.ReportID))
	h("TLS-Report-Domain", m.PolicyDomain)
	h("TLS-Report-Submitter", m.Submitter)
	h("TLS-Required", "No")
	h("Auto-Submitted", "auto-generated") // RFC 3834: no auto-replies
	h("MIME-Version", "1.0")
	h("Content-Type", fmt.Sprintf("multipart/report; report-type=\"tlsrpt\";\r\n boundary=\"%s\"", boundary))
	b.WriteString("\r\nThis is a multipart message in MIME format.\r\n")

	fmt.Fprintf(&b, "\r\n--%s\r\n", boundary)
	h("Content-Type", "text/plain; charset=utf-8")
	h("Content-Transfer-Encoding", "quoted-printable")
	b.WriteString("\r\n")
	qp := quotedprintable.NewWriter(&b)
	qp.Write([]byte(summaryText(m)))
	qp.Close()
	b.WriteString("\r\n")

	fmt.Fprintf(&b, "\r\n--%s\r\n", boundary)
	h("Content-Type", mime.FormatMediaType(MediaTypeGzip, map[string]string{"name": m.Filename}))
	h("Content-Transfer-Encoding", "base64")
	h("Content-Disposition", mime.FormatMediaType("attachment", map[string]string{"filename": m.Filename}))
	b.WriteString("\r\n")
	enc := base64.StdEncoding.EncodeToString(m.Gzip)
	for len(enc) > 76 {
		b.WriteString(enc[:76])
		b.WriteString("\r\n")
		enc = enc[76:]
	}
	b.WriteString(enc)
	b.WriteString("\r\n")
	fmt.Fprintf(&b, "\r\n--%s--\r\n", boundary)

	if sign == nil || sign.Signer == nil {
		return b.Bytes(), nil
	}
	var out bytes.Buffer
	err := dkim.Sign(&out, bytes.NewReader(b.Bytes()), &dkim.SignOptions{
		Domain:                 sign.Domain,
		Selector:               sign.Selector,
		Signer:                 sign.Signer,
		Hash:                   crypto.SHA256,
		HeaderCanonicalization: dkim.CanonicalizationRelaxed,
		BodyCanonicalization:   dkim.CanonicalizationRelaxed,
		HeaderKeys:             dkimHeaders,
	})
	if err != nil {
		return nil, fmt.Errorf("dkim sign: %w", err)
	}
	return out.Bytes(), nil
}

// summaryText is the human-readable part.
func summaryText(m MailReport) string {
	var sb strings.Builder
	r := m.Report
	fmt.Fprintf(&sb, "This is an aggregate TLS report (RFC 8460) from %s", m.Submitter)
	if r.OrganizationName != "" {
		fmt.Fprintf(&sb, " (%s)", r.OrganizationName)
	}
	fmt.Fprintf(&sb, "\r\nabout mail sent to %s from %s to %s.\r\n\r\n",
		m.PolicyDomain, r.DateRange.StartDatetime, r.DateRange.EndDatetime)
	var ok, failed int64
	for _, p := range r.Policies {
		ok += p.Summary.TotalSuccessfulSessionCount
		failed += p.Summary.TotalFailureSessionCount
	}
	fmt.Fprintf(&sb, "Successful TLS sessions: %d\r\nFailed TLS sessions: %d\r\n", ok, failed)
	for _, p := range r.Policies {
		fmt.Fprintf(&sb, "\r\nPolicy %s: %d successful, %d failed\r\n", p.Policy.PolicyType,
			p.Summary.TotalSuccessfulSessionCount, p.Summary.TotalFailureSessionCount)
		for _, d := range p.FailureDetails {
			fmt.Fprintf(&sb, "  %d x %s", d.FailedSessionCount, d.ResultType)
			if d.ReceivingMXHostname != "" {
				fmt.Fprintf(&sb, " at %s", d.ReceivingMXHostname)
			}
			if d.ReceivingIP != "" {
				fmt.Fprintf(&sb, " [%s]", d.ReceivingIP)
			}
			if d.FailureReasonCode != "" {
				fmt.Fprintf(&sb, ": %s", d.FailureReasonCode)
			}
			sb.WriteString("\r\n")
		}
	}
	fmt.Fprintf(&sb, "\r\nReport-ID: %s\r\nThe attached %s is authoritative.\r\n", r.ReportID, m.Filename)
	return sb.String()
}
