// Package mtastsdb is the state half of MTA-STS (RFC 8461) on the sending
// side: the policy cache that delivery asks for the policy in force for a
// recipient domain (RFC 8461 §3.3, §5.1), built on the protocol code of
// package mtasts. It owns:
//
//   - cache.go: Cache, New and Options; Get and Recheck (the TXT grace
//     window, one TXT lookup and one fetch per domain and id for
//     concurrent callers, the failure back-off), Forget;
//   - refresh.go: Refresh and the background refresher Run (§3.3, §10.2);
//   - store.go: one JSON file per domain in data_dir/mtasts (standalone);
//   - shared.go and fleet.go: the Shared seam for fleet mode, where the
//     shared store replaces the directory, and the Cache's use of it
//     (one fetch per domain and id for the whole fleet);
//   - view.go: Entry, the view of a cached policy for the CLI and the
//     control socket.
//
// Package mtasts keeps the protocol (record, policy, matching, fetch,
// IDNA) and must not import this package. This package must not import
// NATS nor any fleet package: the fleet's key-value bucket lives in
// internal/fleet/kvcache, which implements Shared; neither does it know
// queues or SMTP sessions.
package mtastsdb
