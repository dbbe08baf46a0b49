package main

import (
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/emersion/go-sasl"
	"github.com/emersion/go-smtp"
	"github.com/pelletier/go-toml/v2"
	"golang.org/x/crypto/bcrypt"

	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/testworld"
)

// writeConfig replaces the relay's configuration file with cfg.
func (r *relayProc) writeConfig(cfg *config.Config) {
	r.t.Helper()
	data, err := toml.Marshal(cfg)
	if err != nil {
		r.t.Fatal(err)
	}
	if err := os.WriteFile(r.cfgPath, data, 0o600); err != nil {
		r.t.Fatal(err)
	}
}

// hup sends SIGHUP (in process: on the Reload channel) and waits for the
// n-th "reload" line.
func (r *relayProc) hup(n int) map[string]any {
	r.t.Helper()
	if !r.process {
		r.reload <- syscall.SIGHUP
	} else if err := r.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		r.t.Fatal(err)
	}
	return r.waitLog("reload", n, 20*time.Second, nil)[n-1]
}

// loginSession opens a STARTTLS session and logs in as user.
func loginSession(t *testing.T, addr, user, password string) (*smtp.Client, error) {
	t.Helper()
	c, err := smtp.DialStartTLS(addr, &tls.Config{InsecureSkipVerify: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.Hello("client.test"); err != nil {
		t.Fatal(err)
	}
	return c, c.Auth(sasl.NewPlainClient("", user, password))
}

func sendOn(c *smtp.Client, from, to, subject string) error {
	if err := c.Mail(from, nil); err != nil {
		return err
	}
	if err := c.Rcpt(to, nil); err != nil {
		return err
	}
	w, err := c.Data()
	if err != nil {
		return err
	}
	if _, err := w.Write(simpleMessage(subject)); err != nil {
		return err
	}
	return w.Close()
}

func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

func scrape(t *testing.T, addr string) string {
	t.Helper()
	client := &http.Client{Timeout: 5 * time.Second}
	resp, err := client.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// SIGHUP with a good configuration: a new user can log in, a session
// that logged in before goes on, the log level changes, keys that need a
// restart are named. With a bad one: refused with the file:line error, and
// the configuration in force keeps working.
func TestE2EReload(t *testing.T) {
	t.Parallel()
	w := testworld.New(t)
	mx := simpleDomain(w, "ex.test")
	cfg := testConfig(t, w)
	cfg.Metrics.Listen = freeAddr(t)
	r := startRelay(t, cfg)

	old, err := loginSession(t, r.addr, testUser, testPassword)
	if err != nil {
		t.Fatal(err)
	}

	h, err := bcrypt.GenerateFromPassword([]byte("new-secret"), bcrypt.MinCost)
	if err != nil {
		t.Fatal(err)
	}
	good := *cfg
	good.Submission.Users = append([]config.User{{Username: "newuser", PasswordHash: string(h)}}, cfg.Submission.Users...)
	good.Log.Level = "info"
	good.Submission.MaxRecipients = cfg.Submission.MaxRecipients + 1 // needs a restart
	r.writeConfig(&good)
	l := r.hup(1)
	if l["result"] != "ok" || l["error"] != nil {
		t.Fatalf("reload line = %v", l)
	}
	if rn, _ := l["restart_needed"].([]any); len(rn) != 1 || rn[0] != "submission.max_recipients" {
		t.Errorf("restart_needed = %v, want [submission.max_recipients]", l["restart_needed"])
	}

	t.Run("session from before the reload continues", func(t *testing.T) {
		if err := sendOn(old, "s@client.test", "a@ex.test", "old session"); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("new user logs in", func(t *testing.T) {
		c, err := loginSession(t, r.addr, "newuser", "new-secret")
		if err != nil {
			t.Fatal(err)
		}
		if err := sendOn(c, "s@client.test", "b@ex.test", "new user"); err != nil {
			t.Fatal(err)
		}
	})
	mx.WaitMessages(t, 2, 15*time.Second)
	r.waitResult("b@ex.test", "delivered", 10*time.Second)
	t.Run("log level info applies", func(t *testing.T) {
		r.mu.Lock()
		defer r.mu.Unlock()
		after := false
		for _, l := range r.lines {
			if l["msg"] == "reload" {
				after = true
				continue
			}
			if after && l["level"] == "debug" {
				t.Errorf("debug line after log.level = info: %v", l)
			}
		}
	})

	t.Run("bad config is refused and the old one stays", func(t *testing.T) {
		data, _ := toml.Marshal(&good)
		bad := string(data) + "\n[submission2]\nlisten = 1\n"
		if err := os.WriteFile(r.cfgPath, []byte(bad), 0o600); err != nil {
			t.Fatal(err)
		}
		l := r.hup(2)
		msg, _ := l["error"].(string)
		if l["result"] != "failed" || !strings.Contains(msg, r.cfgPath+":") || !strings.Contains(msg, "submission2") {
			t.Fatalf("reload line = %v, want result failed and a file:line error naming the key", l)
		}
		if _, err := loginSession(t, r.addr, "newuser", "new-secret"); err != nil {
			t.Errorf("user of the configuration in force after a refused reload: %v", err)
		}
		if _, code := r.cli("config", "check"); code != exitProblem {
			t.Errorf("config check on the bad file: exit %d, want 2", code)
		}
	})
	t.Run("bad certificate is refused", func(t *testing.T) {
		bad := good
		bad.Submission.TLSKeyFile = filepath.Join(t.TempDir(), "missing.key")
		r.writeConfig(&bad)
		if l := r.hup(3); l["result"] != "failed" {
			t.Fatalf("reload line = %v", l)
		}
		if _, err := loginSession(t, r.addr, testUser, testPassword); err != nil {
			t.Error(err)
		}
	})
	body := scrape(t, cfg.Metrics.Listen)
	for _, want := range []string{`stsrelay_config_reloads_total{result="ok"} 1`, `stsrelay_config_reloads_total{result="failed"} 2`} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}

// config check: exit 0 and "config OK", exit 2 with file:line:key, and
// the start-up warnings without failing.
func TestE2EConfigCheck(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	run := func(path string) (string, string, int) {
		cmd := exec.Command(binPath, "config", "check", "-config", path)
		var out, errb strings.Builder
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return out.String(), errb.String(), code
	}
	write := func(name, text string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, tc := range []struct {
		name, file, text string
		code             int
		stdout           string
		stderr           []string
	}{
		{"the example is clean", "", "", 0, "config OK: ../../config.example.toml", nil},
		{"unknown key names file, line and key", "bad1.toml", "hostname = \"r.example.net\"\n[submission]\nlisen = []\n", 2, "",
			[]string{"bad1.toml:3", `"submission.lisen"`}},
		{"bad value names file, line and key", "bad2.toml", "hostname = \"r.example.net\"\n[queue]\nworkers = \"x\"\n", 2, "",
			[]string{"bad2.toml:3", "queue.workers"}},
		{"missing certificate file", "bad3.toml", "hostname = \"r.example.net\"\n[submission]\ntls_cert_file = \"/nonexistent.pem\"\ntls_key_file = \"/nonexistent.key\"\n", 2, "",
			[]string{"submission.tls_cert_file"}},
		{"warnings do not fail", "warn.toml", "hostname = \"relay.example.net\"\n[tlsrpt]\nenabled = true\ncontact_info = \"mailto:x@other.test\"\n", 0, "config OK",
			[]string{"warning:", "tlsrpt.dkim_key_file", "tlsrpt.contact_info"}},
		{"organisational parent contact is fine", "ok.toml", "hostname = \"relay.example.net\"\n[tlsrpt]\nenabled = false\ncontact_info = \"mailto:postmaster@example.net\"\n", 0, "config OK", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := "../../config.example.toml"
			if tc.file != "" {
				path = write(tc.file, tc.text)
			}
			stdout, stderr, code := run(path)
			if code != tc.code {
				t.Fatalf("exit %d, want %d; stderr:\n%s", code, tc.code, stderr)
			}
			if !strings.Contains(stdout, tc.stdout) {
				t.Errorf("stdout %q lacks %q", stdout, tc.stdout)
			}
			for _, want := range tc.stderr {
				if !strings.Contains(stderr, want) {
					t.Errorf("stderr %q lacks %q", stderr, want)
				}
			}
			if tc.stderr == nil && stderr != "" {
				t.Errorf("unexpected stderr: %s", stderr)
			}
		})
	}
}
