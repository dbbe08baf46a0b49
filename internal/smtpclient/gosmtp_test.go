package smtpclient

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"io"
	"log"
	"math/big"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-smtp"
)

// sink is a go-smtp backend that keeps every message and refuses
// recipients by local part: "temp…" 450 4.2.1, "perm…" 550 5.1.1.
type sink struct {
	mu   sync.Mutex
	msgs []sunk
}

type sunk struct {
	from  string
	rcpts []string
	body  []byte
}

func (b *sink) NewSession(*smtp.Conn) (smtp.Session, error) { return &sinkSession{b: b}, nil }

func (b *sink) messages() []sunk {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]sunk(nil), b.msgs...)
}

type sinkSession struct {
	b     *sink
	from  string
	rcpts []string
}

func (s *sinkSession) Reset()        { s.from, s.rcpts = "", nil }
func (s *sinkSession) Logout() error { return nil }
func (s *sinkSession) Mail(from string, _ *smtp.MailOptions) error {
	s.from = from
	return nil
}

func (s *sinkSession) Rcpt(to string, _ *smtp.RcptOptions) error {
	switch {
	case strings.HasPrefix(to, "temp"):
		return &smtp.SMTPError{Code: 450, EnhancedCode: smtp.EnhancedCode{4, 2, 1}, Message: "busy"}
	case strings.HasPrefix(to, "perm"):
		return &smtp.SMTPError{Code: 550, EnhancedCode: smtp.EnhancedCode{5, 1, 1}, Message: "no such user"}
	}
	s.rcpts = append(s.rcpts, to)
	return nil
}

func (s *sinkSession) Data(r io.Reader) error {
	body, err := io.ReadAll(r)
	if err != nil {
		return err
	}
	s.b.mu.Lock()
	s.b.msgs = append(s.b.msgs, sunk{s.from, s.rcpts, body})
	s.b.mu.Unlock()
	return nil
}

// startGoSMTP runs go-smtp's server on loopback; tlsCfg enables STARTTLS.
func startGoSMTP(t testing.TB, tlsCfg *tls.Config) (string, *sink) {
	t.Helper()
	be := &sink{}
	srv := smtp.NewServer(be)
	srv.Domain = "mx.test"
	srv.TLSConfig = tlsCfg
	srv.ReadTimeout = 20 * time.Second
	srv.WriteTimeout = 20 * time.Second
	srv.ErrorLog = log.New(io.Discard, "", 0)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String(), be
}

// TestGoSMTPExtensions records what go-smtp v0.25.1 advertises, since
// the transaction shapes below depend on it.
func TestGoSMTPExtensions(t *testing.T) {
	t.Parallel()
	addr, _ := startGoSMTP(t, nil)
	c := dial(t, addr, Options{})
	if err := c.Hello(); err != nil {
		t.Fatal(err)
	}
	for _, ext := range []string{"PIPELINING", "CHUNKING", "8BITMIME", "ENHANCEDSTATUSCODES", "SIZE"} {
		if _, ok := c.Ext(ext); !ok {
			t.Errorf("go-smtp does not advertise %s", ext)
		}
	}
}

// TestGoSMTPTransactions runs transactions against go-smtp's server in
// each mode the client has.
func TestGoSMTPTransactions(t *testing.T) {
	t.Parallel()
	body := "Subject: x\r\n\r\nline 1\r\n.dot line\r\n"
	tests := []struct {
		name       string
		opts       Options
		size       int64
		rcpts      []string
		wantCodes  []int
		wantEnh    []string
		wantRcpts  []string
		wantErr    string // stage, "" = nil
		roundTrips int64
	}{
		{"pipelined DATA with mixed recipients", Options{DisableChunking: true}, 0,
			[]string{"ok1@mx.test", "temp@mx.test", "perm@mx.test", "ok2@mx.test"},
			[]int{250, 450, 550, 250}, []string{"2.0.0", "4.2.1", "5.1.1", "2.0.0"},
			[]string{"ok1@mx.test", "ok2@mx.test"}, "", 2},
		{"pipelined BDAT with mixed recipients", Options{}, -1,
			[]string{"ok1@mx.test", "temp@mx.test", "perm@mx.test"},
			[]int{250, 450, 550}, []string{"2.0.0", "4.2.1", "5.1.1"},
			[]string{"ok1@mx.test"}, "", 1},
		{"pipelined DATA with every recipient refused", Options{DisableChunking: true}, 0,
			[]string{"perm@mx.test", "temp@mx.test"},
			[]int{550, 450}, []string{"5.1.1", "4.2.1"}, nil, StageRcpt, 1},
		// RFC 3030: the chunk is sent before the RCPT replies are known;
		// go-smtp answers it 502 and discards it.
		{"pipelined BDAT with every recipient refused", Options{}, -1,
			[]string{"perm@mx.test"},
			[]int{550}, []string{"5.1.1"}, nil, StageRcpt, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			addr, be := startGoSMTP(t, nil)
			c := dial(t, addr, tt.opts)
			if err := c.Hello(); err != nil {
				t.Fatal(err)
			}
			tx := textTx(body, tt.rcpts...)
			if tt.size < 0 {
				tx.Size = int64(len(body))
			}
			rt := c.RoundTrips()
			res, err := c.Send(tx)
			if tt.wantErr == "" && err != nil || tt.wantErr != "" && !isStage(err, tt.wantErr) {
				t.Fatalf("err = %v, want stage %q", err, tt.wantErr)
			}
			if got := c.RoundTrips() - rt; got != tt.roundTrips {
				t.Errorf("round trips = %d, want %d", got, tt.roundTrips)
			}
			for i := range tt.rcpts {
				if r := res.RcptReplies[i]; r.Code != tt.wantCodes[i] || r.Enhanced != tt.wantEnh[i] {
					t.Errorf("rcpt %d: %v, want %d %s", i, r, tt.wantCodes[i], tt.wantEnh[i])
				}
			}
			if !res.Usable {
				t.Error("session not usable")
			}
			// The session carries a second message without EHLO.
			if _, err := c.Send(textTx("second\r\n", "ok3@mx.test")); err != nil {
				t.Fatalf("second message: %v", err)
			}
			if err := c.Quit(); err != nil {
				t.Error(err)
			}
			msgs := be.messages()
			want := 1
			if tt.wantRcpts != nil {
				want = 2
				if string(msgs[0].body) != body || strings.Join(msgs[0].rcpts, ",") != strings.Join(tt.wantRcpts, ",") {
					t.Errorf("message = %q to %v", msgs[0].body, msgs[0].rcpts)
				}
			}
			if len(msgs) != want {
				t.Fatalf("server has %d messages, want %d", len(msgs), want)
			}
		})
	}
}

func isStage(err error, stage string) bool {
	var re *ReplyError
	return errors.As(err, &re) && re.Stage == stage
}

// TestBDATLarge sends a 10 MiB body as one pipelined "BDAT <size> LAST":
// one round trip, and the bytes arrive exact.
func TestBDATLarge(t *testing.T) {
	t.Parallel()
	addr, be := startGoSMTP(t, nil)
	body := make([]byte, 0, 10<<20)
	for i := 0; len(body) < 10<<20-100; i++ {
		body = append(body, []byte(strings.Repeat(string(rune('a'+i%26)), 1+i%97))...)
		body = append(body, '\r', '\n')
	}
	c := dial(t, addr, Options{})
	if err := c.Hello(); err != nil {
		t.Fatal(err)
	}
	size, err := NormalizedSize(bytes.NewReader(body))
	if err != nil || size != int64(len(body)) {
		t.Fatalf("NormalizedSize = %d, %v; want %d", size, err, len(body))
	}
	rt := c.RoundTrips()
	tx := Transaction{From: "a@client.test", Rcpts: []Rcpt{{Addr: "b@mx.test"}}, Body: bytes.NewReader(body), Size: size}
	if _, err := c.Send(tx); err != nil {
		t.Fatal(err)
	}
	if got := c.RoundTrips() - rt; got != 1 {
		t.Errorf("round trips = %d, want 1", got)
	}
	c.Quit()
	msgs := be.messages()
	if len(msgs) != 1 || !bytes.Equal(msgs[0].body, body) {
		t.Fatalf("server got %d messages; body equal: %v", len(msgs), len(msgs) == 1 && bytes.Equal(msgs[0].body, body))
	}
}

// TestNormalizationAtServer sends bodies with bare CR, bare LF and dots
// at line starts by DATA and by BDAT: go-smtp must see exactly one message
// with CRLF lines and the dots as written.
func TestNormalizationAtServer(t *testing.T) {
	t.Parallel()
	tests := []struct{ name, body, want string }{
		{"bare CR before dot", "a\r.\r\nb\r\n", "a\r\n.\r\nb\r\n"},
		{"bare LF dot bare LF", "a\n.\nb\n", "a\r\n.\r\nb\r\n"},
		{"dot line first", ".\r\nafter\r\n", ".\r\nafter\r\n"},
		{"smuggling attempt", "x\r\n\n.\r\nMAIL FROM:<evil@x>\r\n", "x\r\n\r\n.\r\nMAIL FROM:<evil@x>\r\n"},
		{"no final newline", "tail", "tail\r\n"},
	}
	for _, mode := range []string{"DATA", "BDAT"} {
		for _, tt := range tests {
			t.Run(mode+" "+tt.name, func(t *testing.T) {
				t.Parallel()
				addr, be := startGoSMTP(t, nil)
				c := dial(t, addr, Options{DisableChunking: mode == "DATA"})
				tx := textTx(tt.body, "b@mx.test")
				if mode == "BDAT" {
					n, err := NormalizedSize(strings.NewReader(tt.body))
					if err != nil {
						t.Fatal(err)
					}
					tx.Size = n
				}
				if _, err := c.Send(tx); err != nil {
					t.Fatal(err)
				}
				c.Quit()
				msgs := be.messages()
				if len(msgs) != 1 || string(msgs[0].body) != tt.want {
					t.Fatalf("server got %d messages: %q; want one: %q", len(msgs), msgs, tt.want)
				}
			})
		}
	}
}

// TestSizeMismatch: a Size that is not the normalised length never
// completes a chunk, so the server delivers nothing.
func TestSizeMismatch(t *testing.T) {
	t.Parallel()
	for _, delta := range []int64{-1, +1, +1000} {
		addr, be := startGoSMTP(t, nil)
		c := dial(t, addr, Options{})
		body := "a\nb\n" // normalised: 6 bytes
		tx := textTx(body, "b@mx.test")
		tx.Size = 6 + delta
		res, err := c.Send(tx)
		if !errors.Is(err, ErrSizeMismatch) || res.Usable {
			t.Errorf("delta %d: err = %v, usable %v", delta, err, res.Usable)
		}
		time.Sleep(50 * time.Millisecond)
		if n := len(be.messages()); n != 0 {
			t.Errorf("delta %d: server has %d messages", delta, n)
		}
	}
}

func TestValidationSendsNothing(t *testing.T) {
	t.Parallel()
	addr, be := startGoSMTP(t, nil)
	c := dial(t, addr, Options{})
	for _, tx := range []Transaction{
		textTx("x", "a@mx.test\r\nRCPT TO:<b@mx.test>"),
		{From: "a>\r\nDATA", Rcpts: []Rcpt{{Addr: "b@mx.test"}}, Body: strings.NewReader("x")},
		{From: "a@client.test", MailParams: []string{"SIZE=1 X"}, Rcpts: []Rcpt{{Addr: "b@mx.test"}}, Body: strings.NewReader("x")},
		{From: "a@client.test", MailParams: []string{"BODY=BINARYMIME"}, Rcpts: []Rcpt{{Addr: "b@mx.test"}}, Body: strings.NewReader("x")},
		{From: "a@client.test", Body: strings.NewReader("x")},
	} {
		if res, err := c.Send(tx); err == nil || !res.Usable {
			t.Errorf("%+v: err = %v, usable %v", tx, err, res.Usable)
		}
	}
	if _, err := c.Send(textTx("fine\r\n", "ok@mx.test")); err != nil {
		t.Fatal(err)
	}
	c.Quit()
	if n := len(be.messages()); n != 1 {
		t.Errorf("server has %d messages, want 1", n)
	}
}

// selfSigned makes a certificate for name, its own root.
func selfSigned(t testing.TB, name string) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		DNSNames:              []string{name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool
}

// TestStartTLS checks RFC 3207: EHLO again after the handshake (STARTTLS
// no longer offered), session resumption with a shared cache, and
// handshake errors returned untouched.
func TestStartTLS(t *testing.T) {
	t.Parallel()
	cert, pool := selfSigned(t, "mx.test")
	addr, be := startGoSMTP(t, &tls.Config{Certificates: []tls.Certificate{cert}})
	cache := tls.NewLRUClientSessionCache(8)
	for i, wantResume := range []bool{false, true} {
		c := dial(t, addr, Options{})
		if err := c.Hello(); err != nil {
			t.Fatal(err)
		}
		if _, ok := c.Ext("STARTTLS"); !ok {
			t.Fatal("STARTTLS not offered")
		}
		st, err := c.StartTLS(&tls.Config{ServerName: "mx.test", RootCAs: pool, ClientSessionCache: cache})
		if err != nil {
			t.Fatal(err)
		}
		if st.DidResume != wantResume {
			t.Errorf("connection %d: DidResume = %v, want %v", i, st.DidResume, wantResume)
		}
		if cs, ok := c.ConnectionState(); !ok || cs.DidResume != wantResume {
			t.Errorf("ConnectionState = %v, %v", cs.DidResume, ok)
		}
		if _, ok := c.Ext("STARTTLS"); ok {
			t.Error("STARTTLS still offered: EHLO not repeated after TLS")
		}
		if _, err := c.Send(textTx("over tls\r\n", "b@mx.test")); err != nil {
			t.Fatal(err)
		}
		if err := c.Quit(); err != nil {
			t.Error(err)
		}
	}
	if n := len(be.messages()); n != 2 {
		t.Errorf("server has %d messages, want 2", n)
	}

	// An unknown root: the x509 error comes back as is.
	c := dial(t, addr, Options{})
	_, err := c.StartTLS(&tls.Config{ServerName: "mx.test"})
	var ue x509.UnknownAuthorityError
	var ve *tls.CertificateVerificationError
	if !errors.As(err, &ue) || !errors.As(err, &ve) {
		t.Errorf("err = %v (%T), want an x509.UnknownAuthorityError", err, err)
	}
	if c.Usable() {
		t.Error("session usable after a failed handshake")
	}
}

// BenchmarkSendPipelined reports round trips per message on one reused
// session against go-smtp on loopback.
func BenchmarkSendPipelined(b *testing.B) {
	body := strings.Repeat("0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n", 100)
	for _, mode := range []string{"DATA", "BDAT"} {
		b.Run(mode, func(b *testing.B) {
			addr, _ := startGoSMTP(b, nil)
			c := dial(b, addr, Options{DisableChunking: mode == "DATA"})
			if err := c.Hello(); err != nil {
				b.Fatal(err)
			}
			rt := c.RoundTrips()
			b.SetBytes(int64(len(body)))
			b.ResetTimer()
			for range b.N {
				tx := textTx(body, "a@mx.test", "b@mx.test", "c@mx.test")
				tx.Size = int64(len(body))
				if _, err := c.Send(tx); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(c.RoundTrips()-rt)/float64(b.N), "roundtrips/msg")
		})
	}
}
