package control

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/stsrelay/stsrelay/mtasts/forecast"
	"github.com/stsrelay/stsrelay/mtasts/mtastsdb"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// API is what the CLI can ask of a relay. Client implements it over the
// socket, Service on the relay's objects.
type API interface {
	// QueueList selects queued messages, oldest first.
	QueueList(ctx context.Context, o queue.ListOptions) (QueueList, error)
	QueueSummary(ctx context.Context) (queue.Summary, error)
	QueueShow(ctx context.Context, id string) (*queue.Message, error)
	QueueRetry(ctx context.Context, id string) error
	QueueDelete(ctx context.Context, id string) error
	QueueBounce(ctx context.Context, id string) error
	// QueueRetryDomain releases every message to domain and returns how
	// many it released.
	QueueRetryDomain(ctx context.Context, domain string) (int, error)

	PolicyList(ctx context.Context) ([]mtastsdb.Entry, error)
	PolicyShow(ctx context.Context, domain string) (mtastsdb.Entry, error)
	PolicyRefresh(ctx context.Context, domain string) (mtastsdb.Entry, error)
	PolicyForget(ctx context.Context, domain string) error
	// Forecast is the enforce forecast of domain, or of every counted
	// domain when domain is "".
	Forecast(ctx context.Context, domain string) ([]forecast.Summary, error)

	// TLSRPTPending is the TLS-RPT counts not yet reported.
	TLSRPTPending(ctx context.Context) ([]tlsrpt.PolicyCounts, error)
}

// QueueList is the answer to queue.list.
type QueueList struct {
	Messages []*queue.Message `json:"messages"`
	// Total is how many messages the selection has without the limit.
	Total int `json:"total"`
}

var (
	// ErrPolicyNotFound: no cached policy for the domain.
	ErrPolicyNotFound = errors.New("no cached policy for that domain")
	// ErrNoForecast: no sessions to the domain counted.
	ErrNoForecast = errors.New("no sessions counted for that domain in 7 days")
	// ErrMTASTSDisabled and ErrTLSRPTDisabled answer the operations of a
	// part the configuration turned off.
	ErrMTASTSDisabled = errors.New("MTA-STS is disabled (mtasts.enabled = false)")
	ErrTLSRPTDisabled = errors.New("TLS-RPT is disabled (tlsrpt.enabled = false)")
)

// noForecastError is ErrNoForecast for one domain; it is also an
// ErrPolicyNotFound, so that the CLI exits 1 whether the relay runs or
// not.
type noForecastError struct{ domain string }

func (e noForecastError) Error() string { return e.domain + ": " + ErrNoForecast.Error() }

func (e noForecastError) Is(target error) bool {
	return target == ErrNoForecast || target == ErrPolicyNotFound
}

// IsNotFound reports whether err is about a missing queue ID, policy or
// forecast, from the relay (*NotFoundError) or from a Service.
func IsNotFound(err error) bool {
	var nf *NotFoundError
	return errors.As(err, &nf) || errors.Is(err, queue.ErrNotFound) || errors.Is(err, ErrPolicyNotFound)
}

// Serve answers API calls on the control socket of dataDir until the
// returned listener is closed.
func Serve(dataDir string, api API) (net.Listener, error) {
	return Listen(dataDir, Dispatch(api))
}

// Dispatch turns a Request into the API call and its reply data, in the
// shapes the protocol has always had: queue.show, policy.show and
// policy.refresh answer a list of one.
func Dispatch(api API) Handler {
	return func(req Request) (any, error) {
		ctx := context.Background()
		switch req.Op {
		case OpQueueList:
			return api.QueueList(ctx, queue.ListOptions{Domain: req.Domain, Limit: req.Limit, After: req.After})
		case OpQueueSummary:
			return api.QueueSummary(ctx)
		case OpQueueRetryDomain:
			n, err := api.QueueRetryDomain(ctx, req.Domain)
			if err != nil {
				return nil, err
			}
			return map[string]int{"released": n}, nil
		case OpQueueShow:
			m, err := api.QueueShow(ctx, req.Arg)
			if err != nil {
				return nil, err
			}
			return []*queue.Message{m}, nil
		case OpQueueRetry:
			return nil, api.QueueRetry(ctx, req.Arg)
		case OpQueueDelete:
			return nil, api.QueueDelete(ctx, req.Arg)
		case OpQueueBounce:
			return nil, api.QueueBounce(ctx, req.Arg)
		case OpPolicyForecast:
			return api.Forecast(ctx, req.Arg)
		case OpPolicyList:
			return api.PolicyList(ctx)
		case OpPolicyShow, OpPolicyRefresh:
			get := api.PolicyShow
			if req.Op == OpPolicyRefresh {
				get = api.PolicyRefresh
			}
			e, err := get(ctx, req.Arg)
			if err != nil {
				return nil, err
			}
			return []mtastsdb.Entry{e}, nil
		case OpPolicyForget:
			return nil, api.PolicyForget(ctx, req.Arg)
		case OpTLSRPTPending:
			return api.TLSRPTPending(ctx)
		}
		return nil, fmt.Errorf("unknown control operation %q", req.Op)
	}
}

// Client methods: the API over the socket.

var _ API = Client{}

func (cl Client) QueueList(_ context.Context, o queue.ListOptions) (QueueList, error) {
	var ql QueueList
	err := cl.Call(Request{Op: OpQueueList, Domain: o.Domain, Limit: o.Limit, After: o.After}, &ql)
	return ql, err
}

func (cl Client) QueueSummary(context.Context) (queue.Summary, error) {
	var sum queue.Summary
	err := cl.Call(Request{Op: OpQueueSummary}, &sum)
	return sum, err
}

func (cl Client) QueueShow(_ context.Context, id string) (*queue.Message, error) {
	var msgs []*queue.Message
	if err := cl.Call(Request{Op: OpQueueShow, Arg: id}, &msgs); err != nil {
		return nil, err
	}
	if len(msgs) != 1 {
		return nil, fmt.Errorf("control socket: %s: want one message, got %d", OpQueueShow, len(msgs))
	}
	return msgs[0], nil
}

func (cl Client) QueueRetry(_ context.Context, id string) error {
	return cl.Call(Request{Op: OpQueueRetry, Arg: id}, nil)
}

func (cl Client) QueueDelete(_ context.Context, id string) error {
	return cl.Call(Request{Op: OpQueueDelete, Arg: id}, nil)
}

func (cl Client) QueueBounce(_ context.Context, id string) error {
	return cl.Call(Request{Op: OpQueueBounce, Arg: id}, nil)
}

func (cl Client) QueueRetryDomain(_ context.Context, domain string) (int, error) {
	var res map[string]int
	err := cl.Call(Request{Op: OpQueueRetryDomain, Domain: domain}, &res)
	return res["released"], err
}

func (cl Client) PolicyList(context.Context) ([]mtastsdb.Entry, error) {
	var es []mtastsdb.Entry
	err := cl.Call(Request{Op: OpPolicyList}, &es)
	return es, err
}

func (cl Client) policyOne(op, domain string) (mtastsdb.Entry, error) {
	var es []mtastsdb.Entry
	if err := cl.Call(Request{Op: op, Arg: domain}, &es); err != nil {
		return mtastsdb.Entry{}, err
	}
	if len(es) != 1 {
		return mtastsdb.Entry{}, fmt.Errorf("control socket: %s: want one policy, got %d", op, len(es))
	}
	return es[0], nil
}

func (cl Client) PolicyShow(_ context.Context, domain string) (mtastsdb.Entry, error) {
	return cl.policyOne(OpPolicyShow, domain)
}

func (cl Client) PolicyRefresh(_ context.Context, domain string) (mtastsdb.Entry, error) {
	return cl.policyOne(OpPolicyRefresh, domain)
}

func (cl Client) PolicyForget(_ context.Context, domain string) error {
	return cl.Call(Request{Op: OpPolicyForget, Arg: domain}, nil)
}

func (cl Client) Forecast(_ context.Context, domain string) ([]forecast.Summary, error) {
	var out []forecast.Summary
	err := cl.Call(Request{Op: OpPolicyForecast, Arg: domain}, &out)
	return out, err
}

func (cl Client) TLSRPTPending(context.Context) ([]tlsrpt.PolicyCounts, error) {
	var out []tlsrpt.PolicyCounts
	err := cl.Call(Request{Op: OpTLSRPTPending}, &out)
	return out, err
}

// policyRefreshTimeout bounds an operator's policy refresh.
const policyRefreshTimeout = 2 * time.Minute
