package archtest

import (
	"bytes"
	"os/exec"
	"strings"
	"testing"
)

const mod = "github.com/stsrelay/stsrelay"

// rule: a package under one of From may not import (non-test imports) a
// package under any of Deny, unless it is also under one of Except. The
// prefixes are module-relative and cover sub-packages ("mtasts" covers
// mtasts/forecast and a future mtasts/mtastsdb).
type rule struct {
	why    string
	from   []string
	except []string // packages of from the rule does not apply to
	deny   []string
}

// rules are the import rules of docs/architecture.md; keep the two alike.
var rules = []rule{
	{why: "MTA-STS is protocol and policy state; it knows nothing of the queue, delivery or submission",
		from: []string{"mtasts"}, deny: []string{"queue", "delivery", "relay", "internal/fleet", "internal/server", "internal/control", "internal/check"}},
	{why: "TLS-RPT takes a small enqueue function instead of the queue; mtasts imports tlsrpt, not the reverse",
		from: []string{"tlsrpt"}, deny: []string{"queue", "delivery", "relay", "mtasts", "internal/fleet", "internal/server", "internal/control", "internal/check"}},
	{why: "the queue stores messages; it does not deliver or accept them",
		from: []string{"queue"}, deny: []string{"delivery", "relay", "mtasts", "tlsrpt", "internal/fleet", "internal/server", "internal/control", "internal/check"}},
	{why: "submission only queues; delivery decisions are delivery's",
		from: []string{"relay"}, deny: []string{"delivery", "mtasts", "tlsrpt", "internal/fleet", "internal/server", "internal/control", "internal/check"}},
	{why: "delivery never reaches back into submission or the composition layer",
		from: []string{"delivery"}, deny: []string{"relay", "internal/fleet", "internal/server", "internal/control", "internal/check"}},
	{why: "internal leaf packages import no top-level package (they are below all of them)",
		from:   []string{"internal"},
		except: []string{"internal/fleet", "internal/server", "internal/control", "internal/check", "internal/archtest"},
		deny:   []string{"mtasts", "tlsrpt", "queue", "relay", "delivery", "internal/fleet", "internal/server", "internal/control", "internal/check"}},
	{why: "only the composition layer (cmd, internal/server) wires fleet mode in",
		from:   []string{""},
		except: []string{"cmd", "internal/server", "internal/fleet"},
		deny:   []string{"internal/fleet"}},
	{why: "the test kit is for tests, the demo and the benchmarks",
		from:   []string{""},
		except: []string{"cmd", "bench", "internal/testworld"},
		deny:   []string{"internal/testworld"}},
}

// under reports whether the module-relative path p is prefix or below it
// ("" is the whole module).
func under(p, prefix string) bool {
	return prefix == "" || p == prefix || strings.HasPrefix(p, prefix+"/")
}

func anyUnder(p string, prefixes []string) bool {
	for _, x := range prefixes {
		if under(p, x) {
			return true
		}
	}
	return false
}

// violations checks graph (module-relative package → its module-relative
// imports) against rs.
func violations(graph map[string][]string, rs []rule) []string {
	var out []string
	for pkg, imps := range graph {
		for _, r := range rs {
			if !anyUnder(pkg, r.from) || anyUnder(pkg, r.except) {
				continue
			}
			for _, imp := range imps {
				if anyUnder(imp, r.deny) && !under(imp, pkg) {
					out = append(out, pkg+" imports "+imp+": "+r.why)
				}
			}
		}
	}
	return out
}

// moduleGraph lists the module's packages and their imports within the
// module, with go list.
func moduleGraph(t *testing.T) map[string][]string {
	t.Helper()
	cmd := exec.Command("go", "list", "-f", `{{.ImportPath}} {{join .Imports " "}}`, mod+"/...")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, stderr.Bytes())
	}
	graph := map[string][]string{}
	for line := range strings.SplitSeq(strings.TrimSpace(string(out)), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		pkg, ok := rel(f[0])
		if !ok {
			continue
		}
		graph[pkg] = nil
		for _, imp := range f[1:] {
			if r, ok := rel(imp); ok {
				graph[pkg] = append(graph[pkg], r)
			}
		}
	}
	return graph
}

func rel(p string) (string, bool) {
	if p == mod {
		return "", true
	}
	r, ok := strings.CutPrefix(p, mod+"/")
	return r, ok
}

func TestImportRules(t *testing.T) {
	graph := moduleGraph(t)
	// The graph is real: the packages the rules are about are there.
	for _, p := range []string{"mtasts", "tlsrpt", "queue", "relay", "delivery", "internal/domain", "cmd/stsrelay"} {
		if _, ok := graph[p]; !ok {
			t.Fatalf("go list did not list %s; got %d packages", p, len(graph))
		}
	}
	if imps := graph["delivery"]; !anyUnder("queue", imps) {
		t.Fatalf("delivery's imports %v lack queue: the graph is not what go list says", imps)
	}
	for _, v := range violations(graph, rules) {
		t.Error(v)
	}
}

// The rules catch what they are meant to catch.
func TestRulesCatch(t *testing.T) {
	for _, tt := range []struct {
		graph map[string][]string
		bad   bool
	}{
		{map[string][]string{"mtasts/mtastsdb": {"queue"}}, true},
		{map[string][]string{"tlsrpt/tlsrptsend": {"queue"}}, true},
		{map[string][]string{"tlsrpt": {"mtasts"}}, true},
		{map[string][]string{"queue": {"delivery"}}, true},
		{map[string][]string{"internal/dnsclient": {"mtasts"}}, true},
		{map[string][]string{"delivery": {"internal/fleet/jsqueue"}}, true},
		{map[string][]string{"relay": {"internal/testworld"}}, true},
		{map[string][]string{"mtasts": {"tlsrpt", "internal/domain"}}, false},
		{map[string][]string{"internal/server": {"internal/fleet/jsqueue", "queue", "delivery"}}, false},
		{map[string][]string{"internal/fleet/jsqueue": {"queue", "internal/fleet"}}, false},
		{map[string][]string{"cmd/stsrelay": {"internal/fleet", "internal/testworld"}}, false},
		{map[string][]string{"bench/cmd/benchworld": {"internal/testworld"}}, false},
	} {
		if got := len(violations(tt.graph, rules)) > 0; got != tt.bad {
			t.Errorf("%v: violation %v, want %v", tt.graph, got, tt.bad)
		}
	}
}
