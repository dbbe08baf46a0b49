// Command natscluster runs an N-node NATS cluster with JetStream in one
// process, for bench/run.sh's fleet mode (issue #16).
//
//	natscluster -dir DIR [-n 3] [-ip 127.0.0.21] [-client-port 4222] [-route-port 6222]
//
// Server i (1..n) is named nI, listens for clients on IP+i-1:client-port
// and for routes on IP+i-1:route-port (loopback addresses 127.0.0.x), and
// stores its JetStream data in DIR/nI. Once one server is the JetStream
// meta leader, it knows every peer and every server is current, the
// client URLs are printed on stdout as one comma-separated line (and, with
// -ready FILE, written to FILE). SIGTERM or SIGINT shuts every server down
// and the program exits 0. -log sends the servers' logs to stderr.
package main

import (
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "natscluster:", err)
		os.Exit(1)
	}
}

func run() error {
	n := flag.Int("n", 3, "servers")
	dir := flag.String("dir", "", "store directory (one subdirectory per server)")
	ip := flag.String("ip", "127.0.0.21", "address of server 1; server i listens on this address + i-1")
	clientPort := flag.Int("client-port", 4222, "client port (every server, on its own address)")
	routePort := flag.Int("route-port", 6222, "cluster route port (every server, on its own address)")
	readyFile := flag.String("ready", "", "also write the URLs to this file once ready")
	timeout := flag.Duration("timeout", 60*time.Second, "give up when the cluster is not ready after this")
	logs := flag.Bool("log", false, "servers' logs to stderr")
	maxStore := flag.Int64("max-store", 4<<30, "JetStream max file store per server, bytes")
	maxMem := flag.Int64("max-mem", 256<<20, "JetStream max memory store per server, bytes")
	flag.Parse()
	if *n < 1 {
		return errors.New("-n must be at least 1")
	}
	if *dir == "" {
		return errors.New("-dir is required")
	}
	first, err := netip.ParseAddr(*ip)
	if err != nil || !first.Is4() {
		return fmt.Errorf("-ip: want an IPv4 address, got %q", *ip)
	}
	addrs := make([]string, *n)
	a := first
	for i := range addrs {
		if !a.IsLoopback() {
			return fmt.Errorf("address %s is not loopback", a)
		}
		addrs[i] = a.String()
		a = a.Next()
	}

	// Signals first, so that a SIGTERM during start-up still shuts down.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)

	var servers []*server.Server
	shutdown := func() {
		var wg sync.WaitGroup
		for _, s := range servers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				s.Shutdown()
				s.WaitForShutdown()
			}()
		}
		wg.Wait()
	}
	urls := make([]string, *n)
	for i := 0; i < *n; i++ {
		name := fmt.Sprintf("n%d", i+1)
		o := &server.Options{
			ServerName:         name,
			Host:               addrs[i],
			Port:               *clientPort,
			NoSigs:             true,
			NoLog:              !*logs,
			JetStream:          true,
			StoreDir:           filepath.Join(*dir, name),
			JetStreamMaxMemory: *maxMem,
			JetStreamMaxStore:  *maxStore,
		}
		if *n > 1 {
			o.Cluster = server.ClusterOpts{Name: "stsrelay-bench", Host: addrs[i], Port: *routePort}
			var routes []string
			for j := 0; j < *n; j++ {
				if j != i {
					routes = append(routes, fmt.Sprintf("nats://%s:%d", addrs[j], *routePort))
				}
			}
			o.Routes = server.RoutesFromStr(strings.Join(routes, ","))
		}
		s, err := server.NewServer(o)
		if err != nil {
			shutdown()
			return fmt.Errorf("server %s: %w", name, err)
		}
		if *logs {
			s.ConfigureLogger()
		}
		s.Start()
		servers = append(servers, s)
		if !s.ReadyForConnections(10 * time.Second) {
			shutdown()
			return fmt.Errorf("server %s: not ready for connections on %s:%d", name, addrs[i], *clientPort)
		}
		urls[i] = fmt.Sprintf("nats://%s:%d", addrs[i], *clientPort)
	}

	deadline := time.Now().Add(*timeout)
	for !ready(servers) {
		select {
		case s := <-sig:
			shutdown()
			fmt.Fprintf(os.Stderr, "natscluster: %v before ready; stopped\n", s)
			return nil
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			shutdown()
			return fmt.Errorf("JetStream cluster of %d not ready after %v", *n, *timeout)
		}
	}
	line := strings.Join(urls, ",")
	fmt.Println(line)
	if *readyFile != "" {
		if err := os.WriteFile(*readyFile, []byte(line+"\n"), 0o644); err != nil {
			shutdown()
			return err
		}
	}
	<-sig
	shutdown()
	return nil
}

// ready: one server is the JetStream meta leader and knows every peer,
// and every server is current (as internal/fleet/natstest does).
func ready(servers []*server.Server) bool {
	if len(servers) == 1 && !servers[0].JetStreamIsClustered() {
		return servers[0].JetStreamEnabled()
	}
	leaders := 0
	for _, s := range servers {
		if !s.JetStreamEnabled() || !s.JetStreamIsCurrent() {
			return false
		}
		if s.JetStreamIsLeader() {
			leaders++
			if len(s.JetStreamClusterPeers()) < len(servers) {
				return false
			}
		}
	}
	return leaders == 1
}
