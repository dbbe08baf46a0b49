package main

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/fleet/natstest"
	"github.com/stsrelay/stsrelay/internal/testworld"
)

// fleetConfig is testConfig for node i of a fleet on cluster c. Each
// node delivers from its own loopback address (127.0.77.i), so an MX can
// tell the nodes apart.
func fleetConfig(t *testing.T, w *testworld.World, c *natstest.Cluster, i int) *config.Config {
	cfg := testConfig(t, w)
	cfg.Cluster.NATSURLs = c.URLs()
	cfg.Cluster.NodeName = fmt.Sprintf("relay%d", i+1)
	cfg.Cluster.Replicas = 3
	cfg.Cluster.StreamPrefix = "e2e"
	cfg.Cluster.LeaseTime = config.Duration{Duration: 3 * time.Second}
	cfg.Metrics.Listen = freeAddr(t)
	cfg.Delivery.LocalAddresses = []string{fmt.Sprintf("127.0.77.%d", i+1)}
	return cfg
}

// metric reads one sample of a relay's /metrics (-1 when absent).
func (r *relayProc) metric(t *testing.T, name string) float64 {
	t.Helper()
	for _, line := range strings.Split(scrape(t, r.cfg.Metrics.Listen), "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == name {
			var v float64
			fmt.Sscan(f[1], &v)
			return v
		}
	}
	return -1
}

// startFleet runs n relays on one fleet, in process.
func startFleet(t *testing.T, w *testworld.World, c *natstest.Cluster, n int, tune func(*config.Config)) []*relayProc {
	return startFleetMode(t, w, c, n, tune, false)
}

// startFleetProcess is startFleet with binaries, for kill -9.
func startFleetProcess(t *testing.T, w *testworld.World, c *natstest.Cluster, n int, tune func(*config.Config)) []*relayProc {
	return startFleetMode(t, w, c, n, tune, true)
}

func startFleetMode(t *testing.T, w *testworld.World, c *natstest.Cluster, n int, tune func(*config.Config), process bool) []*relayProc {
	var rs []*relayProc
	for i := range n {
		cfg := fleetConfig(t, w, c, i)
		if tune != nil {
			tune(cfg)
		}
		rs = append(rs, rptStartMode(t, cfg, process))
	}
	return rs
}

// deliveredBy counts, per relay, the delivery lines for rcpt with result.
func deliveredBy(rs []*relayProc, rcpt, result string) []int {
	out := make([]int, len(rs))
	for i, r := range rs {
		out[i] = len(r.logs("delivery", func(l map[string]any) bool { return l["rcpt"] == rcpt && l["result"] == result }))
	}
	return out
}

func sum(ns []int) int {
	t := 0
	for _, n := range ns {
		t += n
	}
	return t
}

// Three relays on one three-server NATS cluster: mail submitted to any
// node is delivered once by some node, the queue CLI sees the fleet's
// queue from every node, and one policy fetch serves the whole fleet.
func TestE2EFleetSharesQueueAndPolicyCache(t *testing.T) {
	t.Parallel()
	c := natstest.Start(t, 3)
	w := testworld.New(t)
	const domain = "fleet.test"
	host := "mx1." + domain
	mx := w.NewMX(testworld.MXOptions{Hostname: host, Cert: w.CA.Issue(testworld.CertValid, host)})
	w.DNS.SetMX(domain, testworld.MX{Pref: 10, Host: host})
	w.DNS.SetA(host, mx.IP())
	pol := w.PolicyHost(domain, testworld.CertValid)
	pol.SetPolicy(strings.Join(rptPolicyLines("enforce", host), "\n") + "\n")
	w.DNS.SetTXT("_mta-sts."+domain, []string{"v=STSv1; id=fleet1"})
	busyDomain(w, "busy.test")
	rs := startFleet(t, w, c, 3, nil)

	const n = 24
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rs[i%3]
			if _, err := r.submit("s@client.test", []string{fmt.Sprintf("u%d@%s", i, domain)}, simpleMessage(fmt.Sprintf("fleet-%d", i))); err != nil {
				t.Errorf("submit to relay%d: %v", i%3+1, err)
			}
		}()
	}
	wg.Wait()
	deadline := time.Now().Add(60 * time.Second)
	for {
		total := 0
		for i := range n {
			total += sum(deliveredBy(rs, fmt.Sprintf("u%d@%s", i, domain), "delivered"))
		}
		if total >= n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d delivered after 60s", total, n)
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(time.Second) // a duplicate would show by now
	nodes := map[int]bool{}
	for i := range n {
		by := deliveredBy(rs, fmt.Sprintf("u%d@%s", i, domain), "delivered")
		if sum(by) != 1 {
			t.Errorf("u%d delivered %d times (per node %v)", i, sum(by), by)
		}
		for j, k := range by {
			if k > 0 {
				nodes[j] = true
			}
		}
	}
	if got := len(mx.Messages()); got != n {
		t.Errorf("MX received %d messages, want %d", got, n)
	}
	t.Logf("deliveries made by %d of 3 nodes", len(nodes))
	// One HTTPS policy fetch for the whole fleet (same domain, one id).
	fetches := 0
	for _, q := range pol.Requests() {
		if strings.Contains(q.Path, "mta-sts.txt") {
			fetches++
		}
	}
	if fetches != 1 {
		t.Errorf("policy host served %d fetches to the fleet, want 1", fetches)
	}

	// The queue is the fleet's: a message deferred by one node is
	// visible and operable from the others.
	id := rs[0].mustSubmit("s@client.test", []string{"u@busy.test"}, simpleMessage("busy"))
	for _, r := range rs {
		deadline := time.Now().Add(20 * time.Second)
		for {
			out, code := r.cli("queue", "show", id)
			if code == 0 && strings.Contains(out, "u@busy.test") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: queue show %s: exit %d: %s", r.cfg.Cluster.NodeName, id, code, out)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	out, code := rs[2].cli("queue", "summary")
	if code != 0 || !strings.Contains(out, "busy.test") {
		t.Fatalf("queue summary on relay3: exit %d: %s", code, out)
	}
	if out, code := rs[1].cli("queue", "delete", id); code != 0 {
		t.Fatalf("queue delete on relay2: exit %d: %s", code, out)
	}
	if out, code := rs[0].cli("queue", "show", id); code != 1 {
		t.Fatalf("queue show after delete on another node: exit %d, want 1: %s", code, out)
	}

	// /readyz reflects the NATS connection; fleet metrics are served.
	for _, r := range rs {
		addr := r.cfg.Metrics.Listen
		resp, err := http.Get("http://" + addr + "/readyz")
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("%s /readyz: %v %v", r.cfg.Cluster.NodeName, err, resp)
		}
		resp.Body.Close()
		resp, err = http.Get("http://" + addr + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		for _, m := range []string{"stsrelay_fleet_connected 1", "stsrelay_fleet_publish_seconds_count", "stsrelay_fleet_reporter", "stsrelay_fleet_redeliveries_total"} {
			if !strings.Contains(string(body), m) {
				t.Errorf("%s /metrics lacks %q", r.cfg.Cluster.NodeName, m)
			}
		}
	}
}

// A relay killed (kill -9) while it delivers a message loses nothing: the
// message goes to another node when its lease runs out, and is delivered;
// one NATS server of three down changes nothing for submission.
func TestE2EFleetNodeDiesMidDelivery(t *testing.T) {
	t.Parallel()
	c := natstest.Start(t, 3)
	w := testworld.New(t)
	const domain = "slow.test"
	stall := make(chan struct{})
	var once sync.Once
	release := func() { once.Do(func() { close(stall) }) }
	t.Cleanup(release)
	var mu sync.Mutex
	var stuckFrom string
	mx := w.NewMX(testworld.MXOptions{Hostname: "mx1." + domain, Cert: w.CA.Issue(testworld.CertValid, "mx1."+domain),
		Script: func(cmd testworld.Command) *testworld.Reply {
			if cmd.Verb != "DATA" {
				return nil
			}
			mu.Lock()
			first := stuckFrom == ""
			if first {
				stuckFrom = cmd.Conn.RemoteAddr
			}
			mu.Unlock()
			if first {
				<-stall // the first delivery hangs after the body
				return &testworld.Reply{Code: 421, Enhanced: "4.3.0", Text: "gone"}
			}
			return nil
		}})
	w.DNS.SetMX(domain, testworld.MX{Pref: 10, Host: "mx1." + domain})
	w.DNS.SetA("mx1."+domain, mx.IP())
	rs := startFleetProcess(t, w, c, 2, nil)

	rs[0].mustSubmit("s@client.test", []string{"u@" + domain}, simpleMessage("in flight"))
	// The node whose address the MX sees is stuck in DATA: kill it.
	deadline := time.Now().Add(20 * time.Second)
	victim := -1
	for victim < 0 {
		mu.Lock()
		from := stuckFrom
		mu.Unlock()
		for i := range rs {
			if strings.HasPrefix(from, fmt.Sprintf("127.0.77.%d:", i+1)) {
				victim = i
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no node reached DATA (MX saw %q)", from)
		}
		time.Sleep(20 * time.Millisecond)
	}
	rs[victim].kill9()
	release()
	other := rs[1-victim]
	l := other.waitResult("u@"+domain, "delivered", 30*time.Second)
	if l == nil {
		t.Fatal("the message was not delivered by the surviving node")
	}
	if got := other.metric(t, "stsrelay_fleet_redeliveries_total"); got < 1 {
		t.Errorf("stsrelay_fleet_redeliveries_total = %v on the survivor, want >= 1", got)
	}

	// One NATS server down: submission and delivery go on.
	c.Shutdown(0)
	ok := simpleDomain(w, "ok.test")
	other.mustSubmit("s@client.test", []string{"u@ok.test"}, simpleMessage("quorum"))
	other.waitResult("u@ok.test", "delivered", 30*time.Second)
	if len(ok.WaitMessages(t, 1, 10*time.Second)) != 1 {
		t.Fatalf("ok.test MX got %d messages", len(ok.Messages()))
	}
}

// Three nodes record TLS sessions for one policy domain in one period:
// the domain gets one report for the fleet, with every node's sessions.
func TestE2EFleetOneTLSRPTReport(t *testing.T) {
	t.Parallel()
	c := natstest.Start(t, 3)
	w := testworld.New(t)
	const domain = "rpt.test"
	simpleDomain(w, domain)
	rcv := rptReceiver(w, domain)
	const iv = 6 * time.Second
	rs := startFleet(t, w, c, 3, func(cfg *config.Config) {
		rc := rptConfig(t, w, iv)
		cfg.TLSRPT = rc.TLSRPT
		cfg.Queue.RetrySchedule = rc.Queue.RetrySchedule
		cfg.Delivery.ConnectionReuseLimit = 1
	})
	rptAlign(iv, 4*time.Second)
	const n = 9
	for i := range n {
		rs[i%3].mustSubmit("s@client.test", []string{fmt.Sprintf("u%d@%s", i, domain)}, simpleMessage(fmt.Sprintf("rpt-%d", i)))
	}
	for i := range n {
		found := false
		deadline := time.Now().Add(30 * time.Second)
		for !found {
			found = sum(deliveredBy(rs, fmt.Sprintf("u%d@%s", i, domain), "delivered")) == 1
			if !found && time.Now().After(deadline) {
				t.Fatalf("u%d not delivered", i)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	deadline := time.Now().Add(60 * time.Second)
	var docs []*rptDoc
	for {
		docs = rptReports(t, rcv, iv)
		var total int64
		for _, d := range docs {
			total += d.successes()
		}
		if total >= n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("reports count %d sessions after 60s, want %d (%d reports)", total, n, len(docs))
		}
		time.Sleep(250 * time.Millisecond)
	}
	time.Sleep(2 * time.Second) // a second report for the period would show by now
	docs = rptReports(t, rcv, iv)
	ids := map[string]bool{}
	var total int64
	for _, d := range docs {
		ids[d.ReportID] = true
		total += d.successes()
	}
	if total != n {
		t.Fatalf("reports count %d sessions, want exactly %d", total, n)
	}
	// Sessions may straddle a period edge: at most one report per period.
	periods := map[string]int{}
	for _, d := range docs {
		periods[d.DateRange.Start]++
	}
	for p, k := range periods {
		if k != 1 {
			t.Errorf("period %s got %d reports, want 1 for the fleet", p, k)
		}
	}
	reporters := 0
	for _, r := range rs {
		if r.metric(t, "stsrelay_fleet_reporter") == 1 {
			reporters++
		}
	}
	if reporters != 1 {
		t.Errorf("%d nodes say they are the TLS-RPT reporter, want 1", reporters)
	}
}

// The fleet under load loses nothing: a few thousand messages go to
// three relays while one relay is killed with SIGKILL and then one NATS
// server of three stops. Every message that got a 250 is delivered; a
// message is delivered twice only if the killed relay was delivering it;
// the policy host sees one fetch; each domain gets one report per
// period, counting the sessions the relays logged. A submission that got
// no 250 (its relay died, or lost quorum, mid-transaction) is sent again
// by the client, as SMTP clients do: such a message may arrive twice.
func TestE2EFleetChaos(t *testing.T) {
	t.Parallel()
	c := natstest.Start(t, 3)
	w := testworld.New(t)
	const stsDom, plainDom = "sts.chaos.test", "plain.chaos.test"
	host := "mx1." + stsDom
	stsMX := w.NewMX(testworld.MXOptions{Hostname: host, Cert: w.CA.Issue(testworld.CertValid, host)})
	w.DNS.SetMX(stsDom, testworld.MX{Pref: 10, Host: host})
	w.DNS.SetA(host, stsMX.IP())
	pol := w.PolicyHost(stsDom, testworld.CertValid)
	pol.SetPolicy(strings.Join(rptPolicyLines("enforce", host), "\n") + "\n")
	w.DNS.SetTXT("_mta-sts."+stsDom, []string{"v=STSv1; id=chaos1"})
	plainMX := simpleDomain(w, plainDom)
	stsRcv, plainRcv := rptReceiver(w, stsDom), rptReceiver(w, plainDom)
	const iv = 8 * time.Second
	rs := startFleetProcess(t, w, c, 3, func(cfg *config.Config) {
		rc := rptConfig(t, w, iv)
		cfg.TLSRPT = rc.TLSRPT
		cfg.Delivery.ConnectionReuseLimit = 1 // one message per session: sessions = delivery lines
		// Renewed every third of it: long enough that a node starved of
		// CPU by this test (three relays, three NATS servers, the race
		// detector, two cores) does not lose a lease it still works on.
		cfg.Cluster.LeaseTime = config.Duration{Duration: 10 * time.Second}
	})
	const victim = 2

	const n = 1500
	var mu sync.Mutex
	acked := map[string]bool{}   // subject → got a 250
	retried := map[string]bool{} // subject → a submission failed and was tried again
	var sent, killedAt int
	var killTime time.Time
	next := make(chan int, n)
	for i := range n {
		next <- i
	}
	close(next)
	var wg sync.WaitGroup
	for g := range 24 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				dom := stsDom
				if i%2 == 1 {
					dom = plainDom
				}
				subj := fmt.Sprintf("chaos-%d", i)
				for try := 0; try < 6; try++ {
					r := rs[(g+i+try)%3]
					_, err := r.submit("s@client.test", []string{fmt.Sprintf("u%d@%s", i, dom)}, simpleMessage(subj))
					if err != nil {
						// The relay may have stored it and died (or lost
						// its NATS server) before the 250: the client
						// sends it again, so two copies can exist.
						mu.Lock()
						retried[subj] = true
						mu.Unlock()
					}
					if err == nil {
						mu.Lock()
						acked[subj] = true
						sent++
						switch sent {
						case n * 3 / 10:
							killedAt, killTime = sent, time.Now()
							rs[victim].kill9()
						case n * 6 / 10:
							c.Shutdown(1)
						}
						mu.Unlock()
						break
					}
					time.Sleep(100 * time.Millisecond)
				}
			}
		}()
	}
	wg.Wait()
	if len(acked) < n*9/10 {
		t.Fatalf("only %d of %d submissions got a 250", len(acked), n)
	}
	t.Logf("%d of %d messages acknowledged; relay%d killed after %d, NATS server 2 stopped after %d", len(acked), n, victim+1, killedAt, n*6/10)

	// Every acknowledged message arrives.
	received := func() map[string][]testworld.Received {
		got := map[string][]testworld.Received{}
		for _, mx := range []*testworld.MXServer{stsMX, plainMX} {
			for _, m := range mx.Messages() {
				for _, line := range strings.Split(string(m.Data), "\r\n") {
					if s, ok := strings.CutPrefix(line, "Subject: "); ok {
						got[s] = append(got[s], m)
						break
					}
				}
			}
		}
		return got
	}
	deadline := time.Now().Add(120 * time.Second)
	for {
		got := received()
		missing := 0
		for s := range acked {
			if len(got[s]) == 0 {
				missing++
			}
		}
		if missing == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d acknowledged messages never arrived", missing)
		}
		time.Sleep(500 * time.Millisecond)
	}
	// Duplicates only for what the killed relay was delivering.
	connFrom := func(mx *testworld.MXServer) map[int]string {
		m := map[int]string{}
		for _, cmd := range mx.Commands() {
			m[cmd.Conn.ID] = cmd.Conn.RemoteAddr
		}
		return m
	}
	from := map[*testworld.MXServer]map[int]string{stsMX: connFrom(stsMX), plainMX: connFrom(plainMX)}
	victimIP := fmt.Sprintf("127.0.77.%d:", victim+1)
	dups := 0
	for s, copies := range received() {
		if len(copies) < 2 {
			continue
		}
		dups++
		byVictim := false
		for _, cp := range copies {
			for _, mx := range []*testworld.MXServer{stsMX, plainMX} {
				if strings.HasPrefix(from[mx][cp.ConnID], victimIP) && cp.Time.Before(killTime.Add(time.Second)) {
					byVictim = true
				}
			}
		}
		if !byVictim && !retried[s] {
			var desc []string
			for _, cp := range copies {
				for _, mx := range []*testworld.MXServer{stsMX, plainMX} {
					if a := from[mx][cp.ConnID]; a != "" {
						desc = append(desc, fmt.Sprintf("from %s at kill%+v", a, cp.Time.Sub(killTime).Round(time.Millisecond)))
					}
				}
			}
			i := strings.TrimPrefix(s, "chaos-")
			for k, r := range rs {
				for _, l := range r.logs("delivery", func(l map[string]any) bool {
					return l["rcpt"] == "u"+i+"@"+stsDom || l["rcpt"] == "u"+i+"@"+plainDom
				}) {
					desc = append(desc, fmt.Sprintf("relay%d: %v", k+1, l))
				}
			}
			t.Errorf("%s delivered %d times, none of them by the killed relay before the kill: %s", s, len(copies), strings.Join(desc, "; "))
		}
	}
	t.Logf("%d messages delivered twice (in flight at the kill, or submitted twice after a failed submission; %d submissions were retried)", dups, len(retried))

	// One policy fetch for the fleet.
	fetches := 0
	for _, q := range pol.Requests() {
		if strings.Contains(q.Path, "mta-sts.txt") {
			fetches++
		}
	}
	if fetches != 1 {
		t.Errorf("policy host served %d fetches, want 1", fetches)
	}

	// One report per domain and period, counting the logged sessions:
	// every session the survivors logged, and the killed relay's up to a
	// little before the kill (its counts go to the fleet every few
	// seconds and at each period's end), never more than were logged.
	for _, tc := range []struct {
		dom string
		rcv *testworld.ReportReceiver
	}{{stsDom, stsRcv}, {plainDom, plainRcv}} {
		var all, live, victimEarly int64
		for i, r := range rs {
			for _, l := range r.logs("delivery", func(l map[string]any) bool { return l["domain"] == tc.dom && l["mx"] != "" }) {
				all++
				switch {
				case i != victim:
					live++
				case rptLogTime(t, l).Before(killTime.Add(-iv - 12*time.Second)):
					victimEarly++
				}
			}
		}
		var docs []*rptDoc
		var reported, last int64
		deadline := time.Now().Add(90 * time.Second)
		stable := 0
		for stable < 6 {
			docs = rptReports(t, tc.rcv, iv)
			reported = 0
			for _, d := range docs {
				reported += d.successes() + d.failures()
			}
			if reported >= live+victimEarly && reported == last {
				stable++
			} else {
				stable = 0
			}
			last = reported
			if time.Now().After(deadline) {
				t.Fatalf("%s: reports count %d sessions after 90s; want between %d and %d", tc.dom, reported, live+victimEarly, all)
			}
			time.Sleep(time.Second)
		}
		if reported > all || reported < live+victimEarly {
			t.Errorf("%s: reports count %d sessions; the relays logged %d, the survivors %d, the killed relay %d well before the kill",
				tc.dom, reported, all, live, victimEarly)
		}
		periods := map[time.Time]int{}
		for _, d := range docs {
			periods[d.start]++
		}
		for p, k := range periods {
			if k != 1 {
				t.Errorf("%s: period %s got %d reports, want 1 for the fleet", tc.dom, p.Format(time.RFC3339), k)
			}
		}
		t.Logf("%s: %d reports, %d sessions reported of %d logged", tc.dom, len(docs), reported, all)
	}
}
