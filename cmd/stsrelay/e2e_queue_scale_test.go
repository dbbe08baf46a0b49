package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/emersion/go-smtp"

	"github.com/stsrelay/stsrelay/internal/testworld"
	"github.com/stsrelay/stsrelay/queue"
)

// Over queue.max_disk_bytes the relay answers 452 4.3.1 (RFC 3463: mail
// system full) and accepts again by itself once space returns.
func TestE2EQueueFullAnswers452(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	busyDomain(w, "full.test")
	cfg := testConfig(t, w)
	cfg.Queue.RetrySchedule[0].Duration = time.Hour
	cfg.Queue.MaxDiskBytes = 16 << 20
	cfg.Metrics.Listen = "127.0.0.1:0"
	r := startRelay(t, cfg)

	big := append(simpleMessage("big"), bytes.Repeat([]byte(strings.Repeat("z", 998)+"\r\n"), 1000)...)
	var accepted []string
	var refusal error
	for range 40 {
		id, err := r.submit("s@client.test", []string{"u@full.test"}, big)
		if err != nil {
			refusal = err
			break
		}
		accepted = append(accepted, id)
	}
	var se *smtp.SMTPError
	if !errors.As(refusal, &se) || se.Code != 452 || se.EnhancedCode != (smtp.EnhancedCode{4, 3, 1}) {
		t.Fatalf("after %d messages of 1 MB with max_disk_bytes 16 MiB: err = %v, want 452 4.3.1", len(accepted), refusal)
	}
	if len(accepted) < 8 {
		t.Fatalf("only %d messages accepted before the mark", len(accepted))
	}
	namesMark := func(l map[string]any) bool {
		reason, _ := l["reason"].(string)
		return strings.Contains(reason, "max_disk_bytes")
	}
	// Refused at MAIL when the queue is already over, or at the end of
	// DATA when this message would take it over. The log is read from the
	// relay's stderr by another goroutine: wait for the line.
	logged := func() bool {
		return len(r.logs("mail rejected", namesMark))+len(r.logs("message rejected", namesMark)) > 0
	}
	for wait := time.Now().Add(5 * time.Second); !logged() && time.Now().Before(wait); {
		time.Sleep(20 * time.Millisecond)
	}
	if !logged() {
		t.Errorf("no 'mail rejected' line naming max_disk_bytes:\n%s", tail(r.logText(), 10))
	}
	// Space returns when the operator deletes the stuck mail.
	for _, id := range accepted {
		if out, code := r.cli("queue", "delete", id); code != 0 {
			t.Fatalf("queue delete %s: exit %d: %s", id, code, out)
		}
	}
	deadline := time.Now().Add(15 * time.Second)
	for {
		_, err := r.submit("s@client.test", []string{"u@full.test"}, simpleMessage("after"))
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("still refused after the queue was emptied: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// queue summary counts by destination and age; queue list cuts long
// lists and filters by domain; queue retry -domain releases a whole
// destination at once.
func TestE2EQueueSummaryListRetryDomain(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	busyDomain(w, "many.test")
	busyDomain(w, "few.test")
	cfg := testConfig(t, w)
	cfg.Queue.RetrySchedule[0].Duration = time.Hour
	r := startRelay(t, cfg)

	var many []string
	for i := range 12 {
		many = append(many, r.mustSubmit("s@client.test", []string{fmt.Sprintf("u%d@many.test", i)}, simpleMessage("m")))
	}
	few := r.mustSubmit("s@client.test", []string{"u@few.test"}, simpleMessage("f"))
	for _, id := range append(many, few) {
		waitQueued(t, r, id, 20*time.Second)
	}

	out, code := r.cli("queue", "summary", "-json")
	if code != 0 {
		t.Fatalf("queue summary -json: exit %d: %s", code, out)
	}
	var sum queue.Summary
	if err := json.Unmarshal([]byte(out), &sum); err != nil {
		t.Fatalf("queue summary -json: %v in %s", err, out)
	}
	if sum.Total != 13 || len(sum.Domains) != 2 || sum.Domains[0].Domain != "many.test" || sum.Domains[0].Total != 12 ||
		sum.Domains[0].Ages[0] != 12 || sum.Domains[1].Domain != "few.test" || sum.Domains[1].Total != 1 {
		t.Fatalf("queue summary: %s", out)
	}
	out, code = r.cli("queue", "summary")
	if code != 0 || !strings.Contains(out, "TOTAL") || !strings.Contains(out, "many.test") || !strings.Contains(out, "1280+") {
		t.Fatalf("queue summary: exit %d:\n%s", code, out)
	}

	out, code = r.cli("queue", "list", "-limit", "5")
	if code != 0 || strings.Count(out, "1 deferred") != 5 || !strings.Contains(out, "8 more message(s) not shown (of 13)") {
		t.Fatalf("queue list -limit 5: exit %d:\n%s", code, out)
	}
	out, code = r.cli("queue", "list", "-domain", "few.test", "-json")
	var msgs []*queue.Message
	if code != 0 || json.Unmarshal([]byte(out), &msgs) != nil || len(msgs) != 1 || msgs[0].ID != few {
		t.Fatalf("queue list -domain few.test -json: exit %d: %s", code, out)
	}

	out, code = r.cli("queue", "retry", "-domain", "many.test")
	if code != 0 || !strings.Contains(out, "many.test: 12 message(s) released") {
		t.Fatalf("queue retry -domain: exit %d: %s", code, out)
	}
	r.waitLog("delivery", 12, 20*time.Second, func(l map[string]any) bool {
		return l["domain"] == "many.test" && l["attempt"] == float64(2)
	})
	if n := len(r.logs("delivery", func(l map[string]any) bool { return l["domain"] == "few.test" && l["attempt"] == float64(2) })); n != 0 {
		t.Fatalf("few.test was retried too (%d attempts)", n)
	}
}
