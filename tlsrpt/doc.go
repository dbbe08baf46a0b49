// Package tlsrpt implements the sending side of SMTP TLS Reporting
// (RFC 8460): it counts the relay's own TLS sessions towards each policy
// domain, discovers where that domain wants reports (the _smtp._tls TXT
// record, §3), builds the aggregate JSON report (§4), and delivers it,
// gzip-compressed, by HTTPS POST or by mail through the relay's queue (§5).
//
// The package has these parts:
//
//   - The vocabulary (result.go) and Classify (classify.go): the RFC 8460
//     policy and result types, and the one mapping from a STARTTLS reply
//     or TLS/certificate error to a result type and a short, stable
//     failure-reason-code. Delivery and mtasts use them, so the log line,
//     the metric and the report carry the same value.
//   - Recorder (recorder.go) is what delivery calls once per SMTP session —
//     one connection / TLS negotiation attempt to one MX IP (§4.2), not per
//     message or recipient. Record aggregates in memory under a mutex;
//     Run writes the aggregates to disk about once a second, so a crash
//     loses at most about a second of counts. Record bounds every string
//     a peer can influence (host and HELO names, reason codes) in length
//     and to printable ASCII.
//   - LookupRecord (record.go) and BuildReport (report.go) are the pure
//     protocol parts.
//   - Reporter (reporter.go, mail.go) turns each finished period into one
//     durable report job per policy domain, then discovers, sends and
//     retries.
//   - Fleet mode (fleet.go): several relays, one report per policy domain
//     and period. Each Recorder hands its finished periods to a Sink
//     (Recorder.HandOff); the Reporter reads merged counts from a Source
//     (MergeCounts adds them up), keeps its jobs in a JobStore, and acts
//     only while Options.Active says so. internal/fleet/rptfleet
//     implements them on NATS JetStream; this package imports no NATS.
//
// Periods: the interval is aligned to multiples of Unix time, which for the
// default 24h interval is exactly the UTC day 00:00:00Z–23:59:59Z (§4.1).
// The report's end-datetime is the last second of the period, as in the
// RFC's Appendix B example.
//
// Submitter: the report submitter ("sender" in the §5.1 filename,
// TLS-Report-Submitter and the Subject, §5.3) is the relay's hostname
// (Options.Hostname) — a domain, never the organization name
// (sys4/tlsrpt-reporter#56). RFC 8460 §5.3 says it MUST match the domain of
// contact-info, so operators should use a contact address in that domain;
// NewReporter logs a warning when they differ.
//
// Loop prevention (RFC 8460 §3, §5.3): reports sent by mail are handed to
// the Enqueuer, which queues them as TLS-RPT reports (queue.KindTLSRPT),
// with the header "TLS-Required: No" (RFC 8689 §3).
// Delivery must deliver them despite MTA-STS/DANE failures and must not call
// Recorder.Record for their sessions, otherwise reports about reports would
// loop forever (stalwart#1301, tlsrpt-reporter#50). That check lives in
// delivery, which knows the message kind; this package does not.
//
// Choices where the RFC leaves room:
//   - HTTPS report endpoints are verified against the Web PKI (RFC 8460 §3
//     allows ignoring certificate errors; we don't, so that a report is not
//     handed to an impostor). Redirects are not followed: a 3xx is a failed
//     attempt.
//   - A report is sent to every supported rua (mailto and https), at most
//     MaxRUA (5) distinct ones per record, each retried on its own with
//     exponential backoff for Options.RetryFor (default 24h after the
//     first attempt, §5.5), then dropped.
//   - https: endpoints on loopback, private, link-local and other
//     non-public addresses are refused (checked on the address connected
//     to) unless Options.AllowPrivateRUA: the rua is chosen by whoever
//     controls the domain's DNS.
//   - Report job files are named with domain.FileName, so any domain,
//     however long, has one; a domain whose job cannot be written is
//     retried and then given up without holding up the others.
//   - Delivery to one rua is at-least-once: its "sent" state is written
//     right after the 2xx or the queue's acceptance; a crash in between may
//     repeat it with the same report-id, which §5.3 lets receivers use to
//     drop duplicates.
//   - Mail reports are DKIM-signed when DKIM is configured (§3 requires it;
//     without a key they are sent unsigned and NewReporter warns, since
//     receivers may ignore them).
package tlsrpt
