package main

// The helpers of bench/run.sh's "scale" mode (issue #12, queue at scale):
//
//	benchtool fillqueue -dir DATA_DIR/queue -n N [-size 2048] [-domain down.bench.test] [-conc 256]
//	    Fills an stsrelay queue offline through the queue package (no
//	    SMTP): N messages of -size payload bytes to rcpt@DOMAIN, -conc
//	    commits at once (group commit), then Close (which writes the index
//	    checkpoint). The server must not run on that queue (flock).
//	    Prints fill_s=… n=….
//
//	benchtool waitready -addr HOST:PORT -log FILE [-log-offset BYTES] -since UNIX_NANOS [-interval 10ms]
//	    Polls every -interval until addr accepts a TCP connection AND the
//	    JSON log (from -log-offset on) has a "started" line. Prints
//	    ready_s (both), port_s and log_s, each since -since.
//
//	benchtool procstat -pids P[,P...] [-list]
//	    VmRSS, VmHWM, RssAnon and RssFile from /proc/PID/status summed
//	    over the process trees, and PSS; -list adds each process (name:pid:rss_kb).
//
//	benchtool metrics -url URL -names a,b,…
//	    Scrapes a Prometheus text endpoint; prints name=value for each.
//
// The scale table itself is rendered by `benchtool table -scale scale.tsv`
// (scaleTable below).

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/stsrelay/stsrelay/queue"
)

func cmdFillQueue(args []string) error {
	fs := flag.NewFlagSet("fillqueue", flag.ContinueOnError)
	dir := fs.String("dir", "", "queue directory (data_dir/queue)")
	n := fs.Int("n", 100000, "messages")
	size := fs.Int("size", 2048, "payload bytes per message")
	domain := fs.String("domain", "down.bench.test", "recipient domain")
	conc := fs.Int("conc", 256, "concurrent commits")
	from := fs.String("from", "bench@client.bench.test", "envelope sender")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *dir == "" {
		return errors.New("fillqueue: -dir is required")
	}
	if err := os.MkdirAll(*dir, 0o750); err != nil {
		return err
	}
	st, err := queue.Open(queue.Options{Dir: *dir, Schedule: queue.Schedule{
		Retry: []time.Duration{5 * time.Minute}, MaxQueueTime: 120 * time.Hour}})
	if err != nil {
		return err
	}
	to := "rcpt@" + *domain
	body := makeBody(*size, *from, to)
	start := time.Now()
	var next atomic.Int64
	var failed atomic.Int64
	var firstErr error
	var errOnce sync.Once
	var wg sync.WaitGroup
	stopProgress := make(chan struct{})
	go func() {
		t := time.NewTicker(5 * time.Second)
		defer t.Stop()
		for {
			select {
			case <-stopProgress:
				return
			case <-t.C:
				fmt.Fprintf(os.Stderr, "fillqueue: %d/%d after %.0f s\n", min(next.Load(), int64(*n)), *n, time.Since(start).Seconds())
			}
		}
	}()
	for g := 0; g < *conc; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(*n) {
				w := st.NewWriter()
				if _, err := w.Write(body); err != nil {
					w.Abort()
					failed.Add(1)
					errOnce.Do(func() { firstErr = err })
					return
				}
				if _, err := w.Commit(queue.Envelope{From: *from, Rcpts: []queue.RcptSpec{{Addr: to}}}); err != nil {
					failed.Add(1)
					errOnce.Do(func() { firstErr = err })
					return
				}
			}
		}()
	}
	wg.Wait()
	close(stopProgress)
	committed := time.Since(start)
	queued := st.Len()
	if err := st.Close(); err != nil {
		return fmt.Errorf("close (checkpoint): %w", err)
	}
	if firstErr != nil {
		return fmt.Errorf("fillqueue: %d failed commits, first: %w", failed.Load(), firstErr)
	}
	fmt.Printf("fill_s=%.3f commit_s=%.3f n=%d\n", time.Since(start).Seconds(), committed.Seconds(), queued)
	return nil
}

func cmdWaitReady(args []string) error {
	fs := flag.NewFlagSet("waitready", flag.ContinueOnError)
	addr := fs.String("addr", "", "host:port that must accept a connection")
	logPath := fs.String("log", "", "JSON log file that must get a \"started\" line")
	logOff := fs.Int64("log-offset", 0, "read the log from this byte offset (its size before the start)")
	since := fs.Int64("since", 0, "start time, Unix nanoseconds (default: now)")
	interval := fs.Duration("interval", 10*time.Millisecond, "poll interval")
	timeout := fs.Duration("timeout", 5*time.Minute, "give up after")
	if err := fs.Parse(args); err != nil {
		return err
	}
	t0 := time.Now()
	if *since > 0 {
		t0 = time.Unix(0, *since)
	}
	var portAt, logAt time.Time
	off := *logOff
	var partial []byte
	deadline := time.Now().Add(*timeout)
	for time.Now().Before(deadline) {
		if portAt.IsZero() {
			if c, err := net.DialTimeout("tcp", *addr, time.Second); err == nil {
				portAt = time.Now()
				c.Close()
			}
		}
		if logAt.IsZero() && *logPath != "" {
			if f, err := os.Open(*logPath); err == nil {
				f.Seek(off, io.SeekStart)
				b, _ := io.ReadAll(f)
				f.Close()
				off += int64(len(b))
				partial = append(partial, b...)
				if i := bytes.LastIndexByte(partial, '\n'); i >= 0 {
					for _, line := range bytes.Split(partial[:i], []byte("\n")) {
						if bytes.Contains(line, []byte(`"msg":"started"`)) {
							logAt = time.Now()
						}
					}
					partial = append([]byte(nil), partial[i+1:]...)
				}
			}
		} else if *logPath == "" && logAt.IsZero() {
			logAt = portAt
		}
		if !portAt.IsZero() && !logAt.IsZero() {
			ready := portAt
			if logAt.After(ready) {
				ready = logAt
			}
			fmt.Printf("ready_s=%.3f port_s=%.3f log_s=%.3f\n", ready.Sub(t0).Seconds(), portAt.Sub(t0).Seconds(), logAt.Sub(t0).Seconds())
			return nil
		}
		time.Sleep(*interval)
	}
	return fmt.Errorf("not ready within %v (port ok: %v, log ok: %v)", *timeout, !portAt.IsZero(), !logAt.IsZero())
}

func cmdProcStat(args []string) error {
	fs := flag.NewFlagSet("procstat", flag.ContinueOnError)
	pids := fs.String("pids", "", "comma-separated root PIDs")
	list := fs.Bool("list", false, "also list every process as name:pid:vmrss_kb")
	if err := fs.Parse(args); err != nil {
		return err
	}
	roots, err := parsePIDs(*pids)
	if err != nil {
		return err
	}
	var rss, hwm, anon, file int64
	var procs []string
	n := 0
	for _, p := range treePIDs(roots) {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p))
		if err != nil {
			continue
		}
		var name string
		var r, h int64
		for _, line := range strings.Split(string(b), "\n") {
			f := strings.Fields(line)
			if len(f) < 2 {
				continue
			}
			switch f[0] {
			case "Name:":
				name = f[1]
			case "VmRSS:":
				r, _ = strconv.ParseInt(f[1], 10, 64)
			case "VmHWM:":
				h, _ = strconv.ParseInt(f[1], 10, 64)
			case "RssAnon:":
				v, _ := strconv.ParseInt(f[1], 10, 64)
				anon += v
			case "RssFile:":
				v, _ := strconv.ParseInt(f[1], 10, 64)
				file += v
			}
		}
		rss += r
		hwm += h
		n++
		procs = append(procs, fmt.Sprintf("%s:%d:%d", name, p, r))
	}
	s := sampleTrees(roots)
	fmt.Printf("vmrss_kb=%d vmhwm_kb=%d rssanon_kb=%d rssfile_kb=%d pss_kb=%d procs=%d", rss, hwm, anon, file, s.pss, n)
	if *list {
		fmt.Printf(" list=%s", strings.Join(procs, ","))
	}
	fmt.Println()
	return nil
}

func cmdMetrics(args []string) error {
	fs := flag.NewFlagSet("metrics", flag.ContinueOnError)
	url := fs.String("url", "", "Prometheus text endpoint")
	names := fs.String("names", "", "comma-separated metric names")
	if err := fs.Parse(args); err != nil {
		return err
	}
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get(*url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	vals := map[string]string{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		vals[f[0]] = f[1]
	}
	var out []string
	for _, n := range strings.Split(*names, ",") {
		v, ok := vals[n]
		if !ok {
			v = "-"
		} else if fv, err := strconv.ParseFloat(v, 64); err == nil && fv == math.Trunc(fv) && math.Abs(fv) < 1e15 {
			v = strconv.FormatInt(int64(fv), 10)
		}
		out = append(out, n+"="+v)
	}
	fmt.Println(strings.Join(out, " "))
	return sc.Err()
}

// scaleTable renders scale.tsv (columns test, sys, n, size, key, value).
func scaleTable(path string) error {
	rows, err := readTSV(path)
	if err != nil {
		return err
	}
	if len(rows) == 0 {
		return nil
	}
	type tk struct {
		test, sys string
		n         int
	}
	vals := map[tk]map[string]string{}
	sizes := map[tk]string{}
	var deadNs []int
	seenN := map[int]bool{}
	for _, r := range rows {
		n, _ := strconv.Atoi(r["n"])
		k := tk{r["test"], r["sys"], n}
		if vals[k] == nil {
			vals[k] = map[string]string{}
		}
		vals[k][r["key"]] = r["value"]
		sizes[k] = r["size"]
		if r["test"] == "dead" && !seenN[n] {
			seenN[n] = true
			deadNs = append(deadNs, n)
		}
	}
	sort.Ints(deadNs)
	num := func(k tk, key string) (float64, bool) {
		v, err := strconv.ParseFloat(vals[k][key], 64)
		return v, err == nil
	}
	const mib = 1 << 20
	mb := func(v float64) string { return fmtNum(v / mib) }
	kbMB := func(v float64) string { return fmtNum(v / 1024) }
	sec := func(v float64) string { return fmtNum(v) }
	plain := func(v float64) string { return strconv.FormatFloat(v, 'f', -1, 64) }
	get := func(k tk, key string, f func(float64) string) string {
		if v, ok := num(k, key); ok {
			return f(v)
		}
		return "–"
	}
	ratio := func(a, b tk, key string) string {
		va, ok1 := num(a, key)
		vb, ok2 := num(b, key)
		if !ok1 || !ok2 || vb == 0 {
			return ""
		}
		return ratioFmt(va / vb)
	}
	verdict := func(ok bool) string {
		if ok {
			return "met"
		}
		return "**MISSED**"
	}

	// Pinned disk.
	var pins []tk
	seenPin := map[int]bool{}
	for k := range vals {
		if k.test == "pin" && !seenPin[k.n] {
			seenPin[k.n] = true
			pins = append(pins, tk{"pin", "stsrelay", k.n})
			if sizes[pins[len(pins)-1]] == "" {
				sizes[pins[len(pins)-1]] = sizes[k]
			}
		}
	}
	sort.Slice(pins, func(i, j int) bool { return pins[i].n < pins[j].n })
	for _, s := range pins {
		p := tk{"pin", "postfix", s.n}
		size, _ := strconv.Atoi(sizes[s])
		fmt.Printf("### queue at scale: pinned disk — 1 message deferred to a dead destination, then %d × %s delivered (20 sessions)\n\n", s.n, sizeLabel(size))
		fmt.Println("MB = 2^20 bytes. Sizes after every message but the deferred one was delivered and compaction settled.")
		fmt.Println()
		fmt.Println("| figure | stsrelay | Postfix | stsrelay/Postfix | target |")
		fmt.Println("|---|---|---|---|---|")
		target := ""
		if du, ok := num(s, "du_queue_bytes"); ok {
			if live, ok := num(s, "live_bytes"); ok {
				bound := 2*live + 2*64*mib
				target = fmt.Sprintf("≤ 2×live + 2×64 MiB = %s MB → %s", mb(bound), verdict(du <= bound))
			}
		}
		fmt.Printf("| queue directory on disk (`du -sb`) (MB) | %s | %s | %s | %s |\n", get(s, "du_queue_bytes", mb), get(p, "du_queue_bytes", mb), ratio(s, p, "du_queue_bytes"), target)
		if d, ok := num(s, "disk_bytes"); ok {
			live, _ := num(s, "live_bytes")
			fmt.Printf("| stsrelay_queue_disk_bytes (MB) | %s | | | %s |\n", mb(d), verdict(d <= 2*live+2*64*mib))
		}
		fmt.Printf("| stsrelay_queue_live_bytes (bytes) | %s | | | |\n", get(s, "live_bytes", plain))
		fmt.Printf("| stsrelay_queue_segments | %s | | | |\n", get(s, "segments", plain))
		fmt.Printf("| stsrelay_queue_compactions_total | %s | | | |\n", get(s, "compactions", plain))
		fmt.Printf("| stsrelay_queue_messages | %s | %s | | |\n", get(s, "messages", plain), get(p, "messages", plain))
		fmt.Printf("| peak queue on disk during the run (`stsrelay_queue_disk_bytes` / `du`, sampled 1/s) (MB) | %s | %s | %s | |\n", get(s, "peak_disk_bytes", mb), get(p, "peak_du_bytes", mb), ratio(s, p, "peak_du_bytes"))
		fmt.Printf("| time for compaction to settle after the last delivery (s) | %s | | | ≤ 30 s wait |\n", get(s, "settle_s", sec))
		fmt.Printf("| accepted/s | %s | %s | %s | |\n", get(s, "accept_rate", fmtNum), get(p, "accept_rate", fmtNum), ratio(s, p, "accept_rate"))
		fmt.Printf("| delivered/s | %s | %s | %s | |\n", get(s, "deliver_rate", fmtNum), get(p, "deliver_rate", fmtNum), ratio(s, p, "deliver_rate"))
		fmt.Println()
	}

	// Dead destination.
	if len(deadNs) > 0 {
		fmt.Println("### queue at scale: dead destination — N messages of 2 KiB queued for down.bench.test")
		fmt.Println()
		fmt.Println("stsrelay: filled offline (`benchtool fillqueue`, queue package, 256 concurrent commits), then `stsrelay serve`. Postfix: filled through its smtpd (`smtp-source -d -s 20`), `default_transport = smtp:[127.0.0.6]:2526` (connection refused). Restart = exec → submission port accepts a connection (stsrelay: and its log says \"started\"; Postfix: `postfix start` → first 220). \"20 s after start\": stsrelay's first start after the fill; Postfix: 20 s after its restart with the queue full. VmRSS sums overcount pages shared between Postfix's processes; PSS does not. MB = 2^20 bytes.")
		fmt.Println()
		head := "| figure |"
		sep := "|---|"
		for _, n := range deadNs {
			head += fmt.Sprintf(" stsrelay %s |", countLabel(n))
			sep += "---|"
			if len(vals[tk{"dead", "postfix", n}]) > 0 {
				head += fmt.Sprintf(" Postfix %s | stsrelay/Postfix |", countLabel(n))
				sep += "---|---|"
			}
		}
		head += " target (issue #12) |"
		sep += "---|"
		fmt.Println(head)
		fmt.Println(sep)
		type line struct {
			label, skey, pkey string
			f                 func(float64) string
			target            func(n int, v float64) string
		}
		rssTarget := func(n int, v float64) string {
			lim := 32*mib + 100*float64(n)
			return fmt.Sprintf("%d: ≤ %s MB → %s", n, mb(lim), verdict(v*1024 <= lim))
		}
		under2 := func(n int, v float64) string {
			if n < 1000000 {
				return ""
			}
			return fmt.Sprintf("1M: < 2 s → %s", verdict(v < 2))
		}
		lines := []line{
			{"fill (s) (not comparable: offline vs SMTP)", "fill_s", "fill_s", sec, nil},
			{"queued at start", "queued", "queued", plain, nil},
			{"queue directory on disk (MB)", "du_queue_bytes", "du_queue_bytes", mb, nil},
			{"restart after the fill (s)", "restart1_s", "", sec, under2},
			{"VmRSS 20 s after start (MB)", "vmrss20_kb", "vmrss20_kb", kbMB, rssTarget},
			{"VmHWM 20 s after start (MB)", "vmhwm20_kb", "vmhwm20_kb", kbMB, nil},
			{"PSS 20 s after start (MB)", "pss20_kb", "pss20_kb", kbMB, nil},
			{"of the VmRSS: RssAnon (MB)", "rssanon20_kb", "", kbMB, nil},
			{"of the VmRSS: RssFile (MB)", "rssfile20_kb", "", kbMB, nil},
			{"Go heap in use 20 s after start (`go_memstats_heap_inuse_bytes`) (MB)", "heap_inuse20_bytes", "", mb, nil},
			{"Go next GC goal then (`go_memstats_next_gc_bytes`; ≈ 2 × heap live after the last GC) (MB)", "next_gc20_bytes", "", mb, nil},
			{"Go heap idle then (`go_memstats_heap_idle_bytes`) (MB)", "heap_idle20_bytes", "", mb, nil},
			{"of which returned to the OS (`go_memstats_heap_released_bytes`) (MB)", "heap_released20_bytes", "", mb, nil},
			{"processes", "procs20", "procs20", plain, nil},
			{"stsrelay_queue_disk_bytes 20 s after start (MB)", "disk20_bytes", "", mb, nil},
			{"Postfix: VmRSS, all processes, once quiet after the fill (MB)", "", "vmrss_quiet_kb", kbMB, nil},
			{"Postfix: PSS, all processes, then (MB)", "", "pss_quiet_kb", kbMB, nil},
			{"Postfix: processes then", "", "procs_quiet", plain, nil},
			{"Postfix: qmgr's VmRSS then (MB)", "", "qmgr_rss_quiet_kb", kbMB, nil},
			{"`queue summary` (s) / Postfix `qshape deferred`", "summary_s", "qshape_s", sec, under2},
			{"`queue list` (default limit 1000) (s)", "list_s", "", sec, under2},
			{"`queue list -limit 0 >/dev/null` (s) / Postfix `postqueue -p >/dev/null`", "listall_s", "postqueue_s", sec, under2},
			{"VmHWM after `queue summary` (MB)", "vmhwm_summary_kb", "", kbMB, nil},
			{"VmHWM after `queue list` (MB)", "vmhwm_list_kb", "", kbMB, nil},
			{"VmHWM after `queue list -limit 0` (MB)", "vmhwm_cli_kb", "", kbMB, nil},
			{"stop (SIGTERM → exit) (s)", "stop_s", "stop_s", sec, nil},
			{"restart, checkpoint from shutdown (s) / Postfix restart", "restart2_s", "restart_s", sec, under2},
			{"VmRSS at that restart's ready (MB)", "vmrss_r2_kb", "vmrss_r_kb", kbMB, nil},
			{"restart, checkpoint deleted: full log scan (s)", "restart3_s", "", sec, under2},
			{"VmRSS at that restart's ready (MB)", "vmrss_r3_kb", "", kbMB, nil},
		}
		for _, l := range lines {
			cells := "| " + l.label + " |"
			var tgt []string
			for _, n := range deadNs {
				s, p := tk{"dead", "stsrelay", n}, tk{"dead", "postfix", n}
				sc := ""
				if l.skey != "" {
					sc = get(s, l.skey, l.f)
					if v, ok := num(s, l.skey); ok && l.target != nil {
						if t := l.target(n, v); t != "" {
							tgt = append(tgt, t)
						}
					}
				}
				cells += " " + sc + " |"
				if len(vals[p]) > 0 {
					pc, rc := "", ""
					if l.pkey != "" {
						pc = get(p, l.pkey, l.f)
						if l.skey != "" && l.skey != "fill_s" {
							va, ok1 := num(s, l.skey)
							vb, ok2 := num(p, l.pkey)
							if ok1 && ok2 && vb != 0 {
								rc = ratioFmt(va / vb)
							}
						}
					}
					cells += " " + pc + " | " + rc + " |"
				}
			}
			cells += " " + strings.Join(tgt, "; ") + " |"
			if strings.Trim(cells, "| ") == l.label {
				continue // no figure for this row in this run
			}
			fmt.Println(cells)
		}
		fmt.Println()
		for _, n := range deadNs {
			if v := vals[tk{"dead", "postfix", n}]["procs_quiet_list"]; v != "" {
				fmt.Printf("Postfix processes once quiet (%s): %s\n\n", countLabel(n), v)
			}
		}
	}
	return nil
}

func countLabel(n int) string {
	switch {
	case n >= 1000000 && n%1000000 == 0:
		return fmt.Sprintf("%dM", n/1000000)
	case n >= 1000 && n%1000 == 0:
		return fmt.Sprintf("%dk", n/1000)
	}
	return strconv.Itoa(n)
}

// ratioFmt shows small ratios with three significant digits.
func ratioFmt(r float64) string {
	if r != 0 && math.Abs(r) < 0.1 {
		return fmt.Sprintf("%.2g×", r)
	}
	return fmt.Sprintf("%.2f×", r)
}
