package certexpiry

import (
	"testing"
	"time"
)

func TestDaysLeft(t *testing.T) {
	now := time.Date(2026, 1, 10, 12, 0, 0, 0, time.UTC)
	for _, tt := range []struct {
		left time.Duration
		want int
	}{
		{30 * 24 * time.Hour, 30},
		{30*24*time.Hour - time.Second, 29},
		{time.Hour, 0},
		{0, 0},
		{-time.Second, -1},
		{-24 * time.Hour, -1},
		{-24*time.Hour - time.Second, -2},
	} {
		if got := DaysLeft(now.Add(tt.left), now); got != tt.want {
			t.Errorf("DaysLeft(now%+v) = %d, want %d", tt.left, got, tt.want)
		}
	}
}

func TestSoon(t *testing.T) {
	if !Soon(WarnDays-1) || Soon(WarnDays) || !Soon(-1) {
		t.Fatalf("Soon around WarnDays=%d wrong", WarnDays)
	}
}
