// Package server runs the relay: Run opens the queue (on disk, or the
// fleet's in NATS JetStream), builds the policy cache, TLS-RPT, the
// enforce forecast, the delivery engine, the submission server, the
// control socket and the metrics listener from the configuration, starts
// them in order, applies reloads, and stops them in the reverse order
// when its context ends. It also builds those parts for the CLI commands
// that act on a stopped relay's files (QueueOptions, NewPolicyCache,
// TLSRPTDir, ForecastDir) or check a domain (TrustRoots, NewResolver,
// PolicyFetcher).
//
// Signals, flags and printing are cmd's; server must not import cmd.
package server
