// Package jsqueue is stsrelay's queue for fleet mode: one queue shared by
// several relays, replicated by NATS JetStream, behind queue.Queue so
// that submission, delivery, the CLI and the metrics work unchanged.
//
// # Layout
//
// With Prefix "stsrelay" (names derive from it):
//
//   - Stream STSRELAY_QUEUE, subjects "stsrelay.q.>", one subject per
//     queued message, "stsrelay.q.<queueID>", file storage, Replicas
//     replicas, limits retention with MaxMsgsPerSubject = 1: the stream
//     holds exactly the newest version of each queued message. A new
//     state replaces the old by a re-publish; a message leaves when its
//     last version is deleted.
//   - A stream message is the message's metadata (JSON: envelope,
//     received time, recipients' states, delay-notified, not-before,
//     version, body location) followed by the body when it is small.
//     Headers repeat what listing needs (recipient domains, received,
//     not-before, size), so Select and Summary read headers only.
//   - Object store STSRELAY_BODIES holds bodies larger than
//     InlineBodyBytes, or too large for the server's max_payload
//     (nc.MaxPayload(); never assumed to be 1 MB), under
//     "<queueID>-<nonce>"; the object goes when the message does.
//   - Durable pull consumer "stsrelay-workers" (explicit ack, AckWait,
//     unlimited deliveries and ack-pending) shared by every node.
//   - KV bucket STSRELAY_LOCKS: short-lived operator locks, key = queue
//     ID (LeaseID, Retry), value = the holder, TTL = AckWait.
//   - Core subject "stsrelay.ctl": notices between the nodes' queues
//     (a lock taken or released, a destination retried).
//
// # Guarantees
//
// Commit returns, and the relay answers 250, only after JetStream's
// publish ack: the message (and first its body object) is stored on a
// quorum of the replicas. A message acknowledged so is never lost while
// a quorum of the NATS servers keeps its store: not when a relay node
// dies, not when one NATS node of three dies. Publishes are retried
// through leader elections with the same Nats-Msg-Id, so a retry whose
// first attempt did land is deduplicated, not stored twice. A commit
// that gets no answer at all (no quorum until OpTimeout) fails, and the
// client is not told 250; as its entry may still be committed once a
// quorum is back, the node takes that message out again as soon as NATS
// answers (for up to ten minutes), so that the client's retry is not
// delivered twice.
//
// Every node pulls from the shared consumer. A fetched message whose
// not-before is still ahead is NakWithDelay'd (capped at an hour and
// checked again on redelivery: the not-before stored in the message is
// the truth, so delays survive restarts of relays and servers alike). A
// due message waits in a bounded local prefetch until the delivery
// engine leases it. Held and leased messages get InProgress heartbeats
// every AckWait/3. When a relay dies, its messages come back to the
// other nodes AckWait later. Only messages in flight at that moment
// (held or leased by the dead node) may be delivered twice; a message
// no node held is never duplicated.
//
// Updates are compare-and-set: a new version is published with the
// expected last sequence of its subject set to the version leased, and a
// finished message is deleted by that exact sequence. If an operator
// deleted or retried the message meanwhile, or another node took it over
// after a lapsed lease, the update fails with an error wrapping
// queue.ErrNotFound and nothing is resurrected. The dedup ID of each
// publish is "<queueID>:<version>:<nonce>": the nonce is fixed for one
// logical publish and all its retries, so deduplication only ever merges
// a publish with its own retries; two writers racing for the same version
// are told apart by the sequence check instead of one of them being
// silently dropped as a duplicate.
//
// # Local, not fleet-wide
//
// HoldDomain is a local decision with a fleet-wide effect: this node
// NakWithDelay's the destination's messages it holds or fetches until
// the hold ends (NakWithDelay is the consumer's, so no node gets them
// before then: a destination found dead waits as one, at most the
// engine's first retry interval). Other nodes' holds are their own.
// Leased reports this node's leases. Requeue (an Update failed: NATS
// unreachable) keeps the message leased here with its new recipient
// states, renews the lease, and retries the update in the background
// with the same dedup ID until it lands or the message turns out to be
// gone; if this node dies first, the message is redelivered with its
// previous states (it was in flight). A message held ready here that the
// engine does not lease within AckWait (a busy node) goes back to the
// consumer for another node.
//
// Operator tools are fleet-wide: Get, Select, List, Summary, Oldest and
// Len read the stream (Select, Summary and Oldest with a headers-only
// scan, so memory stays bounded; a message re-published while a scan
// runs may be missed by it, as in any live listing; Oldest is cached for
// ten seconds). Retry, RetryDomain and Delete change the stream. Retry
// takes the message's KV lock and publishes a version due now
// (compare-and-set); a message already due is left alone, and one leased
// on this node becomes due at its Update, as with queue.Store. Delete
// purges the subject and the body object; a delivery in flight finishes
// but its Update is refused. LeaseID (operator bounce) takes the KV
// lock, tells the other nodes (which stop handing the message out and
// answer, within ControlWait, whether a delivery of it is in flight:
// then ErrLeased), and reads the current version; the lock is renewed
// until Update or Release, and that Update is compare-and-set like any
// other. SweepBodies removes body objects no message refers to.
package jsqueue
