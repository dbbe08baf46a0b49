package jsqueue

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/stsrelay/stsrelay/queue"
)

// ctlMsg is a notice between the nodes' queues on <prefix>.ctl.
type ctlMsg struct {
	// Op is "lock" (ID is locked by From: hand it out no more; reply
	// whether a delivery of it is in flight here), "unlock", or
	// "retry-domain" (end the local hold of Domain; its messages leased
	// here become due at their Update).
	Op     string `json:"op"`
	ID     string `json:"id,omitempty"`
	Domain string `json:"domain,omitempty"`
	From   string `json:"from"`
}

type ctlReply struct {
	From   string `json:"from"`
	Leased bool   `json:"leased"`
}

// onControl handles a notice from another node.
func (q *Queue) onControl(m *nats.Msg) {
	var c ctlMsg
	if err := json.Unmarshal(m.Data, &c); err != nil || c.From == q.inst {
		return
	}
	now := q.o.Now()
	switch c.Op {
	case "lock":
		var nak jetstream.Msg
		q.mu.Lock()
		q.locked[c.ID] = now.Add(lockTTL(&q.o))
		e := q.held[c.ID]
		leased := e != nil && e.leased || q.writing[c.ID] != nil
		if e != nil && !e.leased {
			q.forgetLocked(e)
			nak = e.msg
		}
		q.mu.Unlock()
		if nak != nil {
			_ = nak.NakWithDelay(time.Second)
			e.closeBody()
			q.signalRoom()
		}
		if m.Reply != "" {
			b, _ := json.Marshal(ctlReply{From: q.inst, Leased: leased})
			_ = m.Respond(b)
		}
	case "unlock":
		q.mu.Lock()
		delete(q.locked, c.ID)
		q.mu.Unlock()
	case "retry-domain":
		q.retryDomainLocal(c.Domain)
	}
}

// notify sends a notice to the other nodes, expecting no answer.
func (q *Queue) notify(c ctlMsg) {
	c.From = q.inst
	b, _ := json.Marshal(c)
	_ = q.nc.Publish(q.n.ctl, b)
}

// ask sends a notice and collects answers for ControlWait: it reports
// whether any node said the message is leased there.
func (q *Queue) ask(c ctlMsg) (bool, error) {
	c.From = q.inst
	b, _ := json.Marshal(c)
	inbox := q.nc.NewRespInbox()
	sub, err := q.nc.SubscribeSync(inbox)
	if err != nil {
		return false, err
	}
	defer sub.Unsubscribe()
	if err := q.nc.PublishRequest(q.n.ctl, inbox, b); err != nil {
		return false, err
	}
	deadline := time.Now().Add(q.o.ControlWait)
	for {
		wait := time.Until(deadline)
		if wait <= 0 {
			return false, nil
		}
		m, err := sub.NextMsg(wait)
		if errors.Is(err, nats.ErrTimeout) {
			return false, nil
		}
		if err != nil {
			return false, err
		}
		var r ctlReply
		if json.Unmarshal(m.Data, &r) == nil && r.Leased {
			return true, nil
		}
	}
}

// lock takes the KV lock of id: ErrLeased when somebody holds it.
func (q *Queue) lock(ctx context.Context, id string) (rev uint64, val string, err error) {
	val = q.inst + "/" + nonce(4)
	err = retry(ctx, 5*time.Second, func(ctx context.Context) error {
		r, err := q.locks.Create(ctx, id, []byte(val))
		if errors.Is(err, jetstream.ErrKeyExists) {
			// Ours, from an attempt whose answer was lost?
			if e, gerr := q.locks.Get(ctx, id); gerr == nil && string(e.Value()) == val {
				rev = e.Revision()
				return nil
			}
			return err
		}
		rev = r
		return err
	})
	if errors.Is(err, jetstream.ErrKeyExists) {
		return 0, "", fmt.Errorf("%s: %w", id, queue.ErrLeased)
	}
	return rev, val, err
}

// unlock drops the KV lock of id (when still at rev) and, with tell,
// tells the other nodes.
func (q *Queue) unlock(id string, rev uint64, tell bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = retry(ctx, 2*time.Second, func(ctx context.Context) error {
		err := q.locks.Delete(ctx, id, jetstream.LastRevision(rev))
		if err != nil && !transient(err) {
			return nil // not ours any more, or gone: nothing to undo
		}
		return err
	})
	if tell {
		q.notify(ctlMsg{Op: "unlock", ID: id})
	}
}

// unlockEntry ends the lock a LeaseID entry holds.
func (q *Queue) unlockEntry(e *entry) {
	q.mu.Lock()
	rev := e.lockRev
	e.lockRev = 0
	q.mu.Unlock()
	if rev != 0 {
		q.unlock(e.id, rev, true)
	}
}

// refreshLock renews a LeaseID entry's lock and reminds the other nodes.
func (q *Queue) refreshLock(e *entry) {
	q.mu.Lock()
	rev, val := e.lockRev, e.lockVal
	q.mu.Unlock()
	if rev == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(q.ctx, 5*time.Second)
	defer cancel()
	if nrev, err := q.locks.Update(ctx, e.id, []byte(val), rev); err == nil {
		q.mu.Lock()
		if e.lockRev == rev {
			e.lockRev = nrev
		}
		q.mu.Unlock()
	}
	q.notify(ctlMsg{Op: "lock", ID: e.id})
}

// retryDomainLocal ends this node's hold of d and marks its leased
// messages of d due at their Update. It returns how many were leased.
func (q *Queue) retryDomainLocal(d string) int {
	q.mu.Lock()
	defer q.mu.Unlock()
	delete(q.holds, d)
	n := 0
	for _, e := range q.held {
		if e.leased && e.dom == d {
			e.retryNow = true
			n++
		}
	}
	return n
}
