package delivery

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/textproto"
	"slices"
	"strconv"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/delivery/policy"
	"github.com/stsrelay/stsrelay/internal/dane"
	"github.com/stsrelay/stsrelay/internal/domain"
	"github.com/stsrelay/stsrelay/internal/message"
	"github.com/stsrelay/stsrelay/internal/smtpclient"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// outcome is what happened to one recipient in one attempt.
type outcome struct {
	result   string // delivered, deferred, bounced
	code     int
	enhanced string
	reason   string
}

// deliveryLog accumulates what one delivery attempt learnt, for its
// "delivery" log lines: the MX and address tried, TLS, MTA-STS, DANE and
// TLS-RPT findings, the route.
type deliveryLog struct {
	mx, ip       string
	tls          string
	tlsVerified  bool
	tlsResumed   bool
	stsMode      string
	stsID        string
	tlsrptResult string
	// dane is what DANE made of the host tried last (policy.DANEResult):
	// "", authenticated, tls-required or failed.
	dane string
	// counted is false for sessions TLS-RPT does not count (report mail,
	// TLS-Required: No): their lines carry no tlsrpt_result.
	counted bool
	// rt is the [[route]] used (nil: the MX hosts); route its next_hop
	// for the log line. policyDomain is the MTA-STS policy domain: the
	// recipient domain, or the route's (RFC 8461 §3.4).
	rt           *Route
	route        string
	policyDomain string
}

// deliver makes one attempt for job j, on sess when it is still fit to
// carry the message, and returns the session if it can carry more.
func (e *Engine) deliver(ctx context.Context, j *job, sess *session) *session {
	ms := j.ms
	m := ms.m
	a := &deliveryLog{policyDomain: j.domain}
	routing := e.routing.Load()
	if a.rt = routing.route(j.domain); a.rt != nil {
		a.route, a.policyDomain = a.rt.NextHop, a.rt.PolicyDomain()
	}
	outs := make([]outcome, len(j.idx))
	setAll := func(o outcome) {
		for i := range outs {
			outs[i] = o
		}
	}
	pin := policy.Policy{
		RequireTLS:    m.Env.RequireTLS,
		TLSRequiredNo: e.tlsRequiredNo(ms),
		// RFC 8460 §5.3: report mail is delivered despite TLS failures
		// (it carries TLS-Required: No) and never counted itself.
		Uncounted: m.Env.Kind == queue.KindTLSRPT,
	}
	if a.policyDomain == "" {
		// An [IP]:port next hop: no policy domain to report to.
		pin.Uncounted = true
	}
	pin.Override, pin.OverrideWeakens = routing.override(j.domain, a.rt)
	a.counted = !pin.Uncounted && !(pin.TLSRequiredNo && !pin.RequireTLS)

	// RFC 8461 §4, §5: the policy in force for the recipient domain.
	// RFC 8689 §5: "TLS-Required: No" sets the policy aside, unless
	// REQUIRETLS asks for the opposite.
	if e.o.Policies != nil && a.policyDomain != "" && !(pin.TLSRequiredNo && !pin.RequireTLS) {
		// RFC 8461 §5.1: before a final failure, look for a new policy
		// (a new TXT id) rather than trust the cached one.
		lookup := e.o.Policies.Get
		if e.sched.Expired(m.Received, e.now()) {
			lookup = e.o.Policies.Recheck
		}
		res, err := lookup(ctx, a.policyDomain)
		if ctx.Err() != nil {
			// Shutdown, not a failure of the domain's: nothing is
			// recorded against it.
			if sess != nil {
				sess.close()
			}
			e.abandon(j)
			return nil
		}
		if err != nil {
			if sess != nil {
				sess.close()
			}
			setAll(outcome{result: "deferred", code: 451, enhanced: "4.4.3", reason: "MTA-STS policy lookup failed: " + err.Error()})
			e.finish(j, outs, a)
			return nil
		}
		pin.STS = res.Policy
		if res.Policy != nil {
			a.stsMode = string(res.Policy.Mode)
			a.stsID = res.ID
		}
		if res.Failure != nil {
			// RFC 8460 §4.3.2.2: a record, but no valid policy could be
			// fetched (the cached one, if any, still applies).
			pin.FetchFailure, pin.FetchReason = res.Failure.ResultType, res.Failure.Reason
		}
	}

	switch {
	case pin.Weakens():
		// override_policy: said at every use, since it sets a
		// domain's published demand aside.
		e.log.Warn("tls_policy overrides MTA-STS enforce", zap.String("domain", j.domain),
			zap.String("policy_domain", a.policyDomain), zap.String("security", string(pin.Override)))
	case pin.OverrideIgnored():
		e.log.Debug("tls_policy ignored under MTA-STS enforce", zap.String("domain", j.domain),
			zap.String("security", string(pin.Override)))
	}

	// A parked session is used only if the policy now in force allows
	// it: its MX must still match and its TLS state satisfy the mode,
	// and it must go where the route now in force goes.
	if sess != nil && (sess.route != a.route || !e.sessionFits(sess, a.stsID, pin)) {
		sess.close()
		sess = nil
	}
	// A parked session the server has since closed (its idle timeout)
	// shows it only when used: then, once, the message goes on a new one.
	for reused := sess != nil; ; reused = false {
		next, retry := e.transmit(ctx, j, sess, pin, a, outs, reused)
		if !retry {
			return next
		}
		sess = nil
	}
}

// transmit delivers job j on sess, or on a new session when sess is nil.
// It reports retry when sess was a reused one that broke before the
// server answered anything, and nothing was recorded.
func (e *Engine) transmit(ctx context.Context, j *job, sess *session, pin policy.Policy, a *deliveryLog, outs []outcome, reused bool) (*session, bool) {
	ms := j.ms
	m := ms.m
	setAll := func(o outcome) {
		for i := range outs {
			outs[i] = o
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
			return nil, false
		}
		var hosts []Host
		var err error
		if a.rt != nil {
			// A fixed next hop is the operator's choice, authenticated
			// by the Web PKI (and MTA-STS, RFC 8461 §3.4); DANE is for
			// MX hosts (RFC 7672 §2.2.1).
			hosts, err = a.rt.hosts(ctx, e.o.Resolver, e.wantV6)
		} else {
			hosts, err = route(ctx, e.o.Resolver, j.domain, e.cfg.Hostname, e.wantV6, e.dane)
		}
		if ctx.Err() != nil {
			// Shutdown: a lookup it cut short (a TLSA lookup among them)
			// is no failure of the domain's.
			e.abandon(j)
			return nil, false
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
			return nil, false
		}
		sess, lastErr = e.connect(ctx, a.policyDomain, hosts, pin, a)
		if sess == nil && ctx.Err() != nil {
			e.abandon(j)
			return nil, false
		}
		if sess == nil && lastErr != nil && lastErr.TLS == nil && (lastErr.Stage == "connect" || lastErr.Stage == "greeting") {
			e.suspend(j.domain, lastErr.Error())
			e.feedback(j.domain, false)
		}
		if sess == nil {
			o := outcome{result: "deferred", code: 451, enhanced: "4.4.1", reason: "no MX host could be used"}
			if lastErr != nil {
				// The reply's code is in code and enhanced_code; the
				// reason is the text (with the stage when no reply came).
				o.code, o.reason = lastErr.Code, lastErr.Msg
				if lastErr.Code == 0 {
					o.reason = lastErr.Error()
				}
				if o.code == 0 {
					o.code = 451
				}
				if lastErr.Enhanced != "" {
					o.enhanced = lastErr.Enhanced
				}
				if lastErr.Permanent && lastErr.Stage == "policy" {
					// REQUIRETLS (RFC 8689 §4.2.1): no host can take it.
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
			return nil, false
		}
	}
	a.mx, a.ip = sess.host, sess.ip
	a.tls = tlsVersionName(sess.version)
	a.tlsVerified = sess.tls && sess.state.CertError == nil
	a.tlsResumed = sess.resumed
	// tlsrpt_result describes the session that carries the message, as
	// CheckConn classified it when the session was set up (connect
	// recorded it then; a parked session is not counted again).
	v := policy.CheckConn(pin, sess.host, sess.dane, sess.state)
	a.tlsrptResult, a.dane = string(v.Result), string(v.DANE)

	// Extensions the message needs, decided by its content at submission
	// (RFC 6531 §3.2, RFC 6152 §3), not by what the client asked for.
	needUTF8, eightBit := e.content(ms)
	_, offersUTF8 := sess.c.Ext("SMTPUTF8")
	_, offers8Bit := sess.c.Ext("8BITMIME")
	if needUTF8 && !offersUTF8 {
		// RFC 6531 §3.4: no downgrade; the message cannot go this way.
		setAll(outcome{result: "bounced", code: 553, enhanced: "5.6.7", reason: "message needs SMTPUTF8 (a non-ASCII address or header field) and " + sess.host + " does not support it"})
		e.finish(j, outs, a)
		return sess, false
	}
	if max := sess.c.MaxSize(); max > 0 && m.Size > max {
		setAll(outcome{result: "bounced", code: 552, enhanced: "5.3.4", reason: fmt.Sprintf("message size %d exceeds %s's limit of %d", m.Size, sess.host, max)})
		e.finish(j, outs, a)
		return sess, false
	}
	body, size, err := e.openBody(m, eightBit && !offers8Bit, needUTF8)
	switch {
	case errors.Is(err, message.ErrUnconvertible):
		// RFC 6152 §3: a relay that cannot convert returns the message.
		setAll(outcome{result: "bounced", code: 554, enhanced: "5.6.3", reason: sess.host + " does not support 8BITMIME and the message has " + strings.TrimPrefix(err.Error(), message.ErrUnconvertible.Error()+": ")})
		e.finish(j, outs, a)
		return sess, false
	case err != nil:
		setAll(outcome{result: "deferred", code: 451, enhanced: "4.3.0", reason: "reading queued body: " + err.Error()})
		e.finish(j, outs, a)
		return sess, false
	}
	defer body.Close()
	tx, err := e.transaction(sess, m, j, body, size, needUTF8, eightBit && offers8Bit)
	if err != nil {
		setAll(outcome{result: "deferred", code: 451, enhanced: "4.3.0", reason: "reading queued body: " + err.Error()})
		e.finish(j, outs, a)
		return sess, false
	}
	results, serr := sess.send(tx)
	if reused && serr != nil && ctx.Err() == nil {
		answered := false
		for _, r := range results {
			answered = answered || r.Code != 0
		}
		if !answered {
			sess.c.Close()
			return nil, true
		}
	}
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
	switch {
	case serr != nil && (serr.Code == 421 || serr.Code == 0):
		// The destination is overloaded or the link broke: fewer
		// sessions for it.
		e.feedback(j.domain, false)
	case slices.ContainsFunc(results, func(r rcptResult) bool { return r.Delivered }):
		e.feedback(j.domain, true)
	}
	if serr != nil || sess.messages >= e.cfg.Delivery.ConnectionReuseLimit {
		sess.close()
		return nil, false
	}
	return sess, false
}

// transaction builds the SMTP transaction for job j on sess: MAIL
// parameters the server offers and the message needs, RCPT parameters,
// and the body with its exact size for BDAT (RFC 3030) when the server
// offers CHUNKING.
func (e *Engine) transaction(sess *session, m *queue.Message, j *job, body io.ReadSeeker, size int64, utf8, eightBit bool) (smtpclient.Transaction, error) {
	tx := smtpclient.Transaction{From: m.Env.From, Body: body}
	c := sess.c
	if _, ok := c.Ext("SIZE"); ok {
		tx.MailParams = append(tx.MailParams, "SIZE="+strconv.FormatInt(size, 10)) // RFC 1870
	}
	if eightBit {
		tx.MailParams = append(tx.MailParams, "BODY=8BITMIME") // RFC 6152
	}
	if utf8 {
		tx.MailParams = append(tx.MailParams, "SMTPUTF8") // RFC 6531 §3.4
	}
	if m.Env.RequireTLS {
		tx.MailParams = append(tx.MailParams, "REQUIRETLS") // RFC 8689 §4.2.1
	}
	// RFC 3461 §5.2: DSN parameters only to a server that offers DSN.
	_, dsn := c.Ext("DSN")
	if dsn {
		if m.Env.Ret == "FULL" || m.Env.Ret == "HDRS" {
			tx.MailParams = append(tx.MailParams, "RET="+m.Env.Ret)
		}
		if m.Env.EnvID != "" {
			tx.MailParams = append(tx.MailParams, "ENVID="+xtext(m.Env.EnvID))
		}
	}
	for _, i := range j.idx {
		r := &m.Rcpts[i]
		rc := smtpclient.Rcpt{Addr: r.Addr}
		if dsn && len(r.Notify) > 0 {
			rc.Params = append(rc.Params, "NOTIFY="+strings.Join(r.Notify, ","))
		}
		if dsn && r.ORcpt != "" {
			t, addr, ok := strings.Cut(r.ORcpt, ";")
			if !ok {
				t, addr = "rfc822", r.ORcpt
			}
			rc.Params = append(rc.Params, "ORCPT="+t+";"+xtext(addr))
		}
		tx.Rcpts = append(tx.Rcpts, rc)
	}
	if _, ok := c.Ext("CHUNKING"); ok {
		// BDAT needs the size of the body as it goes on the wire: line
		// ends normalised to CRLF (the client does the same).
		n, err := smtpclient.NormalizedSize(body)
		if err != nil {
			return tx, err
		}
		if _, err := body.Seek(0, io.SeekStart); err != nil {
			return tx, err
		}
		tx.Size = n
	}
	return tx, nil
}

// xtext encodes a DSN parameter value (RFC 3461 §4): "+", "=" and
// characters outside "!".."~" as "+XX".
func xtext(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c < '!' || c > '~' || c == '+' || c == '=' {
			fmt.Fprintf(&b, "+%02X", c)
			continue
		}
		b.WriteByte(c)
	}
	return b.String()
}

// sessionFits reports whether a parked session may carry the message
// under the policy now in force (RFC 8461 §5: reuse must not bypass the
// policy): the same decision a fresh session to its MX would get.
func (e *Engine) sessionFits(s *session, stsID string, pin policy.Policy) bool {
	if s.messages >= e.cfg.Delivery.ConnectionReuseLimit {
		return false
	}
	if s.policyID != stsID {
		// The policy changed since the session was set up: set up anew
		// so the MX choice follows the new policy.
		return false
	}
	return policy.CheckMX(pin, s.host, s.dane).Action == policy.Use &&
		policy.CheckConn(pin, s.host, s.dane, s.state).Action == policy.Use
}

// connect walks the hosts in preference order and returns the first
// session that the policy allows (RFC 8461 §5.1 guidance, §8.4: an
// invalid candidate is treated as unreachable and the next one tried).
// Every decision is policy.CheckMX's or policy.CheckConn's, and each
// counted verdict is recorded once.
func (e *Engine) connect(ctx context.Context, domain string, hosts []Host, pin policy.Policy, a *deliveryLog) (*session, *sessionError) {
	var lastErr *sessionError
	refuse := func(v policy.Verdict) {
		a.tlsrptResult, a.dane = string(v.Result), string(v.DANE)
		lastErr = &sessionError{Stage: "policy", Code: v.Code, Enhanced: v.Enhanced, Msg: v.Reason, Permanent: v.Permanent}
	}
	for _, h := range hosts {
		if len(h.IPs) == 0 {
			continue
		}
		a.dane = ""
		if v := policy.CheckMX(pin, h.Name, h.DANE); v.Action != policy.Use {
			// Never contacted.
			a.mx, a.ip = h.Name, ""
			e.record(domain, pin, h.DANE, v, h.Name, "", "", nil)
			refuse(v)
			continue
		}
		// RFC 7672 §3: a host with usable TLSA records is authenticated
		// by them, in the handshake.
		var byDANE policy.DANE
		if pin.DANEStatus(h.DANE) == policy.DANEUsable {
			byDANE = h.DANE
		}
		for _, ip := range h.IPs {
			a.mx, a.ip = h.Name, ip.String()
			// security = "none": no STARTTLS at all.
			s, err := e.dialHost(ctx, h.Name, ip, !pin.STARTTLS(h.DANE), a.rt, byDANE)
			if err != nil {
				se := asSessionError(err)
				if se.TLS == nil {
					lastErr = se // not a TLS failure: the host is unreachable
					continue
				}
				st := *se.TLS
				v := policy.CheckConn(pin, h.Name, h.DANE, st)
				if v.Action != policy.Fallback {
					e.record(domain, pin, h.DANE, v, h.Name, ip.String(), "", &st)
					refuse(v)
					continue
				}
				// Opportunistic: as a sender without a policy would,
				// fall back to plaintext on a new connection.
				st.Fallback = true
				s, err = e.dialHost(ctx, h.Name, ip, true, a.rt, policy.DANE{})
				if err != nil {
					// The failed negotiation is the session's result.
					e.record(domain, pin, h.DANE, policy.CheckConn(pin, h.Name, h.DANE, st), h.Name, ip.String(), "", &st)
					lastErr = asSessionError(err)
					continue
				}
				s.state = st
			}
			s.policyID = a.stsID
			s.dane = h.DANE
			v := policy.CheckConn(pin, h.Name, h.DANE, s.state)
			e.record(domain, pin, h.DANE, v, h.Name, ip.String(), s.helo, &s.state)
			if v.Action != policy.Use {
				s.close()
				refuse(v)
				continue
			}
			s.route = a.route
			if a.rt != nil && a.rt.Username != "" {
				if err := e.authenticate(s, a.rt); err != nil {
					s.close()
					lastErr = err
					continue
				}
			}
			return s, nil
		}
	}
	return nil, lastErr
}

// authenticate says AUTH PLAIN (RFC 4954) to a route's next hop, only on
// a session whose certificate was verified for the next hop name: the
// password never goes in the clear or to an unauthenticated peer. A
// refusal (535 5.7.8) makes the message wait, like any failure of the
// next hop: the credentials are the operator's to fix, not the sender's.
func (e *Engine) authenticate(s *session, r *Route) *sessionError {
	switch {
	case r.PasswordErr != nil:
		return &sessionError{Stage: "auth", Code: 451, Enhanced: "4.7.0", Msg: r.PasswordErr.Error()}
	case !s.state.TLS || s.state.CertError != nil:
		return &sessionError{Stage: "auth", Code: 451, Enhanced: "4.7.0",
			Msg: "not sending credentials to " + s.host + ": no TLS session with a certificate verified for it"}
	}
	if err := s.c.AuthPlain(r.Username, r.Password); err != nil {
		se := clientErr("auth", err)
		se.Permanent = false
		return se
	}
	return nil
}

// dialHost sets up a session to host at ip; d, when usable, is the
// host's DANE to authenticate it with.
func (e *Engine) dialHost(ctx context.Context, host string, ip net.IP, plaintext bool, r *Route, d policy.DANE) (*session, error) {
	port := e.cfg.Delivery.Port
	if r != nil {
		port = r.Port
	}
	o := dialOptions{
		Hostname:       e.cfg.Hostname,
		Port:           port,
		ConnectTimeout: e.cfg.Delivery.ConnectTimeout.Duration,
		CommandTimeout: e.cfg.Delivery.CommandTimeout.Duration,
		DataTimeout:    e.cfg.Delivery.DataTimeout.Duration,
		Roots:          e.o.Roots,
		Now:            e.now,
		TLSSessions:    e.tlsSessions,
		Plaintext:      plaintext,
		DANE:           d,
		Track:          e.conns.track,
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

// record counts one TLS-RPT session, exactly as the verdict says, in the
// metric and the recorder: the log line carries the same result. d is
// the host's DANE; st is the session's TLS state (nil for a host never
// contacted), for the enforce forecast.
func (e *Engine) record(domain string, pin policy.Policy, d policy.DANE, v policy.Verdict, mx, ip, helo string, st *policy.ConnState) {
	if !v.Count {
		return
	}
	// A session DANE decided is not MTA-STS's to forecast: switching the
	// policy to enforce would change nothing for it.
	if e.o.Forecast != nil && v.PolicyType != tlsrpt.PolicyTypeTLSA {
		if fs, ok := forecastSession(pin, mx, d, st); ok {
			fs.Time, fs.Domain = e.now(), domain
			e.o.Forecast.Record(fs)
		}
	}
	if e.o.Counters != nil {
		rt := string(v.Result)
		if v.Success() {
			rt = "success"
		}
		e.o.Counters.TLSSession(rt)
	}
	if e.o.TLSRPT == nil {
		return
	}
	sess := tlsrpt.Session{
		Time:              e.now(),
		PolicyDomain:      domain,
		PolicyType:        v.PolicyType,
		Success:           v.Success(),
		ResultType:        v.Result,
		FailureReasonCode: v.ReasonCode,
		ReceivingMX:       mx,
		ReceivingHelo:     helo,
		ReceivingIP:       ip,
	}
	if ip != "" {
		sess.SendingIP = e.sourceIP(net.ParseIP(ip))
	}
	switch {
	case v.PolicyType == tlsrpt.PolicyTypeSTS && pin.STS != nil:
		sess.PolicyString = pin.STS.Lines
		sess.MXPatterns = pin.STS.MX
	case v.PolicyType == tlsrpt.PolicyTypeTLSA:
		// RFC 8460 §3 (checklist RPT-3-a): for DANE the policy domain
		// is the TLSA base domain, the policy-string the records
		// (§4.4: "3 1 1 <hex>" per RR).
		sess.PolicyDomain = d.Base
		if sess.PolicyDomain == "" {
			sess.PolicyDomain = mx // dane-required: no records, the host
		}
		sess.PolicyString = dane.PolicyStrings(d.Records)
	}
	e.o.TLSRPT.Record(sess)
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
func (e *Engine) openBody(m *queue.Message, to7Bit, utf8Headers bool) (readSeekCloser, int64, error) {
	if !to7Bit {
		b, err := e.store.Body(m.ID)
		if err != nil {
			return nil, 0, err
		}
		return nopCloser{b}, m.Size, nil
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

type readSeekCloser interface {
	io.ReadSeeker
	io.Closer
}

type nopCloser struct{ io.ReadSeeker }

func (nopCloser) Close() error { return nil }

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
func (e *Engine) finish(j *job, outs []outcome, a *deliveryLog) {
	if e.cutShort(j, outs) {
		return // the shutdown deadline cut it: requeued, not counted
	}
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
			if o.result == "delivered" {
				e.o.Counters.Delivered(now.Sub(m.Received))
			}
		}
	}
	ms.pending--
	last := ms.pending == 0
	ms.mu.Unlock()
	if last {
		e.complete(ms)
	}
}

func (e *Engine) logDelivery(m *queue.Message, r *queue.Recipient, o outcome, a *deliveryLog) {
	// Domains are A-labels; a line about an IDN also names the U-label.
	// One parse gives both forms.
	var d string
	unicode := zap.Skip()
	i := strings.LastIndexByte(r.Addr, '@')
	if dd, err := domain.Parse(r.Addr[i+1:]); err == nil && i >= 0 {
		d = dd.ASCII()
		if dd.IsIDN() {
			unicode = zap.String("domain_unicode", dd.Unicode())
		}
	} else {
		d = r.Domain() // a literal, or a name delivery refused
	}
	e.log.Info("delivery",
		zap.String("queue_id", m.ID),
		zap.String("from", m.Env.From),
		zap.String("rcpt", r.Addr),
		zap.String("domain", d),
		unicode,
		zap.String("mx", a.mx),
		zap.String("ip", a.ip),
		zap.Int("attempt", r.Attempts),
		zap.String("result", o.result),
		zap.Int("code", o.code),
		zap.String("enhanced_code", o.enhanced),
		zap.String("reason", o.reason),
		zap.String("tls", a.tls),
		zap.Bool("tls_verified", a.tlsVerified),
		zap.Bool("tls_resumed", a.tlsResumed),
		zap.String("sts_mode", a.stsMode),
		zap.String("sts_policy_id", a.stsID),
		zap.String("tlsrpt_result", a.tlsrptResult),
		zap.String("route", a.route),
		zap.String("dane", a.dane),
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
				r.NextAttempt = now.Add(RetrySchedule(&e.cfg.Queue).Delay(1))
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
		e.logDelivery(m, r, outcome{result: "bounced", code: 550, enhanced: "5.0.0", reason: "bounced by the operator"}, &deliveryLog{})
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
	d := min(RetrySchedule(&e.cfg.Queue).Delay(1), 5*time.Minute)
	e.mu.Lock()
	until := e.now().Add(d)
	e.dead[domain] = deadDest{until: until, reason: reason}
	e.mu.Unlock()
	// The queue holds the destination's other messages back as one, so
	// a dead destination with many messages costs one wake-up, not one
	// deferral record per message (issue #12).
	e.store.HoldDomain(domain, until)
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
