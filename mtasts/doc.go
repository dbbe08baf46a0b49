// Package mtasts is the protocol half of SMTP MTA Strict Transport
// Security (RFC 8461), sending side: discovery of the "_mta-sts" TXT
// record (record.go, §3.1), the HTTPS policy fetch (fetch.go, §3.3), the
// policy parser (policy.go, §3.2), MX host matching and IDNA (match.go,
// idna.go, §4.1), the classification of discovery and fetch failures for
// TLS-RPT (failure.go, RFC 8461 §6), and the policy half of the domain
// checker (check.go).
//
// It owns no state: every function works from its arguments. The policy
// cache, its refresher, its disk store and the fleet's shared-cache seam
// live in mtasts/mtastsdb, which builds on this package; delivery asks
// that cache for the policy in force and checks each MX with
// Policy.Matches.
//
// This package must not import mtasts/mtastsdb or anything else that
// keeps state (queue, delivery, the fleet packages), nor NATS.
package mtasts
