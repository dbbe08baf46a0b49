package tlsrptsend

import (
	"bytes"
	"errors"
	"io"

	"github.com/stsrelay/stsrelay/tlsrpt"
)

// EnqueueFunc queues a report mail for delivery (RFC 8460 §5.3): msg is
// the complete message, from the envelope sender and to the one
// recipient. The queue must mark it as a TLS-RPT report, which delivery
// sends despite MTA-STS failures and never counts for TLS-RPT itself (§3,
// §5.3: no reports about reports). It returns the queue ID. The relay
// passes its queue's EnqueueReport, so this package needs no import of
// the queue.
type EnqueueFunc func(from, to string, msg io.Reader) (queueID string, err error)

// mail queues the report for a mailto: rua (§5.3). A successful Enqueue is
// a sent report: from there on the queue owns its delivery.
func (rp *Reporter) mail(j *job, to string, gz []byte) (string, error) {
	if rp.opts.Enqueue == nil {
		return "", errors.New("no queue for mailto: reports")
	}
	msg, err := tlsrpt.ComposeMail(tlsrpt.MailReport{
		From:         rp.opts.From,
		To:           to,
		Submitter:    rp.opts.Hostname,
		PolicyDomain: j.PolicyDomain,
		Date:         rp.now(),
		MessageID:    tlsrpt.NewMessageID(rp.opts.Hostname),
		Report:       j.Report,
		Gzip:         gz,
		Filename:     j.Report.Filename(rp.opts.Hostname, j.PolicyDomain),
	}, rp.dkim.Load())
	if err != nil {
		return "", err
	}
	return rp.opts.Enqueue(rp.opts.From, to, bytes.NewReader(msg))
}
