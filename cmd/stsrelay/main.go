// Command stsrelay is an outbound SMTP relay that enforces MTA-STS
// (RFC 8461) and sends TLS-RPT reports (RFC 8460). See interface.md for
// the commands, keys and log lines.
package main

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"runtime/debug"
)

// Exit codes (interface.md): 0 success, 1 a checked condition failed, 2
// usage, configuration or internal error.
const (
	exitOK      = 0
	exitFailed  = 1
	exitProblem = 2
)

// version is set at build time with -ldflags "-X main.version=…".
var version = "dev"

// usageError is a command-line mistake (exit 2 with usage).
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

// exitError carries an exit status without an extra message.
type exitError struct{ code int }

func (e *exitError) Error() string { return fmt.Sprintf("exit %d", e.code) }

const usage = `usage: stsrelay <command> [flags]

commands:
  serve -config FILE                         run the relay
  check [-config FILE] [-json] DOMAIN        check a domain's MTA-STS and TLS-RPT setup
  queue list [-limit N] [-domain D]|summary|show ID|retry ID|retry -domain D|delete ID|bounce ID [-config FILE] [-json]
  policy list|show DOMAIN|refresh DOMAIN|forget DOMAIN [-config FILE] [-json]
  policy forecast [DOMAIN] [-config FILE] [-json]   would enforce refuse anything? (testing-mode domains)
  config check -config FILE                  validate a configuration without starting
  demo [-json] [-keep DIR]                   MTA-STS and TLS-RPT at work on loopback, in one command
  tlsrpt pending [-config FILE] [-json]
  hash-password                              read a password on stdin, print a bcrypt hash
  version                                    print version information
`

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return exitProblem
	}
	var err error
	switch args[0] {
	case "serve":
		err = cmdServe(args[1:])
	case "demo":
		err = cmdDemo(args[1:])
	case "config":
		err = cmdConfig(args[1:])
	case "check":
		err = cmdCheck(args[1:])
	case "queue":
		err = cmdQueue(args[1:])
	case "policy":
		err = cmdPolicy(args[1:])
	case "tlsrpt":
		err = cmdTLSRPT(args[1:])
	case "hash-password":
		err = cmdHashPassword(args[1:])
	case "version", "-version", "--version":
		err = cmdVersion()
	case "help", "-h", "--help", "-help":
		fmt.Print(usage)
		return exitOK
	default:
		err = &usageError{fmt.Sprintf("unknown command %q", args[0])}
	}
	if err == nil {
		return exitOK
	}
	var ue *usageError
	var ee *exitError
	switch {
	case errors.As(err, &ee):
		return ee.code
	case errors.As(err, &ue):
		fmt.Fprintf(os.Stderr, "stsrelay: %s\n%s", ue.msg, usage)
		return exitProblem
	default:
		fmt.Fprintf(os.Stderr, "stsrelay: %v\n", err)
		return exitProblem
	}
}

func cmdVersion() error {
	commit := "unknown"
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				commit = s.Value
			}
		}
	}
	fmt.Printf("stsrelay %s (commit %s, %s %s/%s)\n", version, commit, runtime.Version(), runtime.GOOS, runtime.GOARCH)
	return nil
}
