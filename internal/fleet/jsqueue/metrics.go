package jsqueue

import (
	"sync/atomic"
	"time"
)

// counters are the queue's metrics.
type counters struct {
	observe      atomic.Pointer[func(float64)]
	redeliveries atomic.Uint64
}

// ObservePublish makes the queue report, for every publish that JetStream
// acknowledged (commits and new versions), the seconds from the first
// attempt to the ack (a prometheus.Observer's Observe, say).
func (q *Queue) ObservePublish(observe func(seconds float64)) {
	q.ctr.observe.Store(&observe)
}

func (q *Queue) observePublish(d time.Duration) {
	if f := q.ctr.observe.Load(); f != nil {
		(*f)(d.Seconds())
	}
}

// Redeliveries counts the messages this node was handed again, due, by
// the consumer after another holder let them go without an Update: a
// lease that ran out (a dead or cut-off node), a release at shutdown, or
// a destination's hold. JetStream does not say why it redelivers, so
// this counts due messages delivered before (NumDelivered > 1) that
// reach this node more than AckWait after their not-before: a deferred
// message coming due on time is not counted.
func (q *Queue) Redeliveries() uint64 { return q.ctr.redeliveries.Load() }
