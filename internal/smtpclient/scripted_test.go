package smtpclient

import (
	"bytes"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// step is one exchange of a scripted server: it expects a command and
// answers it.
type step struct {
	cmd   string // expected command prefix, case-insensitive
	reply string // reply lines separated by "\n" (CRLF added); "" = none
	raw   string // written verbatim after reply
	data  bool   // after the reply, read a DATA body; the next step answers the dot
	stall bool   // after the reply, stop reading for good (a peer whose reads stopped)
	hang  bool   // after the reply, read and discard, never answer again
	flood int64  // after the reply, write this many bytes with no newline
	close bool   // after the reply, close the connection
}

// scripted is a raw TCP SMTP server on 127.0.0.1 that follows a script,
// one connection only, and records what arrived: the commands, which
// "flight" (burst of bytes with no pause of burstGap) each came in, and
// the message bodies as raw bytes (DATA up to and including the final
// ".\r\n"; each BDAT chunk).
type scripted struct {
	t        testing.TB
	addr     string
	greeting string
	steps    []step
	done     chan struct{}
	finished chan struct{}

	mu     sync.Mutex
	cmds   []string
	bursts []int
	bodies [][]byte
	errs   []string
}

const burstGap = 40 * time.Millisecond

func startScripted(t testing.TB, greeting string, steps ...step) *scripted {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &scripted{t: t, addr: ln.Addr().String(), greeting: greeting, steps: steps,
		done: make(chan struct{}), finished: make(chan struct{})}
	go func() {
		c, err := ln.Accept()
		ln.Close()
		if err != nil {
			close(s.finished)
			return
		}
		go func() { <-s.done; c.Close() }()
		s.serve(c)
	}()
	t.Cleanup(func() {
		close(s.done)
		ln.Close()
		select {
		case <-s.finished:
		case <-time.After(10 * time.Second):
			t.Error("scripted server did not stop")
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, e := range s.errs {
			t.Error("scripted server: " + e)
		}
	})
	return s
}

func (s *scripted) errorf(format string, args ...any) {
	s.mu.Lock()
	s.errs = append(s.errs, fmt.Sprintf(format, args...))
	s.mu.Unlock()
}

// flights groups the commands by the burst they arrived in.
func (s *scripted) flights() [][]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out [][]string
	for i, c := range s.cmds {
		if i == 0 || s.bursts[i] != s.bursts[i-1] {
			out = append(out, nil)
		}
		out[len(out)-1] = append(out[len(out)-1], c)
	}
	return out
}

func (s *scripted) messages() [][]byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([][]byte(nil), s.bodies...)
}

// wait waits for the server to finish its script (the client has quit or
// closed).
func (s *scripted) wait() {
	select {
	case <-s.finished:
	case <-time.After(10 * time.Second):
		s.t.Error("scripted server still running")
	}
}

func (s *scripted) serve(c net.Conn) {
	defer close(s.finished)
	defer c.Close()
	r := &burstReader{c: c, end: time.Now().Add(20 * time.Second)}
	write := func(reply, raw string) bool {
		var b strings.Builder
		if reply != "" {
			for _, l := range strings.Split(reply, "\n") {
				b.WriteString(l + "\r\n")
			}
		}
		b.WriteString(raw)
		_ = c.SetWriteDeadline(r.end)
		_, err := io.WriteString(c, b.String())
		return err == nil
	}
	if !write(s.greeting, "") {
		return
	}
	for i := 0; i < len(s.steps); i++ {
		st := s.steps[i]
		if st.cmd == "" {
			// No command: the step acts first (a flood instead of a
			// greeting).
			if !write(st.reply, st.raw) {
				return
			}
			if st.flood > 0 {
				s.flood(c, st.flood)
			}
			return
		}
		line, burst, err := r.line()
		if err != nil {
			s.errorf("step %d (%s): %v", i, st.cmd, err)
			return
		}
		s.mu.Lock()
		s.cmds, s.bursts = append(s.cmds, line), append(s.bursts, burst)
		s.mu.Unlock()
		if !strings.HasPrefix(strings.ToUpper(line), strings.ToUpper(st.cmd)) {
			s.errorf("step %d: got %q, want %q", i, line, st.cmd)
			write("500 unexpected", "")
			return
		}
		if f := strings.Fields(line); strings.EqualFold(f[0], "BDAT") {
			n, _ := strconv.Atoi(f[1])
			chunk, err := r.bytes(n)
			if err != nil {
				s.errorf("BDAT chunk: %v", err)
				return
			}
			s.mu.Lock()
			s.bodies = append(s.bodies, chunk)
			s.mu.Unlock()
		}
		if !write(st.reply, st.raw) {
			return
		}
		switch {
		case st.flood > 0:
			s.flood(c, st.flood)
			return
		case st.close:
			return
		case st.stall:
			<-s.done
			return
		case st.hang:
			_ = c.SetReadDeadline(r.end)
			io.Copy(io.Discard, c)
			return
		case st.data:
			body, err := r.dataBody()
			if err != nil {
				s.errorf("DATA body: %v", err)
				return
			}
			s.mu.Lock()
			s.bodies = append(s.bodies, body)
			s.mu.Unlock()
			i++
			if i == len(s.steps) {
				return
			}
			if s.steps[i].cmd != "." {
				s.errorf("step %d after data must be \".\"", i)
			}
			if !write(s.steps[i].reply, s.steps[i].raw) {
				return
			}
			if s.steps[i].hang {
				_ = c.SetReadDeadline(r.end)
				io.Copy(io.Discard, c)
				return
			}
		}
	}
	// Past the script: QUIT is answered, anything else is an error.
	for {
		line, burst, err := r.line()
		if err != nil {
			return
		}
		s.mu.Lock()
		s.cmds, s.bursts = append(s.cmds, line), append(s.bursts, burst)
		s.mu.Unlock()
		if strings.EqualFold(line, "QUIT") {
			write("221 bye", "")
			return
		}
		s.errorf("unexpected command %q after the script", line)
		write("500 unexpected", "")
	}
}

func (s *scripted) flood(c net.Conn, n int64) {
	buf := bytes.Repeat([]byte("x"), 64<<10)
	for ; n > 0; n -= int64(len(buf)) {
		if _, err := c.Write(buf[:min(n, int64(len(buf)))]); err != nil {
			return
		}
	}
}

// burstReader reads from a connection in bursts: everything that arrives
// without a pause of burstGap is one burst (one client flight).
type burstReader struct {
	c   net.Conn
	end time.Time
	buf []byte
	ids []int // burst number of each byte of buf
	n   int   // bursts so far
	err error
}

func (r *burstReader) fill() error {
	if r.err != nil {
		return r.err
	}
	b := make([]byte, 64<<10)
	_ = r.c.SetReadDeadline(r.end)
	n, err := r.c.Read(b)
	if n == 0 {
		return err
	}
	r.n++
	for {
		r.buf = append(r.buf, b[:n]...)
		for range n {
			r.ids = append(r.ids, r.n)
		}
		if err != nil {
			r.err = err
			return nil
		}
		if len(r.buf) >= 256<<10 {
			return nil // bounded: a large body is read in several bursts
		}
		_ = r.c.SetReadDeadline(time.Now().Add(burstGap))
		n, err = r.c.Read(b)
		if ne, ok := err.(net.Error); ok && ne.Timeout() && n == 0 {
			return nil
		}
		if n == 0 && err != nil {
			r.err = err
			return nil
		}
	}
}

func (r *burstReader) consume(n int) {
	r.buf, r.ids = r.buf[n:], r.ids[n:]
}

// line returns the next CRLF-terminated line and the burst its first byte
// came in.
func (r *burstReader) line() (string, int, error) {
	for {
		if i := bytes.Index(r.buf, []byte("\r\n")); i >= 0 {
			l, id := string(r.buf[:i]), r.ids[0]
			r.consume(i + 2)
			return l, id, nil
		}
		if err := r.fill(); err != nil {
			return "", 0, err
		}
	}
}

func (r *burstReader) bytes(n int) ([]byte, error) {
	for len(r.buf) < n {
		if err := r.fill(); err != nil {
			return nil, err
		}
	}
	b := append([]byte(nil), r.buf[:n]...)
	r.consume(n)
	return b, nil
}

// dataBody reads a DATA body up to and including the end-of-data line.
func (r *burstReader) dataBody() ([]byte, error) {
	for {
		if bytes.HasPrefix(r.buf, []byte(".\r\n")) {
			return r.bytes(3)
		}
		if i := bytes.Index(r.buf, []byte("\r\n.\r\n")); i >= 0 {
			return r.bytes(i + 5)
		}
		if err := r.fill(); err != nil {
			return nil, err
		}
	}
}

// dial connects a Client to addr with test-sized timeouts.
func dial(t testing.TB, addr string, opts Options) *Client {
	t.Helper()
	c, err := dialErr(addr, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func dialErr(addr string, opts Options) (*Client, error) {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	if opts.CommandTimeout == 0 {
		opts.CommandTimeout = 5 * time.Second
	}
	if opts.DataTimeout == 0 {
		opts.DataTimeout = 5 * time.Second
	}
	if opts.FinalTimeout == 0 {
		opts.FinalTimeout = 5 * time.Second
	}
	if opts.LocalName == "" {
		opts.LocalName = "client.test"
	}
	return New(conn, opts)
}

func textTx(body string, rcpts ...string) Transaction {
	tx := Transaction{From: "sender@client.test", Body: strings.NewReader(body)}
	for _, r := range rcpts {
		tx.Rcpts = append(tx.Rcpts, Rcpt{Addr: r})
	}
	return tx
}

func replyOf(code int, enh, text string) Reply {
	return Reply{Code: code, Enhanced: enh, Lines: []string{text}}
}

func sameReply(a, b Reply) bool {
	return a.Code == b.Code && a.Enhanced == b.Enhanced && a.Text() == b.Text()
}

const ehloPipe = "250-mx.test\n250-PIPELINING\n250-ENHANCEDSTATUSCODES\n250 8BITMIME"
const ehloPlain = "250-mx.test\n250-ENHANCEDSTATUSCODES\n250 8BITMIME"

// TestScriptedTransactions checks, against a server that answers from a
// script, which commands leave in which flight and how replies map to
// recipients.
func TestScriptedTransactions(t *testing.T) {
	t.Parallel()
	type want struct {
		flights   [][]string
		bodies    []string
		rcpts     []Reply
		data      Reply
		errStage  string // "" = nil error
		errCode   int
		usable    bool
		roundTrip int64 // after EHLO
	}
	tests := []struct {
		name  string
		ehlo  string
		steps []step
		tx    Transaction
		want  want
	}{
		{
			// RFC 2920 §3.1: MAIL, RCPTs and DATA in one flight; each
			// reply matched to its command.
			name: "pipelining sends MAIL RCPT DATA in one flight with per-recipient outcomes",
			ehlo: ehloPipe,
			steps: []step{
				{cmd: "MAIL FROM:<sender@client.test>", reply: "250 2.1.0 ok"},
				{cmd: "RCPT TO:<a@mx.test>", reply: "250 2.1.5 ok"},
				{cmd: "RCPT TO:<b@mx.test>", reply: "450 4.2.1 mailbox busy"},
				{cmd: "RCPT TO:<c@mx.test>", reply: "550 5.1.1 no such user"},
				{cmd: "DATA", reply: "354 go ahead", data: true},
				{cmd: ".", reply: "250 2.0.0 queued as X"},
			},
			tx: textTx("Subject: t\r\n\r\nhello\r\n", "a@mx.test", "b@mx.test", "c@mx.test"),
			want: want{
				flights: [][]string{{"MAIL FROM:<sender@client.test>", "RCPT TO:<a@mx.test>", "RCPT TO:<b@mx.test>", "RCPT TO:<c@mx.test>", "DATA"}},
				bodies:  []string{"Subject: t\r\n\r\nhello\r\n.\r\n"},
				rcpts: []Reply{replyOf(250, "2.1.5", "ok"), replyOf(450, "4.2.1", "mailbox busy"),
					replyOf(550, "5.1.1", "no such user")},
				data:      replyOf(250, "2.0.0", "queued as X"),
				usable:    true,
				roundTrip: 2,
			},
		},
		{
			// RFC 2920 §3.1: every RCPT refused, DATA refused: no body.
			name: "pipelining with every recipient refused sends no body",
			ehlo: ehloPipe,
			steps: []step{
				{cmd: "MAIL", reply: "250 2.1.0 ok"},
				{cmd: "RCPT", reply: "550 5.1.1 no"},
				{cmd: "RCPT", reply: "450 4.7.1 later"},
				{cmd: "DATA", reply: "554 5.5.1 no valid recipients"},
			},
			tx: textTx("body\r\n", "a@mx.test", "b@mx.test"),
			want: want{
				flights:   [][]string{{"MAIL FROM:<sender@client.test>", "RCPT TO:<a@mx.test>", "RCPT TO:<b@mx.test>", "DATA"}},
				rcpts:     []Reply{replyOf(550, "5.1.1", "no"), replyOf(450, "4.7.1", "later")},
				data:      replyOf(554, "5.5.1", "no valid recipients"),
				errStage:  StageRcpt,
				errCode:   450, // the temporary refusal is reported
				usable:    true,
				roundTrip: 1,
			},
		},
		{
			// RFC 2920 §3.1: DATA accepted although no RCPT was: end it
			// with a lone dot, never the body.
			name: "pipelining with 354 after refused recipients sends a lone dot",
			ehlo: ehloPipe,
			steps: []step{
				{cmd: "MAIL", reply: "250 ok"},
				{cmd: "RCPT", reply: "550 5.1.1 no"},
				{cmd: "DATA", reply: "354 go ahead", data: true},
				{cmd: ".", reply: "554 5.5.1 no recipients"},
			},
			tx: textTx("secret body\r\n", "a@mx.test"),
			want: want{
				flights:   [][]string{{"MAIL FROM:<sender@client.test>", "RCPT TO:<a@mx.test>", "DATA"}},
				bodies:    []string{".\r\n"},
				rcpts:     []Reply{replyOf(550, "5.1.1", "no")},
				errStage:  StageRcpt,
				errCode:   550,
				usable:    true,
				roundTrip: 2,
			},
		},
		{
			// RFC 2920 §3.1: after a refused MAIL the pipelined RCPT and
			// DATA replies are still read, to stay in step.
			name: "pipelining with MAIL refused reads every reply",
			ehlo: ehloPipe,
			steps: []step{
				{cmd: "MAIL", reply: "552 5.3.4 too big"},
				{cmd: "RCPT", reply: "503 5.5.1 need MAIL"},
				{cmd: "DATA", reply: "503 5.5.1 need MAIL"},
				{cmd: "NOOP", reply: "250 2.0.0 ok"},
			},
			tx: textTx("body\r\n", "a@mx.test"),
			want: want{
				flights:   [][]string{{"MAIL FROM:<sender@client.test>", "RCPT TO:<a@mx.test>", "DATA"}},
				rcpts:     []Reply{replyOf(503, "5.5.1", "need MAIL")},
				data:      replyOf(503, "5.5.1", "need MAIL"),
				errStage:  StageMail,
				errCode:   552,
				usable:    true,
				roundTrip: 1,
			},
		},
		{
			// RFC 5321 §3.3 without PIPELINING: one command per flight.
			name: "no pipelining sends one command per flight",
			ehlo: ehloPlain,
			steps: []step{
				{cmd: "MAIL", reply: "250 2.1.0 ok"},
				{cmd: "RCPT TO:<a@mx.test>", reply: "250 2.1.5 ok"},
				{cmd: "RCPT TO:<b@mx.test>", reply: "550 5.1.1 no"},
				{cmd: "DATA", reply: "354 go", data: true},
				{cmd: ".", reply: "250 2.0.0 ok"},
			},
			tx: textTx("hi\r\n", "a@mx.test", "b@mx.test"),
			want: want{
				flights:   [][]string{{"MAIL FROM:<sender@client.test>"}, {"RCPT TO:<a@mx.test>"}, {"RCPT TO:<b@mx.test>"}, {"DATA"}},
				bodies:    []string{"hi\r\n.\r\n"},
				rcpts:     []Reply{replyOf(250, "2.1.5", "ok"), replyOf(550, "5.1.1", "no")},
				data:      replyOf(250, "2.0.0", "ok"),
				usable:    true,
				roundTrip: 5,
			},
		},
		{
			// RFC 5321 §3.3: no DATA when no recipient was accepted.
			name: "no pipelining and every recipient refused sends no DATA",
			ehlo: ehloPlain,
			steps: []step{
				{cmd: "MAIL", reply: "250 ok"},
				{cmd: "RCPT", reply: "550 5.1.1 no"},
				{cmd: "NOOP", reply: "250 ok"},
			},
			tx: textTx("hi\r\n", "a@mx.test"),
			want: want{
				flights:   [][]string{{"MAIL FROM:<sender@client.test>"}, {"RCPT TO:<a@mx.test>"}},
				rcpts:     []Reply{replyOf(550, "5.1.1", "no")},
				errStage:  StageRcpt,
				errCode:   550,
				usable:    true,
				roundTrip: 2,
			},
		},
		{
			// RFC 3030 §2 without PIPELINING: chunks of ChunkBytes, each
			// answered before the next.
			name: "chunking without pipelining sends lock-step BDAT chunks",
			ehlo: "250-mx.test\n250 CHUNKING",
			steps: []step{
				{cmd: "MAIL", reply: "250 ok"},
				{cmd: "RCPT", reply: "250 ok"},
				{cmd: "BDAT 8", reply: "250 ok"},
				{cmd: "BDAT 8", reply: "250 ok"},
				{cmd: "BDAT 7 LAST", reply: "250 done"},
			},
			tx: func() Transaction {
				tx := textTx("0123456\n89abcde\nxyz", "a@mx.test")
				tx.Size = 23
				return tx
			}(),
			want: want{
				flights: [][]string{{"MAIL FROM:<sender@client.test>"}, {"RCPT TO:<a@mx.test>"}, {"BDAT 8"}, {"BDAT 8"}, {"BDAT 7 LAST"}},
				bodies:  []string{"0123456\r", "\n89abcde", "\r\nxyz\r\n"},
				rcpts:   []Reply{{Code: 250, Lines: []string{"ok"}}},
				data:    Reply{Code: 250, Lines: []string{"done"}},
				usable:  true, roundTrip: 5,
			},
		},
		{
			// RFC 3030 §2: a refused chunk ends the transfer.
			name: "chunking stops after a refused chunk",
			ehlo: "250-mx.test\n250 CHUNKING",
			steps: []step{
				{cmd: "MAIL", reply: "250 ok"},
				{cmd: "RCPT", reply: "250 ok"},
				{cmd: "BDAT 8", reply: "552 too big"},
				{cmd: "RSET", reply: "250 ok"},
			},
			tx: func() Transaction {
				tx := textTx("0123456\n89abcde\nxyz", "a@mx.test")
				tx.Size = 23
				return tx
			}(),
			want: want{
				flights:  [][]string{{"MAIL FROM:<sender@client.test>"}, {"RCPT TO:<a@mx.test>"}, {"BDAT 8"}},
				bodies:   []string{"0123456\r"},
				rcpts:    []Reply{{Code: 250, Lines: []string{"ok"}}},
				data:     Reply{Code: 552, Lines: []string{"too big"}},
				errStage: StageBDAT, errCode: 552,
				usable: true, roundTrip: 3,
			},
		},
		{
			// RFC 5321 §3.8: 421 ends the session.
			name: "421 to a pipelined RCPT ends the session",
			ehlo: ehloPipe,
			steps: []step{
				{cmd: "MAIL", reply: "250 ok"},
				{cmd: "RCPT", reply: "421 4.3.2 shutting down", close: true},
			},
			tx: textTx("hi\r\n", "a@mx.test", "b@mx.test"),
			want: want{
				// The server hangs up after the 421: it reads no more.
				flights:  [][]string{{"MAIL FROM:<sender@client.test>", "RCPT TO:<a@mx.test>"}},
				rcpts:    []Reply{replyOf(421, "4.3.2", "shutting down"), {}},
				errStage: StageRcpt, errCode: 421,
				usable: false, roundTrip: 1,
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			steps := append([]step{{cmd: "EHLO client.test", reply: tt.ehlo}}, tt.steps...)
			s := startScripted(t, "220 mx.test ESMTP", steps...)
			c := dial(t, s.addr, Options{ChunkBytes: 8})
			if err := c.Hello(); err != nil {
				t.Fatal(err)
			}
			rt0 := c.RoundTrips()
			res, err := c.Send(tt.tx)
			checkErr(t, err, tt.want.errStage, tt.want.errCode)
			if res.Usable != tt.want.usable {
				t.Errorf("Usable = %v, want %v", res.Usable, tt.want.usable)
			}
			if got := c.RoundTrips() - rt0; got != tt.want.roundTrip {
				t.Errorf("round trips = %d, want %d", got, tt.want.roundTrip)
			}
			for i, w := range tt.want.rcpts {
				if !sameReply(res.RcptReplies[i], w) {
					t.Errorf("rcpt %d reply = %v, want %v", i, res.RcptReplies[i], w)
				}
			}
			if !sameReply(res.DataReply, tt.want.data) {
				t.Errorf("data reply = %v, want %v", res.DataReply, tt.want.data)
			}
			if res.Usable {
				// The steps after the transaction, if any (NOOP, RSET).
				last := steps[len(steps)-1].cmd
				switch last {
				case "NOOP":
					if err := c.Noop(); err != nil {
						t.Error(err)
					}
				case "RSET":
					if err := c.Reset(); err != nil {
						t.Error(err)
					}
				}
			}
			c.Close()
			s.wait()
			flights := s.flights()[1:] // EHLO
			if last := flights[len(flights)-1]; last[0] == "NOOP" || last[0] == "RSET" {
				flights = flights[:len(flights)-1]
			}
			if fmt.Sprint(flights) != fmt.Sprint(tt.want.flights) {
				t.Errorf("flights:\n got %q\nwant %q", flights, tt.want.flights)
			}
			var bodies []string
			for _, b := range s.messages() {
				bodies = append(bodies, string(b))
			}
			if fmt.Sprint(bodies) != fmt.Sprint(tt.want.bodies) {
				t.Errorf("bodies:\n got %q\nwant %q", bodies, tt.want.bodies)
			}
		})
	}
}

func checkErr(t *testing.T, err error, stage string, code int) {
	t.Helper()
	if stage == "" {
		if err != nil {
			t.Fatalf("err = %v, want nil", err)
		}
		return
	}
	var re *ReplyError
	if !errors.As(err, &re) {
		t.Fatalf("err = %v (%T), want *ReplyError at %s", err, err, stage)
	}
	if re.Stage != stage || re.Code != code {
		t.Errorf("err = %v, want stage %s code %d", err, stage, code)
	}
}

// TestSessionReuse checks RFC 5321 §4.1.1.5: no RSET after a completed
// transaction; after a failed one RSET goes in the next MAIL's flight
// (pipelining) or just before it (lock-step), and never a second EHLO.
func TestSessionReuse(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name        string
		ehlo        string
		wantFlights [][]string
	}{
		{"pipelining puts RSET in the MAIL flight", ehloPipe, [][]string{
			{"EHLO client.test"},
			{"MAIL FROM:<sender@client.test>", "RCPT TO:<a@mx.test>", "DATA"},
			{"MAIL FROM:<sender@client.test>", "RCPT TO:<bad@mx.test>", "DATA"},
			{"RSET", "MAIL FROM:<sender@client.test>", "RCPT TO:<a@mx.test>", "DATA"},
			{"QUIT"},
		}},
		{"lock-step sends RSET alone", ehloPlain, [][]string{
			{"EHLO client.test"},
			{"MAIL FROM:<sender@client.test>"}, {"RCPT TO:<a@mx.test>"}, {"DATA"},
			{"MAIL FROM:<sender@client.test>"}, {"RCPT TO:<bad@mx.test>"},
			{"RSET"}, {"MAIL FROM:<sender@client.test>"}, {"RCPT TO:<a@mx.test>"}, {"DATA"},
			{"QUIT"},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			pipe := tt.ehlo == ehloPipe
			steps := []step{
				{cmd: "EHLO", reply: tt.ehlo},
				// 1: success, no RSET before the next.
				{cmd: "MAIL", reply: "250 ok"},
				{cmd: "RCPT TO:<a@", reply: "250 ok"},
				{cmd: "DATA", reply: "354 go", data: true},
				{cmd: ".", reply: "250 ok"},
				// 2: failure at RCPT.
				{cmd: "MAIL", reply: "250 ok"},
				{cmd: "RCPT TO:<bad@", reply: "550 no"},
			}
			if pipe {
				steps = append(steps, step{cmd: "DATA", reply: "503 no recipients"})
			}
			steps = append(steps,
				// 3: RSET first.
				step{cmd: "RSET", reply: "250 ok"},
				step{cmd: "MAIL", reply: "250 ok"},
				step{cmd: "RCPT TO:<a@", reply: "250 ok"},
				step{cmd: "DATA", reply: "354 go", data: true},
				step{cmd: ".", reply: "250 ok"},
			)
			s := startScripted(t, "220 mx.test", steps...)
			c := dial(t, s.addr, Options{})
			for i, rcpt := range []string{"a@mx.test", "bad@mx.test", "a@mx.test"} {
				res, err := c.Send(textTx("m\r\n", rcpt))
				if (err != nil) != (i == 1) || !res.Usable {
					t.Fatalf("message %d: err = %v, usable %v", i, err, res.Usable)
				}
			}
			if err := c.Quit(); err != nil {
				t.Error(err)
			}
			s.wait()
			if got := s.flights(); fmt.Sprint(got) != fmt.Sprint(tt.wantFlights) {
				t.Errorf("flights:\n got %q\nwant %q", got, tt.wantFlights)
			}
		})
	}
}

// TestDotStuffingOnTheWire checks the raw DATA bytes: RFC 5321 §4.5.2
// transparency and CRLF-only line ends, so that no smuggled end of data
// can reach the server.
func TestDotStuffingOnTheWire(t *testing.T) {
	t.Parallel()
	tests := []struct{ name, body, wire string }{
		{"dot at start", ".\r\nx\r\n", "..\r\nx\r\n.\r\n"},
		{"bare CR dot CRLF", "a\r.\r\nb\r\n", "a\r\n..\r\nb\r\n.\r\n"},
		{"bare LF dot bare LF", "a\n.\nb", "a\r\n..\r\nb\r\n.\r\n"},
		{"LF dot CRLF", "a\n.\r\nb\r\n", "a\r\n..\r\nb\r\n.\r\n"},
		{"dot line with text", "a\r\n.hidden\r\n", "a\r\n..hidden\r\n.\r\n"},
		{"no final newline", "a", "a\r\n.\r\n"},
		{"empty body", "", ".\r\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			s := startScripted(t, "220 mx.test",
				step{cmd: "EHLO", reply: ehloPipe},
				step{cmd: "MAIL", reply: "250 ok"},
				step{cmd: "RCPT", reply: "250 ok"},
				step{cmd: "DATA", reply: "354 go", data: true},
				step{cmd: ".", reply: "250 ok"},
			)
			c := dial(t, s.addr, Options{})
			if _, err := c.Send(textTx(tt.body, "a@mx.test")); err != nil {
				t.Fatal(err)
			}
			c.Quit()
			s.wait()
			msgs := s.messages()
			if len(msgs) != 1 || string(msgs[0]) != tt.wire {
				t.Errorf("wire = %q, want one message %q", msgs, tt.wire)
			}
		})
	}
}

// TestHostilePeers checks that every wait is bounded and memory stays
// bounded whatever the server does.
func TestHostilePeers(t *testing.T) {
	t.Run("64 MiB line without newline", func(t *testing.T) {
		// No t.Parallel: the allocation count must be this test's own.
		s := startScripted(t, "", step{raw: "220-mx.test\r\n220-", flood: 64 << 20})
		var before, after runtimeMem
		before.read()
		start := time.Now()
		conn, err := net.Dial("tcp", s.addr)
		if err != nil {
			t.Fatal(err)
		}
		// The greeting itself is the flood ("220-mx.test" then no end).
		_, err = New(conn, Options{CommandTimeout: 10 * time.Second})
		after.read()
		var pe *ProtocolError
		if !errors.As(err, &pe) {
			t.Fatalf("err = %v, want a protocol error", err)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("took %v", d)
		}
		if grew := after.total - before.total; grew > 4<<20 {
			t.Errorf("allocated %d bytes reading a flood", grew)
		}
	})
	t.Run("flooded EHLO reply", func(t *testing.T) {
		t.Parallel()
		s := startScripted(t, "220 mx.test", step{cmd: "EHLO", raw: "250-mx.test\r\n250-", flood: 64 << 20})
		c := dial(t, s.addr, Options{})
		err := c.Hello()
		var pe *ProtocolError
		if !errors.As(err, &pe) || c.Usable() {
			t.Fatalf("err = %v, usable %v; want protocol error", err, c.Usable())
		}
	})
	t.Run("too many reply lines", func(t *testing.T) {
		t.Parallel()
		s := startScripted(t, "220 mx.test", step{cmd: "EHLO", reply: "250-a\n250-b\n250-c\n250 d"})
		c := dial(t, s.addr, Options{MaxReplyLines: 3})
		var pe *ProtocolError
		if err := c.Hello(); !errors.As(err, &pe) {
			t.Fatalf("err = %v, want protocol error", err)
		}
	})
	t.Run("data after STARTTLS reply", func(t *testing.T) {
		t.Parallel()
		s := startScripted(t, "220 mx.test",
			step{cmd: "EHLO", reply: "250-mx.test\n250 STARTTLS"},
			step{cmd: "STARTTLS", reply: "220 go ahead\n250 injected"})
		c := dial(t, s.addr, Options{})
		if err := c.Hello(); err != nil {
			t.Fatal(err)
		}
		var pe *ProtocolError
		if _, err := c.StartTLS(&tls.Config{ServerName: "mx.test"}); !errors.As(err, &pe) {
			t.Fatalf("err = %v, want protocol error", err)
		}
	})
	t.Run("greeting refused", func(t *testing.T) {
		t.Parallel()
		s := startScripted(t, "554 5.7.1 go away")
		_, err := dialErr(s.addr, Options{})
		var re *ReplyError
		if !errors.As(err, &re) || re.Stage != StageConnect || re.Code != 554 || !Permanent(err) {
			t.Fatalf("err = %v, want 554 at connect", err)
		}
	})
	t.Run("EHLO refused falls back to HELO", func(t *testing.T) {
		t.Parallel()
		s := startScripted(t, "220 mx.test",
			step{cmd: "EHLO", reply: "502 what"},
			step{cmd: "HELO client.test", reply: "250 mx.test"},
			step{cmd: "MAIL", reply: "250 ok"},
			step{cmd: "RCPT", reply: "250 ok"},
			step{cmd: "DATA", reply: "354 go", data: true},
			step{cmd: ".", reply: "250 ok"})
		c := dial(t, s.addr, Options{})
		if _, err := c.Send(textTx("x\r\n", "a@mx.test")); err != nil {
			t.Fatal(err)
		}
		if _, ok := c.Ext("PIPELINING"); ok {
			t.Error("extensions after HELO")
		}
	})
	timeouts := []struct {
		name  string
		ehlo  string
		steps []step
		size  int64
	}{
		// RFC 5321 §4.5.3.2.5: a peer that stops reading the body.
		{"peer stops reading after 354", ehloPipe, []step{
			{cmd: "MAIL", reply: "250 ok"}, {cmd: "RCPT", reply: "250 ok"},
			{cmd: "DATA", reply: "354 go", stall: true}}, 0},
		{"peer stops reading a pipelined BDAT", "250-mx.test\n250-PIPELINING\n250 CHUNKING", []step{
			{cmd: "MAIL", reply: "250 ok", stall: true}}, 64 << 20},
		// RFC 5321 §4.5.3.2.6: no reply to the final dot.
		{"peer never answers the final dot", ehloPipe, []step{
			{cmd: "MAIL", reply: "250 ok"}, {cmd: "RCPT", reply: "250 ok"},
			{cmd: "DATA", reply: "354 go", data: true}, {cmd: ".", hang: true}}, 0},
	}
	for _, tt := range timeouts {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			s := startScripted(t, "220 mx.test", append([]step{{cmd: "EHLO", reply: tt.ehlo}}, tt.steps...)...)
			c := dial(t, s.addr, Options{DataTimeout: 300 * time.Millisecond, FinalTimeout: 300 * time.Millisecond})
			if err := c.Hello(); err != nil {
				t.Fatal(err)
			}
			body := io.Reader(&lineSource{n: 64 << 20})
			if strings.Contains(tt.name, "final dot") {
				body = strings.NewReader("short\r\n")
			}
			start := time.Now()
			res, err := c.Send(Transaction{From: "a@client.test", Rcpts: []Rcpt{{Addr: "b@mx.test"}}, Body: body, Size: tt.size})
			var e *Error
			if !errors.As(err, &e) || !e.Timeout() || res.Usable {
				t.Fatalf("err = %v, usable %v; want a timeout", err, res.Usable)
			}
			if d := time.Since(start); d > 3*time.Second {
				t.Errorf("took %v, want about 300ms", d)
			}
		})
	}
}

// lineSource is an n-byte body of 78-byte CRLF lines, generated on the
// fly.
type lineSource struct {
	n, off int64
}

func (l *lineSource) Read(p []byte) (int, error) {
	if l.off >= l.n {
		return 0, io.EOF
	}
	const line = "0123456789abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ0123\r\n"
	k := 0
	for k < len(p) && l.off < l.n {
		c := copy(p[k:min(len(p), k+int(l.n-l.off))], line[l.off%int64(len(line)):])
		k += c
		l.off += int64(c)
	}
	return k, nil
}

type runtimeMem struct{ total uint64 }

func (m *runtimeMem) read() {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	m.total = ms.TotalAlloc
}
