// Package natstest runs a NATS cluster with JetStream inside a test
// process: n nats-server instances on loopback, each with its own client
// and route ports and its own store directory, clustered with routes.
// Start returns once the cluster has a JetStream meta leader and every
// peer is current, so a test can create replicated streams at once.
//
// Every server stops by itself when the test ends (t.Cleanup). A test may
// stop one server (Shutdown: a dead NATS node) and start it again with
// the same ports and store (Restart).
//
// Set STSRELAY_NATS_LOG=1 to see the servers' logs.
package natstest

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// ReadyTimeout bounds how long Start and Restart wait for the cluster to
// be ready.
const ReadyTimeout = 20 * time.Second

// Cluster is a running test cluster.
type Cluster struct {
	t       testing.TB
	mu      sync.Mutex
	opts    []*server.Options
	servers []*server.Server // nil while shut down
	closed  bool
}

// Start starts an n-node cluster (n >= 1) named n1..nN and waits until
// JetStream is ready on it.
func Start(t testing.TB, n int) *Cluster {
	return StartWith(t, n, nil)
}

// StartWith is Start with a hook that adjusts each server's options
// before it starts (a smaller max_payload, say).
func StartWith(t testing.TB, n int, configure func(i int, o *server.Options)) *Cluster {
	t.Helper()
	if n < 1 {
		t.Fatalf("natstest: need at least one server, got %d", n)
	}
	ports := freePorts(t, 2*n)
	clientPorts, routePorts := ports[:n], ports[n:]
	base := t.TempDir()
	c := &Cluster{t: t}
	t.Cleanup(c.Close)
	for i := 0; i < n; i++ {
		o := &server.Options{
			ServerName:         fmt.Sprintf("n%d", i+1),
			Host:               "127.0.0.1",
			Port:               clientPorts[i],
			NoSigs:             true,
			NoLog:              os.Getenv("STSRELAY_NATS_LOG") == "",
			JetStream:          true,
			StoreDir:           filepath.Join(base, fmt.Sprintf("n%d", i+1)),
			JetStreamMaxMemory: 256 << 20,
			JetStreamMaxStore:  1 << 30,
		}
		if n > 1 {
			o.Cluster = server.ClusterOpts{Name: "stsrelay-test", Host: "127.0.0.1", Port: routePorts[i]}
			var routes []string
			for j := 0; j < n; j++ {
				if j != i {
					routes = append(routes, fmt.Sprintf("nats://127.0.0.1:%d", routePorts[j]))
				}
			}
			o.Routes = server.RoutesFromStr(strings.Join(routes, ","))
		}
		if configure != nil {
			configure(i, o)
		}
		c.opts = append(c.opts, o)
		c.servers = append(c.servers, nil)
	}
	for i := range c.opts {
		s, err := c.newServer(i)
		if err != nil {
			t.Fatalf("natstest: %v", err)
		}
		c.servers[i] = s
	}
	if err := c.waitReady(ReadyTimeout); err != nil {
		t.Fatalf("natstest: %v", err)
	}
	return c
}

// newServer starts server i with its options.
func (c *Cluster) newServer(i int) (*server.Server, error) {
	o := c.opts[i].Clone()
	s, err := server.NewServer(o)
	if err != nil {
		return nil, fmt.Errorf("server %s: %w", o.ServerName, err)
	}
	if !o.NoLog {
		s.ConfigureLogger()
	}
	s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		s.Shutdown()
		return nil, fmt.Errorf("server %s: not ready for connections", o.ServerName)
	}
	return s, nil
}

// waitReady waits until one running server is the JetStream meta leader,
// knows every running peer, and all running servers are current.
func (c *Cluster) waitReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		c.mu.Lock()
		var running []*server.Server
		for _, s := range c.servers {
			if s != nil {
				running = append(running, s)
			}
		}
		c.mu.Unlock()
		if ready(running) {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("JetStream cluster of %d not ready after %v", len(running), timeout)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func ready(running []*server.Server) bool {
	if len(running) == 0 {
		return false
	}
	if len(running) == 1 && !running[0].JetStreamIsClustered() {
		return running[0].JetStreamEnabled()
	}
	leaders := 0
	for _, s := range running {
		if !s.JetStreamEnabled() || !s.JetStreamIsCurrent() {
			return false
		}
		if s.JetStreamIsLeader() {
			leaders++
			if len(s.JetStreamClusterPeers()) < len(running) {
				return false
			}
		}
	}
	return leaders == 1
}

// URLs returns the client URLs of all servers, running or not, so that a
// client given them all reconnects to a live one.
func (c *Cluster) URLs() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]string, len(c.opts))
	for i, o := range c.opts {
		out[i] = fmt.Sprintf("nats://127.0.0.1:%d", o.Port)
	}
	return out
}

// URL returns the client URLs joined with commas (nats.Connect's form).
func (c *Cluster) URL() string { return strings.Join(c.URLs(), ",") }

// Server returns server i, nil while it is shut down.
func (c *Cluster) Server(i int) *server.Server {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.servers[i]
}

// Len returns the number of servers (running or not).
func (c *Cluster) Len() int { return len(c.opts) }

// Shutdown stops server i, as if its node died; its store stays on disk.
func (c *Cluster) Shutdown(i int) {
	c.mu.Lock()
	s := c.servers[i]
	c.servers[i] = nil
	c.mu.Unlock()
	if s != nil {
		s.Shutdown()
		s.WaitForShutdown()
	}
}

// Restart starts server i again with the same ports and store directory
// and waits until the cluster is ready.
func (c *Cluster) Restart(i int) {
	c.t.Helper()
	c.mu.Lock()
	if c.servers[i] != nil || c.closed {
		c.mu.Unlock()
		return
	}
	c.mu.Unlock()
	s, err := c.newServer(i)
	if err != nil {
		c.t.Fatalf("natstest: restart: %v", err)
	}
	c.mu.Lock()
	c.servers[i] = s
	c.mu.Unlock()
	if err := c.waitReady(ReadyTimeout); err != nil {
		c.t.Fatalf("natstest: restart: %v", err)
	}
}

// Close stops every server. It runs by itself at the end of the test.
func (c *Cluster) Close() {
	c.mu.Lock()
	c.closed = true
	servers := c.servers
	c.servers = make([]*server.Server, len(servers))
	c.mu.Unlock()
	var wg sync.WaitGroup
	for _, s := range servers {
		if s == nil {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			s.Shutdown()
			s.WaitForShutdown()
		}()
	}
	wg.Wait()
}

// freePorts picks n distinct free TCP ports on 127.0.0.1: all listeners
// stay open until every port is chosen, so none repeats.
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	ports := make([]int, n)
	for i := range ports {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatalf("natstest: free port: %v", err)
		}
		ls = append(ls, l)
		ports[i] = l.Addr().(*net.TCPAddr).Port
	}
	return ports
}
