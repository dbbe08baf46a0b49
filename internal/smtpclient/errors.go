package smtpclient

import (
	"errors"
	"fmt"
	"net"
)

// Stages name the protocol step an error belongs to. They are the values
// of ReplyError.Stage and Error.Stage.
const (
	StageConnect  = "connect" // the greeting (RFC 5321 §3.1)
	StageEHLO     = "ehlo"    // EHLO, or the HELO fallback
	StageStartTLS = "starttls"
	StageAuth     = "auth" // AUTH (RFC 4954)
	StageMail     = "mail"
	StageRcpt     = "rcpt"
	StageData     = "data" // the DATA command, the body and the final dot
	StageBDAT     = "bdat"
	StageRset     = "rset"
	StageNoop     = "noop"
	StageQuit     = "quit"
)

// ReplyError is a server reply that refused a command.
type ReplyError struct {
	Stage    string
	Code     int
	Enhanced string
	Text     string
}

func replyError(stage string, r Reply) *ReplyError {
	return &ReplyError{Stage: stage, Code: r.Code, Enhanced: r.Enhanced, Text: r.Text()}
}

func (e *ReplyError) Error() string {
	s := fmt.Sprintf("smtp %s: %d", e.Stage, e.Code)
	if e.Enhanced != "" {
		s += " " + e.Enhanced
	}
	if e.Text != "" {
		s += " " + e.Text
	}
	return s
}

// Temporary reports a 4xx reply: retrying later may succeed (RFC 5321
// §4.2.1).
func (e *ReplyError) Temporary() bool { return e.Code/100 == 4 }

// Permanent reports a 5xx reply: the same command will fail again (RFC
// 5321 §4.2.1).
func (e *ReplyError) Permanent() bool { return e.Code/100 == 5 }

// Error is a network failure, a timeout, a protocol violation by the peer
// or a failure to read the message body, at a stage. The session is
// unusable after it and its connection is closed.
type Error struct {
	Stage string
	Err   error
}

func (e *Error) Error() string { return "smtp " + e.Stage + ": " + e.Err.Error() }
func (e *Error) Unwrap() error { return e.Err }

// Temporary is true: a broken connection says nothing about the
// message, which may be tried again, elsewhere or later.
func (e *Error) Temporary() bool { return true }

// Permanent is false, see Temporary.
func (e *Error) Permanent() bool { return false }

// Timeout reports whether the error is a deadline that ran out.
func (e *Error) Timeout() bool {
	var ne net.Error
	return errors.As(e.Err, &ne) && ne.Timeout()
}

// ProtocolError is a violation of the SMTP protocol by the server: a
// malformed or oversized reply, data after the STARTTLS reply.
type ProtocolError struct {
	Reason string
}

func (e *ProtocolError) Error() string { return "protocol violation: " + e.Reason }

func protocolErrorf(format string, args ...any) error {
	return &ProtocolError{Reason: fmt.Sprintf(format, args...)}
}

// ErrSizeMismatch means the normalised body was not Transaction.Size bytes
// long. The BDAT chunk is then left incomplete and the connection closed,
// so that no truncated message is delivered and no body byte can be read
// as a command (RFC 3030 §2: the chunk is exactly the announced size).
var ErrSizeMismatch = errors.New("message body length differs from Transaction.Size (use NormalizedSize)")

// BodyError is a failure to read Transaction.Body. The transfer is
// aborted by closing the connection, so the server delivers nothing.
type BodyError struct {
	Err error
}

func (e *BodyError) Error() string { return "read message body: " + e.Err.Error() }
func (e *BodyError) Unwrap() error { return e.Err }

// Permanent reports whether err is a 5xx reply.
func Permanent(err error) bool {
	var re *ReplyError
	return errors.As(err, &re) && re.Permanent()
}
