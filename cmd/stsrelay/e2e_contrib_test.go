package main

import (
	"bufio"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stsrelay/stsrelay/internal/testworld"
)

var metricNameRe = regexp.MustCompile(`\bstsrelay_[a-z0-9_]+`)

// servedMetrics runs a relay that has delivered one message (so that
// every labelled series exists) and returns the metric names in its
// /metrics.
func servedMetrics(t *testing.T) map[string]bool {
	t.Helper()
	w := testworld.New(t)
	mx := simpleDomain(w, "ex.test")
	cfg := testConfig(t, w)
	cfg.Metrics.Listen = freeAddr(t)
	cfg.TLSRPT.Enabled = true
	r := startRelay(t, cfg)
	r.mustSubmit("s@client.test", []string{"u@ex.test"}, simpleMessage("contrib"))
	mx.WaitMessages(t, 1, 15*time.Second)
	r.waitResult("u@ex.test", "delivered", 10*time.Second)
	names := map[string]bool{}
	sc := bufio.NewScanner(strings.NewReader(scrape(t, cfg.Metrics.Listen)))
	for sc.Scan() {
		line := sc.Text()
		if f, ok := strings.CutPrefix(line, "# TYPE "); ok {
			// A histogram's family name (…_seconds) is served as
			// …_bucket, …_sum and …_count samples.
			names[strings.Fields(f)[0]] = true
			continue
		}
		if strings.HasPrefix(line, "#") {
			continue
		}
		if n := metricNameRe.FindString(line); n != "" && strings.HasPrefix(line, n) {
			names[n] = true
		}
	}
	return names
}

// Every metric the dashboard, the alert rules and the operator docs name
// is served by a running relay.
func TestE2EContribMetricsExist(t *testing.T) {
	t.Parallel()
	served := servedMetrics(t)
	var dash any
	data, err := os.ReadFile("../../contrib/grafana-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(data, &dash); err != nil {
		t.Fatalf("grafana-dashboard.json: %v", err)
	}
	for _, file := range []string{"contrib/grafana-dashboard.json", "contrib/prometheus-alerts.yml", "docs/operations.md"} {
		t.Run(filepath.Base(file), func(t *testing.T) {
			data, err := os.ReadFile("../../" + file)
			if err != nil {
				t.Fatal(err)
			}
			names := metricNameRe.FindAllString(string(data), -1)
			if len(names) == 0 {
				t.Fatal("names no metric")
			}
			for _, n := range names {
				if !served[n] {
					t.Errorf("%s names %s, which /metrics does not serve", file, n)
				}
			}
		})
	}
	t.Run("dashboard panels", func(t *testing.T) {
		for _, want := range []string{"stsrelay_messages_accepted_total", "stsrelay_deliveries_total", "stsrelay_queue_messages",
			"stsrelay_queue_oldest_seconds", "stsrelay_mtasts_policies", "stsrelay_mtasts_fetches_total",
			"stsrelay_tls_sessions_total", "stsrelay_tlsrpt_reports_total", "stsrelay_dns_cache_lookups_total"} {
			if !strings.Contains(string(data), want) {
				t.Errorf("dashboard has no panel on %s", want)
			}
		}
	})
}

// docs/operations.md names only configuration keys that config.example.toml
// documents.
func TestE2EContribDocsKeys(t *testing.T) {
	t.Parallel()
	example, err := os.ReadFile("../../config.example.toml")
	if err != nil {
		t.Fatal(err)
	}
	docs, err := os.ReadFile("../../docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	// The example's tables and their keys, set or commented out.
	keys := map[string]bool{}
	tables := map[string]bool{}
	table := ""
	// A table commented out ("# [[route]]") documents it too.
	headerRe := regexp.MustCompile(`^(?:#\s*)?\[\[?([a-z_.]+)\]\]?\s*(?:#.*)?$`)
	keyRe := regexp.MustCompile(`^#?\s*([a-z_]+)\s*=`)
	for _, line := range strings.Split(string(example), "\n") {
		line = strings.TrimSpace(line)
		if m := headerRe.FindStringSubmatch(line); m != nil {
			table = m[1]
			tables[table] = true
			keys[table] = true
			continue
		}
		if m := keyRe.FindStringSubmatch(line); m != nil {
			if table == "" {
				keys[m[1]] = true
			} else {
				keys[table+"."+m[1]] = true
			}
		}
	}
	mentioned := regexp.MustCompile("`\\[*([a-z_]+(?:\\.[a-z_]+)*)\\]*`").FindAllStringSubmatch(string(docs), -1)
	checked := 0
	for _, m := range mentioned {
		key := m[1]
		section, _, dotted := strings.Cut(key, ".")
		if !dotted && !strings.HasPrefix(m[0], "`[") && !slices.Contains([]string{"hostname", "data_dir"}, key) {
			continue // a plain word in backticks
		}
		if dotted && !tables[section] {
			continue // not a configuration key (e.g. _smtp._tls)
		}
		checked++
		if !keys[key] {
			t.Errorf("docs/operations.md names %s, which config.example.toml does not document", m[0])
		}
	}
	if checked < 20 {
		t.Errorf("only %d configuration keys found in docs/operations.md", checked)
	}
}

// The unit passes systemd-analyze verify (with ExecStart pointing at the
// binary under test, since verify wants it to exist).
func TestE2EContribSystemdVerify(t *testing.T) {
	t.Parallel()
	sa, err := exec.LookPath("systemd-analyze")
	if err != nil {
		t.Skip("systemd-analyze is not installed: contrib/stsrelay.service not verified (install systemd to run this test)")
	}
	unit, err := os.ReadFile("../../contrib/stsrelay.service")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "StateDirectory=stsrelay",
		"ProtectSystem=strict", "NoNewPrivileges=yes", "PrivateTmp=yes", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
		"SystemCallFilter=@system-service", "CapabilityBoundingSet="} {
		if !strings.Contains(string(unit), want) {
			t.Errorf("unit lacks %q", want)
		}
	}
	path := filepath.Join(t.TempDir(), "stsrelay.service")
	if err := os.WriteFile(path, []byte(strings.ReplaceAll(string(unit), "/usr/local/bin/stsrelay", binPath)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(sa, "verify", path).CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Errorf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// sd_notify: the real binary says READY=1 on $NOTIFY_SOCKET once it
// listens, RELOADING=1 then READY=1 around a SIGHUP reload, STOPPING=1 at
// SIGTERM.
func TestE2ENotify(t *testing.T) {
	// t.Setenv: not parallel.
	sock := filepath.Join(t.TempDir(), "notify.sock")
	ln, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	t.Setenv("NOTIFY_SOCKET", sock)
	w := testworld.New(t)
	r := startRelayProcess(t, testConfig(t, w))
	next := func(want string) {
		t.Helper()
		buf := make([]byte, 4096)
		_ = ln.SetReadDeadline(time.Now().Add(20 * time.Second))
		n, err := ln.Read(buf)
		if err != nil {
			t.Fatalf("waiting for %s: %v", want, err)
		}
		if got := string(buf[:n]); !strings.HasPrefix(got, want) {
			t.Fatalf("got %q, want %s", got, want)
		}
	}
	next("READY=1")
	if err := r.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	next("RELOADING=1")
	next("READY=1")
	r.stop()
	next("STOPPING=1")
}

// config.example.toml starts without a warning.
func TestE2EContribExampleStartsClean(t *testing.T) {
	t.Parallel()
	data, err := os.ReadFile("../../config.example.toml")
	if err != nil {
		t.Fatal(err)
	}
	text := string(data)
	dir := t.TempDir()
	for old, repl := range map[string]string{
		`data_dir = "./data"`:         `data_dir = "` + filepath.Join(dir, "data") + `"`,
		`listen = ["127.0.0.1:2525"]`: `listen = ["127.0.0.1:0"]`,
		`listen = "127.0.0.1:9464"`:   `listen = ""`,
	} {
		if !strings.Contains(text, old) {
			t.Fatalf("config.example.toml no longer has %s", old)
		}
		text = strings.Replace(text, old, repl, 1)
	}
	path := filepath.Join(dir, "example.toml")
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	r := &relayProc{t: t, cfgPath: path}
	r.start()
	r.stop()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, l := range r.lines {
		if lv := l["level"]; lv == "warn" || lv == "error" {
			t.Errorf("example config logs %v", l)
		}
	}
}
