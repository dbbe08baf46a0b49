// Package tlsrpt is the protocol of SMTP TLS Reporting (RFC 8460), with no
// state: the vocabulary, the DNS record, the report and its mail. What
// the relay counts, and how it sends, live in two packages beside it, cut
// as mox cuts tlsrpt / tlsrptdb / tlsrptsend:
//
//   - tlsrpt (this package): pure protocol, used by delivery, mtasts,
//     the checker and the two below.
//   - tlsrpt/tlsrptdb: the state of counting. The Recorder aggregates
//     the relay's sessions per period and policy domain and keeps them
//     on disk; in fleet mode it hands finished periods to a Sink, and
//     MergeCounts adds up the counts of several relays.
//   - tlsrpt/tlsrptsend: the state of sending. The Reporter turns each
//     finished period into one durable report job per policy domain,
//     then discovers, sends (https POST, or mail through an EnqueueFunc
//     the relay passes in) and retries, and prunes old jobs.
//
// Import rules: tlsrpt imports neither of them, nor the queue, delivery
// or any fleet package; tlsrptdb imports tlsrpt only; tlsrptsend imports
// tlsrpt and tlsrptdb, never the queue. Delivery needs only this package:
// it calls a TLSRecorder with a Session.
//
// This package holds:
//
//   - The vocabulary (result.go) and Classify (classify.go): the RFC 8460
//     policy and result types, and the one mapping from a STARTTLS reply
//     or TLS/certificate error to a result type and a short, stable
//     failure-reason-code. Delivery and mtasts use them, so the log line,
//     the metric and the report carry the same value.
//   - Session (session.go): the outcome of one SMTP session — one
//     connection / TLS negotiation attempt to one MX IP (§4.2), not per
//     message or recipient — and Bound, with the limits on every string
//     a peer can influence (host and HELO names, reason codes): at most
//     so long, printable ASCII.
//   - LookupRecord and ParseRecord (record.go): the _smtp._tls TXT
//     record (§3) and its rua URIs.
//   - BuildReport and Report (report.go): the aggregate JSON report (§4)
//     from PolicyCounts, its §5.1 filename and gzip form.
//   - ComposeMail (mail.go): the §5.3 multipart/report message, DKIM
//     signed with DKIMOptions; ContactMatchesSubmitter (contact.go).
//
// Periods: the interval is aligned to multiples of Unix time, which for the
// default 24h interval is exactly the UTC day 00:00:00Z–23:59:59Z (§4.1).
// The report's end-datetime is the last second of the period, as in the
// RFC's Appendix B example.
//
// Submitter: the report submitter ("sender" in the §5.1 filename,
// TLS-Report-Submitter and the Subject, §5.3) is the relay's hostname
// (tlsrptsend.Options.Hostname) — a domain, never the organization name
// (sys4/tlsrpt-reporter#56). RFC 8460 §5.3 says it MUST match the domain of
// contact-info, so operators should use a contact address in that domain;
// tlsrptsend.NewReporter logs a warning when they differ.
//
// Loop prevention (RFC 8460 §3, §5.3): reports sent by mail are handed to
// the relay's queue as TLS-RPT reports (queue.KindTLSRPT), with the header
// "TLS-Required: No" (RFC 8689 §3). Delivery must deliver them despite
// MTA-STS/DANE failures and must not record their sessions, otherwise
// reports about reports would loop forever (stalwart#1301,
// tlsrpt-reporter#50). That check lives in delivery, which knows the
// message kind; these packages do not.
//
// Choices where the RFC leaves room (made in tlsrptsend):
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
