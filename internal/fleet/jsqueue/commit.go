package jsqueue

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/stsrelay/stsrelay/internal/message"
	"github.com/stsrelay/stsrelay/queue"
)

// writer receives one message body: in memory up to InlineBodyBytes,
// then in a spool file.
type writer struct {
	q     *Queue
	buf   []byte
	spill *os.File
	size  int64
	err   error
	done  bool
	scan  *message.Scanner
}

// NewWriter starts a message.
func (q *Queue) NewWriter() queue.MessageWriter {
	return &writer{q: q, scan: message.NewScanner()}
}

// Write appends body bytes.
func (w *writer) Write(p []byte) (int, error) {
	if w.err != nil {
		return 0, w.err
	}
	w.size += int64(len(p))
	w.scan.Write(p)
	if w.spill == nil && len(w.buf)+len(p) <= w.q.o.InlineBodyBytes {
		w.buf = append(w.buf, p...)
		return len(p), nil
	}
	if w.spill == nil {
		f, err := w.q.TempFile()
		if err != nil {
			w.err = err
			return 0, err
		}
		w.spill = f
		if _, err := f.Write(w.buf); err != nil {
			w.err = fmt.Errorf("jsqueue spool: %w", err)
			return 0, w.err
		}
		w.buf = nil
	}
	if _, err := w.spill.Write(p); err != nil {
		w.err = fmt.Errorf("jsqueue spool: %w", err)
		return 0, w.err
	}
	return len(p), nil
}

// Size returns the number of body bytes written so far.
func (w *writer) Size() int64 { return w.size }

// Abort drops the message.
func (w *writer) Abort() {
	if w.done {
		return
	}
	w.done = true
	if w.spill != nil {
		w.spill.Close()
	}
	w.buf = nil
}

// Commit stores the message on a quorum of the stream's replicas (its
// body first, in the object store, when large) and returns its queue ID.
// As with queue.Store, the envelope's NeedsSMTPUTF8 and EightBit are
// decided here from the bytes written.
func (w *writer) Commit(env queue.Envelope) (string, error) {
	defer w.Abort()
	if w.done {
		return "", errors.New("jsqueue: writer already used")
	}
	if w.err != nil {
		return "", w.err
	}
	if len(env.Rcpts) == 0 {
		return "", errors.New("jsqueue: message without recipients")
	}
	env.SetContent(w.scan.Content())
	if err := w.q.CheckSpace(w.size); err != nil {
		return "", err
	}
	return w.q.commit(env, w.buf, w.spill, w.size)
}

func (q *Queue) commit(env queue.Envelope, buf []byte, spill *os.File, size int64) (string, error) {
	q.mu.Lock()
	closed := q.closed
	q.mu.Unlock()
	if closed {
		return "", queue.ErrClosed
	}
	ctx, cancel := q.opCtx()
	defer cancel()
	now := q.o.Now()
	rec := &record{Version: 1, Received: now, Env: env, Size: size, NotBefore: now, Node: q.o.NodeName}
	rec.Rcpts = make([]queue.Recipient, len(env.Rcpts))
	for i, rs := range env.Rcpts {
		rec.Rcpts[i] = queue.Recipient{RcptSpec: rs, Status: queue.Pending, NextAttempt: now}
	}
	inline := spill == nil && size <= int64(q.o.InlineBodyBytes)
	body := buf
	for attempt := 0; ; attempt++ {
		rec.ID = q.ids.Next(now)
		subj := q.subject(rec.ID)
		msgID := rec.ID + ":1:" + nonce(4)
		m, err := rec.encode(subj, msgID, body)
		if err != nil {
			return "", err
		}
		if inline && headerBytes(m.Header)+len(m.Data) > q.maxStreamMsg() {
			// Not under the server's max_payload with its metadata:
			// the body goes to the object store after all.
			inline = false
		}
		if !inline && rec.Body == "" {
			name := rec.ID + "-" + nonce(4)
			if err := q.putBody(ctx, name, buf, spill, size); err != nil {
				return "", mapErr(err)
			}
			rec.Body = name
			body = nil
			if m, err = rec.encode(subj, msgID, nil); err != nil {
				q.dropBody(name)
				return "", err
			}
		}
		if headerBytes(m.Header)+len(m.Data) > q.maxStreamMsg() {
			q.dropBody(rec.Body)
			return "", fmt.Errorf("jsqueue: envelope of %d bytes too large for the server's max_payload (%d)", len(m.Data), q.nc.MaxPayload())
		}
		_, err = q.publish(ctx, &pending{msg: m})
		if errors.Is(err, errConflict) && attempt < 5 {
			// Another node made the same ID in the same millisecond:
			// its message stands; this one takes a new ID (and its
			// body a name that goes with it).
			if rec.Body != "" {
				q.dropBody(rec.Body)
				rec.Body = ""
				body = buf
			}
			continue
		}
		if err != nil {
			if _, _, _, refused := apiCode(err); !refused {
				// No answer: the message may still be stored, now or
				// when a quorum is back. The client got no 250 and
				// will send it again: take this copy out once NATS
				// answers, so that it is not delivered twice.
				q.undoLater(rec.ID, rec.Body)
			} else {
				q.dropBody(rec.Body)
			}
			return "", fmt.Errorf("jsqueue: commit: %w", err)
		}
		return rec.ID, nil
	}
}

// putBody stores a body in the object store under name.
func (q *Queue) putBody(ctx context.Context, name string, buf []byte, spill *os.File, size int64) error {
	chunk := uint32(min(128<<10, max(1024, q.maxStreamMsg()-1024)))
	return retry(ctx, q.o.OpTimeout, func(ctx context.Context) error {
		var r io.Reader = bytes.NewReader(buf)
		if spill != nil {
			r = io.NewSectionReader(spill, 0, size)
		}
		info, err := q.bodies.Put(ctx, jetstream.ObjectMeta{Name: name, Opts: &jetstream.ObjectMetaOptions{ChunkSize: chunk}}, r)
		if err != nil {
			return err
		}
		if int64(info.Size) != size {
			return fmt.Errorf("jsqueue: body object %s holds %d bytes, want %d", name, info.Size, size)
		}
		return nil
	})
}

// undo is a commit that failed without an answer.
type undo struct {
	id, body string
	until    time.Time
	// purged is when a purge first went through. The entry may be
	// committed a little after that (as a quorum forms), so purging
	// goes on for undoSettle.
	purged time.Time
}

// undoTTL: a failed commit is taken out for this long at most. Past it,
// the message (if it was stored after all) is delivered like any other.
const undoTTL = 10 * time.Minute

// undoSettle is how long purges of a failed commit go on after the
// first that went through.
const undoSettle = time.Minute

func (q *Queue) undoLater(id, body string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.undos = append(q.undos, undo{id: id, body: body, until: time.Now().Add(undoTTL)})
}

// runUndos purges the subjects (and bodies) of failed commits. Those not
// reached stay for the next round (and keep this node's fetcher off
// them).
func (q *Queue) runUndos() {
	q.mu.Lock()
	list := append([]undo(nil), q.undos...)
	q.mu.Unlock()
	now := time.Now()
	purged := map[string]time.Time{}
	for _, u := range list {
		if now.After(u.until) || !u.purged.IsZero() && now.Sub(u.purged) > undoSettle {
			purged[u.id] = time.Time{} // done
			continue
		}
		ctx, cancel := context.WithTimeout(q.ctx, 2*time.Second)
		err := q.stream.Purge(ctx, jetstream.WithPurgeSubject(q.subject(u.id)))
		if err == nil {
			err = q.deleteBody(ctx, u.body)
		}
		cancel()
		if err != nil {
			break // NATS still away: the rest next round
		}
		if u.purged.IsZero() {
			u.purged = now
		}
		purged[u.id] = u.purged
	}
	q.mu.Lock()
	keep := q.undos[:0]
	for _, u := range q.undos {
		if t, ok := purged[u.id]; ok {
			if t.IsZero() {
				continue
			}
			u.purged = t
		}
		keep = append(keep, u)
	}
	clear(q.undos[len(keep):])
	q.undos = keep
	q.mu.Unlock()
}

// dropBody deletes a body object whose message was never committed.
func (q *Queue) dropBody(name string) {
	if name == "" {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = q.deleteBody(ctx, name)
}

// Enqueue queues a message the relay makes itself (a DSN, a TLS report).
func (q *Queue) Enqueue(env queue.Envelope, body io.Reader) (string, error) {
	w := q.NewWriter()
	if _, err := io.Copy(w, body); err != nil {
		w.Abort()
		return "", err
	}
	return w.Commit(env)
}

// EnqueueReport queues a TLS-RPT report mail (RFC 8460 §3).
func (q *Queue) EnqueueReport(from, to string, msg io.Reader) (string, error) {
	return q.Enqueue(queue.Envelope{From: from, Kind: queue.KindTLSRPT, Rcpts: []queue.RcptSpec{{Addr: to}}}, msg)
}

// CheckSpace says whether a new message of about size bytes may be
// queued: nil, or an error wrapping queue.ErrFull when the stream's
// limits (max_bytes, max_msgs, set by an operator on the stream) would
// be passed. The stream has no limits by default; JetStream's account
// and server limits surface as ErrFull from Commit itself.
func (q *Queue) CheckSpace(size int64) error {
	q.infoMu.Lock()
	defer q.infoMu.Unlock()
	if q.info == nil || time.Since(q.infoAt) > 5*time.Second {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		info, err := q.stream.Info(ctx)
		cancel()
		q.infoAt = time.Now()
		if err != nil {
			// Let the commit itself say what is wrong.
			return nil
		}
		q.info = info
	}
	cfg, st := q.info.Config, q.info.State
	if cfg.MaxBytes > 0 && int64(st.Bytes)+size > cfg.MaxBytes {
		return fmt.Errorf("%w: the queue stream holds %d bytes, its max_bytes is %d", queue.ErrFull, st.Bytes, cfg.MaxBytes)
	}
	if cfg.MaxMsgs > 0 && int64(st.Msgs) >= cfg.MaxMsgs {
		return fmt.Errorf("%w: the queue stream holds %d messages, its max_msgs is %d", queue.ErrFull, st.Msgs, cfg.MaxMsgs)
	}
	return nil
}
