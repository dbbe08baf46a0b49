package control

import (
	"context"
	"fmt"
	"time"

	"github.com/stsrelay/stsrelay/mtasts/forecast"
	"github.com/stsrelay/stsrelay/mtasts/mtastsdb"
	"github.com/stsrelay/stsrelay/queue"
	"github.com/stsrelay/stsrelay/tlsrpt"
)

// Policies is the MTA-STS policy cache as the control API uses it.
type Policies interface {
	Entries() []mtastsdb.Entry
	Entry(domain string) (mtastsdb.Entry, bool)
	Refresh(ctx context.Context, domain string) (mtastsdb.Entry, error)
	Forget(domain string) error
}

// Service answers the API from the relay's objects. A nil field is a part
// that is off (or, in the CLI on a stopped relay, not opened): its
// operations fail.
type Service struct {
	Queue queue.Queue
	// Bounce returns a queued message to its sender now (the delivery
	// engine's Bounce).
	Bounce func(id string) error
	// Policies is nil when MTA-STS is disabled.
	Policies Policies
	// Forecasts is nil when MTA-STS is disabled.
	Forecasts *forecast.Counter
	// Pending is the TLS-RPT recorder's Pending; nil when TLS-RPT is
	// disabled.
	Pending func() []tlsrpt.PolicyCounts
}

var _ API = (*Service)(nil)

func (s *Service) queue() (queue.Queue, error) {
	if s.Queue == nil {
		return nil, fmt.Errorf("control: no queue")
	}
	return s.Queue, nil
}

func (s *Service) QueueList(_ context.Context, o queue.ListOptions) (QueueList, error) {
	q, err := s.queue()
	if err != nil {
		return QueueList{}, err
	}
	msgs, total := q.Select(o)
	return QueueList{Messages: msgs, Total: total}, nil
}

func (s *Service) QueueSummary(context.Context) (queue.Summary, error) {
	q, err := s.queue()
	if err != nil {
		return queue.Summary{}, err
	}
	return q.Summary(time.Now()), nil
}

func (s *Service) QueueShow(_ context.Context, id string) (*queue.Message, error) {
	q, err := s.queue()
	if err != nil {
		return nil, err
	}
	return q.Get(id)
}

func (s *Service) QueueRetry(_ context.Context, id string) error {
	q, err := s.queue()
	if err != nil {
		return err
	}
	return q.Retry(id)
}

func (s *Service) QueueDelete(_ context.Context, id string) error {
	q, err := s.queue()
	if err != nil {
		return err
	}
	return q.Delete(id)
}

func (s *Service) QueueBounce(_ context.Context, id string) error {
	if s.Bounce == nil {
		return fmt.Errorf("control: no delivery engine to bounce with")
	}
	return s.Bounce(id)
}

func (s *Service) QueueRetryDomain(_ context.Context, domain string) (int, error) {
	q, err := s.queue()
	if err != nil {
		return 0, err
	}
	return q.RetryDomain(domain), nil
}

func (s *Service) PolicyList(context.Context) ([]mtastsdb.Entry, error) {
	if s.Policies == nil {
		return nil, ErrMTASTSDisabled
	}
	return s.Policies.Entries(), nil
}

func (s *Service) PolicyShow(_ context.Context, domain string) (mtastsdb.Entry, error) {
	if s.Policies == nil {
		return mtastsdb.Entry{}, ErrMTASTSDisabled
	}
	e, ok := s.Policies.Entry(domain)
	if !ok {
		return mtastsdb.Entry{}, fmt.Errorf("%s: %w", domain, ErrPolicyNotFound)
	}
	return e, nil
}

func (s *Service) PolicyRefresh(ctx context.Context, domain string) (mtastsdb.Entry, error) {
	if s.Policies == nil {
		return mtastsdb.Entry{}, ErrMTASTSDisabled
	}
	ctx, cancel := context.WithTimeout(ctx, policyRefreshTimeout)
	defer cancel()
	return s.Policies.Refresh(ctx, domain)
}

func (s *Service) PolicyForget(_ context.Context, domain string) error {
	if s.Policies == nil {
		return ErrMTASTSDisabled
	}
	if _, ok := s.Policies.Entry(domain); !ok {
		return fmt.Errorf("%s: %w", domain, ErrPolicyNotFound)
	}
	return s.Policies.Forget(domain)
}

func (s *Service) Forecast(_ context.Context, domain string) ([]forecast.Summary, error) {
	if s.Forecasts == nil {
		return nil, ErrMTASTSDisabled
	}
	if domain == "" {
		return s.Forecasts.Summaries(), nil
	}
	sum, ok := s.Forecasts.Summary(domain)
	if !ok {
		return nil, noForecastError{domain}
	}
	return []forecast.Summary{sum}, nil
}

func (s *Service) TLSRPTPending(context.Context) ([]tlsrpt.PolicyCounts, error) {
	if s.Pending == nil {
		return nil, ErrTLSRPTDisabled
	}
	return s.Pending(), nil
}
