package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"runtime/pprof"
	"sync"
	"syscall"

	"go.uber.org/zap"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/logging"
	"github.com/stsrelay/stsrelay/internal/server"
)

func cmdServe(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	cfgPath := fs.String("config", defaultConfig, "configuration file")
	if err := fs.Parse(args); err != nil {
		return &usageError{err.Error()}
	}
	if fs.NArg() > 0 {
		return &usageError{"serve: unexpected argument " + fs.Arg(0)}
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		return err
	}
	log, level, closeLog, err := logging.NewLeveled(cfg.Log)
	if err != nil {
		return fmt.Errorf("config %s: %w", cfg.Path, err)
	}
	defer closeLog()
	ctx, stop := stopOnSignal(log)
	defer stop()
	// SIGHUP reloads the configuration (internal/server/reload.go).
	// Registered before anything starts: unhandled, SIGHUP would end the
	// process.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	// STSRELAY_CPUPROFILE=FILE writes a CPU profile of the whole run, for
	// `go tool pprof` (benchmarks; not an operator setting).
	if path := os.Getenv("STSRELAY_CPUPROFILE"); path != "" {
		f, err := os.Create(path)
		if err != nil {
			return fmt.Errorf("STSRELAY_CPUPROFILE: %w", err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			return fmt.Errorf("STSRELAY_CPUPROFILE: %w", err)
		}
		defer func() { pprof.StopCPUProfile(); f.Close() }()
	}
	if err := server.Run(ctx, server.Options{Config: cfg, Logger: log, Reload: hup, Level: &level, Version: version}); err != nil {
		log.Error("stopped with error", zap.Error(err))
		return err
	}
	return nil
}

// stopOnSignal returns a context that ends on the first SIGINT or
// SIGTERM (the clean shutdown: in-flight deliveries get
// delivery.shutdown_timeout). A second signal exits at once with status
// 2, after one log line: every acknowledged message is already on disk,
// so nothing accepted is lost, though an attempt in flight may be
// repeated after the restart. stop releases the signals.
func stopOnSignal(log *zap.Logger) (context.Context, func()) {
	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	returned := make(chan struct{})
	go func() {
		select {
		case s := <-sigs:
			log.Info("signal", zap.String("signal", s.String()))
			cancel()
		case <-returned:
			return
		}
		select {
		case s := <-sigs:
			log.Error("second signal: exiting at once", zap.String("signal", s.String()))
			_ = log.Sync()
			os.Exit(exitProblem)
		case <-returned:
		}
	}()
	var once sync.Once
	return ctx, func() {
		once.Do(func() {
			signal.Stop(sigs)
			close(returned)
			cancel()
		})
	}
}

// serve runs the relay in process (demo) until ctx ends.
func serve(ctx context.Context, cfg *config.Config, log *zap.Logger) error {
	return server.Run(ctx, server.Options{Config: cfg, Logger: log, Version: version})
}
