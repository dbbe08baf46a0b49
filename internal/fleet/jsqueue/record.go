package jsqueue

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/stsrelay/stsrelay/queue"
)

// record is the metadata of one version of a queued message: the JSON
// at the start of its stream message.
type record struct {
	ID       string            `json:"id"`
	Version  uint64            `json:"version"`
	Received time.Time         `json:"received"`
	Env      queue.Envelope    `json:"envelope"`
	Size     int64             `json:"size"`
	Rcpts    []queue.Recipient `json:"recipients"`
	// DelayNotified is set once a "delayed" DSN went to the sender.
	DelayNotified bool `json:"delay_notified,omitempty"`
	// NotBefore is when the message is next due: the earliest next
	// attempt of a recipient not yet final.
	NotBefore time.Time `json:"not_before"`
	// Body is the object-store name of the body; "" when the body
	// follows the metadata in the stream message.
	Body string `json:"body,omitempty"`
	// Node is the relay that wrote this version.
	Node string `json:"node,omitempty"`
}

// Headers of a stream message. Listing reads them alone.
const (
	hdrMsgID     = "Nats-Msg-Id"
	hdrMeta      = "Stsq-Meta"       // length of the JSON metadata in the data
	hdrVersion   = "Stsq-Version"    // record.Version
	hdrReceived  = "Stsq-Received"   // RFC 3339, nanoseconds
	hdrNotBefore = "Stsq-Not-Before" // RFC 3339, nanoseconds
	hdrSize      = "Stsq-Size"       // body size
	hdrDomains   = "Stsq-Domains"    // recipient domains, comma-separated, first-seen order
	hdrBody      = "Stsq-Body"       // object name, when not inline
)

// maxDomainsHeader bounds the domains header; a message with more
// recipient domains than fit says "*" and listing reads its metadata.
const maxDomainsHeader = 8 << 10

func (r *record) message() *queue.Message {
	m := &queue.Message{
		ID:            r.ID,
		Env:           r.Env,
		Received:      r.Received,
		Size:          r.Size,
		Rcpts:         append([]queue.Recipient(nil), r.Rcpts...),
		DelayNotified: r.DelayNotified,
	}
	m.Env.Rcpts = append([]queue.RcptSpec(nil), r.Env.Rcpts...)
	return m
}

// domains returns the distinct recipient domains of r in order.
func (r *record) domains() []string {
	var out []string
	seen := map[string]bool{}
	for _, rs := range r.Env.Rcpts {
		if d := queue.AddrDomain(rs.Addr); !seen[d] {
			seen[d] = true
			out = append(out, d)
		}
	}
	return out
}

// encode builds the stream message of r with body (nil when the body is
// in the object store). msgID is the dedup ID.
func (r *record) encode(subj, msgID string, body []byte) (*nats.Msg, error) {
	meta, err := json.Marshal(r)
	if err != nil {
		return nil, err
	}
	m := nats.NewMsg(subj)
	m.Header.Set(hdrMsgID, msgID)
	m.Header.Set(hdrMeta, strconv.Itoa(len(meta)))
	m.Header.Set(hdrVersion, strconv.FormatUint(r.Version, 10))
	m.Header.Set(hdrReceived, r.Received.UTC().Format(time.RFC3339Nano))
	m.Header.Set(hdrNotBefore, r.NotBefore.UTC().Format(time.RFC3339Nano))
	m.Header.Set(hdrSize, strconv.FormatInt(r.Size, 10))
	doms := strings.Join(r.domains(), ",")
	if len(doms) > maxDomainsHeader {
		doms = "*"
	}
	m.Header.Set(hdrDomains, doms)
	if r.Body != "" {
		m.Header.Set(hdrBody, r.Body)
	}
	m.Data = make([]byte, 0, len(meta)+len(body))
	m.Data = append(m.Data, meta...)
	m.Data = append(m.Data, body...)
	return m, nil
}

// headerBytes estimates the size of m's headers on the wire.
func headerBytes(h nats.Header) int {
	n := len("NATS/1.0\r\n\r\n")
	for k, vs := range h {
		for _, v := range vs {
			n += len(k) + len(v) + 4
		}
	}
	return n
}

var errCorrupt = errors.New("jsqueue: malformed queue message")

// decode reads the record and inline body of a stream message.
func decode(h nats.Header, data []byte) (*record, []byte, error) {
	n, err := strconv.Atoi(h.Get(hdrMeta))
	if err != nil || n < 0 || n > len(data) {
		return nil, nil, fmt.Errorf("%w: bad %s header", errCorrupt, hdrMeta)
	}
	r := &record{}
	if err := json.Unmarshal(data[:n], r); err != nil {
		return nil, nil, fmt.Errorf("%w: %v", errCorrupt, err)
	}
	if !queue.ValidID(r.ID) || len(r.Rcpts) != len(r.Env.Rcpts) {
		return nil, nil, fmt.Errorf("%w: bad record for %q", errCorrupt, r.ID)
	}
	body := data[n:]
	if r.Body == "" && int64(len(body)) != r.Size {
		return nil, nil, fmt.Errorf("%w: %s: inline body of %d bytes, want %d", errCorrupt, r.ID, len(body), r.Size)
	}
	return r, body, nil
}

// hdrInfo is what listing needs of a message, from its headers.
type hdrInfo struct {
	id        string
	seq       uint64
	notBefore time.Time
	domains   []string // nil with all: read the metadata
	all       bool
}

func parseHeaders(subjPrefix, subj string, seq uint64, h nats.Header) hdrInfo {
	hi := hdrInfo{id: strings.TrimPrefix(subj, subjPrefix), seq: seq}
	hi.notBefore, _ = time.Parse(time.RFC3339Nano, h.Get(hdrNotBefore))
	switch d := h.Get(hdrDomains); d {
	case "*":
		hi.all = true
	case "":
	default:
		hi.domains = strings.Split(d, ",")
	}
	return hi
}

// singleDomain returns the domain of a message whose recipients share
// one, else "".
func (hi *hdrInfo) singleDomain() string {
	if len(hi.domains) == 1 && !hi.all {
		return hi.domains[0]
	}
	return ""
}

// nextDue is queue.Message.NextDue for recipients alone.
func nextDue(rcpts []queue.Recipient) time.Time {
	m := queue.Message{Rcpts: rcpts}
	return m.NextDue()
}

// allFinal reports whether every recipient is final.
func allFinal(rcpts []queue.Recipient) bool {
	for i := range rcpts {
		if !rcpts[i].Status.Final() {
			return false
		}
	}
	return true
}

// IDs come from queue.IDGenerator: queue's format, so that they sort by
// time and every tool that checks queue.ValidID takes them. Its random
// counter start makes two nodes unlikely to make the same ID; Commit's
// compare-and-set (the subject must be empty) makes a clash harmless: the
// second node takes a new ID.

// nonce returns n random bytes in hex.
func nonce(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
