// Command benchtool holds the measuring helpers of bench/run.sh.
//
//	benchtool load [flags] [-- smtp-source args...]
//	    Runs one load: either smtp-source (the arguments after --) or, with
//	    -lat, the built-in single-session client. While it runs it samples
//	    the proportional set size (PSS, /proc/PID/smaps_rollup) summed over
//	    the process trees rooted at -pids. With -expect N it then waits until
//	    the sink's counter grew by N. Prints one line of key=value figures:
//	    accept_s (submitting tool's wall time), deliver_s (start to sink
//	    holding every message), drain_s (submitter done to sink done),
//	    peak_pss_kb, peak_rss_kb, max_procs and, with -lat, lat_p50_ms,
//	    lat_p99_ms, lat_min_ms, lat_max_ms, lat_n.
//
//	benchtool mem -pids P[,P...]
//	    One PSS/RSS sample of the process trees.
//
//	benchtool waitbanner -addr HOST:PORT -since UNIX_NANOS
//	    Waits for a 220 greeting on addr; prints the seconds since -since.
//
//	benchtool table -results results.tsv [-fsync fsync.tsv] [-restart restart.tsv] [-scale scale.tsv]
//	    The Markdown report: medians, min-max, per-repetition ratios.
//
//	benchtool fillqueue | waitready | procstat | metrics
//	    The "scale" mode's helpers (queue at scale, issue #12): see scale.go.
//
//	benchtool waitcount -count-sinkc F -expect N -pids P,... [-extra-pids P]
//	    The fleet mode's delivery side (issue #16): see fleet.go.
//
// The built-in client (-lat) submits like `smtp-source -s C -m N -l SIZE`
// does (-c C, default 1): one message per connection (connect, EHLO, MAIL, RCPT, DATA, body,
// ".", QUIT), one connection at a time per session. Latency is measured from sending the
// final "." to reading the reply to it (the 250 comes only after the queue
// made the message durable), per message.
package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: benchtool load|mem|waitbanner|table|fillqueue|waitready|procstat|metrics|waitcount [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "load":
		err = cmdLoad(os.Args[2:])
	case "mem":
		err = cmdMem(os.Args[2:])
	case "waitbanner":
		err = cmdWaitBanner(os.Args[2:])
	case "table":
		err = cmdTable(os.Args[2:])
	case "fillqueue":
		err = cmdFillQueue(os.Args[2:])
	case "waitready":
		err = cmdWaitReady(os.Args[2:])
	case "procstat":
		err = cmdProcStat(os.Args[2:])
	case "metrics":
		err = cmdMetrics(os.Args[2:])
	case "waitcount":
		err = cmdWaitCount(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "benchtool:", err)
		os.Exit(1)
	}
}

func cmdLoad(args []string) error {
	fs := flag.NewFlagSet("load", flag.ContinueOnError)
	countHTTP := fs.String("count-http", "", "sink counter URL (benchworld /count)")
	countSinkc := fs.String("count-sinkc", "", "smtp-sink -c output file")
	expect := fs.Int("expect", 0, "messages the sink must receive (0: do not wait)")
	pids := fs.String("pids", "", "comma-separated root PIDs whose process trees are sampled")
	interval := fs.Duration("interval", 200*time.Millisecond, "memory sampling interval")
	timeout := fs.Duration("timeout", 10*time.Minute, "give up waiting for delivery after this")
	lat := fs.Bool("lat", false, "submit with the built-in single-session client instead of smtp-source")
	addr := fs.String("addr", "", "-lat: submission address")
	n := fs.Int("n", 100, "-lat: messages")
	size := fs.Int("size", 2048, "-lat: payload bytes")
	from := fs.String("from", "bench@client.bench.test", "-lat: envelope sender")
	to := fs.String("to", "", "-lat: recipient")
	sessions := fs.Int("c", 1, "-lat: concurrent sessions (the -n messages are shared among them)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	counter := func() (int64, error) { return 0, nil }
	switch {
	case *countHTTP != "":
		counter = func() (int64, error) { return httpCount(*countHTTP) }
	case *countSinkc != "":
		counter = func() (int64, error) { return sinkcCount(*countSinkc) }
	case *expect > 0:
		return errors.New("-expect needs -count-http or -count-sinkc")
	}
	roots, err := parsePIDs(*pids)
	if err != nil {
		return err
	}
	base, err := counter()
	if err != nil {
		return fmt.Errorf("read counter: %w", err)
	}

	var peak memSample
	stopMem := make(chan struct{})
	var memWG sync.WaitGroup
	if len(roots) > 0 {
		memWG.Add(1)
		go func() {
			defer memWG.Done()
			t := time.NewTicker(*interval)
			defer t.Stop()
			for {
				s := sampleTrees(roots)
				peak.max(s)
				select {
				case <-stopMem:
					return
				case <-t.C:
				}
			}
		}()
	}

	start := time.Now()
	var lats []time.Duration
	if *lat {
		lats, err = latClient(*addr, *n, *sessions, *size, *from, *to)
	} else {
		if fs.NArg() == 0 {
			return errors.New("load: smtp-source arguments expected after --")
		}
		cmd := exec.Command(fs.Arg(0), fs.Args()[1:]...)
		cmd.Stdout = os.Stderr
		cmd.Stderr = os.Stderr
		err = cmd.Run()
	}
	accepted := time.Now()
	if err != nil {
		close(stopMem)
		return fmt.Errorf("submitter: %w", err)
	}
	delivered := accepted
	if *expect > 0 {
		deadline := start.Add(*timeout)
		for {
			c, err := counter()
			if err == nil && c-base >= int64(*expect) {
				delivered = time.Now()
				break
			}
			if time.Now().After(deadline) {
				close(stopMem)
				return fmt.Errorf("timeout: sink has %d of %d messages", c-base, *expect)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	close(stopMem)
	memWG.Wait()

	fmt.Printf("accept_s=%.3f", accepted.Sub(start).Seconds())
	if *expect > 0 {
		fmt.Printf(" deliver_s=%.3f drain_s=%.3f", delivered.Sub(start).Seconds(), delivered.Sub(accepted).Seconds())
	}
	if len(roots) > 0 {
		fmt.Printf(" peak_pss_kb=%d peak_rss_kb=%d max_procs=%d", peak.pss, peak.rss, peak.procs)
	}
	if len(lats) > 0 {
		sort.Slice(lats, func(i, j int) bool { return lats[i] < lats[j] })
		ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
		fmt.Printf(" lat_p50_ms=%.3f lat_p99_ms=%.3f lat_min_ms=%.3f lat_max_ms=%.3f lat_n=%d",
			ms(pct(lats, 50)), ms(pct(lats, 99)), ms(lats[0]), ms(lats[len(lats)-1]), len(lats))
	}
	fmt.Println()
	return nil
}

// pct is the nearest-rank percentile of sorted d.
func pct(d []time.Duration, p int) time.Duration {
	i := (p*len(d) + 99) / 100
	if i < 1 {
		i = 1
	}
	return d[i-1]
}

func httpCount(url string) (int64, error) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
}

// sinkcCount reads the last "mesg=N" that smtp-sink -c wrote.
func sinkcCount(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	off := st.Size() - 256
	if off < 0 {
		off = 0
	}
	buf := make([]byte, st.Size()-off)
	if _, err := f.ReadAt(buf, off); err != nil && err != io.EOF {
		return 0, err
	}
	s := string(buf)
	i := strings.LastIndex(s, "mesg=")
	if i < 0 {
		return 0, nil
	}
	s = s[i+5:]
	j := 0
	for j < len(s) && s[j] >= '0' && s[j] <= '9' {
		j++
	}
	if j == 0 || j == len(s) { // no digits, or possibly cut short: retry later
		return 0, errors.New("partial counter")
	}
	return strconv.ParseInt(s[:j], 10, 64)
}

// latClient sends n messages over c concurrent sessions (c = 1: one after
// the other), one connection per message, and returns the time from the
// final "." to the reply, per message. Sessions take the next message
// from a shared count, so together they send exactly n.
func latClient(addr string, n, c, size int, from, to string) ([]time.Duration, error) {
	body := makeBody(size, from, to)
	if c < 1 {
		c = 1
	}
	var (
		mu    sync.Mutex
		out   = make([]time.Duration, 0, n)
		next  int
		first error
		wg    sync.WaitGroup
	)
	take := func() (int, bool) {
		mu.Lock()
		defer mu.Unlock()
		if first != nil || next >= n {
			return 0, false
		}
		next++
		return next, true
	}
	for s := 0; s < c; s++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i, ok := take()
				if !ok {
					return
				}
				d, err := oneMessage(addr, body, from, to)
				mu.Lock()
				if err != nil {
					if first == nil {
						first = fmt.Errorf("message %d: %w", i, err)
					}
				} else {
					out = append(out, d)
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	return out, first
}

func makeBody(size int, from, to string) []byte {
	var b strings.Builder
	fmt.Fprintf(&b, "From: <%s>\r\nTo: <%s>\r\nSubject: bench\r\n\r\n", from, to)
	line := strings.Repeat("x", 78) + "\r\n"
	for n := 0; n < size; n += len(line) {
		if size-n < len(line) {
			b.WriteString(strings.Repeat("y", max(size-n-2, 0)) + "\r\n")
			break
		}
		b.WriteString(line)
	}
	return []byte(b.String())
}

func oneMessage(addr string, body []byte, from, to string) (time.Duration, error) {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(2 * time.Minute))
	r := bufio.NewReader(c)
	w := bufio.NewWriterSize(c, 64<<10)
	cmd := func(line string, want int) error {
		if line != "" {
			w.WriteString(line + "\r\n")
			if err := w.Flush(); err != nil {
				return err
			}
		}
		code, text, err := readReply(r)
		if err != nil {
			return err
		}
		if code != want {
			return fmt.Errorf("%q: got %d %s", line, code, text)
		}
		return nil
	}
	if err := cmd("", 220); err != nil {
		return 0, err
	}
	if err := cmd("EHLO client.bench.test", 250); err != nil {
		return 0, err
	}
	if err := cmd("MAIL FROM:<"+from+">", 250); err != nil {
		return 0, err
	}
	if err := cmd("RCPT TO:<"+to+">", 250); err != nil {
		return 0, err
	}
	if err := cmd("DATA", 354); err != nil {
		return 0, err
	}
	w.Write(body)
	if err := w.Flush(); err != nil {
		return 0, err
	}
	t0 := time.Now()
	if err := cmd(".", 250); err != nil {
		return 0, err
	}
	d := time.Since(t0)
	w.WriteString("QUIT\r\n")
	w.Flush()
	readReply(r)
	return d, nil
}

func readReply(r *bufio.Reader) (int, string, error) {
	var text []string
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return 0, "", err
		}
		line = strings.TrimRight(line, "\r\n")
		if len(line) < 3 {
			return 0, "", fmt.Errorf("short reply %q", line)
		}
		text = append(text, line)
		if len(line) == 3 || line[3] == ' ' {
			code, err := strconv.Atoi(line[:3])
			return code, strings.Join(text, " | "), err
		}
	}
}

// Memory sampling.

type memSample struct {
	pss, rss int64 // kB
	procs    int
}

func (m *memSample) max(s memSample) {
	if s.pss > m.pss {
		m.pss = s.pss
	}
	if s.rss > m.rss {
		m.rss = s.rss
	}
	if s.procs > m.procs {
		m.procs = s.procs
	}
}

func parsePIDs(s string) ([]int, error) {
	var out []int
	for _, f := range strings.FieldsFunc(s, func(r rune) bool { return r == ',' || r == ' ' }) {
		p, err := strconv.Atoi(f)
		if err != nil {
			return nil, fmt.Errorf("bad pid %q", f)
		}
		out = append(out, p)
	}
	return out, nil
}

// treePIDs returns roots and all their descendants.
func treePIDs(roots []int) []int {
	ents, _ := os.ReadDir("/proc")
	children := map[int][]int{}
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) < 2 {
			continue
		}
		ppid, _ := strconv.Atoi(f[1])
		children[ppid] = append(children[ppid], pid)
	}
	var out []int
	seen := map[int]bool{}
	var walk func(int)
	walk = func(p int) {
		if seen[p] {
			return
		}
		seen[p] = true
		out = append(out, p)
		for _, c := range children[p] {
			walk(c)
		}
	}
	for _, r := range roots {
		walk(r)
	}
	return out
}

func sampleTrees(roots []int) memSample {
	var s memSample
	for _, p := range treePIDs(roots) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", p))
		if err != nil {
			continue
		}
		got := false
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) < 2 {
				continue
			}
			v, _ := strconv.ParseInt(f[1], 10, 64)
			switch f[0] {
			case "Pss:":
				s.pss += v
				got = true
			case "Rss:":
				s.rss += v
			}
		}
		if got {
			s.procs++
		}
	}
	return s
}

func cmdMem(args []string) error {
	fs := flag.NewFlagSet("mem", flag.ContinueOnError)
	pids := fs.String("pids", "", "comma-separated root PIDs")
	if err := fs.Parse(args); err != nil {
		return err
	}
	roots, err := parsePIDs(*pids)
	if err != nil {
		return err
	}
	s := sampleTrees(roots)
	fmt.Printf("pss_kb=%d rss_kb=%d procs=%d\n", s.pss, s.rss, s.procs)
	return nil
}

func cmdWaitBanner(args []string) error {
	fs := flag.NewFlagSet("waitbanner", flag.ContinueOnError)
	addr := fs.String("addr", "", "host:port")
	since := fs.Int64("since", 0, "start time, Unix nanoseconds (default: now)")
	timeout := fs.Duration("timeout", 5*time.Minute, "give up after")
	if err := fs.Parse(args); err != nil {
		return err
	}
	t0 := time.Now()
	if *since > 0 {
		t0 = time.Unix(0, *since)
	}
	deadline := time.Now().Add(*timeout)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", *addr, time.Second)
		if err == nil {
			c.SetDeadline(time.Now().Add(30 * time.Second))
			code, _, err := readReply(bufio.NewReader(c))
			c.Close()
			if err == nil && code == 220 {
				fmt.Printf("ready_s=%.3f\n", time.Since(t0).Seconds())
				return nil
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	return fmt.Errorf("no 220 from %s within %v", *addr, *timeout)
}
