package main

// The fleet mode of bench/run.sh (issue #16): one relay on its disk queue
// ("local"), one relay on a 3-node JetStream cluster ("fleet1"), three
// relays on it ("fleet3").
//
//	benchtool waitcount -count-sinkc F -expect N [-base B] -pids P,... [-extra-pids P,...] [-settle 2s]
//	    The delivery side of one run, started just before the submitters
//	    (one `benchtool load -lat` per relay). Samples PSS/RSS of the -pids
//	    trees (the relays) and, separately, of -extra-pids (the NATS
//	    cluster) every -interval; waits until the sink's counter reached
//	    B+N (B: -base, default its value at start), then watches it for
//	    -settle more (duplicates would show there). Prints deliver_s (start
//	    → sink holds all), peak_pss_kb, peak_rss_kb, max_procs,
//	    extra_peak_rss_kb, extra_peak_pss_kb and sink_final (messages the
//	    sink got in all, minus B).

import (
	"errors"
	"flag"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"
)

func cmdWaitCount(args []string) error {
	fs := flag.NewFlagSet("waitcount", flag.ContinueOnError)
	countHTTP := fs.String("count-http", "", "sink counter URL (benchworld /count)")
	countSinkc := fs.String("count-sinkc", "", "smtp-sink -c output file")
	expect := fs.Int("expect", 0, "messages the sink must receive")
	base := fs.Int64("base", -1, "counter value before the run (-1: read it at start)")
	pids := fs.String("pids", "", "comma-separated root PIDs (the relays)")
	extra := fs.String("extra-pids", "", "comma-separated root PIDs sampled separately (the NATS cluster)")
	interval := fs.Duration("interval", 200*time.Millisecond, "memory sampling interval")
	timeout := fs.Duration("timeout", 10*time.Minute, "give up after this")
	settle := fs.Duration("settle", 2*time.Second, "keep counting this long after the last expected message")
	if err := fs.Parse(args); err != nil {
		return err
	}
	var counter func() (int64, error)
	switch {
	case *countHTTP != "":
		counter = func() (int64, error) { return httpCount(*countHTTP) }
	case *countSinkc != "":
		counter = func() (int64, error) { return sinkcCount(*countSinkc) }
	default:
		return errors.New("waitcount needs -count-http or -count-sinkc")
	}
	if *expect <= 0 {
		return errors.New("waitcount needs -expect N > 0")
	}
	roots, err := parsePIDs(*pids)
	if err != nil {
		return err
	}
	extraRoots, err := parsePIDs(*extra)
	if err != nil {
		return err
	}
	start := time.Now()
	b := *base
	if b < 0 {
		if b, err = counter(); err != nil {
			return fmt.Errorf("read counter: %w", err)
		}
	}

	var mu sync.Mutex
	var peak, peakExtra memSample
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(*interval)
		defer t.Stop()
		for {
			var s, e memSample
			if len(roots) > 0 {
				s = sampleTrees(roots)
			}
			if len(extraRoots) > 0 {
				e = sampleTrees(extraRoots)
			}
			mu.Lock()
			peak.max(s)
			peakExtra.max(e)
			mu.Unlock()
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	}()
	finish := func() {
		close(stop)
		wg.Wait()
	}

	deadline := start.Add(*timeout)
	var c int64
	for {
		c, err = counter()
		if err == nil && c-b >= int64(*expect) {
			break
		}
		if time.Now().After(deadline) {
			finish()
			return fmt.Errorf("timeout: sink has %d of %d messages", c-b, *expect)
		}
		time.Sleep(20 * time.Millisecond)
	}
	delivered := time.Since(start)
	time.Sleep(*settle)
	for i := 0; i < 50; i++ { // a partial counter line: try again
		if v, err := counter(); err == nil {
			c = v
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	finish()
	fmt.Printf("deliver_s=%.3f peak_pss_kb=%d peak_rss_kb=%d max_procs=%d extra_peak_pss_kb=%d extra_peak_rss_kb=%d sink_final=%d\n",
		delivered.Seconds(), peak.pss, peak.rss, peak.procs, peakExtra.pss, peakExtra.rss, c-b)
	return nil
}

// fleetTable prints the fleet mode's table from results.tsv rows with
// mode "fleet" (sys local, fleet1, fleet3).
func fleetTable(rows []row) {
	type key struct{ size, conc, n string }
	by := map[key]map[string]map[string]row{} // case → sys → rep
	var keys []key
	var reps []string
	seenRep := map[string]bool{}
	for _, r := range rows {
		if r["mode"] != "fleet" || r["accept_s"] == "-" || r["accept_s"] == "" {
			continue
		}
		k := key{r["size"], r["conc"], r["n"]}
		if by[k] == nil {
			by[k] = map[string]map[string]row{}
			keys = append(keys, k)
		}
		if by[k][r["sys"]] == nil {
			by[k][r["sys"]] = map[string]row{}
		}
		by[k][r["sys"]][r["rep"]] = r
		if !seenRep[r["rep"]] {
			seenRep[r["rep"]] = true
			reps = append(reps, r["rep"])
		}
	}
	if len(keys) == 0 {
		return
	}
	sort.Slice(reps, func(i, j int) bool { a, _ := strconv.Atoi(reps[i]); b, _ := strconv.Atoi(reps[j]); return a < b })
	checkNum := func(r row, name string) (float64, bool) {
		for _, kv := range strings.Split(r["check"], ",") {
			if k, v, ok := strings.Cut(kv, "="); ok && k == name {
				f, err := strconv.ParseFloat(v, 64)
				return f, err == nil
			}
		}
		return 0, false
	}
	kb2mb := func(v float64, ok bool) (float64, bool) { return v / 1024, ok }
	figs := []figure{
		figures[0], figures[1], // the drain time is in results.tsv: ~0 here, delivery keeps up
		{name: "p50 time to 250 after the final \".\" (fleet3: median of the 3 loads' p50)", unit: "ms", get: func(r row) (float64, bool) { return r.num("lat_p50_ms") }},
		{name: "p99 time to 250 after the final \".\" (fleet3: worst of the 3 loads' p99)", unit: "ms", get: func(r row) (float64, bool) { return r.num("lat_p99_ms") }},
		{name: "peak RSS of the relay(s), summed", unit: "MB", get: func(r row) (float64, bool) { return kb2mb(r.num("peak_rss_kb")) }},
		{name: "peak RSS of the 3 NATS servers (one process)", unit: "MB", get: func(r row) (float64, bool) { return kb2mb(checkNum(r, "nats_peak_rss_kb")) }},
	}
	sysCols := []string{"local", "fleet1", "fleet3"}
	fmt.Printf("### fleet mode (issue #16): one relay on its disk queue, one and three relays on a 3-node JetStream cluster (R3), plain sink\n\n")
	fmt.Printf("Cells: **median** (min–max) over %d repetitions; ratios are per repetition (the three cases ran back to back), then median (min–max). accepted/s = messages ÷ wall time of the slowest submitter; delivered/s = messages ÷ (start → the sink holds all).\n\n", len(reps))
	fmt.Println("| figure | case | local | fleet1 | fleet3 | fleet1/local | fleet3/local |")
	fmt.Println("|---|---|---|---|---|---|---|")
	for _, f := range figs {
		for _, k := range keys {
			size, _ := strconv.Atoi(k.size)
			label := fmt.Sprintf("%s, %s sess., %s msgs", sizeLabel(size), k.conc, k.n)
			var cells []string
			vals := map[string]map[string]float64{}
			any := false
			for _, sys := range sysCols {
				vals[sys] = map[string]float64{}
				var v []float64
				for _, rep := range reps {
					if r, ok := by[k][sys][rep]; ok {
						if x, ok := f.get(r); ok {
							v = append(v, x)
							vals[sys][rep] = x
						}
					}
				}
				if len(v) > 0 {
					any = true
				}
				cells = append(cells, cell(v))
			}
			if !any {
				continue
			}
			for _, sys := range sysCols[1:] {
				var rs []float64
				for _, rep := range reps {
					a, ok1 := vals[sys][rep]
					b, ok2 := vals["local"][rep]
					if ok1 && ok2 && b > 0 {
						rs = append(rs, a/b)
					}
				}
				cells = append(cells, ratioCell(rs))
			}
			fmt.Printf("| %s (%s) | %s | %s |\n", f.name, f.unit, label, strings.Join(cells, " | "))
		}
	}
	fmt.Println()
	fmt.Println("Delivery checks, summed over the repetitions: `sink` = messages the sink received (2 s after the last expected one; more than submitted = duplicates), `delivered_log` = `delivered` lines in the relays' logs, `log_errors` = log lines at level error, `redeliveries` = stsrelay_fleet_redeliveries_total summed over the relays at the end.")
	fmt.Println()
	fmt.Println("| case | system | submitted | checks |")
	fmt.Println("|---|---|---|---|")
	for _, k := range keys {
		size, _ := strconv.Atoi(k.size)
		for _, sys := range sysCols {
			total := 0
			sums := map[string]int{}
			var order []string
			for _, rep := range reps {
				r, ok := by[k][sys][rep]
				if !ok {
					continue
				}
				n, _ := strconv.Atoi(r["n"])
				total += n
				for _, kv := range strings.Split(r["check"], ",") {
					name, val, ok := strings.Cut(kv, "=")
					if !ok || strings.HasSuffix(name, "_kb") {
						continue
					}
					v, err := strconv.Atoi(val)
					if err != nil {
						continue
					}
					if _, seen := sums[name]; !seen {
						order = append(order, name)
					}
					sums[name] += v
				}
			}
			if total == 0 {
				continue
			}
			var parts []string
			for _, name := range order {
				parts = append(parts, fmt.Sprintf("%s=%d", name, sums[name]))
			}
			fmt.Printf("| %s, %s sess. | %s | %d | %s |\n", sizeLabel(size), k.conc, sys, total, strings.Join(parts, " "))
		}
	}
	fmt.Println()
}
