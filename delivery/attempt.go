package delivery

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/textproto"
	"strings"
	"time"

	"github.com/emersion/go-smtp"
	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/internal/message"
	"github.com/stsrelay/stsrelay/mtasts"
	"github.com/stsrelay/stsrelay/queue"
)

// outcome is what happened to one recipient in one attempt.
type outcome struct {
	result   string // delivered, deferred, bounced
	code     int
	enhanced string
	reason   string
}

// attempt carries what one delivery attempt learnt, for the log lines.
type attempt struct {
	mx, ip       string
	tls          string
	tlsVerified  bool
	stsMode      string
	stsID        string
	tlsrptResult string
	// counted is false for sessions TLS-RPT does not count (report mail,
	// TLS-Required: No): their lines carry no tlsrpt_result.
	counted bool
}

// deliver makes one attempt for job j, on sess when it is still fit to
// carry the message, and returns the session if it can carry more.
func (e *Engine) deliver(ctx context.Context, j *job, sess *session) *session {
	ms := j.ms
	m := ms.m
	a := &attempt{}
	outs := make([]outcome, len(j.idx))
	setAll := func(o outcome) {
		for i := range outs {
			outs[i] = o
		}
	}
	tlsRequiredNo := e.tlsRequiredNo(ms)
	report := m.Env.Kind != queue.KindTLSRPT && !tlsRequiredNo
	a.counted = report

	// RFC 8461 §4, §5: the policy in force for the recipient domain.
	var pol PolicyResult
	if e.o.Policies != nil && !tlsRequiredNo {
		var err error
		// RFC 8461 §5.1: before a final failure, look for a new policy
		// (a new TXT id) rather than trust the cached one.
		fresh := e.sched.Expired(m.Received, e.now())
		pol, err = e.o.Policies.Lookup(ctx, j.domain, fresh)
		if err != nil {
			if sess != nil {
				sess.close()
			}
			if ctx.Err() != nil {
				// Shutdown, not a failure of the domain's.
				e.abandon(j)
				return nil
			}
			setAll(outcome{result: "deferred", code: 451, enhanced: "4.4.3", reason: "MTA-STS policy lookup failed: " + err.Error()})
			e.finish(j, outs, a)
			return nil
		}
		if pol.Policy != nil {
			a.stsMode = string(pol.Policy.Mode)
			a.stsID = pol.ID
		}
		if pol.FailureType != "" && report {
			e.recordTLS(j.domain, pol, TLSResult{ResultType: pol.FailureType, Reason: pol.FailureReason})
		}
	}
	mode := mtasts.Mode("")
	if pol.Policy != nil {
		mode = pol.Policy.Mode
	}

	// A parked session is used only if the policy now in force allows
	// it: its MX must still match and its TLS state satisfy the mode.
	if sess != nil {
		if !e.sessionFits(sess, pol, m) {
			sess.close()
			sess = nil
		} else if err := sess.reset(); err != nil {
			sess.close()
			sess = nil
		}
	}
	var lastErr *sessionError
	if sess == nil {
		// A destination none of whose hosts answered a moment ago is
		// not tried again for every message (like Postfix's dead
		// destination): its messages wait for the next retry.
		if reason, ok := e.suspended(j.domain); ok {
			setAll(outcome{result: "deferred", code: 451, enhanced: "4.4.1", reason: "delivery to " + j.domain + " temporarily suspended: " + reason})
			e.finish(j, outs, a)
			return nil
		}
		hosts, err := route(ctx, e.o.Resolver, j.domain, e.cfg.Hostname, e.wantV6)
		if err != nil && ctx.Err() != nil {
			e.abandon(j)
			return nil
		}
		var re *routeError
		if errors.As(err, &re) {
			res := "deferred"
			code := 451
			if re.Permanent {
				res, code = "bounced", 550
				if re.Enhanced == "5.1.10" {
					code = 556 // RFC 7505 §4.1
				}
			}
			setAll(outcome{result: res, code: code, enhanced: re.Enhanced, reason: re.Msg})
			e.finish(j, outs, a)
			return nil
		}
		sess, lastErr = e.connect(ctx, j.domain, hosts, pol, m, report, tlsRequiredNo, a)
		if sess == nil && ctx.Err() != nil {
			e.abandon(j)
			return nil
		}
		if sess == nil && lastErr != nil && lastErr.ResultType == "" && (lastErr.Stage == "connect" || lastErr.Stage == "greeting") {
			e.suspend(j.domain, lastErr.Error())
		}
		if sess == nil {
			o := outcome{result: "deferred", code: 451, enhanced: "4.4.1", reason: "no MX host could be used"}
			if lastErr != nil {
				o.code, o.reason = lastErr.Code, lastErr.Error()
				if o.code == 0 {
					o.code = 451
				}
				if lastErr.Enhanced != "" {
					o.enhanced = lastErr.Enhanced
				}
				if lastErr.Permanent && lastErr.Stage == "requiretls" {
					o.result = "bounced"
				}
				if o.code >= 500 && o.result != "bounced" {
					// A 5xx from a host we moved past says nothing
					// final about the others: retry later.
					o.code = 451
				}
			}
			if o.result == "deferred" && o.enhanced[0] == '5' {
				o.enhanced = "4" + o.enhanced[1:]
			}
			setAll(o)
			e.finish(j, outs, a)
			return nil
		}
	}
	a.mx, a.ip = sess.host, sess.ip
	a.tls = tlsVersionName(sess.version)
	a.tlsVerified = sess.tls && sess.cert.Verified
	// tlsrpt_result describes the session that carries the message, not
	// the hosts passed over on the way to it (connect records those).
	a.tlsrptResult = ""
	switch {
	case sess.tls && !sess.cert.Verified:
		a.tlsrptResult = sess.cert.ResultType
	case !sess.tls && mode != "" && mode != mtasts.ModeNone:
		a.tlsrptResult = ResultSTARTTLSNotSupported
	case mode == mtasts.ModeTesting && !pol.Policy.Matches(sess.host):
		// RFC 8461 §5 testing: delivered to an MX the policy does not
		// list; that mismatch is the failure TLS-RPT records.
		a.tlsrptResult = ResultValidationFailure
	}

	// Extensions the message needs, decided by its content at submission
	// (RFC 6531 §3.2, RFC 6152 §3), not by what the client asked for.
	needUTF8, eightBit := e.content(ms)
	offersUTF8, _ := sess.c.Extension("SMTPUTF8")
	offers8Bit, _ := sess.c.Extension("8BITMIME")
	if needUTF8 && !offersUTF8 {
		// RFC 6531 §3.4: no downgrade; the message cannot go this way.
		setAll(outcome{result: "bounced", code: 553, enhanced: "5.6.7", reason: "message needs SMTPUTF8 (a non-ASCII address or header field) and " + sess.host + " does not support it"})
		e.finish(j, outs, a)
		return sess
	}
	if max, ok := sess.c.MaxMessageSize(); ok && max > 0 && m.Size > int64(max) {
		setAll(outcome{result: "bounced", code: 552, enhanced: "5.3.4", reason: fmt.Sprintf("message size %d exceeds %s's limit of %d", m.Size, sess.host, max)})
		e.finish(j, outs, a)
		return sess
	}
	mopts := &smtp.MailOptions{Size: m.Size, UTF8: needUTF8, EnvelopeID: m.Env.EnvID}
	body, size, err := e.openBody(m, eightBit && !offers8Bit, needUTF8)
	switch {
	case errors.Is(err, message.ErrUnconvertible):
		// RFC 6152 §3: a relay that cannot convert returns the message.
		setAll(outcome{result: "bounced", code: 554, enhanced: "5.6.3", reason: sess.host + " does not support 8BITMIME and the message has " + strings.TrimPrefix(err.Error(), message.ErrUnconvertible.Error()+": ")})
		e.finish(j, outs, a)
		return sess
	case err != nil:
		setAll(outcome{result: "deferred", code: 451, enhanced: "4.3.0", reason: "reading queued body: " + err.Error()})
		e.finish(j, outs, a)
		return sess
	}
	defer body.Close()
	mopts.Size = size
	if eightBit && offers8Bit {
		mopts.Body = smtp.Body8BitMIME
	}
	switch m.Env.Ret {
	case "FULL":
		mopts.Return = smtp.DSNReturnFull
	case "HDRS":
		mopts.Return = smtp.DSNReturnHeaders
	}
	if m.Env.RequireTLS {
		mopts.RequireTLS = true
	}
	rcpts := make([]string, len(j.idx))
	ropts := make([]*smtp.RcptOptions, len(j.idx))
	for k, i := range j.idx {
		r := &m.Rcpts[i]
		rcpts[k] = r.Addr
		if len(r.Notify) > 0 || r.ORcpt != "" {
			ro := &smtp.RcptOptions{}
			for _, n := range r.Notify {
				ro.Notify = append(ro.Notify, smtp.DSNNotify(n))
			}
			if r.ORcpt != "" {
				ro.OriginalRecipientType = smtp.DSNAddressTypeRFC822
				orcpt := r.ORcpt
				if t, addr, ok := strings.Cut(orcpt, ";"); ok && strings.EqualFold(t, "rfc822") {
					orcpt = addr
				}
				ro.OriginalRecipient = orcpt
			}
			ropts[k] = ro
		}
	}
	results, serr := sess.send(m.Env.From, rcpts, mopts, ropts, body)
	for k, r := range results {
		switch {
		case r.Delivered:
			outs[k] = outcome{result: "delivered", code: r.Code, enhanced: "2.0.0", reason: r.Msg}
		case r.Permanent:
			outs[k] = outcome{result: "bounced", code: r.Code, enhanced: r.Enhanced, reason: r.Msg}
		default:
			code := r.Code
			if code == 0 {
				code = 451
			}
			outs[k] = outcome{result: "deferred", code: code, enhanced: r.Enhanced, reason: r.Msg}
		}
	}
	e.finish(j, outs, a)
	if serr != nil && (serr.Code == 0 || serr.Code == 421) || sess.messages >= e.cfg.Delivery.ConnectionReuseLimit {
		sess.close()
		return nil
	}
	return sess
}

// sessionFits reports whether a parked session may carry m under the
// policy now in force (RFC 8461 §5: reuse must not bypass the policy).
func (e *Engine) sessionFits(s *session, pol PolicyResult, m *queue.Message) bool {
	if s.messages >= e.cfg.Delivery.ConnectionReuseLimit {
		return false
	}
	if s.policyID != pol.ID {
		// The policy changed since the session was set up: set up anew
		// so the MX choice follows the new policy.
		return false
	}
	if m.Env.RequireTLS {
		// RFC 8689 §4.2.1, as connect applies it to a new session: an MX
		// validated by MTA-STS, verified TLS, and REQUIRETLS offered. A
		// session set up for an ordinary message need not have any.
		if pol.Policy == nil || !pol.Policy.Matches(s.host) {
			return false
		}
		if ok, _ := e.tlsAcceptable(s, pol.Policy.Mode, true); !ok {
			return false
		}
	}
	if pol.Policy == nil || pol.Policy.Mode != mtasts.ModeEnforce {
		return true
	}
	return pol.Policy.Matches(s.host) && s.tls && s.cert.Verified
}

// connect walks the hosts in preference order and returns the first
// session that the policy allows (RFC 8461 §5.1 guidance, §8.4: an
// invalid candidate is treated as unreachable and the next one tried).
func (e *Engine) connect(ctx context.Context, domain string, hosts []Host, pol PolicyResult, m *queue.Message, report, tlsRequiredNo bool, a *attempt) (*session, *sessionError) {
	mode := mtasts.Mode("")
	if pol.Policy != nil {
		mode = pol.Policy.Mode
	}
	enforce := mode == mtasts.ModeEnforce
	testing := mode == mtasts.ModeTesting
	requireTLS := m.Env.RequireTLS
	var lastErr *sessionError
	for _, h := range hosts {
		if len(h.IPs) == 0 {
			continue
		}
		// RFC 8461 §4.1: the MX name from DNS must match a pattern.
		mismatch := (enforce || testing || requireTLS) && (pol.Policy == nil || !pol.Policy.Matches(h.Name))
		if mismatch {
			if enforce && report {
				// Never contacted: a failure without a session. In
				// testing mode the session below is counted instead.
				e.recordTLS(domain, pol, TLSResult{MX: h.Name, ResultType: ResultValidationFailure, Reason: "mtasts-policy-mx-mismatch"})
			}
			if enforce || requireTLS {
				a.mx = h.Name
				a.tlsrptResult = ResultValidationFailure
				code, enh := 451, "4.7.5"
				msg := "MX host " + h.Name + " is not allowed by the MTA-STS policy of " + domain
				stage := "policy"
				if requireTLS && !enforce {
					stage, code, enh = "requiretls", 550, "5.7.30"
					msg = "REQUIRETLS: MX host " + h.Name + " is not validated by MTA-STS"
				}
				lastErr = &sessionError{Stage: stage, Code: code, Enhanced: enh, Msg: msg, Permanent: stage == "requiretls"}
				continue
			}
		}
		for _, ip := range h.IPs {
			a.mx, a.ip = h.Name, ip.String()
			s, err := e.dialHost(ctx, h.Name, ip, false)
			if err != nil {
				se := asSessionError(err)
				if se.ResultType != "" {
					// The TLS handshake (or STARTTLS) failed.
					if report {
						e.recordTLS(domain, pol, TLSResult{MX: h.Name, IP: ip.String(), ResultType: se.ResultType, Reason: se.Msg})
					}
					a.tlsrptResult = se.ResultType
					if enforce || requireTLS {
						se.Code, se.Enhanced = 451, "4.7.5"
						lastErr = se
						continue
					}
					// Opportunistic: as a sender without a policy would,
					// fall back to plaintext on a new connection.
					s, err = e.dialHost(ctx, h.Name, ip, true)
					if err != nil {
						lastErr = asSessionError(err)
						continue
					}
				} else {
					lastErr = se
					continue
				}
			}
			s.policyID = pol.ID
			if ok, why := e.tlsAcceptable(s, mode, requireTLS); !ok {
				rt := ResultSTARTTLSNotSupported
				if s.tls {
					rt = s.cert.ResultType
				}
				if report {
					e.recordTLS(domain, pol, TLSResult{MX: h.Name, IP: ip.String(), Helo: s.helo, ResultType: rt, Reason: why})
				}
				a.tlsrptResult = rt
				s.close()
				code, enh := 451, "4.7.5"
				if requireTLS && !enforce {
					code, enh = 550, "5.7.10"
				}
				lastErr = &sessionError{Stage: "tls", Code: code, Enhanced: enh, Msg: why, Permanent: code == 550, ResultType: rt}
				if requireTLS && !enforce {
					lastErr.Stage = "requiretls"
				}
				continue
			}
			if report {
				switch {
				case mismatch && testing:
					// RFC 8461 §5 testing: delivered to an MX the policy
					// does not list; the session counts as that failure.
					e.recordTLS(domain, pol, TLSResult{MX: h.Name, IP: ip.String(), Helo: s.helo, ResultType: ResultValidationFailure, Reason: "mtasts-policy-mx-mismatch"})
				case !s.tls:
					e.recordTLS(domain, pol, TLSResult{MX: h.Name, IP: ip.String(), Helo: s.helo, ResultType: ResultSTARTTLSNotSupported, Reason: "STARTTLS not offered"})
				case !s.cert.Verified && (testing || enforce):
					e.recordTLS(domain, pol, TLSResult{MX: h.Name, IP: ip.String(), Helo: s.helo, ResultType: s.cert.ResultType, Reason: s.cert.Reason})
				default:
					e.recordTLS(domain, pol, TLSResult{MX: h.Name, IP: ip.String(), Helo: s.helo, Success: true})
				}
			}
			return s, nil
		}
	}
	return nil, lastErr
}

// tlsAcceptable applies RFC 8461 §5 (enforce: STARTTLS and a verified
// certificate, no plaintext fallback) and RFC 8689 §4.2.1 (REQUIRETLS)
// to a fresh session.
func (e *Engine) tlsAcceptable(s *session, mode mtasts.Mode, requireTLS bool) (bool, string) {
	if mode != mtasts.ModeEnforce && !requireTLS {
		return true, ""
	}
	if !s.tls {
		return false, "STARTTLS not offered by " + s.host + ", required by policy"
	}
	if !s.cert.Verified {
		return false, "certificate of " + s.host + " not valid: " + s.cert.Reason
	}
	if requireTLS {
		if ok, _ := s.c.Extension("REQUIRETLS"); !ok {
			return false, s.host + " does not offer REQUIRETLS"
		}
	}
	return true, ""
}

func (e *Engine) dialHost(ctx context.Context, host string, ip net.IP, plaintext bool) (*session, error) {
	o := dialOptions{
		Hostname:       e.cfg.Hostname,
		Port:           e.cfg.Delivery.Port,
		ConnectTimeout: e.cfg.Delivery.ConnectTimeout.Duration,
		CommandTimeout: e.cfg.Delivery.CommandTimeout.Duration,
		Roots:          e.o.Roots,
		Now:            e.now,
		Plaintext:      plaintext,
	}
	for _, l := range e.localIPs {
		if (l.To4() != nil) == (ip.To4() != nil) {
			o.LocalAddr = l
			break
		}
	}
	return dial(ctx, host, ip.String(), o)
}

func asSessionError(err error) *sessionError {
	var se *sessionError
	if errors.As(err, &se) {
		return se
	}
	return &sessionError{Stage: "connect", Msg: err.Error()}
}

// recordTLS counts a session for TLS-RPT against the policy in force.
func (e *Engine) recordTLS(domain string, pol PolicyResult, r TLSResult) {
	r.Time = e.now()
	r.Domain = domain
	if r.SendingIP == "" && r.IP != "" {
		r.SendingIP = e.sourceIP(net.ParseIP(r.IP))
	}
	if pol.Policy != nil && pol.Policy.Mode != mtasts.ModeNone {
		r.PolicyType = "sts"
		r.PolicyLines = pol.Policy.Lines
		r.MXPatterns = pol.Policy.MX
	} else {
		r.PolicyType = "no-policy-found"
	}
	if e.o.Counters != nil {
		rt := r.ResultType
		if r.Success {
			rt = "success"
		}
		e.o.Counters.TLSSession(rt)
	}
	if e.o.TLSRPT != nil {
		e.o.TLSRPT.RecordTLS(r)
	}
}

// content says what the message needs of the next hop: SMTPUTF8, and
// 8BITMIME (or a conversion). The queue decides both at submission; a
// message queued by an older version is scanned here, once.
func (e *Engine) content(ms *msgState) (needUTF8, eightBit bool) {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	env := &ms.m.Env
	if !env.Scanned {
		sc := message.NewScanner()
		if body, err := e.store.Body(ms.m.ID); err == nil {
			_, _ = io.Copy(sc, body)
		}
		env.SetContent(sc.Content())
	}
	return env.NeedsSMTPUTF8, env.EightBit
}

// openBody returns the queued body and its size; with to7Bit, a copy
// converted to 7-bit MIME in the spool (RFC 6152 §3), for a next hop that
// did not offer 8BITMIME.
func (e *Engine) openBody(m *queue.Message, to7Bit, utf8Headers bool) (io.ReadCloser, int64, error) {
	if !to7Bit {
		b, err := e.store.Body(m.ID)
		if err != nil {
			return nil, 0, err
		}
		return io.NopCloser(b), m.Size, nil
	}
	f, err := e.store.TempFile()
	if err != nil {
		return nil, 0, err
	}
	err = message.To7Bit(f, func() (io.Reader, error) {
		return e.store.Body(m.ID)
	}, message.ConvertOptions{UTF8Headers: utf8Headers})
	var size int64
	if err == nil {
		size, err = f.Seek(0, io.SeekCurrent)
	}
	if err == nil {
		_, err = f.Seek(0, io.SeekStart)
	}
	if err != nil {
		f.Close()
		return nil, 0, err
	}
	return f, size, nil
}

// tlsRequiredNo reads the message header once for "TLS-Required: No"
// (RFC 8689 §3): the sender asks that MTA-STS and DANE be ignored for
// this message. TLS-RPT reports carry it so that they reach a domain
// whose TLS is broken.
func (e *Engine) tlsRequiredNo(ms *msgState) bool {
	ms.mu.Lock()
	defer ms.mu.Unlock()
	if ms.hdrRead {
		return ms.tlsRequiredNo
	}
	ms.hdrRead = true
	body, err := e.store.Body(ms.m.ID)
	if err != nil {
		return false
	}
	hdr, err := textproto.NewReader(bufio.NewReader(io.LimitReader(body, 256<<10))).ReadMIMEHeader()
	if err != nil && len(hdr) == 0 {
		return false
	}
	ms.tlsRequiredNo = strings.EqualFold(strings.TrimSpace(hdr.Get("TLS-Required")), "No")
	return ms.tlsRequiredNo
}

// finish records the outcomes of a job, logs one line per recipient, and
// when it was the message's last job of this round, writes the new state
// and sends the DSNs due.
func (e *Engine) finish(j *job, outs []outcome, a *attempt) {
	ms := j.ms
	now := e.now()
	if !a.counted {
		a.tlsrptResult = ""
	}
	ms.mu.Lock()
	m := ms.m
	ms.attempted = true
	for k, i := range j.idx {
		r := &m.Rcpts[i]
		o := outs[k]
		r.Attempts++
		r.LastAttempt = now
		r.LastCode, r.LastEnhanced, r.LastError, r.LastMX = o.code, o.enhanced, o.reason, a.mx
		switch o.result {
		case "delivered":
			r.Status = queue.Delivered
		case "bounced":
			r.Status = queue.Bounced
			ms.bounced = append(ms.bounced, i)
		default:
			next, expired := e.sched.Next(m.Received, r.Attempts, now)
			if expired {
				// RFC 5321 §4.5.4.1: give up after the configured
				// lifetime. An MTA-STS failure becomes 5.7.x here and
				// only here (RFC 8461 §5: enforce failures are
				// temporary until then).
				o.result = "bounced"
				r.Status = queue.Bounced
				if o.enhanced == "" {
					o.enhanced = "4.4.7"
				}
				r.LastEnhanced = "5" + o.enhanced[1:]
				r.LastError = "delivery time expired; last error: " + o.reason
				o.enhanced, o.reason = r.LastEnhanced, r.LastError
				ms.bounced = append(ms.bounced, i)
			} else {
				r.Status = queue.Deferred
				r.NextAttempt = next
			}
		}
		e.logDelivery(m, r, o, a)
		if e.o.Counters != nil {
			e.o.Counters.Delivery(o.result)
		}
	}
	ms.pending--
	last := ms.pending == 0
	ms.mu.Unlock()
	if last {
		e.complete(ms)
	}
}

func (e *Engine) logDelivery(m *queue.Message, r *queue.Recipient, o outcome, a *attempt) {
	e.log.Info("delivery",
		zap.String("queue_id", m.ID),
		zap.String("from", m.Env.From),
		zap.String("rcpt", r.Addr),
		zap.String("domain", r.Domain()),
		zap.String("mx", a.mx),
		zap.String("ip", a.ip),
		zap.Int("attempt", r.Attempts),
		zap.String("result", o.result),
		zap.Int("code", o.code),
		zap.String("enhanced_code", o.enhanced),
		zap.String("reason", o.reason),
		zap.String("tls", a.tls),
		zap.Bool("tls_verified", a.tlsVerified),
		zap.String("sts_mode", a.stsMode),
		zap.String("sts_policy_id", a.stsID),
		zap.String("tlsrpt_result", a.tlsrptResult),
	)
}

// complete ends a message's round: DSNs first (durably queued), then the
// new recipient states.
func (e *Engine) complete(ms *msgState) {
	m := ms.m
	if !ms.attempted {
		// Only abandoned jobs (shutdown): nothing changed.
		e.store.Release(m.ID)
		return
	}
	now := e.now()
	if len(ms.bounced) > 0 {
		if err := e.sendDSN(m, ms.bounced, actionFailed, now); err != nil {
			// The sender must hear of the failure: keep these
			// recipients until a later round can queue the DSN.
			for _, i := range ms.bounced {
				r := &m.Rcpts[i]
				r.Status = queue.Deferred
				r.NextAttempt = now.Add(e.cfg.Queue.RetryDelay(1))
			}
		}
	}
	if d := e.cfg.Queue.DelayNoticeAfter.Duration; d > 0 && !m.DelayNotified && now.Sub(m.Received) >= d {
		var delayed []int
		for i := range m.Rcpts {
			if m.Rcpts[i].Status == queue.Deferred {
				delayed = append(delayed, i)
			}
		}
		if len(delayed) > 0 && e.sendDSN(m, delayed, actionDelayed, now) == nil {
			m.DelayNotified = true
		}
	}
	// The worker goes on while the group commit makes the new states
	// durable: a crash before that repeats only this (in-flight) attempt.
	failed := func(err error) {
		if err != nil && !errors.Is(err, queue.ErrNotFound) {
			e.log.Error("queue update failed", zap.String("queue_id", m.ID), zap.Error(err))
			// Not Release: the message would come due at once with
			// its old states and be delivered again, in a loop while
			// the disk fails.
			e.store.Requeue(m)
		}
	}
	if err := e.store.UpdateAsync(m, failed); err != nil {
		failed(err)
	}
}

// Bounce fails every recipient of a queued message that is not final,
// with a DSN to the sender (operator action).
func (e *Engine) Bounce(id string) error {
	// Take the message's lease, so that no delivery starts meanwhile;
	// Update below gives it back.
	m, err := e.store.LeaseID(id)
	if err != nil {
		return err
	}
	now := e.now()
	var idx []int
	for i := range m.Rcpts {
		r := &m.Rcpts[i]
		if r.Status.Final() {
			continue
		}
		r.Status = queue.Bounced
		r.LastCode, r.LastEnhanced = 550, "5.0.0"
		r.LastError = "bounced by the operator"
		idx = append(idx, i)
		e.logDelivery(m, r, outcome{result: "bounced", code: 550, enhanced: "5.0.0", reason: "bounced by the operator"}, &attempt{})
	}
	if len(idx) == 0 {
		e.store.Release(id)
		return nil
	}
	if err := e.sendDSN(m, idx, actionFailed, now); err != nil {
		e.store.Release(id)
		return fmt.Errorf("%s: queueing the DSN: %w", id, err)
	}
	return e.store.Update(m)
}

// sourceIP is the address this host sends from towards dst: the
// configured local address of dst's family, or the one the routing table
// picks (a UDP "connect" sends no packet). For TLS-RPT sending-mta-ip.
func (e *Engine) sourceIP(dst net.IP) string {
	if dst == nil {
		return ""
	}
	for _, l := range e.localIPs {
		if (l.To4() != nil) == (dst.To4() != nil) {
			return l.String()
		}
	}
	c, err := net.Dial("udp", net.JoinHostPort(dst.String(), "25"))
	if err != nil {
		return ""
	}
	defer c.Close()
	if a, ok := c.LocalAddr().(*net.UDPAddr); ok {
		return a.IP.String()
	}
	return ""
}

// suspend marks domain unreachable until its first retry interval has
// passed (at most five minutes).
func (e *Engine) suspend(domain, reason string) {
	d := min(e.cfg.Queue.RetryDelay(1), 5*time.Minute)
	e.mu.Lock()
	e.dead[domain] = deadDest{until: e.now().Add(d), reason: reason}
	e.mu.Unlock()
}

// suspended reports whether domain is marked unreachable now, and why.
func (e *Engine) suspended(domain string) (string, bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	dd, ok := e.dead[domain]
	if !ok {
		return "", false
	}
	if !e.now().Before(dd.until) {
		delete(e.dead, domain)
		return "", false
	}
	return dd.reason, true
}
