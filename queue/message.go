package queue

import (
	"strings"
	"time"

	"github.com/stsrelay/stsrelay/internal/domain"
	"github.com/stsrelay/stsrelay/internal/message"
)

// Status is where one recipient of a message stands.
type Status string

// Recipient states. Pending and Deferred recipients are still to be
// delivered; Delivered and Bounced are final.
const (
	Pending   Status = "pending"
	Deferred  Status = "deferred"
	Delivered Status = "delivered"
	Bounced   Status = "bounced"
)

// Final reports whether no more delivery attempts follow.
func (s Status) Final() bool { return s == Delivered || s == Bounced }

// Kind says who made a message: an application, or the relay itself.
type Kind string

// Message kinds. The relay never sends a DSN about a DSN (RFC 5321
// §4.5.4) and never counts TLS-RPT report deliveries in TLS-RPT
// (reports about reports loop forever).
const (
	KindSubmitted Kind = ""
	KindDSN       Kind = "dsn"
	KindTLSRPT    Kind = "tlsrpt"
)

// Envelope is what the client said around the message body.
type Envelope struct {
	// From is the reverse path; "" is the null sender (bounces).
	From string `json:"from"`
	// SMTPUTF8 is set when MAIL FROM carried SMTPUTF8 (RFC 6531). It
	// says what the client asked for, not what the message needs: many
	// clients (Go's net/smtp among them) send it whenever it is offered.
	SMTPUTF8 bool `json:"smtputf8,omitempty"`
	// Body is the BODY= parameter: "", "7BIT" or "8BITMIME".
	Body string `json:"body,omitempty"`
	// Scanned is set when the queue decided NeedsSMTPUTF8 and EightBit
	// from the message's content as it was written. Messages queued by
	// versions before that lack it; delivery scans those itself.
	Scanned bool `json:"scanned,omitempty"`
	// NeedsSMTPUTF8: an envelope address or a top-level header field
	// holds non-ASCII, so the next hop must offer SMTPUTF8 (RFC 6531
	// §3.2, RFC 6532 §3). Set by the queue at Commit.
	NeedsSMTPUTF8 bool `json:"needs_smtputf8,omitempty"`
	// EightBit: the body holds octets above 127, so the next hop must
	// offer 8BITMIME or get the message converted (RFC 6152 §3). Set by
	// the queue at Commit.
	EightBit bool `json:"eightbit,omitempty"`
	// RequireTLS is the REQUIRETLS MAIL parameter (RFC 8689).
	RequireTLS bool `json:"requiretls,omitempty"`
	// Ret and EnvID are the DSN parameters of MAIL (RFC 3461).
	Ret   string `json:"ret,omitempty"`
	EnvID string `json:"envid,omitempty"`
	Kind  Kind   `json:"kind,omitempty"`
	// User is the authenticated submitter, ClientIP its address.
	User     string `json:"user,omitempty"`
	ClientIP string `json:"client_ip,omitempty"`
	// Rcpts are the recipients in the order the client gave them.
	Rcpts []RcptSpec `json:"rcpts"`
}

// SetContent records what the message needs of the next hop, from a
// scan of its bytes and from its addresses.
func (env *Envelope) SetContent(c message.Content) {
	env.Scanned = true
	env.EightBit = c.Body8Bit
	env.NeedsSMTPUTF8 = c.HeaderUTF8 || !message.IsASCII(env.From)
	for _, r := range env.Rcpts {
		if !message.IsASCII(r.Addr) {
			env.NeedsSMTPUTF8 = true
		}
	}
}

// RcptSpec is one RCPT TO with its DSN parameters (RFC 3461).
type RcptSpec struct {
	Addr   string   `json:"addr"`
	Notify []string `json:"notify,omitempty"`
	ORcpt  string   `json:"orcpt,omitempty"`
}

// Recipient is a recipient and its delivery state.
type Recipient struct {
	RcptSpec
	Status      Status    `json:"status"`
	Attempts    int       `json:"attempts"`
	NextAttempt time.Time `json:"next_attempt,omitzero"`
	LastAttempt time.Time `json:"last_attempt,omitzero"`
	// LastCode, LastEnhanced and LastError describe the last outcome:
	// the remote reply, or the local reason.
	LastCode     int    `json:"last_code,omitempty"`
	LastEnhanced string `json:"last_enhanced,omitempty"`
	LastError    string `json:"last_error,omitempty"`
	// LastMX is the host tried last (for DSN Remote-MTA).
	LastMX string `json:"last_mx,omitempty"`
}

// Domain returns the recipient's domain, lower-cased.
func (r *Recipient) Domain() string { return AddrDomain(r.Addr) }

// AddrDomain returns the domain of an address as DNS, MTA-STS and
// TLS-RPT know it: the A-label form (UTS #46 mapping and NFC, RFC 5890),
// lower-cased, without a trailing dot. An address literal, or a name that
// cannot be a domain, comes back lower-cased as written; delivery refuses
// the latter.
func AddrDomain(addr string) string {
	i := strings.LastIndexByte(addr, '@')
	if i < 0 {
		return ""
	}
	raw := addr[i+1:]
	if !domain.IsLiteral(raw) {
		if d, err := domain.Parse(raw); err == nil {
			return d.ASCII()
		}
	}
	return domain.Key(raw)
}

// Message is a queued message: envelope, recipients' states and where its
// body lies. Values returned by the Store are copies.
type Message struct {
	ID       string      `json:"id"`
	Env      Envelope    `json:"envelope"`
	Received time.Time   `json:"received"`
	Size     int64       `json:"size"`
	Rcpts    []Recipient `json:"recipients"`
	// DelayNotified is set once a "delayed" DSN went to the sender.
	DelayNotified bool `json:"delay_notified,omitempty"`

	loc bodyLoc
}

// Done reports whether every recipient is final.
func (m *Message) Done() bool {
	for i := range m.Rcpts {
		if !m.Rcpts[i].Status.Final() {
			return false
		}
	}
	return true
}

// NextDue is the earliest next attempt among recipients not yet final;
// zero when all are final.
func (m *Message) NextDue() time.Time {
	var t time.Time
	for i := range m.Rcpts {
		r := &m.Rcpts[i]
		if r.Status.Final() {
			continue
		}
		next := r.NextAttempt
		if next.IsZero() {
			// Never scheduled: due at once (zero means "all final").
			next = time.Unix(1, 0)
		}
		if t.IsZero() || next.Before(t) {
			t = next
		}
	}
	return t
}

// hasDomain reports whether a recipient of m is in domain d.
func (m *Message) hasDomain(d string) bool {
	for i := range m.Env.Rcpts {
		if AddrDomain(m.Env.Rcpts[i].Addr) == d {
			return true
		}
	}
	return false
}

// nextDue is Message.NextDue for recipients alone.
func nextDue(rcpts []Recipient) time.Time {
	m := Message{Rcpts: rcpts}
	return m.NextDue()
}

// Schedule turns the configured retry schedule and lifetime into times
// (RFC 5321 §4.5.4.1: retry intervals and give-up time MUST be
// configurable).
type Schedule struct {
	// Retry[i] is the wait after the (i+1)-th failed attempt; the last
	// entry repeats.
	Retry []time.Duration
	// MaxQueueTime is how long a message may stay before it is bounced.
	MaxQueueTime time.Duration
}

// Next returns when to try again after attempts failed attempts of a
// message received at received, and whether its lifetime has run out.
func (s Schedule) Next(received time.Time, attempts int, now time.Time) (time.Time, bool) {
	expire := received.Add(s.MaxQueueTime)
	if !now.Before(expire) {
		return time.Time{}, true
	}
	next := now.Add(s.Delay(attempts))
	if next.After(expire) {
		// One last try at the end of the lifetime rather than a bounce
		// long before it.
		next = expire
	}
	return next, false
}

// DefaultRetry is the wait of a Schedule with no Retry entries.
const DefaultRetry = 5 * time.Minute

// Delay is the wait after attempts failed attempts (attempts ≥ 1; less
// counts as 1): Retry[attempts-1], the last entry repeating, or
// DefaultRetry when Retry is empty. It is the module's one retry-delay
// computation; Next adds it and caps it at the lifetime.
func (s Schedule) Delay(attempts int) time.Duration {
	if len(s.Retry) == 0 {
		return DefaultRetry
	}
	i := min(max(attempts-1, 0), len(s.Retry)-1)
	return s.Retry[i]
}

// Expired reports whether a message received at received has outlived
// MaxQueueTime at now.
func (s Schedule) Expired(received, now time.Time) bool {
	return !now.Before(received.Add(s.MaxQueueTime))
}
