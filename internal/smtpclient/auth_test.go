package smtpclient

import (
	"crypto/tls"
	"errors"
	"io"
	"log"
	"net"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
)

// authBackend is a go-smtp server that offers AUTH PLAIN (go-smtp offers
// it only over TLS) and accepts one user.
type authBackend struct {
	user, pass string
	sink       sink
}

func (b *authBackend) NewSession(*smtp.Conn) (smtp.Session, error) {
	return &authSession{sinkSession: sinkSession{b: &b.sink}, b: b}, nil
}

type authSession struct {
	sinkSession
	b    *authBackend
	user string
}

func (s *authSession) AuthMechanisms() []string { return []string{sasl.Plain} }

func (s *authSession) Auth(string) (sasl.Server, error) {
	return sasl.NewPlainServer(func(identity, user, pass string) error {
		if user != s.b.user || pass != s.b.pass {
			return &smtp.SMTPError{Code: 535, EnhancedCode: smtp.EnhancedCode{5, 7, 8}, Message: "bad credentials"}
		}
		s.user = user
		return nil
	}), nil
}

func (s *authSession) Mail(from string, o *smtp.MailOptions) error {
	if s.user == "" {
		return &smtp.SMTPError{Code: 530, EnhancedCode: smtp.EnhancedCode{5, 7, 0}, Message: "authenticate first"}
	}
	return s.sinkSession.Mail(from, o)
}

// RFC 4954: AUTH PLAIN with an initial response, only over TLS; a wrong
// password is a 535 ReplyError at the auth stage, the session stays
// usable; the right one lets MAIL through.
func TestAuthPlain(t *testing.T) {
	t.Parallel()
	cert, pool := selfSigned(t, "mx.test")
	be := &authBackend{user: "relay", pass: "s3cret"}
	srv := smtp.NewServer(be)
	srv.Domain = "mx.test"
	srv.TLSConfig = &tls.Config{Certificates: []tls.Certificate{cert}}
	srv.ReadTimeout, srv.WriteTimeout = 20*time.Second, 20*time.Second
	srv.ErrorLog = log.New(io.Discard, "", 0)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	c := dial(t, ln.Addr().String(), Options{})
	if err := c.Hello(); err != nil {
		t.Fatal(err)
	}
	if err := c.AuthPlain("relay", "s3cret"); !errors.Is(err, ErrAuthWithoutTLS) {
		t.Fatalf("AUTH before TLS: %v, want ErrAuthWithoutTLS (credentials never in plaintext)", err)
	}
	if _, err := c.StartTLS(&tls.Config{ServerName: "mx.test", RootCAs: pool}); err != nil {
		t.Fatal(err)
	}
	var re *ReplyError
	if err := c.AuthPlain("relay", "wrong"); !errors.As(err, &re) || re.Code != 535 || re.Stage != StageAuth {
		t.Fatalf("wrong password: %v, want a 535 ReplyError at stage %q", err, StageAuth)
	}
	if !c.Usable() {
		t.Fatal("session unusable after a refused AUTH")
	}
	if err := c.AuthPlain("relay", "s3cret"); err != nil {
		t.Fatalf("right password: %v", err)
	}
	if _, err := c.Send(textTx("authenticated\r\n", "b@mx.test")); err != nil {
		t.Fatalf("send after AUTH: %v", err)
	}
	if n := len(be.sink.messages()); n != 1 {
		t.Errorf("server holds %d messages, want 1", n)
	}
	if err := c.AuthPlain("a\r\nMAIL FROM:<x>", "p"); err == nil {
		t.Error("credentials with a line break were sent")
	}
	c.Quit()
}
