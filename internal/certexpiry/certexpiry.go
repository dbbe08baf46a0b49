// Package certexpiry is the module's one certificate-expiry rule: how many
// days a certificate has left, and how few make a warning. The checker
// (MTA-STS policy host and MX probes) uses both. It is a leaf: it imports
// nothing of the module.
package certexpiry

import (
	"math"
	"time"
)

// WarnDays: a certificate with fewer days left than this gets a warning
// (three weeks, enough for an ACME renewal that failed once to be noticed
// and fixed).
const WarnDays = 21

// DaysLeft is the number of whole days from now until notAfter, rounded
// down: 0 on the last day, -1 on the first day after expiry.
func DaysLeft(notAfter, now time.Time) int {
	return int(math.Floor(notAfter.Sub(now).Hours() / 24))
}

// Soon reports whether days (from DaysLeft) is under WarnDays.
func Soon(days int) bool { return days < WarnDays }
