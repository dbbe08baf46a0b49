package control

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/mtasts/forecast"
	"github.com/stsrelay/stsrelay/mtasts/mtastsdb"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// fakeAPI answers from fixed data and records the calls it gets.
type fakeAPI struct {
	calls []string
}

func (f *fakeAPI) rec(format string, args ...any) {
	f.calls = append(f.calls, fmt.Sprintf(format, args...))
}

func (f *fakeAPI) QueueList(_ context.Context, o queue.ListOptions) (QueueList, error) {
	f.rec("list %s %d %s", o.Domain, o.Limit, o.After)
	return QueueList{Messages: []*queue.Message{{ID: "a"}, {ID: "b"}}, Total: 7}, nil
}

func (f *fakeAPI) QueueSummary(context.Context) (queue.Summary, error) {
	f.rec("summary")
	return queue.Summary{Total: 3}, nil
}

func (f *fakeAPI) QueueShow(_ context.Context, id string) (*queue.Message, error) {
	f.rec("show %s", id)
	if id != "known" {
		return nil, fmt.Errorf("%s: %w", id, queue.ErrNotFound)
	}
	return &queue.Message{ID: id, Size: 42}, nil
}

func (f *fakeAPI) QueueRetry(_ context.Context, id string) error { f.rec("retry %s", id); return nil }
func (f *fakeAPI) QueueDelete(_ context.Context, id string) error {
	f.rec("delete %s", id)
	return errors.New("disk on fire")
}
func (f *fakeAPI) QueueBounce(_ context.Context, id string) error { f.rec("bounce %s", id); return nil }
func (f *fakeAPI) QueueRetryDomain(_ context.Context, d string) (int, error) {
	f.rec("retry-domain %s", d)
	return 5, nil
}
func (f *fakeAPI) PolicyList(context.Context) ([]mtastsdb.Entry, error) {
	f.rec("policy list")
	return []mtastsdb.Entry{{Domain: "a.test"}, {Domain: "b.test"}}, nil
}
func (f *fakeAPI) PolicyShow(_ context.Context, d string) (mtastsdb.Entry, error) {
	f.rec("policy show %s", d)
	return mtastsdb.Entry{}, fmt.Errorf("%s: %w", d, ErrPolicyNotFound)
}
func (f *fakeAPI) PolicyRefresh(_ context.Context, d string) (mtastsdb.Entry, error) {
	f.rec("policy refresh %s", d)
	return mtastsdb.Entry{Domain: d, ID: "20260101"}, nil
}
func (f *fakeAPI) PolicyForget(_ context.Context, d string) error {
	f.rec("policy forget %s", d)
	return nil
}
func (f *fakeAPI) Forecast(_ context.Context, d string) ([]forecast.Summary, error) {
	f.rec("forecast %s", d)
	if d == "" {
		return nil, nil
	}
	return nil, noForecastError{d}
}
func (f *fakeAPI) TLSRPTPending(context.Context) ([]tlsrpt.PolicyCounts, error) {
	f.rec("pending")
	return []tlsrpt.PolicyCounts{{PolicyDomain: "ex.test"}}, nil
}

func serveFake(t *testing.T) (*fakeAPI, Client) {
	t.Helper()
	dir := t.TempDir()
	api := &fakeAPI{}
	ln, err := Serve(dir, api)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return api, Client{DataDir: dir}
}

func TestClientServerRoundTrip(t *testing.T) {
	api, cl := serveFake(t)
	ctx := context.Background()

	ql, err := cl.QueueList(ctx, queue.ListOptions{Domain: "ex.test", Limit: 2, After: "x"})
	if err != nil || len(ql.Messages) != 2 || ql.Total != 7 || ql.Messages[1].ID != "b" {
		t.Fatalf("QueueList = %+v, %v", ql, err)
	}
	if sum, err := cl.QueueSummary(ctx); err != nil || sum.Total != 3 {
		t.Fatalf("QueueSummary = %+v, %v", sum, err)
	}
	if m, err := cl.QueueShow(ctx, "known"); err != nil || m.ID != "known" || m.Size != 42 {
		t.Fatalf("QueueShow = %+v, %v", m, err)
	}
	_, err = cl.QueueShow(ctx, "gone")
	var nf *NotFoundError
	if !errors.As(err, &nf) || !IsNotFound(err) || !strings.Contains(err.Error(), "gone") {
		t.Fatalf("QueueShow(gone) = %v, want a NotFoundError", err)
	}
	if err := cl.QueueRetry(ctx, "r"); err != nil {
		t.Fatal(err)
	}
	if err := cl.QueueDelete(ctx, "d"); err == nil || err.Error() != "disk on fire" || IsNotFound(err) {
		t.Fatalf("QueueDelete = %v", err)
	}
	if err := cl.QueueBounce(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	if n, err := cl.QueueRetryDomain(ctx, "ex.test"); err != nil || n != 5 {
		t.Fatalf("QueueRetryDomain = %d, %v", n, err)
	}
	if es, err := cl.PolicyList(ctx); err != nil || len(es) != 2 || es[1].Domain != "b.test" {
		t.Fatalf("PolicyList = %+v, %v", es, err)
	}
	if _, err := cl.PolicyShow(ctx, "none.test"); !IsNotFound(err) {
		t.Fatalf("PolicyShow = %v, want not found", err)
	}
	if e, err := cl.PolicyRefresh(ctx, "ex.test"); err != nil || e.Domain != "ex.test" || e.ID != "20260101" {
		t.Fatalf("PolicyRefresh = %+v, %v", e, err)
	}
	if err := cl.PolicyForget(ctx, "ex.test"); err != nil {
		t.Fatal(err)
	}
	if s, err := cl.Forecast(ctx, ""); err != nil || s != nil {
		t.Fatalf("Forecast(\"\") = %v, %v", s, err)
	}
	if _, err := cl.Forecast(ctx, "quiet.test"); !IsNotFound(err) || !strings.Contains(err.Error(), ErrNoForecast.Error()) {
		t.Fatalf("Forecast(quiet.test) = %v", err)
	}
	if p, err := cl.TLSRPTPending(ctx); err != nil || len(p) != 1 || p[0].PolicyDomain != "ex.test" {
		t.Fatalf("TLSRPTPending = %+v, %v", p, err)
	}
	if err := cl.Call(Request{Op: "queue.explode"}, nil); err == nil || !strings.Contains(err.Error(), `unknown control operation "queue.explode"`) {
		t.Fatalf("unknown op = %v", err)
	}

	want := []string{"list ex.test 2 x", "summary", "show known", "show gone", "retry r", "delete d", "bounce b",
		"retry-domain ex.test", "policy list", "policy show none.test", "policy refresh ex.test", "policy forget ex.test",
		"forecast ", "forecast quiet.test", "pending"}
	if strings.Join(api.calls, "|") != strings.Join(want, "|") {
		t.Fatalf("calls\n got %q\nwant %q", api.calls, want)
	}
}

// The wire format: one JSON request, one JSON reply per connection, in
// the field names the CLI of every version since the socket came uses.
func TestWireFormat(t *testing.T) {
	_, cl := serveFake(t)
	for _, tc := range []struct{ req, reply string }{
		{`{"op":"queue.retry-domain","domain":"ex.test"}`, `{"data":{"released":5}}`},
		{`{"op":"queue.show","arg":"known"}`, `{"data":[{"id":"known"`},
		{`{"op":"queue.show","arg":"gone"}`, `{"error":"gone: ` + queue.ErrNotFound.Error() + `","not_found":true}`},
		{`{"op":"queue.list","domain":"d","limit":1,"after":"a"}`, `{"data":{"messages":[{"id":"a"`},
		{`{"op":"queue.retry","arg":"x"}`, `{}`},
		{`{"op":"policy.show","arg":"p.test"}`, `{"error":"p.test: no cached policy for that domain","not_found":true}`},
		{`{"op":"nope"}`, `{"error":"unknown control operation \"nope\""}`},
	} {
		c, err := net.Dial("unix", Path(cl.DataDir))
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write([]byte(tc.req + "\n")); err != nil {
			t.Fatal(err)
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		c.Close()
		if err != nil {
			t.Fatalf("%s: %v", tc.req, err)
		}
		if !strings.HasPrefix(line, tc.reply) {
			t.Errorf("%s: reply %s, want it to begin %s", tc.req, line, tc.reply)
		}
	}
}

func TestSocketModeAndNoServer(t *testing.T) {
	dir := t.TempDir()
	cl := Client{DataDir: dir}
	if _, err := cl.QueueSummary(context.Background()); !errors.Is(err, ErrNoServer) {
		t.Fatalf("no socket: %v, want ErrNoServer", err)
	}
	ln, err := Serve(dir, &fakeAPI{})
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, "control.sock"))
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 || fi.Mode()&os.ModeSocket == 0 {
		t.Fatalf("socket mode %v, want a socket with 0600", fi.Mode())
	}
	// A relay that died leaves its socket behind: nobody answers.
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	ln.Close()
	if _, err := cl.QueueSummary(context.Background()); !errors.Is(err, ErrNoServer) {
		t.Fatalf("stale socket: %v, want ErrNoServer", err)
	}
	// The next relay takes the stale socket over.
	ln, err = Serve(dir, &fakeAPI{})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if _, err := cl.QueueSummary(context.Background()); err != nil {
		t.Fatal(err)
	}
}

// fakePolicies is a policy cache of fixed entries.
type fakePolicies map[string]mtastsdb.Entry

func (p fakePolicies) Entries() []mtastsdb.Entry {
	var out []mtastsdb.Entry
	for _, e := range p {
		out = append(out, e)
	}
	return out
}
func (p fakePolicies) Entry(d string) (mtastsdb.Entry, bool) { e, ok := p[d]; return e, ok }
func (p fakePolicies) Refresh(ctx context.Context, d string) (mtastsdb.Entry, error) {
	if _, ok := ctx.Deadline(); !ok {
		return mtastsdb.Entry{}, errors.New("refresh without a deadline")
	}
	return mtastsdb.Entry{Domain: d}, nil
}
func (p fakePolicies) Forget(d string) error { delete(p, d); return nil }

func TestServiceOffParts(t *testing.T) {
	ctx := context.Background()
	s := &Service{}
	if _, err := s.PolicyList(ctx); !errors.Is(err, ErrMTASTSDisabled) {
		t.Errorf("PolicyList: %v", err)
	}
	if _, err := s.Forecast(ctx, ""); !errors.Is(err, ErrMTASTSDisabled) {
		t.Errorf("Forecast: %v", err)
	}
	if _, err := s.TLSRPTPending(ctx); !errors.Is(err, ErrTLSRPTDisabled) {
		t.Errorf("TLSRPTPending: %v", err)
	}
	if _, err := s.QueueSummary(ctx); err == nil {
		t.Errorf("QueueSummary without a queue: no error")
	}
	if err := s.QueueBounce(ctx, "x"); err == nil {
		t.Errorf("QueueBounce without an engine: no error")
	}
}

func TestServicePolicies(t *testing.T) {
	ctx := context.Background()
	s := &Service{Policies: fakePolicies{"ex.test": {Domain: "ex.test", ID: "1"}}}
	if e, err := s.PolicyShow(ctx, "ex.test"); err != nil || e.ID != "1" {
		t.Fatalf("PolicyShow = %+v, %v", e, err)
	}
	if _, err := s.PolicyShow(ctx, "no.test"); !IsNotFound(err) || err.Error() != "no.test: no cached policy for that domain" {
		t.Fatalf("PolicyShow(no.test) = %v", err)
	}
	if _, err := s.PolicyRefresh(ctx, "ex.test"); err != nil {
		t.Fatal(err)
	}
	if err := s.PolicyForget(ctx, "no.test"); !IsNotFound(err) {
		t.Fatalf("PolicyForget(no.test) = %v", err)
	}
	if err := s.PolicyForget(ctx, "ex.test"); err != nil {
		t.Fatal(err)
	}
	if es, _ := s.PolicyList(ctx); len(es) != 0 {
		t.Fatalf("after forget: %v", es)
	}
}

func TestServiceQueue(t *testing.T) {
	ctx := context.Background()
	st, err := queue.Open(queue.Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	s := &Service{Queue: st}
	if _, err := s.QueueShow(ctx, "00000000000000000000000000"); !IsNotFound(err) {
		t.Fatalf("QueueShow of a missing ID = %v", err)
	}
	if ql, err := s.QueueList(ctx, queue.ListOptions{}); err != nil || len(ql.Messages) != 0 || ql.Total != 0 {
		t.Fatalf("QueueList = %+v, %v", ql, err)
	}
	if n, err := s.QueueRetryDomain(ctx, "ex.test"); err != nil || n != 0 {
		t.Fatalf("QueueRetryDomain = %d, %v", n, err)
	}
}
