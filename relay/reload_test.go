package relay

import (
	"crypto/tls"
	"net/netip"
	"slices"
	"testing"

	"github.com/emersion/go-sasl"
	"golang.org/x/crypto/bcrypt"

	"github.com/stsrelay/stsrelay/internal/config"
)

var reloadBody = []byte("Subject: reload\r\n\r\nbody\r\n")

// reloaded returns a copy of the environment's configuration for Reload.
func (e *testEnv) reloaded(edit func(*config.Config)) *config.Config {
	c := *e.cfg
	c.Submission.Users = slices.Clone(c.Submission.Users)
	edit(&c)
	return &c
}

// A reload lets a new user log in, while a session that logged in before
// it goes on sending.
func TestReloadUsersOldSessionContinues(t *testing.T) {
	e := newEnv(t, envOpts{})
	old := e.starttlsClient()
	if err := old.Auth(sasl.NewPlainClient("", testUser, testPassword)); err != nil {
		t.Fatal(err)
	}
	h, err := bcrypt.GenerateFromPassword([]byte("new-secret"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	restart, err := e.srv.Reload(e.reloaded(func(c *config.Config) {
		c.Submission.Users = []config.User{{Username: "newuser", PasswordHash: string(h)}}
	}))
	if err != nil || len(restart) != 0 {
		t.Fatalf("Reload = %v, %v", restart, err)
	}
	if _, err := send(old, "a@example.net", nil, []string{"b@example.org"}, reloadBody); err != nil {
		t.Errorf("session logged in before the reload: %v", err)
	}
	c := e.starttlsClient()
	if err := c.Auth(sasl.NewPlainClient("", "newuser", "new-secret")); err != nil {
		t.Errorf("new user after reload: %v", err)
	}
	c2 := e.starttlsClient()
	if err := c2.Auth(sasl.NewPlainClient("", testUser, testPassword)); err == nil {
		t.Errorf("removed user still logs in after reload")
	}
}

// A configuration that cannot be loaded changes nothing.
func TestReloadBadConfigKeepsOld(t *testing.T) {
	e := newEnv(t, envOpts{})
	_, err := e.srv.Reload(e.reloaded(func(c *config.Config) {
		c.Submission.Users = []config.User{{Username: "x", PasswordHash: "not-bcrypt"}}
	}))
	if err == nil {
		t.Fatal("Reload accepted a bad password_hash")
	}
	_, err = e.srv.Reload(e.reloaded(func(c *config.Config) {
		c.Submission.TLSKeyFile = c.Submission.TLSKeyFile + ".missing"
	}))
	if err == nil {
		t.Fatal("Reload accepted a missing key file")
	}
	c := e.starttlsClient()
	if err := c.Auth(sasl.NewPlainClient("", testUser, testPassword)); err != nil {
		t.Errorf("old user after refused reloads: %v", err)
	}
}

// trusted_networks is reloaded: a client that had to log in may relay
// without AUTH afterwards, and the other way round.
func TestReloadTrustedNetworks(t *testing.T) {
	e := newEnv(t, envOpts{})
	if _, err := send(e.client(), "a@example.net", nil, []string{"b@example.org"}, reloadBody); err == nil {
		t.Fatal("untrusted client relayed without AUTH")
	}
	if _, err := e.srv.Reload(e.reloaded(trustLoopback)); err != nil {
		t.Fatal(err)
	}
	if _, err := send(e.client(), "a@example.net", nil, []string{"b@example.org"}, reloadBody); err != nil {
		t.Errorf("trusted client after reload: %v", err)
	}
	if _, err := e.srv.Reload(e.reloaded(func(c *config.Config) { c.Submission.TrustedPrefixes = []netip.Prefix{} })); err != nil {
		t.Fatal(err)
	}
	if _, err := send(e.client(), "a@example.net", nil, []string{"b@example.org"}, reloadBody); err == nil {
		t.Error("client relayed without AUTH after its network was removed")
	}
}

// The certificate files are read again: the next handshake, STARTTLS or
// implicit TLS, presents the new certificate.
func TestReloadCertificate(t *testing.T) {
	e := newEnv(t, envOpts{})
	certFile, keyFile, clientTLS := writeCert(t)
	restart, err := e.srv.Reload(e.reloaded(func(c *config.Config) {
		c.Submission.TLSCertFile, c.Submission.TLSKeyFile = certFile, keyFile
	}))
	if err != nil || len(restart) != 0 {
		t.Fatalf("Reload = %v, %v", restart, err)
	}
	// Each test certificate is self-signed with a fresh key: only the new
	// one verifies against the new root, only the old one against the old.
	conn, err := tls.Dial("tcp", e.tlsAddr, clientTLS)
	if err != nil {
		t.Fatalf("implicit TLS, new certificate: %v", err)
	}
	conn.Close()
	if conn, err := tls.Dial("tcp", e.tlsAddr, e.clientTLS); err == nil {
		conn.Close()
		t.Error("old certificate still served after reload")
	}
}

// Keys fixed at start are named, and the certificate cannot be removed
// by a reload (STARTTLS is offered or not from the start).
func TestReloadNamesRestartKeys(t *testing.T) {
	e := newEnv(t, envOpts{})
	restart, err := e.srv.Reload(e.reloaded(func(c *config.Config) {
		c.Submission.Listen = []string{"127.0.0.1:1"}
		c.Submission.MaxRecipients++
		c.Submission.TLSCertFile, c.Submission.TLSKeyFile = "", ""
	}))
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"submission.tls_cert_file", "submission.listen", "submission.max_recipients"}
	if !slices.Equal(restart, want) {
		t.Errorf("restart = %q, want %q", restart, want)
	}
	c := e.starttlsClient() // the old certificate is kept
	if err := c.Auth(sasl.NewPlainClient("", testUser, testPassword)); err != nil {
		t.Error(err)
	}
}
