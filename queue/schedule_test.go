package queue

import (
	"testing"
	"time"
)

func TestScheduleDelay(t *testing.T) {
	s := Schedule{Retry: []time.Duration{time.Minute, 10 * time.Minute, time.Hour}}
	tests := []struct {
		name string
		n    int
		want time.Duration
	}{
		{"after the first failure the first interval", 1, time.Minute},
		{"after the second failure the second interval", 2, 10 * time.Minute},
		{"after the last listed failure the last interval", 3, time.Hour},
		{"later failures repeat the last interval", 50, time.Hour},
		{"zero failures count as one", 0, time.Minute},
		{"negative counts count as one", -3, time.Minute},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := s.Delay(tt.n); got != tt.want {
				t.Fatalf("Delay(%d) = %v, want %v", tt.n, got, tt.want)
			}
		})
	}
	if got := (Schedule{}).Delay(3); got != DefaultRetry {
		t.Fatalf("empty schedule: Delay = %v, want %v", got, DefaultRetry)
	}
}
