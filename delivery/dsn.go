package delivery

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"mime/multipart"
	"net/textproto"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/queue"
)

type dsnAction string

const (
	actionFailed  dsnAction = "failed"
	actionDelayed dsnAction = "delayed"
)

// maxReturnedBody bounds the original message returned with RET=FULL.
const maxReturnedBody = 1 << 20

// wantsDSN applies RFC 3461 NOTIFY: without NOTIFY a failure DSN is sent
// (and a delay DSN at our discretion); NOTIFY=NEVER sends none; otherwise
// only the listed kinds.
func wantsDSN(r *queue.Recipient, action dsnAction) bool {
	if len(r.Notify) == 0 {
		return true
	}
	for _, n := range r.Notify {
		switch strings.ToUpper(n) {
		case "NEVER":
			return false
		case "FAILURE":
			if action == actionFailed {
				return true
			}
		case "DELAY":
			if action == actionDelayed {
				return true
			}
		}
	}
	return false
}

// sendDSN queues a delivery status notification about recipients idx of m
// to m's sender. Never a DSN for a message with a null sender or for one
// the relay made itself (RFC 5321 §4.5.4: no errors about errors; no
// bounces of TLS reports).
func (e *Engine) sendDSN(m *queue.Message, idx []int, action dsnAction, now time.Time) error {
	if m.Env.From == "" || m.Env.Kind != queue.KindSubmitted {
		return nil
	}
	var rcpts []*queue.Recipient
	for _, i := range idx {
		if wantsDSN(&m.Rcpts[i], action) {
			rcpts = append(rcpts, &m.Rcpts[i])
		}
	}
	if len(rcpts) == 0 {
		return nil
	}
	var orig io.Reader
	if body, err := e.store.Body(m.ID); err == nil {
		orig = body
	}
	msg := BuildDSN(DSNInput{
		ReportingMTA: e.cfg.Hostname,
		Message:      m,
		Rcpts:        rcpts,
		Action:       action,
		Now:          now,
		Original:     orig,
		WillRetryTil: m.Received.Add(e.sched.MaxQueueTime),
	})
	id, err := e.store.Enqueue(queue.Envelope{From: "", Kind: queue.KindDSN,
		Rcpts: []queue.RcptSpec{{Addr: m.Env.From}}}, bytes.NewReader(msg))
	if err != nil {
		e.log.Error("queueing DSN failed", zap.String("queue_id", m.ID), zap.Error(err))
		return err
	}
	e.log.Info("dsn", zap.String("queue_id", m.ID), zap.String("dsn_id", id), zap.String("action", string(action)),
		zap.String("to", m.Env.From), zap.Int("rcpt", len(rcpts)))
	return nil
}

// DSNInput is what a DSN is made of.
type DSNInput struct {
	ReportingMTA string
	Message      *queue.Message
	Rcpts        []*queue.Recipient
	Action       dsnAction
	Now          time.Time
	// Original is the queued message; its header is returned (its whole
	// body too with RET=FULL, up to a bound).
	Original     io.Reader
	WillRetryTil time.Time
}

// BuildDSN writes an RFC 3464 delivery status notification: a
// multipart/report (RFC 6522) with a human-readable part, a
// message/delivery-status part and the original header (or message).
func BuildDSN(in DSNInput) []byte {
	m := in.Message
	var buf bytes.Buffer
	var rnd [8]byte
	_, _ = rand.Read(rnd[:])
	boundary := "dsn-" + hex.EncodeToString(rnd[:])
	subject := "Undelivered Mail Returned to Sender"
	if in.Action == actionDelayed {
		subject = "Delayed Mail (still being retried)"
	}
	fmt.Fprintf(&buf, "From: Mail Delivery System <MAILER-DAEMON@%s>\r\n", in.ReportingMTA)
	fmt.Fprintf(&buf, "To: <%s>\r\n", m.Env.From)
	fmt.Fprintf(&buf, "Subject: %s\r\n", subject)
	fmt.Fprintf(&buf, "Date: %s\r\n", in.Now.Format(time.RFC1123Z))
	fmt.Fprintf(&buf, "Message-ID: <%s.dsn.%s@%s>\r\n", m.ID, hex.EncodeToString(rnd[:4]), in.ReportingMTA)
	buf.WriteString("Auto-Submitted: auto-replied\r\n")
	buf.WriteString("MIME-Version: 1.0\r\n")
	fmt.Fprintf(&buf, "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"%s\"\r\n\r\n", boundary)
	buf.WriteString("This is a MIME-encapsulated delivery status notification.\r\n")

	mw := multipart.NewWriter(&buf)
	_ = mw.SetBoundary(boundary)

	// Part 1: for people.
	h := textproto.MIMEHeader{}
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("Content-Description", "Notification")
	pw, _ := mw.CreatePart(h)
	if in.Action == actionFailed {
		fmt.Fprintf(pw, "This is the mail system at %s.\r\n\r\nYour message %s could not be delivered to one or more recipients.\r\nIt has been returned with the reasons below.\r\n\r\n", in.ReportingMTA, m.ID)
	} else {
		fmt.Fprintf(pw, "This is the mail system at %s.\r\n\r\nYour message %s has not yet been delivered to one or more recipients.\r\nDelivery will be retried until %s; you need not resend it.\r\n\r\n", in.ReportingMTA, m.ID, in.WillRetryTil.UTC().Format(time.RFC1123Z))
	}
	for _, r := range in.Rcpts {
		fmt.Fprintf(pw, "<%s>: %s\r\n", r.Addr, oneLine(diagnostic(r)))
	}

	// Part 2: RFC 3464 §2.2 per-message and §2.3 per-recipient fields.
	h = textproto.MIMEHeader{}
	h.Set("Content-Type", "message/delivery-status")
	h.Set("Content-Description", "Delivery report")
	pw, _ = mw.CreatePart(h)
	fmt.Fprintf(pw, "Reporting-MTA: dns; %s\r\n", in.ReportingMTA)
	fmt.Fprintf(pw, "X-Queue-ID: %s\r\n", m.ID)
	if m.Env.EnvID != "" {
		fmt.Fprintf(pw, "Original-Envelope-Id: %s\r\n", m.Env.EnvID)
	}
	fmt.Fprintf(pw, "Arrival-Date: %s\r\n", m.Received.Format(time.RFC1123Z))
	for _, r := range in.Rcpts {
		pw.Write([]byte("\r\n"))
		if r.ORcpt != "" {
			o := r.ORcpt
			if !strings.Contains(o, ";") {
				o = "rfc822;" + o
			}
			fmt.Fprintf(pw, "Original-Recipient: %s\r\n", o)
		}
		fmt.Fprintf(pw, "Final-Recipient: rfc822; %s\r\n", r.Addr)
		fmt.Fprintf(pw, "Action: %s\r\n", in.Action)
		fmt.Fprintf(pw, "Status: %s\r\n", dsnStatus(r, in.Action))
		if r.LastMX != "" {
			fmt.Fprintf(pw, "Remote-MTA: dns; %s\r\n", r.LastMX)
		}
		if r.LastCode != 0 {
			fmt.Fprintf(pw, "Diagnostic-Code: smtp; %s\r\n", oneLine(diagnostic(r)))
		} else if r.LastError != "" {
			fmt.Fprintf(pw, "Diagnostic-Code: X-stsrelay; %s\r\n", oneLine(r.LastError))
		}
		if !r.LastAttempt.IsZero() {
			fmt.Fprintf(pw, "Last-Attempt-Date: %s\r\n", r.LastAttempt.Format(time.RFC1123Z))
		}
		if in.Action == actionDelayed {
			fmt.Fprintf(pw, "Will-Retry-Until: %s\r\n", in.WillRetryTil.Format(time.RFC1123Z))
		}
	}

	// Part 3: the original header (RET=HDRS, our default), or the whole
	// message when RET=FULL asked for it and it is not too big.
	if in.Original != nil {
		full := strings.EqualFold(m.Env.Ret, "FULL") && m.Size <= maxReturnedBody && !m.Env.RequireTLS
		h = textproto.MIMEHeader{}
		if full {
			h.Set("Content-Type", "message/rfc822")
		} else {
			h.Set("Content-Type", "text/rfc822-headers")
		}
		h.Set("Content-Description", "Undelivered message")
		pw, _ = mw.CreatePart(h)
		if full {
			_, _ = io.Copy(pw, in.Original)
		} else {
			br := bufio.NewReader(io.LimitReader(in.Original, 1<<20))
			for {
				line, err := br.ReadString('\n')
				if strings.TrimRight(line, "\r\n") == "" {
					break
				}
				if !strings.HasSuffix(line, "\n") {
					line += "\r\n"
				} else if !strings.HasSuffix(line, "\r\n") {
					line = strings.TrimSuffix(line, "\n") + "\r\n"
				}
				pw.Write([]byte(line))
				if err != nil {
					break
				}
			}
		}
	}
	_ = mw.Close()
	return buf.Bytes()
}

// dsnStatus is the RFC 3463 status: the remote enhanced code when there
// is one, with the class fitted to the action.
func dsnStatus(r *queue.Recipient, action dsnAction) string {
	st := r.LastEnhanced
	if st == "" || !isEnhanced(st) {
		switch {
		case action == actionDelayed:
			st = "4.0.0"
		case r.LastCode >= 500:
			st = "5.0.0"
		default:
			st = "5.4.7"
		}
	}
	if action == actionFailed && st[0] != '5' {
		st = "5" + st[1:]
	}
	if action == actionDelayed && st[0] != '4' {
		st = "4" + st[1:]
	}
	return st
}

func diagnostic(r *queue.Recipient) string {
	if r.LastCode == 0 {
		return r.LastError
	}
	s := fmt.Sprint(r.LastCode)
	if r.LastEnhanced != "" {
		s += " " + r.LastEnhanced
	}
	if r.LastError != "" {
		s += " " + r.LastError
	}
	return s
}

func oneLine(s string) string {
	s = strings.ReplaceAll(s, "\r", " ")
	s = strings.ReplaceAll(s, "\n", " ")
	if len(s) > 900 {
		s = s[:900]
	}
	return s
}

// isEnhanced reports whether s is an RFC 3463 status code ("4.7.5").
func isEnhanced(s string) bool {
	parts := strings.Split(s, ".")
	if len(parts) != 3 || (parts[0] != "2" && parts[0] != "4" && parts[0] != "5") {
		return false
	}
	for _, p := range parts[1:] {
		if n, err := strconv.Atoi(p); err != nil || n < 0 || n > 999 {
			return false
		}
	}
	return true
}
