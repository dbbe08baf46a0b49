package smtpclient

import (
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync/atomic"
)

// Rcpt is one recipient of a transaction.
type Rcpt struct {
	Addr string // the forward-path without angle brackets
	// Params are RCPT parameters, each "KEYWORD[=value]" already encoded
	// (e.g. "NOTIFY=FAILURE", "ORCPT=rfc822;a+40b.example").
	Params []string
}

// Transaction is one message for Send.
type Transaction struct {
	From string // the reverse-path without angle brackets; "" for <>
	// MailParams are MAIL parameters, each "KEYWORD[=value]" already
	// encoded ("SIZE=123", "BODY=8BITMIME", "SMTPUTF8", "REQUIRETLS",
	// "RET=FULL", "ENVID=x"). Checking them against the server's
	// extensions is the caller's job. BODY=BINARYMIME is refused: the
	// body is always sent CRLF-normalised (see Normalize).
	MailParams []string
	Rcpts      []Rcpt
	// Body is the message (header and body), read once, in a stream.
	Body io.Reader
	// Size is NormalizedSize(Body): the exact number of bytes BDAT will
	// send. When Size > 0 and the server offers CHUNKING, Send uses BDAT;
	// otherwise (Size <= 0: unknown) it uses DATA, which needs no size.
	// A Size that turns out wrong makes Send fail with ErrSizeMismatch
	// and close the connection before the chunk is complete.
	Size int64
}

// Result is what the server said to a transaction.
type Result struct {
	// MailReply is the reply to MAIL; Code 0 if none was read.
	MailReply Reply
	// RcptReplies has the reply to each RCPT, in Transaction.Rcpts
	// order; Code 0 where none was sent or read. After a refused MAIL
	// these are whatever the server said to the pipelined RCPTs (503
	// usually), not a verdict on the recipients.
	RcptReplies []Reply
	// DataReply is the reply that ended the transaction: to the final
	// dot, to BDAT LAST or to a failed BDAT chunk, or to a DATA command
	// that was not answered 354. Code 0 if none was read.
	DataReply Reply
	// Usable reports whether the session can carry another transaction.
	Usable bool
}

// RcptOutcome is the reply that decides recipient i's fate: its RCPT
// reply when that was not 2xx, else the DataReply (RFC 5321 §3.3: the
// message is accepted for the recipients accepted at RCPT). Code 0 means
// undecided — the session broke — which a caller treats as temporary.
func (r *Result) RcptOutcome(i int) Reply {
	if rr := r.RcptReplies[i]; rr.Code/100 != 2 {
		return rr
	}
	return r.DataReply
}

func (r *Result) accepted() int {
	n := 0
	for _, rr := range r.RcptReplies {
		if rr.Code/100 == 2 {
			n++
		}
	}
	return n
}

// Send runs one mail transaction (RFC 5321 §3.3) and reports each reply.
//
// With PIPELINING (RFC 2920) MAIL, every RCPT and DATA leave in one flight
// and the body in a second; with CHUNKING (RFC 3030) as well, MAIL, every
// RCPT, "BDAT <Size> LAST" and the body leave in one flight: one round
// trip per message. Without PIPELINING commands go one at a time, and no
// DATA is sent when no recipient was accepted.
//
// The returned error is nil when the server accepted the message for the
// recipients whose RcptReplies are 2xx (others may have been refused: see
// RcptOutcome). Otherwise it is a *ReplyError for the stage that failed
// ("mail"; "rcpt" when every recipient was refused, carrying the first
// temporary refusal if any, else the first; "data" or "bdat"), an *Error
// when the session broke (then Result.Usable is false), or a validation
// error when nothing was sent.
//
// A session is reusable after Send returns with Result.Usable (RFC 5321
// §4.1.1.4: the end of data clears the transaction). After a failed
// transaction the next Send starts with RSET (§4.1.1.5), in the same
// flight as its MAIL when pipelining.
func (c *Client) Send(tx Transaction) (res Result, err error) {
	res.RcptReplies = make([]Reply, len(tx.Rcpts))
	defer func() { res.Usable = c.err == nil }()
	if c.err != nil {
		return res, c.err
	}
	if err := validate(tx); err != nil {
		return res, err
	}
	if !c.helloDone {
		if err := c.Hello(); err != nil {
			return res, err
		}
	}
	_, pipelining := c.ext["PIPELINING"]
	_, chunking := c.ext["CHUNKING"]
	chunking = chunking && !c.opts.DisableChunking && tx.Size > 0
	if pipelining {
		err = c.sendPipelined(tx, chunking, &res)
	} else {
		err = c.sendLockStep(tx, chunking, &res)
	}
	c.needReset = err != nil
	return res, err
}

// validate refuses what would let an argument become another command:
// control characters (CR, LF above all), and spaces in parameters.
func validate(tx Transaction) error {
	if len(tx.Rcpts) == 0 {
		return errors.New("smtpclient: transaction without recipients")
	}
	if tx.Body == nil {
		return errors.New("smtpclient: transaction without body")
	}
	if err := checkPath(tx.From); err != nil {
		return fmt.Errorf("smtpclient: MAIL FROM: %w", err)
	}
	for _, p := range tx.MailParams {
		if err := checkParam(p); err != nil {
			return fmt.Errorf("smtpclient: MAIL parameter: %w", err)
		}
		if k, v, _ := strings.Cut(p, "="); strings.EqualFold(k, "BODY") && strings.EqualFold(v, "BINARYMIME") {
			return errors.New("smtpclient: BODY=BINARYMIME is not supported (bodies are CRLF-normalised)")
		}
	}
	for _, r := range tx.Rcpts {
		if r.Addr == "" {
			return errors.New("smtpclient: empty recipient")
		}
		if err := checkPath(r.Addr); err != nil {
			return fmt.Errorf("smtpclient: RCPT TO: %w", err)
		}
		for _, p := range r.Params {
			if err := checkParam(p); err != nil {
				return fmt.Errorf("smtpclient: RCPT parameter: %w", err)
			}
		}
	}
	return nil
}

func checkPath(s string) error {
	for i := 0; i < len(s); i++ {
		if b := s[i]; b < 0x20 || b == 0x7f || b == '<' || b == '>' {
			return fmt.Errorf("invalid byte %q in %q", b, s)
		}
	}
	return nil
}

func checkParam(s string) error {
	if s == "" {
		return errors.New("empty parameter")
	}
	for i := 0; i < len(s); i++ {
		if b := s[i]; b <= 0x20 || b == 0x7f {
			return fmt.Errorf("invalid byte %q in %q", b, s)
		}
	}
	return nil
}

func mailCommand(tx Transaction) string {
	var sb strings.Builder
	sb.WriteString("MAIL FROM:<")
	sb.WriteString(tx.From)
	sb.WriteString(">")
	for _, p := range tx.MailParams {
		sb.WriteString(" ")
		sb.WriteString(p)
	}
	return sb.String()
}

func rcptCommand(r Rcpt) string {
	var sb strings.Builder
	sb.WriteString("RCPT TO:<")
	sb.WriteString(r.Addr)
	sb.WriteString(">")
	for _, p := range r.Params {
		sb.WriteString(" ")
		sb.WriteString(p)
	}
	return sb.String()
}

// sendPipelined runs a transaction as RFC 2920 §3.1 describes: [RSET,]
// MAIL, the RCPTs and DATA (the last command of the group) in one flight,
// then every reply read in order and checked. With CHUNKING the group ends
// in "BDAT <size> LAST" followed by the body (RFC 3030 §4.2 allows BDAT
// and its chunk in a pipelined group).
func (c *Client) sendPipelined(tx Transaction, chunking bool, res *Result) error {
	lines := make([]string, 0, len(tx.Rcpts)+3)
	stages := make([]string, 0, len(tx.Rcpts)+3)
	reset := c.needReset
	if reset {
		lines, stages = append(lines, "RSET"), append(stages, StageRset)
	}
	lines, stages = append(lines, mailCommand(tx)), append(stages, StageMail)
	for _, r := range tx.Rcpts {
		lines, stages = append(lines, rcptCommand(r)), append(stages, StageRcpt)
	}
	var body func() error
	if chunking {
		lines, stages = append(lines, "BDAT "+strconv.FormatInt(tx.Size, 10)+" LAST"), append(stages, StageBDAT)
		body = func() error { return c.writeExact(Normalize(tx.Body), tx.Size, true) }
	} else {
		lines, stages = append(lines, "DATA"), append(stages, StageData)
	}
	// The BDAT reply comes only once the whole chunk is in: it is read
	// after the flight, with FinalTimeout.
	early := len(stages)
	if chunking {
		early--
	}
	replies, err := c.flight(lines, stages, early, body)
	if err == nil && chunking {
		var r Reply
		if r, err = c.readReply(StageBDAT, c.opts.FinalTimeout); err == nil {
			replies = append(replies, r)
		}
	}
	// Match replies to commands, in order (RFC 2920 §3.1: "MUST check
	// all statuses").
	k := 0
	if reset && len(replies) > 0 {
		k = 1
		if replies[0].Code != 250 {
			return c.fail(StageRset, replyError(StageRset, replies[0]))
		}
	}
	if k < len(replies) {
		res.MailReply = replies[k]
	}
	for i := range res.RcptReplies {
		if k+1+i < len(replies) {
			res.RcptReplies[i] = replies[k+1+i]
		}
	}
	var last Reply
	if len(replies) == len(stages) {
		last = replies[len(replies)-1]
	}
	if err != nil {
		if last.Code != 0 {
			res.DataReply = last
		}
		return err
	}
	if chunking || last.Code != 354 {
		res.DataReply = last
		return c.outcome(res, stages[len(stages)-1])
	}
	if res.MailReply.Code/100 != 2 || res.accepted() == 0 {
		// RFC 2920 §3.1: DATA was accepted although no recipient was;
		// end the (empty) message with a lone dot and ignore the reply.
		c.bw.WriteString(".\r\n")
		if err := c.flush(StageData); err != nil {
			return err
		}
		if _, err := c.readReply(StageData, c.opts.FinalTimeout); err != nil {
			return err
		}
		return c.outcome(res, StageData)
	}
	if err := c.sendData(tx, res); err != nil {
		return err
	}
	return c.outcome(res, StageData)
}

// flight writes lines (then body, if any) with a single flush, while a
// second goroutine reads the first n replies. Reading while writing keeps
// a server that answers as it reads (and blocks when its replies are not
// read) from deadlocking against a client that writes more than the
// socket buffers hold — a large BDAT chunk, or many RCPTs. It returns the
// replies read and the error that ended the flight, if any; a 421 among
// the replies is returned as that error.
func (c *Client) flight(lines, stages []string, n int, body func() error) ([]Reply, error) {
	type outcome struct {
		replies []Reply
		err     error
	}
	// The side that fails first closes the connection, to unblock the
	// other, and its error is the one reported.
	const (
		none int32 = iota
		reader
		writer
	)
	var aborted atomic.Int32
	abort := func(who int32) {
		if aborted.CompareAndSwap(none, who) {
			c.conn.Close()
		}
	}
	done := make(chan outcome, 1)
	go func() {
		var rs []Reply
		for range n {
			r, err := c.read(c.opts.CommandTimeout)
			if err != nil {
				abort(reader)
				done <- outcome{rs, err}
				return
			}
			rs = append(rs, r)
			if r.Code == 421 {
				abort(reader)
				break
			}
		}
		done <- outcome{rs, nil}
	}()

	wstage := stages[0]
	c.extendRead = true
	for _, l := range lines {
		c.bw.WriteString(l)
		c.bw.WriteString("\r\n")
	}
	var werr error
	if body != nil {
		wstage = stages[len(stages)-1]
		c.writeTimeout = c.opts.DataTimeout
		werr = body()
	}
	if werr == nil {
		c.roundTrips.Add(1)
		werr = c.bw.Flush()
	}
	c.extendRead = false
	c.writeTimeout = c.opts.CommandTimeout
	if werr != nil {
		abort(writer)
	}
	o := <-done

	for i, r := range o.replies {
		if r.Code == 421 {
			return o.replies, c.fail(stages[i], replyError(stages[i], r))
		}
	}
	if aborted.Load() == reader && o.err != nil {
		return o.replies, c.fail(stages[len(o.replies)], o.err)
	}
	if werr != nil {
		return o.replies, c.fail(wstage, werr)
	}
	return o.replies, nil
}

// outcome turns a finished transaction into Send's error: the first
// stage that failed decides.
func (c *Client) outcome(res *Result, final string) error {
	if res.MailReply.Code/100 != 2 {
		return c.refused(StageMail, res.MailReply)
	}
	if res.accepted() == 0 {
		pick := res.RcptReplies[0]
		for _, r := range res.RcptReplies {
			if r.Code/100 == 4 {
				pick = r
				break
			}
		}
		return c.refused(StageRcpt, pick)
	}
	if res.DataReply.Code/100 != 2 {
		return c.refused(final, res.DataReply)
	}
	return nil
}

// sendLockStep runs a transaction one command at a time (RFC 5321 §3.3),
// for servers without PIPELINING.
func (c *Client) sendLockStep(tx Transaction, chunking bool, res *Result) error {
	if c.needReset {
		if err := c.Reset(); err != nil {
			return err
		}
	}
	r, err := c.cmd(StageMail, mailCommand(tx))
	if err != nil {
		return err
	}
	res.MailReply = r
	if r.Code/100 != 2 {
		return c.refused(StageMail, r)
	}
	for i, rc := range tx.Rcpts {
		r, err := c.cmd(StageRcpt, rcptCommand(rc))
		if err != nil {
			return err
		}
		res.RcptReplies[i] = r
		if r.Code == 421 {
			return c.refused(StageRcpt, r)
		}
	}
	if res.accepted() == 0 {
		// RFC 5321 §3.3: no DATA without an accepted recipient.
		return c.outcome(res, StageData)
	}
	if chunking {
		return c.sendChunks(tx, res)
	}
	r, err = c.cmd(StageData, "DATA")
	if err != nil {
		return err
	}
	if r.Code != 354 {
		res.DataReply = r
		return c.refused(StageData, r)
	}
	if err := c.sendData(tx, res); err != nil {
		return err
	}
	return c.outcome(res, StageData)
}

// sendData writes the body after a 354 — dot-stuffed and CRLF-normalised
// (RFC 5321 §4.5.2, §2.3.8) — then the final dot, and reads the reply
// within FinalTimeout (§4.5.3.2.6). Each body write has DataTimeout
// (§4.5.3.2.5). A body read failure aborts the session: without the
// final dot the server delivers nothing.
func (c *Client) sendData(tx Transaction, res *Result) error {
	c.writeTimeout = c.opts.DataTimeout
	_, err := c.bw.ReadFrom(newNormReader(tx.Body, true))
	if err == nil {
		c.bw.WriteString(".\r\n")
		err = c.flush(StageData)
	}
	c.writeTimeout = c.opts.CommandTimeout
	if err != nil {
		return c.fail(StageData, err)
	}
	r, err := c.readReply(StageData, c.opts.FinalTimeout)
	if err != nil {
		return err
	}
	res.DataReply = r
	return nil
}

// sendChunks sends the body in BDAT chunks of at most ChunkBytes, each
// waiting for its reply (RFC 3030 §2; without PIPELINING the client must
// wait). A refused chunk ends the transaction: "MUST NOT send any
// additional BDAT segments".
func (c *Client) sendChunks(tx Transaction, res *Result) error {
	src := Normalize(tx.Body)
	for remaining := tx.Size; remaining > 0; {
		n := min(remaining, c.opts.ChunkBytes)
		last := n == remaining
		line := "BDAT " + strconv.FormatInt(n, 10)
		timeout := c.opts.CommandTimeout
		if last {
			line += " LAST"
			timeout = c.opts.FinalTimeout
		}
		c.bw.WriteString(line + "\r\n")
		c.writeTimeout = c.opts.DataTimeout
		err := c.writeExact(src, n, last)
		if err == nil {
			c.roundTrips.Add(1)
			err = c.bw.Flush()
		}
		c.writeTimeout = c.opts.CommandTimeout
		if err != nil {
			return c.fail(StageBDAT, err)
		}
		r, err := c.readReply(StageBDAT, timeout)
		if err != nil {
			return err
		}
		remaining -= n
		if last || r.Code/100 != 2 {
			res.DataReply = r
			break
		}
	}
	return c.outcome(res, StageBDAT)
}

// writeExact copies exactly n bytes of src. When last, it holds the final
// byte back until it has seen src end, so that a body longer or shorter
// than announced never completes the chunk: the caller then closes the
// connection and the server discards the incomplete message.
func (c *Client) writeExact(src io.Reader, n int64, last bool) error {
	hold := int64(0)
	if last {
		hold = 1
	}
	if _, err := io.CopyN(c.bw, src, n-hold); err != nil {
		if err == io.EOF {
			return ErrSizeMismatch
		}
		return err
	}
	if !last {
		return nil
	}
	var b, extra [1]byte
	if _, err := io.ReadFull(src, b[:]); err != nil {
		if err == io.EOF {
			return ErrSizeMismatch
		}
		return err
	}
	switch k, err := io.ReadFull(src, extra[:]); {
	case k > 0:
		return ErrSizeMismatch
	case err != io.EOF:
		return err
	}
	_, err := c.bw.Write(b[:])
	return err
}
