// Package logging builds the zap logger from the [log] configuration:
// JSON lines (or console text), "ts" in RFC 3339 UTC.
package logging

import (
	"fmt"
	"io"
	"os"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/stsrelay/stsrelay/internal/config"
)

// New returns a logger writing to cfg.Output at cfg.Level in cfg.Format.
// The returned close function flushes and closes a log file.
func New(cfg config.Log) (*zap.Logger, func(), error) {
	log, _, closeFn, err := NewLeveled(cfg)
	return log, closeFn, err
}

// ParseLevel reads log.level: debug, info, warn or error.
func ParseLevel(s string) (zapcore.Level, error) {
	var level zapcore.Level
	if err := level.UnmarshalText([]byte(s)); err != nil {
		return level, fmt.Errorf("log.level: %w", err)
	}
	return level, nil
}

// NewLeveled is New that also returns the logger's level, which can be
// changed while the logger is in use (on reload: log.level takes effect
// at once; format and output need a restart).
func NewLeveled(cfg config.Log) (*zap.Logger, zap.AtomicLevel, func(), error) {
	if _, err := ParseLevel(cfg.Level); err != nil {
		return nil, zap.AtomicLevel{}, nil, err
	}
	var w io.Writer
	closeFn := func() {}
	switch cfg.Output {
	case "", "stderr":
		w = os.Stderr
	case "stdout":
		w = os.Stdout
	default:
		f, err := os.OpenFile(cfg.Output, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
		if err != nil {
			return nil, zap.AtomicLevel{}, nil, fmt.Errorf("log.output: %w", err)
		}
		w = f
		closeFn = func() { f.Sync(); f.Close() }
	}
	logger, level, err := NewWriter(cfg, w)
	if err != nil {
		closeFn()
		return nil, zap.AtomicLevel{}, nil, err
	}
	return logger, level, func() { _ = logger.Sync(); closeFn() }, nil
}

// NewWriter is NewLeveled writing to w instead of cfg.Output (NewLeveled
// itself, and tests that run the relay in process and read its lines).
func NewWriter(cfg config.Log, w io.Writer) (*zap.Logger, zap.AtomicLevel, error) {
	lv, err := ParseLevel(cfg.Level)
	if err != nil {
		return nil, zap.AtomicLevel{}, err
	}
	level := zap.NewAtomicLevelAt(lv)
	return zap.New(zapcore.NewCore(newEncoder(cfg.Format), zapcore.Lock(zapcore.AddSync(w)), level)), level, nil
}

// newEncoder returns the encoder for log.format: JSON lines, or console
// text.
func newEncoder(format string) zapcore.Encoder {
	enc := zapcore.EncoderConfig{
		TimeKey:        "ts",
		LevelKey:       "level",
		MessageKey:     "msg",
		CallerKey:      "",
		StacktraceKey:  "",
		LineEnding:     zapcore.DefaultLineEnding,
		EncodeLevel:    zapcore.LowercaseLevelEncoder,
		EncodeDuration: zapcore.StringDurationEncoder,
		EncodeTime: func(t time.Time, pe zapcore.PrimitiveArrayEncoder) {
			pe.AppendString(t.UTC().Format("2006-01-02T15:04:05.000000Z07:00"))
		},
	}
	if format == "console" {
		return zapcore.NewConsoleEncoder(enc)
	}
	return zapcore.NewJSONEncoder(enc)
}
