package delivery

import (
	"bytes"
	"io"
	"mime"
	"mime/multipart"
	"net/mail"
	"strings"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/queue"
)

func dsnFixture() (*queue.Message, []*queue.Recipient) {
	m := &queue.Message{
		ID:       "1k84rb8270t7fd",
		Env:      queue.Envelope{From: "app@client.test", EnvID: "env-1"},
		Received: time.Date(2026, 11, 23, 10, 0, 0, 0, time.UTC),
		Size:     100,
		Rcpts: []queue.Recipient{
			{RcptSpec: queue.RcptSpec{Addr: "ok@ex.test"}, Status: queue.Delivered},
			{RcptSpec: queue.RcptSpec{Addr: "gone@ex.test", ORcpt: "RFC822;gone@ex.test"}, Status: queue.Bounced,
				LastCode: 550, LastEnhanced: "5.1.1", LastError: "no such user", LastMX: "mx1.ex.test",
				LastAttempt: time.Date(2026, 11, 23, 10, 0, 5, 0, time.UTC)},
		},
	}
	return m, []*queue.Recipient{&m.Rcpts[1]}
}

const original = "From: <app@client.test>\r\nTo: <gone@ex.test>\r\nSubject: the original\r\nMessage-ID: <orig@client.test>\r\n\r\nsecret body\r\n"

// DSN-a: an RFC 3464 multipart/report naming only the failed recipient,
// with the original header and (RET=HDRS, the default) not the body.
func TestBuildDSNFailed(t *testing.T) {
	m, rcpts := dsnFixture()
	msg := BuildDSN(DSNInput{ReportingMTA: "relay.test", Message: m, Rcpts: rcpts, Action: actionFailed,
		Now: time.Now(), Original: strings.NewReader(original)})
	parsed, err := mail.ReadMessage(bytes.NewReader(msg))
	if err != nil {
		t.Fatal(err)
	}
	if got := parsed.Header.Get("To"); got != "<app@client.test>" {
		t.Errorf("To = %q", got)
	}
	mt, params, err := mime.ParseMediaType(parsed.Header.Get("Content-Type"))
	if err != nil || mt != "multipart/report" || params["report-type"] != "delivery-status" {
		t.Fatalf("Content-Type %q: %v %v", parsed.Header.Get("Content-Type"), mt, params)
	}
	mr := multipart.NewReader(parsed.Body, params["boundary"])
	var types []string
	var status, headers string
	for {
		p, err := mr.NextPart()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(p)
		ct := p.Header.Get("Content-Type")
		types = append(types, strings.Split(ct, ";")[0])
		switch {
		case ct == "message/delivery-status":
			status = string(b)
		case ct == "text/rfc822-headers":
			headers = string(b)
		}
	}
	if strings.Join(types, ",") != "text/plain,message/delivery-status,text/rfc822-headers" {
		t.Errorf("parts %v", types)
	}
	for _, want := range []string{"Reporting-MTA: dns; relay.test", "Original-Envelope-Id: env-1",
		"Final-Recipient: rfc822; gone@ex.test", "Original-Recipient: RFC822;gone@ex.test", "Action: failed", "Status: 5.1.1",
		"Remote-MTA: dns; mx1.ex.test", "Diagnostic-Code: smtp; 550 5.1.1 no such user"} {
		if !strings.Contains(status, want) {
			t.Errorf("delivery-status lacks %q:\n%s", want, status)
		}
	}
	if strings.Contains(status, "ok@ex.test") {
		t.Errorf("delivered recipient named in the DSN")
	}
	if !strings.Contains(headers, "Subject: the original") || strings.Contains(headers, "secret body") {
		t.Errorf("returned headers wrong:\n%s", headers)
	}
}

// The status class follows the action: a deferral that expired is 5.x.x,
// a delayed DSN is 4.x.x (RFC 3464 §2.3.4).
func TestDSNStatusClass(t *testing.T) {
	cases := []struct {
		r      queue.Recipient
		action dsnAction
		want   string
	}{
		{queue.Recipient{LastCode: 451, LastEnhanced: "4.7.5"}, actionFailed, "5.7.5"},
		{queue.Recipient{LastCode: 451, LastEnhanced: "4.4.1"}, actionDelayed, "4.4.1"},
		{queue.Recipient{LastCode: 550}, actionFailed, "5.0.0"},
		{queue.Recipient{}, actionFailed, "5.4.7"},
		{queue.Recipient{}, actionDelayed, "4.0.0"},
	}
	for _, c := range cases {
		if got := dsnStatus(&c.r, c.action); got != c.want {
			t.Errorf("dsnStatus(%+v, %s) = %s, want %s", c.r, c.action, got, c.want)
		}
	}
}

// DSN-b: NOTIFY decides which DSNs a recipient gets (RFC 3461 §4.1).
func TestWantsDSN(t *testing.T) {
	r := func(n ...string) *queue.Recipient { return &queue.Recipient{RcptSpec: queue.RcptSpec{Notify: n}} }
	cases := []struct {
		r      *queue.Recipient
		action dsnAction
		want   bool
	}{
		{r(), actionFailed, true},
		{r(), actionDelayed, true},
		{r("NEVER"), actionFailed, false},
		{r("SUCCESS"), actionFailed, false},
		{r("FAILURE"), actionFailed, true},
		{r("FAILURE"), actionDelayed, false},
		{r("DELAY", "FAILURE"), actionDelayed, true},
	}
	for _, c := range cases {
		if got := wantsDSN(c.r, c.action); got != c.want {
			t.Errorf("wantsDSN(%v, %s) = %v", c.r.Notify, c.action, got)
		}
	}
}

func BenchmarkBuildDSN(b *testing.B) {
	m, rcpts := dsnFixture()
	b.ReportAllocs()
	for b.Loop() {
		_ = BuildDSN(DSNInput{ReportingMTA: "relay.test", Message: m, Rcpts: rcpts, Action: actionFailed,
			Now: time.Now(), Original: strings.NewReader(original)})
	}
}
