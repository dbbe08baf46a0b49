package main

// benchtool table: the Markdown report of bench/run.sh from results.tsv,
// fsync.tsv and restart.tsv.

import (
	"bufio"
	"flag"
	"fmt"
	"math"
	"os"
	"sort"
	"strconv"
	"strings"
)

type row map[string]string

func readTSV(path string) ([]row, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	var head []string
	var out []row
	for sc.Scan() {
		fields := strings.Split(sc.Text(), "\t")
		if head == nil {
			head = fields
			continue
		}
		r := row{}
		for i, h := range head {
			if i < len(fields) {
				r[h] = fields[i]
			}
		}
		out = append(out, r)
	}
	return out, sc.Err()
}

func (r row) num(k string) (float64, bool) {
	v, err := strconv.ParseFloat(r[k], 64)
	return v, err == nil
}

type caseKey struct {
	mode       string
	size, conc int
	// wan mode: one-way delay of the latency proxy and the sink kind
	delay int
	sink  string
}

// label names a case in the tables.
func (k caseKey) label() string {
	l := fmt.Sprintf("%s, %s, %d sess.", modeLabel[k.mode], sizeLabel(k.size), k.conc)
	if k.mode == "wan" {
		sink := "CHUNKING sink"
		if k.sink == "nochunking" {
			sink = "no-CHUNKING sink"
		}
		l = fmt.Sprintf("WAN %d ms RTT, %s, %s, %d sess.", 2*k.delay, sink, sizeLabel(k.size), k.conc)
	}
	return l
}

// figure computes one number from a run, ok=false when not applicable.
type figure struct {
	name   string
	unit   string
	higher bool // higher is better
	get    func(r row) (float64, bool)
	only   func(k caseKey) bool
}

func perSec(r row, k string) (float64, bool) {
	n, ok1 := r.num("n")
	t, ok2 := r.num(k)
	if !ok1 || !ok2 || t <= 0 {
		return 0, false
	}
	return n / t, true
}

var figures = []figure{
	{name: "accepted/s", unit: "msg/s", higher: true, get: func(r row) (float64, bool) { return perSec(r, "accept_s") }},
	{name: "delivered/s", unit: "msg/s", higher: true, get: func(r row) (float64, bool) { return perSec(r, "deliver_s") },
		only: func(k caseKey) bool { return k.mode != "accept" }},
	{name: "queue drain time (submitter done → sink holds all)", unit: "s", get: func(r row) (float64, bool) { return r.num("drain_s") },
		only: func(k caseKey) bool { return k.mode != "accept" }},
	{name: "p50 time to 250 after the final \".\" (1 session)", unit: "ms", get: func(r row) (float64, bool) { return r.num("lat_p50_ms") },
		only: func(k caseKey) bool { return k.conc == 1 }},
	{name: "p99 time to 250 after the final \".\" (1 session)", unit: "ms", get: func(r row) (float64, bool) { return r.num("lat_p99_ms") },
		only: func(k caseKey) bool { return k.conc == 1 }},
	{name: "peak PSS, all processes of the relay", unit: "MB", get: func(r row) (float64, bool) {
		v, ok := r.num("peak_pss_kb")
		return v / 1024, ok
	}},
	{name: "round trips per message: client→server flights at the sink side of the latency proxy ÷ messages", unit: "flights/msg",
		get: func(r row) (float64, bool) { return perMsg(r, "flights_c2s") }, only: func(k caseKey) bool { return k.mode == "wan" }},
	{name: "connections per message (at the latency proxy)", unit: "conn/msg",
		get: func(r row) (float64, bool) { return perMsg(r, "conns") }, only: func(k caseKey) bool { return k.mode == "wan" }},
}

func perMsg(r row, k string) (float64, bool) {
	n, ok1 := r.num("n")
	v, ok2 := r.num(k)
	if !ok1 || !ok2 || n <= 0 {
		return 0, false
	}
	return v / n, true
}

var systems = []string{"stsrelay", "postfix", "postfix-reuse"}

var modeOrder = map[string]int{"plain": 0, "tls": 1, "sts": 2, "accept": 3, "wan": 4}
var modeLabel = map[string]string{
	"plain":  "plain",
	"tls":    "verified TLS",
	"sts":    "MTA-STS enforce",
	"accept": "accept only",
	"wan":    "WAN (verified TLS via latencyproxy)",
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

func fmtNum(v float64) string {
	a := math.Abs(v)
	switch {
	case a >= 100:
		return fmt.Sprintf("%.0f", v)
	case a >= 10:
		return fmt.Sprintf("%.1f", v)
	case a >= 1:
		return fmt.Sprintf("%.2f", v)
	default:
		return fmt.Sprintf("%.3f", v)
	}
}

func cell(v []float64) string {
	if len(v) == 0 {
		return ""
	}
	if len(v) == 1 {
		return fmtNum(v[0])
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	return fmt.Sprintf("**%s** (%s–%s)", fmtNum(median(s)), fmtNum(s[0]), fmtNum(s[len(s)-1]))
}

func ratioCell(v []float64) string {
	if len(v) == 0 {
		return ""
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s) == 1 {
		return fmt.Sprintf("%.2f×", s[0])
	}
	return fmt.Sprintf("**%.2f×** (%.2f–%.2f)", median(s), s[0], s[len(s)-1])
}

func sizeLabel(b int) string {
	if b%1024 == 0 {
		return fmt.Sprintf("%d KiB", b/1024)
	}
	return fmt.Sprintf("%d B", b)
}

func cmdTable(args []string) error {
	fs := flag.NewFlagSet("table", flag.ContinueOnError)
	results := fs.String("results", "", "results.tsv")
	fsyncF := fs.String("fsync", "", "fsync.tsv")
	restartF := fs.String("restart", "", "restart.tsv")
	scaleF := fs.String("scale", "", "scale.tsv (the scale mode's figures)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	rows, err := readTSV(*results)
	if err != nil {
		return err
	}
	// byCase[case][sys][rep] = row
	byCase := map[caseKey]map[string]map[string]row{}
	var reps []string
	seenRep := map[string]bool{}
	for _, r := range rows {
		if r["accept_s"] == "-" || r["accept_s"] == "" {
			continue // failed run
		}
		if strings.HasPrefix(r["mode"], "scale") || r["mode"] == "fleet" {
			continue // the scale and fleet modes have their own tables
		}
		size, _ := strconv.Atoi(r["size"])
		conc, _ := strconv.Atoi(r["conc"])
		delay, _ := strconv.Atoi(r["delay_ms"])
		sink := r["sink"]
		if sink == "-" {
			sink = ""
		}
		k := caseKey{mode: r["mode"], size: size, conc: conc, delay: delay, sink: sink}
		if byCase[k] == nil {
			byCase[k] = map[string]map[string]row{}
		}
		if byCase[k][r["sys"]] == nil {
			byCase[k][r["sys"]] = map[string]row{}
		}
		byCase[k][r["sys"]][r["rep"]] = r
		if !seenRep[r["rep"]] {
			seenRep[r["rep"]] = true
			reps = append(reps, r["rep"])
		}
	}
	var keys []caseKey
	for k := range byCase {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		a, b := keys[i], keys[j]
		if a.mode != b.mode {
			return modeOrder[a.mode] < modeOrder[b.mode]
		}
		if a.size != b.size {
			return a.size < b.size
		}
		if a.conc != b.conc {
			return a.conc < b.conc
		}
		if a.delay != b.delay {
			return a.delay < b.delay
		}
		return a.sink < b.sink
	})
	// Postfix reference runs for a case: the MTA-STS case compares with
	// Postfix's verified-TLS runs of the same repetition.
	// The WAN case's no-CHUNKING rows compare with Postfix's runs against
	// the CHUNKING sink of the same repetition and delay unless Postfix ran
	// against the no-CHUNKING sink too (WAN_NOCHUNK_SYSTEMS): Postfix's SMTP
	// client never sends BDAT, so the sink's CHUNKING makes no difference
	// to it.
	wanShared := false
	ref := func(k caseKey, sys string) map[string]row {
		if k.mode == "sts" {
			k.mode = "tls"
		}
		if k.mode == "wan" && k.sink == "nochunking" && sys != "stsrelay" && len(byCase[k][sys]) == 0 {
			k.sink = "chunking"
			if len(byCase[k][sys]) > 0 {
				wanShared = true
			}
		}
		return byCase[k][sys]
	}
	for _, k := range keys {
		ref(k, "postfix")
	}
	values := func(m map[string]row, f figure) []float64 {
		var out []float64
		for _, rep := range reps {
			if r, ok := m[rep]; ok {
				if v, ok := f.get(r); ok {
					out = append(out, v)
				}
			}
		}
		return out
	}
	ratios := func(k caseKey, f figure, other string) []float64 {
		var out []float64
		for _, rep := range reps {
			a, ok1 := byCase[k]["stsrelay"][rep]
			b, ok2 := ref(k, other)[rep]
			if !ok1 || !ok2 {
				continue
			}
			va, ok1 := f.get(a)
			vb, ok2 := f.get(b)
			if ok1 && ok2 && vb > 0 {
				out = append(out, va/vb)
			}
		}
		return out
	}

	if len(keys) > 0 {
		fmt.Printf("Cells: **median** (min–max) over %d repetitions; ratios are stsrelay ÷ Postfix computed per repetition (the two ran back to back), then the median (min–max) of those ratios. The MTA-STS-enforce rows (stsrelay only) are compared with Postfix's verified-TLS runs.", len(reps))
		if wanShared {
			fmt.Print(" The WAN no-CHUNKING rows' Postfix columns are Postfix's runs against the CHUNKING sink at the same RTT and repetition (Postfix's SMTP client does not use BDAT, so it delivers to both sinks alike; set WAN_NOCHUNK_SYSTEMS to run it against both).")
		}
		fmt.Print("\n\n")
	}
	for _, f := range figures {
		var lines []string
		for _, k := range keys {
			if f.only != nil && !f.only(k) {
				continue
			}
			sts := values(byCase[k]["stsrelay"], f)
			pf := values(ref(k, "postfix"), f)
			pfr := values(ref(k, "postfix-reuse"), f)
			if len(sts)+len(pf)+len(pfr) == 0 {
				continue
			}
			lines = append(lines, fmt.Sprintf("| %s | %s | %s | %s | %s | %s |",
				k.label(),
				cell(sts), cell(pf), cell(pfr),
				ratioCell(ratios(k, f, "postfix")), ratioCell(ratios(k, f, "postfix-reuse"))))
		}
		if len(lines) == 0 {
			continue
		}
		fmt.Printf("### %s (%s)\n\n", f.name, f.unit)
		fmt.Println("| case | stsrelay | Postfix | Postfix TLS reuse | stsrelay/Postfix | stsrelay/Postfix reuse |")
		fmt.Println("|---|---|---|---|---|---|")
		fmt.Println(strings.Join(lines, "\n"))
		fmt.Println()
	}

	// TLS checks, summed over the repetitions.
	checksHead := false
	for _, k := range keys {
		if k.mode != "tls" && k.mode != "sts" && k.mode != "wan" {
			continue
		}
		if !checksHead {
			checksHead = true
			fmt.Println("### delivery checks (TLS cases, summed over the repetitions)")
			fmt.Println()
			fmt.Println("stsrelay: delivery log lines `delivered` with `\"tls_verified\":true` (and `\"sts_mode\":\"enforce\"`); Postfix: `status=sent` lines and `Verified TLS connection established` (one per TLS handshake, so fewer with connection reuse).")
			fmt.Println()
			fmt.Println("| case | system | messages | check |")
			fmt.Println("|---|---|---|---|")
		}
		for _, sys := range systems {
			total := 0
			sums := map[string]int{}
			var order []string
			for _, rep := range reps {
				r, ok := byCase[k][sys][rep]
				if !ok {
					continue
				}
				n, _ := strconv.Atoi(r["n"])
				total += n
				for _, kv := range strings.Split(r["check"], ",") {
					name, val, ok := strings.Cut(kv, "=")
					if !ok {
						continue
					}
					v, _ := strconv.Atoi(val)
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
			fmt.Printf("| %s | %s | %d | %s |\n", k.label(), sys, total, strings.Join(parts, " "))
		}
	}
	if checksHead {
		fmt.Println()
	}

	if *fsyncF != "" {
		if fr, err := readTSV(*fsyncF); err == nil && len(fr) > 0 {
			fmt.Println("### messages per sync (accept only, 2 KiB; `perf stat` syscall tracepoints over the relay's processes)")
			fmt.Println()
			fmt.Println("| system | sessions | messages | fdatasync | fsync | messages per sync |")
			fmt.Println("|---|---|---|---|---|---|")
			for _, r := range fr {
				fmt.Printf("| %s | %s | %s | %s | %s | %s |\n", r["sys"], r["conc"], r["n"], r["fdatasync"], r["fsync"], r["msgs_per_sync"])
			}
			fmt.Println()
		}
	}
	if *restartF != "" {
		if rr, err := readTSV(*restartF); err == nil && len(rr) > 0 {
			fmt.Println("### restart with a full queue (destination down; 2 KiB messages)")
			fmt.Println()
			fmt.Println("| system | queued | fill (s) | stop (s) | start → 220 (s) | PSS at 220 (MB) | RSS at 220 (MB) | procs | PSS +5 s (MB) | RSS +5 s (MB) |")
			fmt.Println("|---|---|---|---|---|---|---|---|---|---|")
			mb := func(s string) string {
				v, err := strconv.ParseFloat(s, 64)
				if err != nil {
					return s
				}
				return fmt.Sprintf("%.1f", v/1024)
			}
			for _, r := range rr {
				fmt.Printf("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", r["sys"], r["queued"], r["fill_s"], r["stop_s"], r["restart_s"],
					mb(r["pss_kb"]), mb(r["rss_kb"]), r["procs"], mb(r["pss_kb_after_5s"]), mb(r["rss_kb_after_5s"]))
			}
			fmt.Println()
		}
	}

	fleetTable(rows)

	if *scaleF != "" {
		if err := scaleTable(*scaleF); err != nil {
			return err
		}
	}

	// Targets (only those whose case was run).
	targetsHead := false
	target := func(label string, k caseKey, f figure, other string, want float64, atLeast bool) {
		rs := ratios(k, f, other)
		if len(rs) == 0 {
			return
		}
		if !targetsHead {
			fmt.Println("### targets")
			fmt.Println()
			targetsHead = true
		}
		m := median(rs)
		ok := m >= want
		if !atLeast {
			ok = m <= want
		}
		verdict := "MISSED"
		if ok {
			verdict = "met"
		}
		fmt.Printf("- %s: median ratio %.2f× (%s) → **%s**\n", label, m, ratioCell(rs), verdict)
	}
	del, acc, pss := figures[1], figures[0], figures[5]
	target("verified-TLS delivered/s ≥ 3× Postfix defaults (2 KiB, 20 sessions)", caseKey{mode: "tls", size: 2048, conc: 20}, del, "postfix", 3, true)
	target("verified-TLS delivered/s ≥ 2× Postfix with TLS reuse (2 KiB, 20 sessions)", caseKey{mode: "tls", size: 2048, conc: 20}, del, "postfix-reuse", 2, true)
	target("MTA-STS-enforce delivered/s ≥ 3× Postfix verify defaults (2 KiB, 20 sessions)", caseKey{mode: "sts", size: 2048, conc: 20}, del, "postfix", 3, true)
	target("durable accepts/s ≥ 3× Postfix (accept only, 2 KiB, 20 sessions)", caseKey{mode: "accept", size: 2048, conc: 20}, acc, "postfix", 3, true)
	target("PSS ≤ ¼ of Postfix at 100 sessions (plain, 2 KiB)", caseKey{mode: "plain", size: 2048, conc: 100}, pss, "postfix", 0.25, false)
	target("PSS ≤ ¼ of Postfix at 100 sessions (accept only, 2 KiB)", caseKey{mode: "accept", size: 2048, conc: 100}, pss, "postfix", 0.25, false)
	if *restartF != "" {
		if rr, err := readTSV(*restartF); err == nil {
			for _, r := range rr {
				if r["sys"] == "stsrelay" {
					v, _ := strconv.ParseFloat(r["restart_s"], 64)
					verdict := "MISSED"
					if v < 2 {
						verdict = "met"
					}
					if !targetsHead {
						fmt.Print("### targets\n\n")
						targetsHead = true
					}
					fmt.Printf("- restart with %s queued < 2 s: %s s → **%s**\n", r["queued"], r["restart_s"], verdict)
				}
			}
		}
	}
	return nil
}
