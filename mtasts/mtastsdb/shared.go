package mtastsdb

import (
	"context"
	"time"

	"github.com/stsrelay/stsrelay/mtasts"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// Shared is the policy cache state a fleet of relays shares (fleet mode:
// internal/fleet/kvcache implements it on a JetStream key-value bucket).
// With Options.Shared set, the shared store is the cache's store of
// record: Options.Dir is not used, and the Cache's in-memory map is a
// read-through copy that Watch keeps current, so a cached lookup never
// leaves the process. One HTTPS fetch per domain and TXT id serves the
// whole fleet: a node that finds neither the policy nor a back-off for
// the id takes the domain's fetch lock; the others Wait for its result,
// and fetch themselves only when the lock goes away without one (its
// holder died) and they win the lock in turn.
//
// This package only uses the interface: it holds no protocol code.
type Shared interface {
	// Load returns the shared entry of domain and its revision, or nil
	// when there is none.
	Load(ctx context.Context, domain string) (e *SharedEntry, rev uint64, err error)
	// Update changes the shared entry of domain atomically: fn gets the
	// current entry (nil when there is none) and returns the next one
	// and whether to write it; writing nil deletes the entry. fn may run
	// again when another writer got in first, so it must not have side
	// effects.
	Update(ctx context.Context, domain string, fn func(cur *SharedEntry) (next *SharedEntry, write bool)) error
	// Lock takes the fetch lock of domain (for TXT id) when no one holds
	// it. The lock goes away by itself after ttl if it is not released,
	// so that a dead holder does not block the fleet. unlock releases it
	// (only if it is still this holder's).
	Lock(ctx context.Context, domain, id string, ttl time.Duration) (unlock func(), acquired bool, err error)
	// Wait returns when nobody holds the fetch lock of domain (at once
	// when nobody does), or with ctx's error.
	Wait(ctx context.Context, domain string) error
	// Watch calls fn with every shared entry (rev is its revision),
	// returns once it has seen them all (or with ctx's error), and then
	// goes on calling fn, in order, for every change until the store
	// is closed. A nil e means the entry of domain was removed. The
	// calls are never concurrent.
	Watch(ctx context.Context, fn func(domain string, e *SharedEntry, rev uint64)) error
}

// SharedEntry is one domain's shared state: the cached policy (what the
// file of a standalone cache holds) and the negative back-off. Its JSON
// form is what the shared store keeps.
type SharedEntry struct {
	Domain string `json:"domain"`
	// ID is the TXT id of Policy.
	ID string `json:"id,omitempty"`
	// Policy is the policy body as fetched; empty when no policy is
	// cached (an entry holding only a back-off).
	Policy      string    `json:"policy,omitempty"`
	Fetched     time.Time `json:"fetched,omitzero"`
	LastUsed    time.Time `json:"last_used,omitzero"`
	LastError   string    `json:"last_error,omitempty"`
	LastErrorAt time.Time `json:"last_error_at,omitzero"`
	// Failure is the back-off after a failed fetch: no node fetches the
	// policy for Failure.ID before Failure.Until (RFC 8461 §3.3).
	Failure *SharedFailure `json:"failure,omitempty"`
}

// SharedFailure is a failed fetch for a TXT id, shared as back-off.
type SharedFailure struct {
	ID         string    `json:"id"`
	Until      time.Time `json:"until"`
	ResultType string    `json:"result_type"`
	Reason     string    `json:"reason"`
	Error      string    `json:"error"`
}

// sharedError is a fetch error learnt from another node: its text, and
// the sentinel of its result type for errors.Is.
type sharedError struct {
	msg  string
	kind error
}

func (e *sharedError) Error() string { return e.msg }
func (e *sharedError) Unwrap() error { return e.kind }

func (f *SharedFailure) fetchError() *mtasts.Failure {
	rt := tlsrpt.ResultType(f.ResultType)
	kind := mtasts.ErrPolicyFetch
	switch rt {
	case tlsrpt.ResultSTSWebPKIInvalid:
		kind = mtasts.ErrWebPKI
	case tlsrpt.ResultSTSPolicyInvalid:
		kind = mtasts.ErrPolicySyntax
	}
	return &mtasts.Failure{ResultType: rt, Reason: f.Reason, Err: &sharedError{msg: f.Error, kind: kind}}
}
