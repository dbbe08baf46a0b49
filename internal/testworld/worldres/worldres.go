// Package worldres builds the relay's DNS resolver pointed at a testworld
// World: the one way tests make it. It lives apart from testworld because
// internal/dnsclient's own tests import testworld, and testworld must not
// import dnsclient. For tests only.
package worldres

import (
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/dnsclient"
	"github.com/stsrelay/stsrelay/internal/testworld"
)

// Timeout is the per-query timeout of the resolvers New makes.
const Timeout = 2 * time.Second

// New returns a resolver that asks w's DNS server only; it fails the test
// on error.
func New(t testing.TB, w *testworld.World) *dnsclient.Resolver {
	t.Helper()
	r, err := dnsclient.New([]string{w.DNS.Addr()}, Timeout)
	if err != nil {
		t.Fatal(err)
	}
	return r
}
