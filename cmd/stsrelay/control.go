package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"
)

// The control socket lets the CLI act on a running relay (queue and
// policy cache operations) instead of on files the relay holds open. It is
// a Unix socket under data_dir, mode 0600: one JSON request, one JSON
// reply per connection.

type controlRequest struct {
	Op  string `json:"op"`
	Arg string `json:"arg,omitempty"`
	// Domain and Limit select messages (queue.list, queue.retry).
	Domain string `json:"domain,omitempty"`
	Limit  int    `json:"limit,omitempty"`
	After  string `json:"after,omitempty"`
}

type controlReply struct {
	Error string          `json:"error,omitempty"`
	Data  json.RawMessage `json:"data,omitempty"`
	// NotFound marks an error about a missing queue ID or domain.
	NotFound bool `json:"not_found,omitempty"`
}

// errNoServer: no relay is listening on the control socket.
var errNoServer = errors.New("no running relay")

func controlPath(dataDir string) string { return filepath.Join(dataDir, "control.sock") }

// controlHandler answers one request.
type controlHandler func(req controlRequest) (any, error)

// serveControl listens on the control socket until the listener is
// closed.
func serveControl(dataDir string, h controlHandler, isNotFound func(error) bool) (net.Listener, error) {
	path := controlPath(dataDir)
	_ = os.Remove(path) // a stale socket from a crash; the queue lock proves we are alone
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("control socket: %w", err)
	}
	_ = os.Chmod(path, 0o600)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(2 * time.Minute))
				var req controlRequest
				if err := json.NewDecoder(bufio.NewReader(c)).Decode(&req); err != nil {
					return
				}
				var rep controlReply
				data, err := h(req)
				if err != nil {
					rep.Error = err.Error()
					rep.NotFound = isNotFound(err)
				} else if data != nil {
					rep.Data, _ = json.Marshal(data)
				}
				_ = json.NewEncoder(c).Encode(rep)
			}()
		}
	}()
	return ln, nil
}

// callControl sends req to the running relay. It returns errNoServer when
// none is listening.
func callControl(dataDir string, req controlRequest, out any) error {
	c, err := net.DialTimeout("unix", controlPath(dataDir), 2*time.Second)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT) {
			return errNoServer
		}
		return fmt.Errorf("control socket: %w", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Minute))
	if err := json.NewEncoder(c).Encode(req); err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	var rep controlReply
	if err := json.NewDecoder(c).Decode(&rep); err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	if rep.Error != "" {
		if rep.NotFound {
			return &notFoundError{rep.Error}
		}
		return errors.New(rep.Error)
	}
	if out != nil && len(rep.Data) > 0 {
		return json.Unmarshal(rep.Data, out)
	}
	return nil
}

// notFoundError is a missing queue ID or domain (exit 1).
type notFoundError struct{ msg string }

func (e *notFoundError) Error() string { return e.msg }
