package main

// The WAN sinks: a small STARTTLS SMTP server of our own (go-smtp's server
// always advertises CHUNKING), so that CHUNKING can be switched off. It
// behaves like a pipelining server should (RFC 2920): replies are buffered
// and flushed when no more input is waiting, so a pipelined group gets its
// replies in one flight.

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync/atomic"
	"time"
)

type wanSink struct {
	name     string // host name in the greeting
	chunking bool
	tls      *tls.Config
	count    *atomic.Int64
}

func (s *wanSink) serve(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go s.session(c)
	}
}

const maxLine = 4096

func (s *wanSink) session(c net.Conn) {
	defer func() { c.Close() }()
	r := bufio.NewReaderSize(c, 64<<10)
	w := bufio.NewWriterSize(c, 16<<10)
	isTLS := false
	var mail bool
	var rcpts int
	reply := func(format string, a ...any) {
		fmt.Fprintf(w, format+"\r\n", a...)
	}
	flush := func(always bool) error {
		if always || r.Buffered() == 0 {
			return w.Flush()
		}
		return nil
	}
	reply("220 %s ESMTP benchworld", s.name)
	if w.Flush() != nil {
		return
	}
	for {
		c.SetDeadline(time.Now().Add(5 * time.Minute))
		line, err := readLine(r)
		if err != nil {
			if errors.Is(err, errLong) {
				reply("500 5.5.2 line too long")
				if flush(true) == nil {
					continue
				}
			}
			return
		}
		verb, arg, _ := strings.Cut(line, " ")
		switch strings.ToUpper(verb) {
		case "EHLO":
			mail, rcpts = false, 0
			caps := []string{s.name, "PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SIZE 67108864"}
			if s.chunking {
				caps = append(caps, "CHUNKING")
			}
			if !isTLS && s.tls != nil {
				caps = append(caps, "STARTTLS")
			}
			for i, cp := range caps {
				sep := "-"
				if i == len(caps)-1 {
					sep = " "
				}
				reply("250%s%s", sep, cp)
			}
		case "HELO":
			mail, rcpts = false, 0
			reply("250 %s", s.name)
		case "STARTTLS":
			if isTLS || s.tls == nil {
				reply("503 5.5.1 TLS already active")
				break
			}
			if r.Buffered() > 0 { // RFC 3207 §5: nothing may follow in plaintext
				reply("554 5.5.1 pipelined STARTTLS")
				w.Flush()
				return
			}
			reply("220 2.0.0 ready to start TLS")
			if w.Flush() != nil {
				return
			}
			tc := tls.Server(c, s.tls)
			tc.SetDeadline(time.Now().Add(time.Minute))
			if tc.Handshake() != nil {
				return
			}
			c = tc
			r.Reset(c)
			w.Reset(c)
			isTLS = true
			mail, rcpts = false, 0
			continue
		case "MAIL":
			if mail {
				reply("503 5.5.1 nested MAIL")
				break
			}
			mail, rcpts = true, 0
			reply("250 2.1.0 OK")
		case "RCPT":
			if !mail {
				reply("503 5.5.1 MAIL first")
				break
			}
			rcpts++
			reply("250 2.1.5 OK")
		case "DATA":
			if rcpts == 0 {
				reply("503 5.5.1 RCPT first")
				break
			}
			reply("354 end with <CRLF>.<CRLF>")
			if w.Flush() != nil {
				return
			}
			if err := readData(r); err != nil {
				return
			}
			mail, rcpts = false, 0
			s.count.Add(1)
			reply("250 2.0.0 OK queued")
		case "BDAT":
			if !s.chunking {
				reply("502 5.5.1 BDAT not supported")
				break
			}
			f := strings.Fields(arg)
			if len(f) < 1 || len(f) > 2 || (len(f) == 2 && !strings.EqualFold(f[1], "LAST")) {
				reply("501 5.5.4 BDAT size [LAST]")
				break
			}
			n, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil || n < 0 {
				reply("501 5.5.4 bad size")
				break
			}
			if _, err := io.CopyN(io.Discard, r, n); err != nil {
				return
			}
			switch {
			case rcpts == 0:
				reply("503 5.5.1 RCPT first")
			case len(f) == 2:
				mail, rcpts = false, 0
				s.count.Add(1)
				reply("250 2.0.0 OK queued")
			default:
				reply("250 2.0.0 %d octets received", n)
			}
		case "RSET":
			mail, rcpts = false, 0
			reply("250 2.0.0 OK")
		case "NOOP":
			reply("250 2.0.0 OK")
		case "QUIT":
			reply("221 2.0.0 bye")
			w.Flush()
			return
		default:
			reply("502 5.5.2 command not recognized")
		}
		if flush(false) != nil {
			return
		}
	}
}

var errLong = errors.New("line too long")

// readLine reads one CRLF (or LF) terminated command line.
func readLine(r *bufio.Reader) (string, error) {
	var long bool
	var b []byte
	for {
		part, err := r.ReadSlice('\n')
		if err == nil {
			if !long && len(b)+len(part) <= maxLine {
				b = append(b, part...)
			} else {
				long = true
			}
			break
		}
		if err != bufio.ErrBufferFull {
			return "", err
		}
		long = true
	}
	if long {
		return "", errLong
	}
	return strings.TrimRight(string(b), "\r\n"), nil
}

// readData discards a DATA body up to the line ".".
func readData(r *bufio.Reader) error {
	bol := true // at the beginning of a line
	for {
		part, err := r.ReadSlice('\n')
		if err != nil && err != bufio.ErrBufferFull {
			return err
		}
		if bol && (string(part) == ".\r\n" || string(part) == ".\n") {
			return nil
		}
		bol = err == nil
	}
}
