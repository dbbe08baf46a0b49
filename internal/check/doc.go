// Package check checks a domain's MTA-STS, DANE and TLS-RPT setup as a
// sending relay sees it (`stsrelay check`): it composes mtasts.CheckPolicy,
// delivery.Probe of each MX address, the DANE assessment of each MX and
// tlsrpt.LookupRecord into one Report with problems (the check fails) and
// advice. Printing the report is the command's business.
//
// It reads DNS and connects out, and never touches a relay's data_dir; it
// must not import internal/server, internal/control or cmd.
package check
