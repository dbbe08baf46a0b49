// Command latencyproxy is the "WAN" of bench/run.sh: a TCP proxy on
// loopback that delays every chunk of bytes by a fixed one-way delay in each
// direction and counts the round trips an SMTP client makes.
//
//	latencyproxy -listen 127.0.0.7:2526 -target 127.0.0.4:2527 -delay 25ms \
//	    -stats stats.json -ready ready
//
// The link model: a chunk read from one side at time t is written to the
// other side at t+delay, in order (one goroutine per direction with a queue
// of (deadline, bytes)). Bandwidth is not limited, and there is no loss,
// slow start, Nagle or delayed ACK: only propagation delay. With
// -handshake (the default) the TCP three-way handshake is modelled too: the
// kernel completes the client's connect() at once, so the proxy dials the
// target only 3×delay after accepting. For a server-speaks-first protocol
// such as SMTP the client then sees the greeting 4×delay (2 RTT) after it
// sent its SYN, and the server sees the connection 1.5 RTT after it, as on
// a real path.
//
// Counting, at the target (sink) side of the link, per connection: a
// client→server flight starts whenever the client's bytes reach the target
// after the target last sent something (or first); a server→client flight
// starts whenever the target sends after it last received. An SMTP
// exchange that waits for every reply makes one client→server flight per
// command; a pipelined one makes one per group. So flights / messages is
// round trips per message (the greeting wait and the TCP handshake are not
// flights of the client; connections are counted separately).
//
// Memory is bounded per connection and direction (-queue chunks of at most
// -chunk bytes; a full queue stops reading from that side, which is what a
// full TCP window does). On SIGINT or SIGTERM it stops accepting, closes
// every connection, writes the totals as JSON to -stats (and to stdout) and
// exits 0.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

type stats struct {
	Listen                string  `json:"listen"`
	Target                string  `json:"target"`
	DelayC2SMs            float64 `json:"delay_client_to_server_ms"`
	DelayS2CMs            float64 `json:"delay_server_to_client_ms"`
	Handshake             bool    `json:"handshake_modelled"`
	Connections           int64   `json:"connections"`
	DialErrors            int64   `json:"dial_errors"`
	MaxConcurrent         int64   `json:"max_concurrent"`
	FlightsClientToServer int64   `json:"flights_client_to_server"`
	FlightsServerToClient int64   `json:"flights_server_to_client"`
	BytesClientToServer   int64   `json:"bytes_client_to_server"`
	BytesServerToClient   int64   `json:"bytes_server_to_client"`
	MaxFlightsPerConn     int64   `json:"max_flights_client_to_server_per_connection"`
	ElapsedSeconds        float64 `json:"elapsed_s"`
}

type proxy struct {
	target    string
	dC2S      time.Duration
	dS2C      time.Duration
	handshake bool
	chunk     int
	queue     int

	connections, dialErrors, active, maxActive atomic.Int64
	flightsC2S, flightsS2C, bytesC2S, bytesS2C atomic.Int64
	maxFlights                                 atomic.Int64

	mu    sync.Mutex
	conns map[*link]struct{}
	done  bool
	wg    sync.WaitGroup
}

// link is one proxied connection.
type link struct {
	p              *proxy
	client, server net.Conn
	closeOnce      sync.Once

	mu      sync.Mutex
	last    int // 0 none, 1 client→server, 2 server→client
	flights int64
}

type chunk struct {
	due time.Time
	b   []byte
}

func main() {
	listen := flag.String("listen", "127.0.0.1:2526", "listen address (loopback)")
	target := flag.String("target", "", "address to forward to (loopback)")
	delay := flag.Duration("delay", 25*time.Millisecond, "one-way delay, each direction (RTT = 2×delay)")
	dC2S := flag.Duration("delay-c2s", -1, "client→server delay (default -delay)")
	dS2C := flag.Duration("delay-s2c", -1, "server→client delay (default -delay)")
	handshake := flag.Bool("handshake", true, "model the TCP handshake: dial the target 3×delay after accepting")
	statsFile := flag.String("stats", "", "write the totals as JSON here on exit")
	ready := flag.String("ready", "", "create this file once listening")
	chunkSize := flag.Int("chunk", 16<<10, "read size (bytes)")
	queueLen := flag.Int("queue", 64, "chunks queued per connection and direction (bounds memory)")
	flag.Parse()

	for _, a := range []string{*listen, *target} {
		h, _, err := net.SplitHostPort(a)
		ip := net.ParseIP(h)
		if err != nil || ip == nil || !ip.IsLoopback() {
			log.Fatalf("latencyproxy: %q is not a loopback host:port", a)
		}
	}
	p := &proxy{target: *target, dC2S: *delay, dS2C: *delay, handshake: *handshake,
		chunk: *chunkSize, queue: *queueLen, conns: map[*link]struct{}{}}
	if *dC2S >= 0 {
		p.dC2S = *dC2S
	}
	if *dS2C >= 0 {
		p.dS2C = *dS2C
	}
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		log.Fatalf("latencyproxy: %v", err)
	}
	start := time.Now()
	if *ready != "" {
		if err := os.WriteFile(*ready, []byte("ready\n"), 0o644); err != nil {
			log.Fatalf("latencyproxy: %v", err)
		}
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	acceptDone := make(chan struct{})
	go func() {
		defer close(acceptDone)
		for {
			c, err := ln.Accept()
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				log.Printf("latencyproxy: accept: %v", err)
				time.Sleep(10 * time.Millisecond)
				continue
			}
			p.serve(c)
		}
	}()
	<-sig
	ln.Close()
	<-acceptDone
	p.mu.Lock()
	p.done = true
	links := make([]*link, 0, len(p.conns))
	for l := range p.conns {
		links = append(links, l)
	}
	p.mu.Unlock()
	for _, l := range links { // l.close takes p.mu
		l.close()
	}
	waited := make(chan struct{})
	go func() { p.wg.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-time.After(5 * time.Second):
		log.Printf("latencyproxy: some connections did not stop within 5s")
	}
	s := stats{
		Listen: *listen, Target: *target,
		DelayC2SMs: float64(p.dC2S) / 1e6, DelayS2CMs: float64(p.dS2C) / 1e6, Handshake: p.handshake,
		Connections: p.connections.Load(), DialErrors: p.dialErrors.Load(), MaxConcurrent: p.maxActive.Load(),
		FlightsClientToServer: p.flightsC2S.Load(), FlightsServerToClient: p.flightsS2C.Load(),
		BytesClientToServer: p.bytesC2S.Load(), BytesServerToClient: p.bytesS2C.Load(),
		MaxFlightsPerConn: p.maxFlights.Load(), ElapsedSeconds: time.Since(start).Seconds(),
	}
	b, _ := json.MarshalIndent(s, "", "  ")
	b = append(b, '\n')
	os.Stdout.Write(b)
	if *statsFile != "" {
		if err := os.WriteFile(*statsFile, b, 0o644); err != nil {
			log.Fatalf("latencyproxy: %v", err)
		}
	}
}

func (p *proxy) serve(c net.Conn) {
	l := &link{p: p, client: c}
	p.mu.Lock()
	if p.done {
		p.mu.Unlock()
		c.Close()
		return
	}
	p.conns[l] = struct{}{}
	p.wg.Add(1)
	p.mu.Unlock()
	p.connections.Add(1)
	n := p.active.Add(1)
	for {
		m := p.maxActive.Load()
		if n <= m || p.maxActive.CompareAndSwap(m, n) {
			break
		}
	}
	go l.run()
}

func (l *link) close() {
	l.closeOnce.Do(func() {
		l.client.Close()
		l.p.mu.Lock()
		if l.server != nil {
			l.server.Close()
		}
		l.p.mu.Unlock()
	})
}

// event records data moving at the target side of the link: dir 1 is the
// client's bytes reaching the target, 2 the target's bytes leaving it.
func (l *link) event(dir int) {
	l.mu.Lock()
	flip := l.last != dir
	l.last = dir
	if flip && dir == 1 {
		l.flights++
		f := l.flights
		l.mu.Unlock()
		l.p.flightsC2S.Add(1)
		for {
			m := l.p.maxFlights.Load()
			if f <= m || l.p.maxFlights.CompareAndSwap(m, f) {
				break
			}
		}
		return
	}
	l.mu.Unlock()
	if flip {
		l.p.flightsS2C.Add(1)
	}
}

func (l *link) run() {
	p := l.p
	defer func() {
		l.close()
		p.mu.Lock()
		delete(p.conns, l)
		p.mu.Unlock()
		p.active.Add(-1)
		p.wg.Done()
	}()
	accepted := time.Now()
	// Client→server: start reading (and queueing) at once; the writer
	// waits for the dial.
	c2s := make(chan chunk, p.queue)
	serverReady := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { // client reader
		defer wg.Done()
		l.reader(l.client, c2s, p.dC2S, &p.bytesC2S, 0)
	}()
	var dialed bool
	go func() { // client→server writer
		defer wg.Done()
		<-serverReady
		if !dialed {
			for range c2s { // drain until the reader stops
			}
			return
		}
		l.writer(l.server, c2s, 1)
	}()

	if p.handshake {
		t := time.NewTimer(time.Until(accepted.Add(p.dC2S + p.dS2C + p.dC2S)))
		<-t.C
	}
	s, err := net.DialTimeout("tcp", p.target, 10*time.Second)
	p.mu.Lock()
	if err == nil && p.done {
		s.Close()
		err = errors.New("stopping")
	}
	if err == nil {
		l.server = s
	}
	p.mu.Unlock()
	if err != nil {
		p.dialErrors.Add(1)
		l.close()
		close(serverReady)
		wg.Wait()
		return
	}
	dialed = true
	close(serverReady)

	s2c := make(chan chunk, p.queue)
	wg.Add(2)
	go func() {
		defer wg.Done()
		l.reader(s, s2c, p.dS2C, &p.bytesS2C, 2)
	}()
	go func() {
		defer wg.Done()
		l.writer(l.client, s2c, 0)
	}()
	wg.Wait()
}

// reader reads src into chunks due after delay, until EOF or an error;
// then closes out. With ev != 0 each read is recorded (the target side).
func (l *link) reader(src net.Conn, out chan<- chunk, delay time.Duration, bytes *atomic.Int64, ev int) {
	defer close(out)
	buf := make([]byte, l.p.chunk)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			now := time.Now()
			if ev != 0 {
				l.event(ev)
			}
			bytes.Add(int64(n))
			b := make([]byte, n)
			copy(b, buf[:n])
			out <- chunk{due: now.Add(delay), b: b}
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				l.close()
			}
			return
		}
	}
}

// writer writes each chunk at its due time, in order; at the end of the
// stream it half-closes dst. With ev != 0 each write is recorded (before
// it is made, so that the reply to it cannot be recorded first).
func (l *link) writer(dst net.Conn, in <-chan chunk, ev int) {
	t := time.NewTimer(time.Hour)
	t.Stop()
	failed := false
	for c := range in {
		if failed {
			continue // drain, so the reader is never blocked for good
		}
		if d := time.Until(c.due); d > 0 {
			t.Reset(d)
			<-t.C
		}
		if ev != 0 {
			l.event(ev)
		}
		if _, err := dst.Write(c.b); err != nil {
			failed = true
			l.close()
		}
	}
	if !failed {
		if tc, ok := dst.(*net.TCPConn); ok {
			tc.CloseWrite()
		} else {
			dst.Close()
		}
	}
}

func init() {
	log.SetFlags(0)
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: latencyproxy -listen ADDR -target ADDR [-delay 25ms] [-stats FILE] [-ready FILE]")
		flag.PrintDefaults()
	}
}
