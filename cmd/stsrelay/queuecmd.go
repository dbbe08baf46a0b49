package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/stsrelay/stsrelay/delivery"
	"github.com/stsrelay/stsrelay/internal/config"
	"github.com/stsrelay/stsrelay/internal/control"
	"github.com/stsrelay/stsrelay/internal/server"
	"github.com/stsrelay/stsrelay/queue"
)

// defaultListLimit is how many messages `queue list` shows (without
// -json; -json lists them all) unless -limit
// says otherwise: a queue of a million still answers at once, and
// `queue summary` gives its shape.
const defaultListLimit = 1000

// cmdQueue is `stsrelay queue`: it lists, summarises, shows, retries,
// deletes or bounces queued messages, through the running relay or, with
// none, on the queue directory itself.
func cmdQueue(args []string) error {
	var cf commonFlags
	fs := newFlagSet("queue", &cf)
	limit := fs.Int("limit", -1, fmt.Sprintf("list: show at most this many messages, oldest first (0: all; default %d, and all with -json)", defaultListLimit))
	domainFlag := fs.String("domain", "", "list: only messages to this domain; retry: release every message to it")
	pos, err := parseFlags(fs, args)
	if err != nil {
		return err
	}
	if len(pos) == 0 {
		return &usageError{"queue: want list, summary, show ID, retry ID|-domain D, delete ID or bounce ID"}
	}
	if *limit < -1 {
		return &usageError{"queue: -limit must not be negative"}
	}
	if *limit == -1 {
		// Scripts reading -json get the whole queue, as before -limit
		// existed (paged, so memory stays bounded); a person reading the
		// table gets the oldest defaultListLimit at once.
		*limit = defaultListLimit
		if cf.json {
			*limit = 0
		}
	}
	sub := pos[0]
	dom := ""
	if *domainFlag != "" {
		if sub != "list" && sub != "retry" {
			return &usageError{"queue " + sub + ": -domain applies to list and retry only"}
		}
		dom = queue.AddrDomain("x@" + *domainFlag)
	}
	if sub == "summary" {
		if len(pos) != 1 {
			return &usageError{"queue summary: wrong number of arguments"}
		}
		cfg, err := loadConfig(cf.config)
		if err != nil {
			return err
		}
		return queueSummary(cfg, cf.json)
	}
	if sub == "retry" && dom != "" {
		if len(pos) != 1 {
			return &usageError{"queue retry: give an ID or -domain, not both"}
		}
		cfg, err := loadConfig(cf.config)
		if err != nil {
			return err
		}
		return queueRetryDomain(cfg, dom, cf.json)
	}
	return runQueueByID(cf, sub, pos, dom, *limit)
}

// runQueueByID checks the arguments of `queue list` and of the
// subcommands that take one message ID, loads the configuration and runs
// the subcommand.
func runQueueByID(cf commonFlags, sub string, pos []string, dom string, limit int) error {
	needID := sub != "list"
	if needID && len(pos) != 2 || !needID && len(pos) != 1 {
		return &usageError{"queue " + sub + ": wrong number of arguments"}
	}
	cfg, err := loadConfig(cf.config)
	if err != nil {
		return err
	}
	var id string
	if needID {
		id = pos[1]
		if !queue.ValidID(id) {
			return &usageError{fmt.Sprintf("queue %s: %q is not a queue ID", sub, id)}
		}
	}
	switch sub {
	case "list":
		return runQueueList(cfg, dom, limit, cf.json)
	case "show":
		return runQueueShow(cfg, id, cf.json)
	case "retry", "delete", "bounce":
		return runQueueAction(cfg, sub, id, cf.json)
	}
	return &usageError{"queue: unknown subcommand " + sub}
}

// runQueueList prints up to limit queued messages (to dom, if set), or
// all of them page by page when limit is 0, and says on stderr how many
// more there are.
func runQueueList(cfg *config.Config, dom string, limit int, asJSON bool) error {
	if limit == 0 {
		return listAllPaged(cfg, dom, asJSON)
	}
	lo := queue.ListOptions{Domain: dom, Limit: limit}
	ql, err := controlClient(cfg).QueueList(context.Background(), lo)
	if err = fleetOffline(cfg, err); errors.Is(err, control.ErrNoServer) {
		ql, err = listQueueOffline(cfg, lo)
	}
	if err != nil {
		return err
	}
	if err := printQueueList(ql.Messages, asJSON); err != nil {
		return err
	}
	if more := ql.Total - len(ql.Messages); more > 0 {
		fmt.Fprintf(os.Stderr, "stsrelay: %d more message(s) not shown (of %d): use -limit 0 for all, -domain D, or `stsrelay queue summary`\n", more, ql.Total)
	}
	return nil
}

// runQueueShow prints the queued message id.
func runQueueShow(cfg *config.Config, id string, asJSON bool) error {
	m, err := controlClient(cfg).QueueShow(context.Background(), id)
	if err = fleetOffline(cfg, err); errors.Is(err, control.ErrNoServer) {
		m, err = readQueueOffline(cfg, id)
	}
	if err != nil {
		return notFoundExit(err)
	}
	return printQueueShow(m, asJSON)
}

// runQueueAction retries, deletes or bounces (sub) the queued message
// id and reports it done.
func runQueueAction(cfg *config.Config, sub, id string, asJSON bool) error {
	ctx := context.Background()
	err := queueAction(ctx, controlClient(cfg), sub, id)
	if err = fleetOffline(cfg, err); errors.Is(err, control.ErrNoServer) {
		err = queueActionOffline(ctx, cfg, sub, id)
	}
	if err != nil {
		return notFoundExit(err)
	}
	if asJSON {
		return jsonOut().Encode(map[string]string{"id": id, "action": sub, "result": "ok"})
	}
	fmt.Printf("%s: %s done\n", id, sub)
	return nil
}

// fleetOffline turns "no relay running here" into an error in fleet
// mode: the queue lives in the fleet's NATS servers, and a stopped node's
// local directory holds none of it.
func fleetOffline(cfg *config.Config, err error) error {
	if errors.Is(err, control.ErrNoServer) && cfg.Cluster.Enabled() {
		return errors.New("fleet mode: the queue is the fleet's; run this on a node whose relay is running")
	}
	return err
}

// notFoundExit prints a missing-ID error and exits 1 (a checked condition
// failed); other errors exit 2.
func notFoundExit(err error) error {
	if control.IsNotFound(err) {
		fmt.Fprintf(os.Stderr, "stsrelay: %v\n", err)
		return &exitError{exitFailed}
	}
	return err
}

func readQueueOffline(cfg *config.Config, id string) (*queue.Message, error) {
	o := server.QueueOptions(cfg)
	o.ReadOnly = true
	st, err := queue.Open(o)
	if err != nil {
		return nil, err
	}
	defer st.Close()
	return st.Get(id)
}

// listPage is how many messages `queue list -limit 0` asks for at a time,
// so that neither the relay nor the CLI holds a million at once.
const listPage = 5000

// listAllPaged prints every queued message, page by page, as it reads
// them: a queue of a million streams out instead of being built in
// memory first.
func listAllPaged(cfg *config.Config, dom string, asJSON bool) error {
	var st queue.Queue
	var api control.API = controlClient(cfg)
	ctx := context.Background()
	fetch := func(after string) (control.QueueList, error) {
		lo := queue.ListOptions{Domain: dom, Limit: listPage, After: after}
		ql, err := api.QueueList(ctx, lo)
		if err = fleetOffline(cfg, err); errors.Is(err, control.ErrNoServer) {
			ro := server.QueueOptions(cfg)
			ro.ReadOnly = true
			s, oerr := queue.Open(ro)
			if oerr != nil {
				return ql, oerr
			}
			st = s
			api = &control.Service{Queue: st}
			return api.QueueList(ctx, lo)
		}
		return ql, err
	}
	defer func() {
		if st != nil {
			st.Close()
		}
	}()
	out := bufio.NewWriterSize(os.Stdout, 1<<20)
	defer out.Flush()
	var enc *json.Encoder
	if asJSON {
		enc = json.NewEncoder(jsonTermWriter{out})
		enc.SetIndent("  ", "  ")
		fmt.Fprint(out, "[")
	} else {
		fmt.Fprintln(out, "ID\tAGE\tSIZE\tFROM\tRECIPIENTS\tNEXT ATTEMPT")
	}
	n, after := 0, ""
	now := time.Now()
	for {
		ql, err := fetch(after)
		if err != nil {
			return err
		}
		for _, m := range ql.Messages {
			if asJSON {
				if n > 0 {
					fmt.Fprint(out, ",")
				}
				fmt.Fprint(out, "\n  ")
				if err := enc.Encode(m); err != nil {
					return err
				}
			} else {
				fmt.Fprintln(out, queueListLine(m, now))
			}
			n++
		}
		if len(ql.Messages) < listPage {
			break
		}
		after = ql.Messages[len(ql.Messages)-1].ID
	}
	if asJSON {
		fmt.Fprintln(out, "]")
		return nil
	}
	fmt.Fprintf(out, "%d message(s)\n", n)
	return nil
}

func listQueueOffline(cfg *config.Config, o queue.ListOptions) (control.QueueList, error) {
	ro := server.QueueOptions(cfg)
	ro.ReadOnly = true
	st, err := queue.Open(ro)
	if err != nil {
		return control.QueueList{}, err
	}
	defer st.Close()
	return (&control.Service{Queue: st}).QueueList(context.Background(), o)
}

// queueSummary prints the queue's shape: messages by destination and
// age, like Postfix's qshape.
func queueSummary(cfg *config.Config, asJSON bool) error {
	sum, err := controlClient(cfg).QueueSummary(context.Background())
	if err = fleetOffline(cfg, err); errors.Is(err, control.ErrNoServer) {
		ro := server.QueueOptions(cfg)
		ro.ReadOnly = true
		st, oerr := queue.Open(ro)
		if oerr != nil {
			return oerr
		}
		sum = st.Summary(time.Now())
		st.Close()
		err = nil
	}
	if err != nil {
		return err
	}
	if asJSON {
		if sum.Domains == nil {
			sum.Domains = []queue.DomainSummary{}
		}
		enc := jsonOut()
		enc.SetIndent("", "  ")
		return enc.Encode(sum)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 1, ' ', tabwriter.AlignRight)
	head := "DOMAIN\tT"
	for _, b := range queue.AgeBuckets {
		head += fmt.Sprintf("\t%d", int(b.Minutes()))
	}
	head += fmt.Sprintf("\t%d+\t", int(queue.AgeBuckets[len(queue.AgeBuckets)-1].Minutes()))
	fmt.Fprintln(tw, head)
	row := func(name string, total int, ages []int) {
		line := termSafe(name) + "\t" + strconv.Itoa(total)
		for _, n := range ages {
			line += "\t" + strconv.Itoa(n)
		}
		fmt.Fprintln(tw, line+"\t")
	}
	row("TOTAL", sum.Total, sum.Ages)
	for _, d := range sum.Domains {
		name := d.Domain
		if !d.HeldUntil.IsZero() {
			name += " (held)"
		}
		row(name, d.Total, d.Ages)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Println("ages in minutes since arrival")
	return nil
}

// queueRetryDomain releases every message to a destination at once.
func queueRetryDomain(cfg *config.Config, dom string, asJSON bool) error {
	released, err := controlClient(cfg).QueueRetryDomain(context.Background(), dom)
	if err = fleetOffline(cfg, err); errors.Is(err, control.ErrNoServer) {
		// Offline the schedule is read fresh at the next start; a
		// released destination simply has its messages due then.
		st, oerr := queue.Open(server.QueueOptions(cfg))
		if oerr != nil {
			return oerr
		}
		released = st.RetryDomain(dom)
		err = st.Close()
	}
	if err != nil {
		return err
	}
	if asJSON {
		return jsonOut().Encode(map[string]any{"domain": dom, "action": "retry", "released": released})
	}
	fmt.Printf("%s: %d message(s) released\n", dom, released)
	return nil
}

// queueActionOffline applies an operator action to the queue of a
// stopped relay; a bounce builds its DSN with a bare delivery engine.
func queueActionOffline(ctx context.Context, cfg *config.Config, sub, id string) error {
	st, err := queue.Open(server.QueueOptions(cfg))
	if err != nil {
		return err
	}
	defer st.Close()
	svc := &control.Service{Queue: st, Bounce: func(id string) error {
		return delivery.New(delivery.Options{Config: cfg, Store: st}).Bounce(id)
	}}
	return queueAction(ctx, svc, sub, id)
}

// queueAction applies an operator action (retry, delete, bounce).
func queueAction(ctx context.Context, api control.API, sub, id string) error {
	switch sub {
	case "retry":
		return api.QueueRetry(ctx, id)
	case "delete":
		return api.QueueDelete(ctx, id)
	case "bounce":
		return api.QueueBounce(ctx, id)
	}
	return fmt.Errorf("unknown queue action %q", sub)
}

func rcptSummary(m *queue.Message) string {
	counts := map[queue.Status]int{}
	for _, r := range m.Rcpts {
		counts[r.Status]++
	}
	var parts []string
	for _, s := range []queue.Status{queue.Pending, queue.Deferred, queue.Delivered, queue.Bounced} {
		if counts[s] > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", counts[s], s))
		}
	}
	return strings.Join(parts, ", ")
}

// queueListLine is one message's line of `queue list`, tab-separated.
func queueListLine(m *queue.Message, now time.Time) string {
	next := "-"
	if t := m.NextDue(); !t.IsZero() {
		if d := t.Sub(now); d > 0 {
			next = "in " + d.Round(time.Second).String()
		} else {
			next = "now"
		}
	}
	from := m.Env.From
	if from == "" {
		from = "<>"
	}
	return fmt.Sprintf("%s\t%s\t%d\t%s\t%s\t%s", m.ID, now.Sub(m.Received).Round(time.Second), m.Size, termSafe(from), rcptSummary(m), next)
}

func printQueueList(msgs []*queue.Message, asJSON bool) error {
	if asJSON {
		if msgs == nil {
			msgs = []*queue.Message{}
		}
		enc := jsonOut()
		enc.SetIndent("", "  ")
		return enc.Encode(msgs)
	}
	tw := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tAGE\tSIZE\tFROM\tRECIPIENTS\tNEXT ATTEMPT")
	now := time.Now()
	for _, m := range msgs {
		fmt.Fprintln(tw, queueListLine(m, now))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	fmt.Printf("%d message(s)\n", len(msgs))
	return nil
}

func printQueueShow(m *queue.Message, asJSON bool) error {
	if asJSON {
		enc := jsonOut()
		enc.SetIndent("", "  ")
		return enc.Encode(m)
	}
	from := m.Env.From
	if from == "" {
		from = "<>"
	}
	// Addresses, replies and MX names come from clients and remote
	// servers: termSafe.
	fmt.Printf("ID:        %s\nReceived:  %s\nSize:      %d\nFrom:      %s\nUser:      %s\nClient IP: %s\n", m.ID, m.Received.UTC().Format(time.RFC3339), m.Size, termSafe(from), termSafe(m.Env.User), termSafe(m.Env.ClientIP))
	if m.Env.Kind != "" {
		fmt.Printf("Kind:      %s\n", termSafe(string(m.Env.Kind)))
	}
	for _, r := range m.Rcpts {
		fmt.Printf("\n  %s\n    status: %s, attempts: %d\n", termSafe(r.Addr), r.Status, r.Attempts)
		if !r.NextAttempt.IsZero() && !r.Status.Final() {
			fmt.Printf("    next attempt: %s\n", r.NextAttempt.UTC().Format(time.RFC3339))
		}
		if r.LastError != "" || r.LastCode != 0 {
			fmt.Printf("    last: %d %s %s (mx %s)\n", r.LastCode, termSafe(r.LastEnhanced), termSafe(r.LastError), termSafe(r.LastMX))
		}
	}
	return nil
}
