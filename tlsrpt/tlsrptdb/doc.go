// Package tlsrptdb holds the counting state of TLS reporting (RFC 8460):
// what the relay's own SMTP sessions were, per report period and policy
// domain, until a report is made of them.
//
// It owns:
//
//   - Recorder (recorder.go): delivery calls Record once per SMTP session
//     (tlsrpt.Session). Record aggregates in memory under a mutex, with
//     no I/O and, for an existing aggregate, no allocation, and bounds
//     every peer-influenced string (tlsrpt.Bound).
//   - Its file (file.go): Run writes the aggregates to data_dir/tlsrpt/
//     counts.json about once a second, so a crash loses at most about a
//     second of counts; NewRecorder loads them back.
//   - The counts (counts.go): Pending, PendingPeriods and Collect give
//     tlsrpt.PolicyCounts, the report's input; ClosePeriod drops a
//     period once its reports are durable, and refuses late sessions
//     for it.
//   - Fleet mode (fleet.go): several relays, one report per policy domain
//     and period. Each Recorder hands its finished periods to a Sink
//     (HandOff); the reporter reads them merged from a Source
//     (MergeCounts adds them up). internal/fleet/rptfleet implements them
//     on NATS JetStream; this package imports no NATS.
//
// It must not import tlsrptsend, the queue, delivery or any fleet
// package: it imports tlsrpt (the vocabulary and the report format) and
// nothing else of the relay but internal/atomicfile.
package tlsrptdb
