package testworld

import (
	"sync"
	"testing"
	"time"
)

func TestClock(t *testing.T) {
	start := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	c := NewClock(start)
	if !c.Now().Equal(start) {
		t.Fatalf("Now = %v, want %v", c.Now(), start)
	}
	var wg sync.WaitGroup
	for range 10 {
		wg.Go(func() { c.Advance(time.Minute) })
	}
	wg.Wait()
	if got := c.Now().Sub(start); got != 10*time.Minute {
		t.Fatalf("after 10 concurrent Advance(1m): %v", got)
	}
	c.Set(start)
	if !c.Now().Equal(start) {
		t.Fatal("Set did not set")
	}
}
