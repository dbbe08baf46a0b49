package control

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

// Operations (Request.Op).
const (
	OpQueueList        = "queue.list"
	OpQueueSummary     = "queue.summary"
	OpQueueRetryDomain = "queue.retry-domain"
	OpQueueShow        = "queue.show"
	OpQueueRetry       = "queue.retry"
	OpQueueDelete      = "queue.delete"
	OpQueueBounce      = "queue.bounce"
	OpPolicyForecast   = "policy.forecast"
	OpPolicyList       = "policy.list"
	OpPolicyShow       = "policy.show"
	OpPolicyRefresh    = "policy.refresh"
	OpPolicyForget     = "policy.forget"
	OpTLSRPTPending    = "tlsrpt.pending"
)

// Request is one call on the socket.
type Request struct {
	Op  string `json:"op"`
	Arg string `json:"arg,omitempty"`
	// Domain, Limit and After select messages (queue.list,
	// queue.retry-domain).
	Domain string `json:"domain,omitempty"`
	Limit  int    `json:"limit,omitempty"`
	After  string `json:"after,omitempty"`
}

// Reply is the answer to one Request.
type Reply struct {
	Error string          `json:"error,omitempty"`
	Data  json.RawMessage `json:"data,omitempty"`
	// NotFound marks an error about a missing queue ID or domain.
	NotFound bool `json:"not_found,omitempty"`
}

// ErrNoServer is returned by Client when no relay listens on the socket.
var ErrNoServer = errors.New("no running relay")

// NotFoundError is a missing queue ID, policy or forecast as the Client
// sees it (the relay's error, text only).
type NotFoundError struct{ Msg string }

func (e *NotFoundError) Error() string { return e.Msg }

// Path is the control socket of the relay whose data_dir is dataDir.
func Path(dataDir string) string { return filepath.Join(dataDir, "control.sock") }

// Handler answers one request with the value sent as Reply.Data (nil:
// none).
type Handler func(req Request) (any, error)

// Listen listens on the control socket, answering each connection with
// h, until the returned listener is closed.
func Listen(dataDir string, h Handler) (net.Listener, error) {
	path := Path(dataDir)
	_ = os.Remove(path) // a stale socket from a crash; the data_dir lock proves we are alone
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
			go serveConn(c, h)
		}
	}()
	return ln, nil
}

func serveConn(c net.Conn, h Handler) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(2 * time.Minute))
	var req Request
	if err := json.NewDecoder(bufio.NewReader(c)).Decode(&req); err != nil {
		return
	}
	var rep Reply
	data, err := h(req)
	if err != nil {
		rep.Error = err.Error()
		rep.NotFound = IsNotFound(err)
	} else if data != nil {
		rep.Data, _ = json.Marshal(data)
	}
	_ = json.NewEncoder(c).Encode(rep)
}

// Client calls the relay whose data_dir is DataDir. Each method returns
// ErrNoServer when none is listening, and a *NotFoundError for a missing
// queue ID, policy or forecast.
type Client struct{ DataDir string }

// Call sends req and decodes the reply's data into out (nil: ignored).
func (cl Client) Call(req Request, out any) error {
	c, err := net.DialTimeout("unix", Path(cl.DataDir), 2*time.Second)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT) {
			return ErrNoServer
		}
		return fmt.Errorf("control socket: %w", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(3 * time.Minute))
	if err := json.NewEncoder(c).Encode(req); err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	var rep Reply
	if err := json.NewDecoder(c).Decode(&rep); err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	if rep.Error != "" {
		if rep.NotFound {
			return &NotFoundError{rep.Error}
		}
		return errors.New(rep.Error)
	}
	if out != nil && len(rep.Data) > 0 {
		return json.Unmarshal(rep.Data, out)
	}
	return nil
}
