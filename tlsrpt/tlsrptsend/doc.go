// Package tlsrptsend sends TLS reports (RFC 8460 §5): it turns each
// finished period of a tlsrptdb.Recorder (or of a fleet's Source) into
// one durable report job per policy domain, discovers where the domain
// wants reports, delivers them and retries.
//
// It owns:
//
//   - Reporter and Options (reporter.go): the send loop (Run, SendDue)
//     and the DKIM key (SetDKIM, on reload).
//   - The job model and its files (jobs.go): one JSON file per policy
//     domain and period under data_dir/tlsrpt/reports, or a JobStore in
//     fleet mode, where Options.Active says which relay sends.
//   - Making jobs (periods.go): from the Recorder's finished periods, or
//     from a Source, before their counts are dropped.
//   - Sending (send.go): record discovery, one attempt per due rua,
//     backoff, and the job's outcome.
//   - The transports: https POST with address checks and Web PKI
//     verification (https.go), and mailto through an EnqueueFunc
//     (mailto.go), which the relay sets to its queue's EnqueueReport.
//   - Pruning finished jobs (prune.go).
//
// It imports tlsrpt (protocol, report and mail format) and tlsrptdb (the
// counts). It must not import the queue, delivery or any fleet package:
// mail goes out through Options.Enqueue, shared state through the
// tlsrptdb.Source and JobStore seams (internal/fleet/rptfleet implements
// them).
package tlsrptsend
