// Package control is the control API of a running relay: the typed
// operations the CLI performs on the queue, the MTA-STS policy cache, the
// enforce forecast and the TLS-RPT counts (API), the Unix-socket protocol
// that carries them (one JSON Request, one JSON Reply per connection,
// socket data_dir/control.sock, mode 0600), its Client and Serve, and
// Service, which answers the operations from the relay's own objects —
// in the relay behind the socket, or in the CLI on the files of a stopped
// relay.
//
// It must not import cmd or internal/server; it knows the relay's
// objects only through the small interfaces and functions in Service.
package control
