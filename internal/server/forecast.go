package server

import (
	"context"
	"path/filepath"
	"sync"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/metrics"
	"github.com/stsrelay/stsrelay/mtasts/forecast"
)

// ForecastDir is where the enforce forecast counts are kept.
func ForecastDir(cfg *config.Config) string { return filepath.Join(cfg.DataDir, "forecast") }

// startForecast opens the counts and writes them every few seconds until
// ctx ends (and once more then). It returns nil when MTA-STS is off.
func startForecast(ctx context.Context, cfg *config.Config, met *metrics.Metrics, bg *sync.WaitGroup) (*forecast.Counter, error) {
	if !cfg.MTASTS.Enabled {
		return nil, nil
	}
	fc, err := forecast.Open(forecast.Options{Dir: ForecastDir(cfg), OnRefusal: met.ForecastRefusal})
	if err != nil {
		return nil, err
	}
	bg.Add(1)
	go func() { defer bg.Done(); fc.Run(ctx) }()
	return fc, nil
}
