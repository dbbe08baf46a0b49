#!/usr/bin/env bash
# bench/run.sh — stsrelay and Postfix side by side, everything on loopback.
#
# Usage (as root, on Debian/Ubuntu, from any directory):
#
#   bench/run.sh               full mode  (est. 50-60 minutes on a slow 2-core VM,
#                              most of it Postfix; ran in 31 minutes here)
#   QUICK=1 bench/run.sh       quick mode (fewer messages; ~12 minutes on 2
#                              cores, most of it Postfix starting and stopping)
#   MODES=wan bench/run.sh     only the WAN case (issue #10): verified TLS
#                              through bench/cmd/latencyproxy at 10 and 50 ms
#                              RTT, to a sink with and one without CHUNKING;
#                              2 KiB, 20 sessions, 2,000 messages, 3 reps;
#                              ~13-20 minutes on 2 cores (see bench/README.md)
#                              (defaults SIZES=2048 CONCS=20 FSYNC=0
#                              RESTART_N=0 when MODES is just "wan")
#   MODES=scale bench/run.sh   only the queue-at-scale case (issue #12): a
#                              disk pinned by one deferred message, and
#                              100,000 / 1,000,000 messages queued for a dead
#                              destination (restart, RSS, queue summary/list);
#                              ~8-10 minutes; QUICK=1 (100,000 only, smaller
#                              pinned-disk run): ~5 minutes (see
#                              bench/README.md; FSYNC=0 RESTART_N=0 when
#                              MODES is just "scale")
#   MODES=fleet bench/run.sh   only fleet mode (issue #16): one relay on its
#                              disk queue ("local"), one relay on a 3-node
#                              NATS JetStream cluster ("fleet1"), three relays
#                              on it ("fleet3"); plain sink, 2 KiB; ~2
#                              minutes (QUICK=1: ~35 s); see bench/README.md
#                              (FSYNC=0 RESTART_N=0 when MODES is just
#                              "fleet")
#
# Environment (all optional):
#   QUICK=1            fewer messages per case, smaller restart test
#   REPS=3             repetitions of every case; the order of the systems
#                      alternates from one repetition to the next
#   SIZES="2048 102400"      message payload sizes (smtp-source -l)
#   CONCS="1 20 100"         concurrent submitting sessions
#   MODES="plain tls sts accept"
#                      plain : deliver to Postfix's smtp-sink, no TLS
#                      tls   : deliver to a STARTTLS sink whose certificate
#                              chains to a test CA; Postfix with
#                              smtp_tls_security_level=verify, once with
#                              defaults ("postfix") and once with
#                              smtp_tls_connection_reuse=yes + tlsproxy
#                              ("postfix-reuse"); stsrelay verifies against
#                              tls.extra_root_ca_file (the run checks its
#                              delivery log says tls_verified true)
#                      sts   : as tls, destination under an MTA-STS enforce
#                              policy (stsrelay only: the cost of the policy)
#                      accept: destination down; only the durable accept
#                              path is measured
#                      wan   : as tls, but through bench/cmd/latencyproxy
#                              (one-way delay per chunk, each direction) to
#                              benchworld's own STARTTLS sink, which does or
#                              does not advertise CHUNKING; not in the
#                              default MODES
#                      scale : the queue at scale (issue #12), run once
#                              after the other modes; not in the default
#                              MODES. Knobs below (SCALE_*)
#   WAN_DELAYS="5 25"  one-way delays in ms (RTT = 2x) of the wan mode
#   WAN_SINKS="chunking nochunking"   which WAN sinks
#   WAN_NMSG=2000      messages per wan run (QUICK: 500; NMSG overrides)
#   WAN_NOCHUNK_SYSTEMS="stsrelay"   systems run against the no-CHUNKING
#                      sink; Postfix's SMTP client never sends BDAT, so by
#                      default its no-CHUNKING ratios use its runs against
#                      the CHUNKING sink (same RTT and repetition); add
#                      "postfix postfix-reuse" to run it there too (+~9 min)
#   WAN_NOCHUNK_REPS=N repetitions for the no-CHUNKING sink (default REPS)
#   WAN_HANDSHAKE=1    the proxy also models the TCP handshake (dials the
#                      sink 1.5 RTT after accepting); 0: only chunk delays
#   STSRELAY_BIN=PATH  use this stsrelay binary instead of building ./cmd/stsrelay
#                      fleet : fleet mode (issue #16), run once after the
#                              other modes; not in the default MODES;
#                              knobs FLEET_*
#   FLEET_NMSG=6000    fleet mode: messages per case (QUICK: 600); fleet3
#                      splits them over its three relays
#   FLEET_CONC=12      fleet mode: submitting sessions per case, split
#                      over the relays (a multiple of 3)
#   FLEET_SIZE=2048    fleet mode: payload bytes
#   FLEET_REPS=N       fleet mode: repetitions (default REPS; QUICK: 2
#                      unless REPS is set)
#   FLEET_CASES="local fleet1 fleet3"   fleet mode: which cases
#   SCALE_PARTS="pin dead"   scale mode: which parts
#   SCALE_PIN_N=60000 SCALE_PIN_SIZE=4096   scale "pin": messages delivered
#                      after the one deferred (QUICK: 20000 x 10240; either
#                      way several 64 MiB log segments)
#   SCALE_DEAD_NS="100000 1000000"   scale "dead": stsrelay queue sizes,
#                      filled offline with `benchtool fillqueue` (QUICK:
#                      "100000")
#   SCALE_PF_DEAD_N=100000   scale "dead": messages queued in Postfix (over
#                      SMTP, 2-4 minutes); 0 skips Postfix there
#   SCALE_SYSTEMS="stsrelay postfix"   which systems the scale mode runs
#   RESTART_N=100000   messages queued (destination down) for the restart
#                      and memory-with-a-full-queue test; 0 skips it
#                      (QUICK default: 10000)
#   RESTART_SYSTEMS="stsrelay postfix"   which systems the restart test runs
#   FSYNC=1            count fdatasync/fsync calls per accepted message with
#                      `perf stat` tracepoints (separate, untimed runs); 0 skips
#   OUT=DIR            results directory (default: a new directory under /tmp)
#   NO_INSTALL=1       do not apt-get install postfix (it must be installed)
#   NMSG=N             messages per run, overriding the per-case defaults
#
# What it does: installs Postfix (apt-get, noninteractive) unless present;
# builds stsrelay and the helpers bench/cmd/benchworld (DNS zone, test CA,
# STARTTLS sink with a message counter, HTTPS MTA-STS policy host) and
# bench/cmd/benchtool (load driver, latency client, PSS sampler); then, per
# repetition and per case, starts a fresh stsrelay (fresh data_dir) or a fresh
# private Postfix instance (own config_directory and queue_directory under
# $OUT, started with `postfix -c DIR start`, stopped by its master PID),
# submits with smtp-source (or, at 1 session, the benchtool latency client),
# waits until the sink holds every message and stops it again. At the end it
# prints the table (medians, min-max, stsrelay/Postfix ratios from the same
# repetition) and writes it to $OUT/table.md; every raw figure is in
# $OUT/results.tsv.
#
# Addresses (all 127.0.0.0/8): 127.0.0.2 benchworld DNS :53535 and counter
# :8089; 127.0.0.3:2526 smtp-sink; 127.0.0.4:2526 STARTTLS sink;
# 127.0.0.5:8443 MTA-STS policy host; 127.0.0.6:2526 nothing (down);
# 127.0.0.10:2525 stsrelay submission; 127.0.0.11:2525 Postfix smtpd;
# wan mode: 127.0.0.4:2527 / :2528 benchworld's WAN sinks with / without
# CHUNKING, behind latencyproxy on 127.0.0.7:2526 / 127.0.0.8:2526
# (mx.wan.bench.test / mx.wannc.bench.test).
# fleet mode: relays on 127.0.0.10, 127.0.0.12, 127.0.0.13 (:2525
# submission, :9464 metrics); bench/cmd/natscluster's NATS servers on
# 127.0.0.21-23 (:4222 clients, :6222 routes).
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$BENCH_DIR/.." && pwd)

QUICK=${QUICK:-0}
REPS_SET=${REPS:-}
REPS=${REPS:-3}
MODES=${MODES:-"plain tls sts accept"}
if [ "$MODES" = scale ]; then
	# The queue-at-scale case alone (issue #12): nothing else.
	FSYNC=${FSYNC:-0}
	RESTART_N=${RESTART_N:-0}
fi
if [ "$MODES" = fleet ]; then
	# Fleet mode alone (issue #16): nothing else.
	FSYNC=${FSYNC:-0}
	RESTART_N=${RESTART_N:-0}
fi
if [ "$MODES" = wan ]; then
	# The WAN case alone: issue #10's configuration, nothing else.
	SIZES=${SIZES:-2048}
	CONCS=${CONCS:-20}
	FSYNC=${FSYNC:-0}
	RESTART_N=${RESTART_N:-0}
fi
SIZES=${SIZES:-"2048 102400"}
CONCS=${CONCS:-"1 20 100"}
FSYNC=${FSYNC:-1}
WAN_DELAYS=${WAN_DELAYS:-"5 25"}
WAN_SINKS=${WAN_SINKS:-"chunking nochunking"}
WAN_NOCHUNK_REPS=${WAN_NOCHUNK_REPS:-$REPS}
WAN_NOCHUNK_SYSTEMS=${WAN_NOCHUNK_SYSTEMS:-stsrelay}
WAN_HANDSHAKE=${WAN_HANDSHAKE:-1}
if [ "$QUICK" = 1 ]; then WAN_NMSG=${WAN_NMSG:-500}; else WAN_NMSG=${WAN_NMSG:-2000}; fi
if [ "$QUICK" = 1 ]; then RESTART_N=${RESTART_N:-10000}; else RESTART_N=${RESTART_N:-100000}; fi

# Messages per run, by payload size and sessions.
msgs() { # size conc [mode]
	local size=$1 conc=$2
	if [ -n "${NMSG:-}" ]; then echo "$NMSG"; return; fi
	if [ "${3:-}" = wan ]; then echo "$WAN_NMSG"; return; fi
	if [ "$QUICK" = 1 ]; then
		if [ "$conc" = 1 ]; then echo 60; elif [ "$size" -le 4096 ]; then echo 400; else echo 200; fi
	else
		if [ "$conc" = 1 ]; then echo 500; elif [ "$size" -le 4096 ]; then echo 4000; else echo 1500; fi
	fi
}

SUB_STS=127.0.0.10:2525
SUB_PF=127.0.0.11:2525
DNS_ADDR=127.0.0.2:53535
COUNT_URL=http://127.0.0.2:8089/count
SINK_PLAIN_IP=127.0.0.3
SINK_TLS_IP=127.0.0.4
HTTPS_IP=127.0.0.5
DOWN_IP=127.0.0.6
WAN_SINK_C=127.0.0.4:2527  # benchworld WAN sink, CHUNKING
WAN_SINK_N=127.0.0.4:2528  # benchworld WAN sink, no CHUNKING
WAN_IP_C=127.0.0.7         # latencyproxy in front of WAN_SINK_C (mx.wan.bench.test)
WAN_IP_N=127.0.0.8         # latencyproxy in front of WAN_SINK_N (mx.wannc.bench.test)
MX_PORT=2526
HTTPS_PORT=8443
FROM=bench@client.bench.test

log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (Postfix's master and smtp-sink need it)"

# ---------------------------------------------------------------- install
if [ "${NO_INSTALL:-0}" != 1 ] && ! command -v smtp-source >/dev/null 2>&1; then
	log "installing postfix with apt-get"
	export DEBIAN_FRONTEND=noninteractive
	echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections || true
	apt-get update -qq
	apt-get install -y -qq postfix >/dev/null
	# The package may have started the system instance: this benchmark
	# does not use it and leaves nothing of its own running.
	if [ -f /var/spool/postfix/pid/master.pid ] && kill -0 "$(cat /var/spool/postfix/pid/master.pid)" 2>/dev/null; then
		log "stopping the system Postfix instance the package started"
		postfix stop >/dev/null 2>&1 || true
	fi
fi
command -v smtp-source >/dev/null || die "smtp-source not found (install postfix)"
command -v postfix >/dev/null || die "postfix not found"
PERF=$(command -v perf || true)
[ -n "$PERF" ] || { [ "$FSYNC" = 1 ] && log "perf not found: skipping the fsync count"; FSYNC=0; }

# ---------------------------------------------------------------- work dir
OUT=${OUT:-$(mktemp -d /tmp/stsrelay-bench.XXXXXX)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
chmod 755 "$OUT" # Postfix's unprivileged daemons must reach their queue below it
log "results in $OUT"
RESULTS=$OUT/results.tsv
printf 'rep\tsys\tmode\tsize\tconc\tn\taccept_s\tdeliver_s\tdrain_s\tpeak_pss_kb\tpeak_rss_kb\tmax_procs\tlat_p50_ms\tlat_p99_ms\tlat_min_ms\tlat_max_ms\tcheck\tdelay_ms\tsink\tconns\tflights_c2s\tflights_s2c\tbytes_c2s\tbytes_s2c\n' >"$RESULTS"

PIDS_TO_STOP=() # everything this script started and that may still run
cleanup() {
	local p
	for p in "${PIDS_TO_STOP[@]}"; do
		[ -n "$p" ] && kill -TERM "$p" 2>/dev/null || true
	done
	sleep 0.5
	for p in "${PIDS_TO_STOP[@]}"; do
		[ -n "$p" ] && kill -KILL "$p" 2>/dev/null || true
	done
}
trap cleanup EXIT
trap 'exit 130' INT TERM
track() { PIDS_TO_STOP+=("$1"); }
untrack() { local p keep=(); for p in "${PIDS_TO_STOP[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done; PIDS_TO_STOP=("${keep[@]}"); }

# wait_gone PID [seconds]: wait for a process that is not our child
wait_gone() {
	local pid=$1 i
	for ((i = 0; i < ${2:-30} * 20; i++)); do
		kill -0 "$pid" 2>/dev/null || return 0
		sleep 0.05
	done
	log "pid $pid did not stop; killing it"
	kill -KILL "$pid" 2>/dev/null || true
}

# ---------------------------------------------------------------- build
log "building stsrelay and the bench helpers"
mkdir -p "$OUT/bin"
if [ -n "${STSRELAY_BIN:-}" ]; then
	cp "$STSRELAY_BIN" "$OUT/bin/stsrelay"
else
	(cd "$REPO" && go build -o "$OUT/bin/stsrelay" ./cmd/stsrelay)
fi
(cd "$REPO" && go build -o "$OUT/bin/benchworld" ./bench/cmd/benchworld &&
	go build -o "$OUT/bin/benchtool" ./bench/cmd/benchtool &&
	go build -o "$OUT/bin/latencyproxy" ./bench/cmd/latencyproxy &&
	go build -o "$OUT/bin/natscluster" ./bench/cmd/natscluster)
STSRELAY=$OUT/bin/stsrelay
BT=$OUT/bin/benchtool

# ---------------------------------------------------------------- world
mkdir -p "$OUT/world"
"$OUT/bin/benchworld" -dir "$OUT/world" -dns "$DNS_ADDR" -http "127.0.0.2:8089" -plain-ip $SINK_PLAIN_IP -tls-ip $SINK_TLS_IP -down-ip $DOWN_IP \
	-https-ip $HTTPS_IP -smtp-port $MX_PORT -https-port $HTTPS_PORT \
	-wan-ip $WAN_IP_C -wannc-ip $WAN_IP_N -wan-sink $WAN_SINK_C -wan-sink-nochunking $WAN_SINK_N >"$OUT/world/log" 2>&1 &
WORLD_PID=$!
track $WORLD_PID
for _ in $(seq 100); do [ -f "$OUT/world/ready" ] && break; sleep 0.05; done
[ -f "$OUT/world/ready" ] || die "benchworld did not start: $(cat "$OUT/world/log")"
CA=$OUT/world/ca.pem

# ---------------------------------------------------------------- smtp-sink
SINK_PID=
sink_start() { # counter file
	"$(command -v smtp-sink)" -u postfix -c $SINK_PLAIN_IP:$MX_PORT 1024 >"$1" 2>&1 &
	SINK_PID=$!
	track $SINK_PID
	local i
	for i in $(seq 100); do
		(exec 3<>/dev/tcp/$SINK_PLAIN_IP/$MX_PORT) 2>/dev/null && return 0
		sleep 0.05
	done
	die "smtp-sink did not start"
}
sink_stop() {
	[ -n "$SINK_PID" ] || return 0
	kill -TERM "$SINK_PID" 2>/dev/null || true
	wait "$SINK_PID" 2>/dev/null || true
	untrack "$SINK_PID"
	SINK_PID=
}

# ---------------------------------------------------------------- latency proxy
PROXY_PID=
PROXY_STATS=
proxy_start() { # sink(chunking|nochunking) delay_ms stats-file
	local listen target
	case $1 in
	chunking) listen=$WAN_IP_C:$MX_PORT target=$WAN_SINK_C ;;
	nochunking) listen=$WAN_IP_N:$MX_PORT target=$WAN_SINK_N ;;
	*) die "unknown WAN sink $1" ;;
	esac
	PROXY_STATS=$3
	rm -f "$3" "$3.ready"
	local hs=true
	[ "$WAN_HANDSHAKE" = 1 ] || hs=false
	"$OUT/bin/latencyproxy" -listen "$listen" -target "$target" -delay "${2}ms" -handshake=$hs \
		-stats "$3" -ready "$3.ready" >/dev/null 2>"$3.err" &
	PROXY_PID=$!
	track $PROXY_PID
	local i
	for i in $(seq 100); do [ -f "$3.ready" ] && return 0; sleep 0.05; done
	die "latencyproxy did not start: $(cat "$3.err")"
}
proxy_stop() {
	[ -n "$PROXY_PID" ] || return 0
	kill -TERM "$PROXY_PID" 2>/dev/null || true
	wait "$PROXY_PID" 2>/dev/null || true
	untrack "$PROXY_PID"
	PROXY_PID=
}
# proxy_stat KEY: one number from the last proxy's stats file
proxy_stat() {
	local v
	v=$(sed -n "s/^ *\"$1\": \([0-9.]*\),\{0,1\}\$/\1/p" "$PROXY_STATS" 2>/dev/null)
	echo "${v:--}"
}

# ---------------------------------------------------------------- stsrelay
STS_PID=
sts_config() { # dir
	cat >"$1/stsrelay.toml" <<EOF
hostname = "stsrelay.bench.test"
data_dir = "$1/data"

[submission]
listen = ["$SUB_STS"]
trusted_networks = ["127.0.0.0/8"]
require_tls_for_auth = false
# All load comes from one loopback address (Postfix has no such cap by
# default); the per-address cap (default 20) would refuse the
# 100-session cases.
max_connections_per_ip = 1000

[dns]
servers = ["$DNS_ADDR"]
timeout = "5s"

[delivery]
port = $MX_PORT

[tls]
extra_root_ca_file = "$CA"

[mtasts]
https_port = $HTTPS_PORT

[log]
output = "$1/stsrelay.log"

[metrics]
listen = "127.0.0.10:9464"
EOF
}
sts_start() { # dir [keep-data]
	local d=$1
	if [ "${2:-}" != keep ]; then rm -rf "$d"; mkdir -p "$d/data"; sts_config "$d"; fi
	local t0
	t0=$(date +%s%N)
	"$STSRELAY" serve -config "$d/stsrelay.toml" >>"$d/stderr" 2>&1 &
	STS_PID=$!
	track $STS_PID
	READY=$("$BT" waitbanner -addr $SUB_STS -since "$t0" -timeout 5m) || die "stsrelay did not start: $(tail -5 "$d/stderr")"
	READY=${READY#ready_s=}
	MAIN_PID=$STS_PID
}
sts_stop() {
	[ -n "$STS_PID" ] || return 0
	kill -TERM "$STS_PID" 2>/dev/null || true
	wait "$STS_PID" 2>/dev/null || true
	untrack "$STS_PID"
	STS_PID=
}

# ---------------------------------------------------------------- Postfix
PF_MASTER=
pf_config() { # dir mode reuse(0|1)   (wan: the sink is $WAN_SINK)
	local d=$1 mode=$2 reuse=$3 nexthop mxname=mx.tls.bench.test
	case $mode in
	plain) nexthop="[$SINK_PLAIN_IP]:$MX_PORT" ;;
	tls) nexthop="[$SINK_TLS_IP]:$MX_PORT" ;;
	accept) nexthop="[$DOWN_IP]:$MX_PORT" ;;
	wan)
		case $WAN_SINK in
		chunking) nexthop="[$WAN_IP_C]:$MX_PORT" mxname=mx.wan.bench.test ;;
		nochunking) nexthop="[$WAN_IP_N]:$MX_PORT" mxname=mx.wannc.bench.test ;;
		esac
		;;
	*) die "postfix has no mode $mode" ;;
	esac
	mkdir -p "$d/etc" "$d/queue" "$d/data"
	chown postfix "$d/data"
	cat >"$d/etc/main.cf" <<EOF
# Private instance for bench/run.sh.
compatibility_level = 3.6
queue_directory = $d/queue
data_directory = $d/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = \$myhostname
mydestination =
relay_domains =
mynetworks = 127.0.0.0/8
# Postfix refuses addresses that are not on an interface (127.0.0.11 is
# routed via lo but not configured on it): the smtpd listener in master.cf
# names its own address, the rest of Postfix uses 127.0.0.1.
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
default_transport = smtp:$nexthop
relay_transport = smtp:$nexthop
smtp_host_lookup = native
smtp_dns_support_level = disabled
alias_maps =
alias_database =
local_recipient_maps =
biff = no
append_dot_mydomain = no
maillog_file = $d/postfix.log
maillog_file_prefixes = $d
EOF
	if [ "$mode" = tls ] || [ "$mode" = wan ]; then
		# Debian's packaged main.cf turns the TLS session cache on; so do we.
		cat >>"$d/etc/main.cf" <<EOF
smtp_tls_security_level = verify
smtp_tls_CAfile = $CA
smtp_tls_policy_maps = texthash:$d/etc/tls_policy
smtp_tls_session_cache_database = btree:\${data_directory}/smtp_scache
smtp_tls_loglevel = 1
EOF
		# The nexthop is an IP literal: name the certificate to match.
		echo "$nexthop verify match=$mxname" >"$d/etc/tls_policy"
		if [ "$reuse" = 1 ]; then
			echo "smtp_tls_connection_reuse = yes" >>"$d/etc/main.cf"
		fi
	fi
	# Debian's master.cf services, none chrooted; smtpd on our address.
	cat >"$d/etc/master.cf" <<EOF
$SUB_PF inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
tlsproxy  unix  -       -       n       -       0       tlsproxy
EOF
}
pf_start() { # dir mode reuse [keep]
	local d=$1
	if [ "${4:-}" != keep ]; then rm -rf "$d"; pf_config "$d" "$2" "$3"; fi
	local t0
	t0=$(date +%s%N)
	if ! postfix -c "$d/etc" start >>"$d/start.log" 2>&1; then
		# Without syslog its complaint is only visible on a terminal.
		command -v script >/dev/null && script -qc "postfix -c $d/etc check" /dev/null >&2 || true
		die "postfix start failed: $(tail -5 "$d/start.log")"
	fi
	READY=$("$BT" waitbanner -addr $SUB_PF -since "$t0" -timeout 5m) || die "postfix did not answer"
	READY=${READY#ready_s=}
	PF_MASTER=$(tr -dc 0-9 <"$d/queue/pid/master.pid")
	track "$PF_MASTER"
	MAIN_PID=$PF_MASTER
}
pf_stop() {
	[ -n "$PF_MASTER" ] || return 0
	kill -TERM "$PF_MASTER" 2>/dev/null || true
	wait_gone "$PF_MASTER" 30
	untrack "$PF_MASTER"
	PF_MASTER=
}

# ---------------------------------------------------------------- one run
rcpt_for() { # mode [wan sink]
	case $1/${2:-} in
	accept/*) echo rcpt@down.bench.test ;;
	wan/nochunking) echo rcpt@wannc.bench.test ;;
	*) echo "rcpt@$1.bench.test" ;;
	esac
}

# run_case REP SYS MODE SIZE CONC [DELAY_MS SINK]: SYS is stsrelay, postfix
# or postfix-reuse; DELAY_MS and SINK only for the wan mode
run_case() {
	local rep=$1 sys=$2 mode=$3 size=$4 conc=$5 delay=${6:--} sink=${7:--} n d addr rcpt counter expect out check=-
	local pstats=(- - - - - -)
	n=$(msgs "$size" "$conc" "$mode")
	rcpt=$(rcpt_for "$mode" "$sink")
	d=$OUT/run/$sys
	mkdir -p "$OUT/run"
	WAN_SINK=$sink
	case $mode in
	plain) sink_start "$d.sinkc"; counter=(-count-sinkc "$d.sinkc"); expect=$n ;;
	tls | sts) counter=(-count-http "$COUNT_URL"); expect=$n ;;
	wan) proxy_start "$sink" "$delay" "$d.proxy.json"; counter=(-count-http "$COUNT_URL"); expect=$n ;;
	accept) counter=(); expect=0 ;;
	esac
	case $sys in
	stsrelay) sts_start "$d"; addr=$SUB_STS ;;
	postfix) pf_start "$d" "$mode" 0; addr=$SUB_PF ;;
	postfix-reuse) pf_start "$d" "$mode" 1; addr=$SUB_PF ;;
	esac
	local load
	if [ "$conc" = 1 ]; then
		load=(-lat -addr "$addr" -n "$n" -size "$size" -from $FROM -to "$rcpt")
	else
		load=(-- "$(command -v smtp-source)" -s "$conc" -m "$n" -l "$size" -f $FROM -t "$rcpt" -M client.bench.test "$addr")
	fi
	if ! out=$("$BT" load "${counter[@]}" -expect "$expect" -pids "$MAIN_PID" -timeout 10m "${load[@]}" 2>"$d.load.err"); then
		log "run failed: rep=$rep $sys $mode size=$size conc=$conc: $(tail -3 "$d.load.err")"
		out="failed=1"
	fi
	# Check what was delivered, and how.
	case $sys/$mode in
	stsrelay/tls | stsrelay/sts | stsrelay/wan)
		sleep 0.2
		check="verified=$(grep '"msg":"delivery"' "$d/stsrelay.log" | grep '"result":"delivered"' | grep -c '"tls_verified":true' || true)"
		[ "$mode" = sts ] && check="$check,enforce=$(grep '"msg":"delivery"' "$d/stsrelay.log" | grep -c '"sts_mode":"enforce"' || true)"
		;;
	postfix*/tls | postfix*/wan)
		sleep 0.2
		check="sent=$(grep -c 'status=sent' "$d/postfix.log" || true),verified_handshakes=$(grep -c 'Verified TLS connection established' "$d/postfix.log" || true)"
		;;
	esac
	case $sys in
	stsrelay) sts_stop ;;
	postfix*) pf_stop ;;
	esac
	sink_stop
	if [ "$mode" = wan ]; then
		proxy_stop
		pstats=("$(proxy_stat connections)" "$(proxy_stat flights_client_to_server)" "$(proxy_stat flights_server_to_client)"
			"$(proxy_stat bytes_client_to_server)" "$(proxy_stat bytes_server_to_client)")
	fi
	get() { local v; v=$(tr ' ' '\n' <<<"$out" | sed -n "s/^$1=//p"); echo "${v:--}"; }
	printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rep" "$sys" "$mode" "$size" "$conc" "$n" \
		"$(get accept_s)" "$(get deliver_s)" "$(get drain_s)" "$(get peak_pss_kb)" "$(get peak_rss_kb)" "$(get max_procs)" \
		"$(get lat_p50_ms)" "$(get lat_p99_ms)" "$(get lat_min_ms)" "$(get lat_max_ms)" "$check" \
		"$delay" "$sink" "${pstats[0]}" "${pstats[1]}" "${pstats[2]}" "${pstats[3]}" "${pstats[4]}" >>"$RESULTS"
	local wan=
	[ "$mode" = wan ] && wan=" rtt=$((delay * 2))ms sink=$sink conns=${pstats[0]} flights_c2s=${pstats[1]}"
	log "rep=$rep $sys $mode size=$size conc=$conc n=$n$wan: $out $check"
}

# ---------------------------------------------------------------- main loop
T_START=$(date +%s)
for rep in $(seq "$REPS"); do
	for size in $SIZES; do
		for conc in $CONCS; do
			for mode in $MODES; do
				case $mode in
				plain | accept) systems="stsrelay postfix" ;;
				tls | wan) systems="stsrelay postfix postfix-reuse" ;;
				sts) systems="stsrelay" ;;
				scale | fleet) continue ;; # run on their own, below
				*) die "unknown mode $mode" ;;
				esac
				# Alternate the order from one repetition to the next.
				if [ $((rep % 2)) = 0 ]; then systems=$(tr ' ' '\n' <<<"$systems" | tac | tr '\n' ' '); fi
				if [ "$mode" != wan ]; then
					for sys in $systems; do
						run_case "$rep" "$sys" "$mode" "$size" "$conc"
					done
					continue
				fi
				for delay in $WAN_DELAYS; do
					for sink in $WAN_SINKS; do
						[ "$sink" = nochunking ] && [ "$rep" -gt "$WAN_NOCHUNK_REPS" ] && continue
						for sys in $systems; do
							[ "$sink" = nochunking ] && [[ " $WAN_NOCHUNK_SYSTEMS " != *" $sys "* ]] && continue
							run_case "$rep" "$sys" wan "$size" "$conc" "$delay" "$sink"
						done
					done
				done
			done
		done
	done
done

# ---------------------------------------------------------------- fsync count
FSYNC_TSV=$OUT/fsync.tsv
printf 'sys\tmode\tsize\tconc\tn\tfdatasync\tfsync\tmsgs_per_sync\n' >"$FSYNC_TSV"
if [ "$FSYNC" = 1 ]; then
	log "counting syncs (perf stat tracepoints, separate untimed runs)"
	for conc in $CONCS; do
		for sys in stsrelay postfix; do
			n=$(msgs 2048 "$conc")
			d=$OUT/run/fsync-$sys
			case $sys in
			stsrelay) sts_start "$d"; addr=$SUB_STS ;;
			postfix) pf_start "$d" accept 0; addr=$SUB_PF ;;
			esac
			# --inherit (the default) follows processes forked after the
			# attach: Postfix's cleanup/smtpd children.
			"$PERF" stat -x, -e syscalls:sys_enter_fdatasync,syscalls:sys_enter_fsync -p "$(pgrep -d, -P "$MAIN_PID" | sed 's/$/,/')${MAIN_PID}" -o "$d.perf" &
			perf_pid=$!
			track $perf_pid
			sleep 0.5
			if [ "$conc" = 1 ]; then
				"$BT" load -lat -addr "$addr" -n "$n" -size 2048 -from $FROM -to rcpt@down.bench.test >/dev/null
			else
				smtp-source -s "$conc" -m "$n" -l 2048 -f $FROM -t rcpt@down.bench.test -M client.bench.test "$addr"
			fi
			kill -INT $perf_pid; wait $perf_pid 2>/dev/null || true
			untrack $perf_pid
			case $sys in stsrelay) sts_stop ;; postfix) pf_stop ;; esac
			fds=$(awk -F, '/fdatasync/ {print $1}' "$d.perf"); fs=$(awk -F, '/sys_enter_fsync/ {print $1}' "$d.perf")
			per=$(awk -v n="$n" -v a="${fds:-0}" -v b="${fs:-0}" 'BEGIN { s = a + b; if (s > 0) printf "%.2f", n / s; else print "-" }')
			printf '%s\taccept\t2048\t%s\t%s\t%s\t%s\t%s\n' "$sys" "$conc" "$n" "${fds:-0}" "${fs:-0}" "$per" >>"$FSYNC_TSV"
			log "fsync $sys conc=$conc n=$n fdatasync=${fds:-0} fsync=${fs:-0} msgs/sync=$per"
		done
	done
fi

# ---------------------------------------------------------------- restart test
RESTART_TSV=$OUT/restart.tsv
printf 'sys\tqueued\tfill_s\tstop_s\trestart_s\tpss_kb\trss_kb\tprocs\tpss_kb_after_5s\trss_kb_after_5s\n' >"$RESTART_TSV"
if [ "$RESTART_N" -gt 0 ]; then
	for sys in ${RESTART_SYSTEMS:-stsrelay postfix}; do
		log "restart test: $sys with $RESTART_N messages queued (destination down)"
		d=$OUT/run/restart-$sys
		case $sys in
		stsrelay) sts_start "$d"; addr=$SUB_STS ;;
		postfix) pf_start "$d" accept 0; addr=$SUB_PF ;;
		esac
		t0=$(date +%s%N)
		# -d: many messages per connection, to keep the fill short.
		smtp-source -d -s 20 -m "$RESTART_N" -l 2048 -f $FROM -t rcpt@down.bench.test -M client.bench.test "$addr"
		fill=$(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
		sleep 5 # let the first (failing) delivery attempts settle
		t0=$(date +%s%N)
		case $sys in stsrelay) sts_stop ;; postfix) pf_stop ;; esac
		stop=$(awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
		case $sys in
		stsrelay) sts_start "$d" keep ;;
		postfix) pf_start "$d" accept 0 keep ;;
		esac
		m1=$("$BT" mem -pids "$MAIN_PID")
		sleep 5
		m2=$("$BT" mem -pids "$MAIN_PID")
		if [ $sys = stsrelay ]; then
			queued=$(grep '"msg":"queue opened"' "$d/stsrelay.log" | tail -1 | sed -n 's/.*"messages":\([0-9]*\).*/\1/p')
		else
			queued=$(find "$d/queue/deferred" "$d/queue/active" "$d/queue/incoming" -type f 2>/dev/null | wc -l)
		fi
		case $sys in stsrelay) sts_stop ;; postfix) pf_stop ;; esac
		g() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }
		printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$sys" "${queued:-?}" "$fill" "$stop" "$READY" \
			"$(g "$m1" pss_kb)" "$(g "$m1" rss_kb)" "$(g "$m1" procs)" "$(g "$m2" pss_kb)" "$(g "$m2" rss_kb)" >>"$RESTART_TSV"
		log "restart $sys: queued=${queued:-?} fill=${fill}s stop=${stop}s restart=${READY}s mem: $m1 / after 5s: $m2"
		rm -rf "$d/data" "$d/queue" # 100k files: do not keep them around
	done
fi

# ---------------------------------------------------------------- queue at scale (issue #12)
SCALE_TSV=$OUT/scale.tsv
printf 'test\tsys\tn\tsize\tkey\tvalue\n' >"$SCALE_TSV"
SCALE_PARTS=${SCALE_PARTS:-"pin dead"}
SCALE_SYSTEMS=${SCALE_SYSTEMS:-"stsrelay postfix"}
SCALE_PF_DEAD_N=${SCALE_PF_DEAD_N:-100000}
if [ "$QUICK" = 1 ]; then
	SCALE_PIN_N=${SCALE_PIN_N:-20000} SCALE_PIN_SIZE=${SCALE_PIN_SIZE:-10240} SCALE_DEAD_NS=${SCALE_DEAD_NS:-100000}
else
	SCALE_PIN_N=${SCALE_PIN_N:-60000} SCALE_PIN_SIZE=${SCALE_PIN_SIZE:-4096} SCALE_DEAD_NS=${SCALE_DEAD_NS:-"100000 1000000"}
fi
SCALE_METRICS_URL=http://127.0.0.10:9464/metrics
SCALE_QMETRICS=stsrelay_queue_disk_bytes,stsrelay_queue_live_bytes,stsrelay_queue_segments,stsrelay_queue_compactions_total,stsrelay_queue_messages

kv() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p" | head -1; } # kv "k=v k=v" KEY
now_ns() { date +%s%N; }
since_s() { awk -v a="$1" -v b="$(date +%s%N)" 'BEGIN { printf "%.3f", (b - a) / 1e9 }'; }
# scale_put TEST SYS N SIZE KEY VALUE ...: figures for the scale table
scale_put() {
	local t=$1 sys=$2 n=$3 size=$4
	shift 4
	while [ $# -ge 2 ]; do
		printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$sys" "$n" "$size" "$1" "${2:--}" >>"$SCALE_TSV"
		shift 2
	done
}
# scale_result SYS MODE SIZE CONC N ACCEPT DELIVER DRAIN PSS RSS PROCS CHECK: a results.tsv row
scale_result() {
	printf '1\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t-\t-\t-\t-\t%s\t-\t-\t-\t-\t-\t-\t-\n' "$@" >>"$RESULTS"
}
qfiles() { # Postfix queue dir: files waiting in incoming, active, maildrop
	find "$1/incoming" "$1/active" "$1/maildrop" -type f 2>/dev/null | wc -l || true
}
# sts_start_ready DIR: start stsrelay on an existing DIR; READY = exec →
# submission port accepts a connection AND the log has "started" (10 ms polls)
sts_start_ready() {
	local d=$1 t0 off out
	off=$(stat -c %s "$d/stsrelay.log" 2>/dev/null || echo 0)
	t0=$(now_ns)
	"$STSRELAY" serve -config "$d/stsrelay.toml" >>"$d/stderr" 2>&1 &
	STS_PID=$!
	track $STS_PID
	out=$("$BT" waitready -addr $SUB_STS -log "$d/stsrelay.log" -log-offset "$off" -since "$t0" -interval 10ms -timeout 10m) ||
		die "stsrelay did not start: $(tail -5 "$d/stderr")"
	READY=$(kv "$out" ready_s)
	MAIN_PID=$STS_PID
}
# sampler_start FILE CMD...: run CMD every second, appending to FILE, until sampler_stop
SAMPLER_PID=
sampler_start() {
	local f=$1
	shift
	(while :; do "$@" >>"$f" 2>/dev/null || true; sleep 1; done) &
	SAMPLER_PID=$!
	track $SAMPLER_PID
}
sampler_stop() {
	[ -n "$SAMPLER_PID" ] || return 0
	kill -TERM "$SAMPLER_PID" 2>/dev/null || true
	wait "$SAMPLER_PID" 2>/dev/null || true
	untrack "$SAMPLER_PID"
	SAMPLER_PID=
}
pf_du_line() { echo "du_bytes=$(du -sb "$1" 2>/dev/null | cut -f1)"; }

# Part 1: a disk pinned by one deferred message. One message to the dead
# destination, then N to the plain sink; once all N are delivered (sink
# count) and compaction has settled, how big is the queue on disk?
scale_pin() { # sys
	local sys=$1 n=$SCALE_PIN_N size=$SCALE_PIN_SIZE d addr out m t0 last prev i stable settle du peak
	d=$OUT/run/scale-pin-$sys
	mkdir -p "$OUT/run"
	log "scale pin: $sys, 1 message deferred, then $n x $size B delivered"
	rm -f "$d.disk" "$d.sinkc"
	sink_start "$d.sinkc"
	case $sys in
	stsrelay)
		sts_start "$d"
		addr=$SUB_STS
		sampler_start "$d.disk" "$BT" metrics -url $SCALE_METRICS_URL -names stsrelay_queue_disk_bytes
		;;
	postfix)
		rm -rf "$d"
		pf_config "$d" plain 0
		echo "down.bench.test smtp:[$DOWN_IP]:$MX_PORT" >"$d/etc/transport"
		echo "transport_maps = texthash:$d/etc/transport" >>"$d/etc/main.cf"
		pf_start "$d" plain 0 keep
		addr=$SUB_PF
		sampler_start "$d.disk" pf_du_line "$d/queue"
		;;
	esac
	"$BT" load -lat -addr "$addr" -n 1 -size "$size" -from $FROM -to rcpt@down.bench.test >/dev/null ||
		die "scale pin: could not submit the deferred message to $sys"
	if ! out=$("$BT" load -count-sinkc "$d.sinkc" -expect "$n" -pids "$MAIN_PID" -timeout 30m -- \
		"$(command -v smtp-source)" -s 20 -m "$n" -l "$size" -f $FROM -t rcpt@plain.bench.test -M client.bench.test "$addr" 2>"$d.load.err"); then
		log "scale pin: $sys run failed: $(tail -3 "$d.load.err")"
		out="failed=1"
	fi
	# Let compaction (stsrelay) / the queue manager (Postfix) settle: until
	# the queue's size has not changed for 5 s, at most 30 s.
	t0=$(now_ns)
	prev= stable=0 settle=0
	for ((i = 0; i < 30; i++)); do
		case $sys in
		stsrelay) m=$("$BT" metrics -url $SCALE_METRICS_URL -names "$SCALE_QMETRICS" || echo scrape-failed) ;;
		postfix) m="$(qfiles "$d/queue") $(du -sb "$d/queue" | cut -f1)" ;;
		esac
		if [ "$m" = "$prev" ]; then
			stable=$((stable + 1))
			[ $stable -ge 5 ] && break
		else
			stable=0 prev=$m settle=$(since_s "$t0")
		fi
		sleep 1
	done
	sampler_stop
	peak=$(sed -n 's/.*_bytes=\([0-9]*\).*/\1/p' "$d.disk" | sort -n | tail -1)
	case $sys in
	stsrelay)
		du=$(du -sb "$d/data/queue" | cut -f1)
		m=$("$BT" metrics -url $SCALE_METRICS_URL -names "$SCALE_QMETRICS" || true)
		ls -l "$d/data/queue/log" >"$d.segments" 2>&1 || true
		sts_stop
		scale_put pin stsrelay "$n" "$size" du_queue_bytes "$du" settle_s "$settle" peak_disk_bytes "$peak" \
			disk_bytes "$(kv "$m" stsrelay_queue_disk_bytes)" live_bytes "$(kv "$m" stsrelay_queue_live_bytes)" \
			segments "$(kv "$m" stsrelay_queue_segments)" compactions "$(kv "$m" stsrelay_queue_compactions_total)" \
			messages "$(kv "$m" stsrelay_queue_messages)"
		;;
	postfix)
		du=$(du -sb "$d/queue" | cut -f1)
		local deferred
		deferred=$(find "$d/queue/deferred" -type f | wc -l || true)
		m="queued=$deferred waiting=$(qfiles "$d/queue")"
		pf_stop
		scale_put pin postfix "$n" "$size" du_queue_bytes "$du" settle_s "$settle" peak_du_bytes "$peak" messages "$deferred"
		;;
	esac
	sink_stop
	local acc del
	acc=$(kv "$out" accept_s) del=$(kv "$out" deliver_s)
	scale_put pin "$sys" "$n" "$size" accept_s "${acc:--}" deliver_s "${del:--}" \
		accept_rate "$(awk -v n="$n" -v t="${acc:-0}" 'BEGIN { if (t > 0) printf "%.1f", n / t; else print "-" }')" \
		deliver_rate "$(awk -v n="$n" -v t="${del:-0}" 'BEGIN { if (t > 0) printf "%.1f", n / t; else print "-" }')"
	local check
	check=$(echo "du_queue_bytes=$du settle_s=$settle peak_disk_bytes=$peak $m" | tr ' ' ',')
	scale_result "$sys" scale-pin "$size" 20 "$n" "${acc:--}" "${del:--}" "$(kv "$out" drain_s)" \
		"$(kv "$out" peak_pss_kb)" "$(kv "$out" peak_rss_kb)" "$(kv "$out" max_procs)" "$check"
	log "scale pin $sys: $out du=$du settle=${settle}s peak=$peak $m"
}

# Part 2: N messages for a dead destination. stsrelay: filled offline,
# then restart time, RSS after 20 s, queue summary/list, and two more
# restarts (checkpoint from shutdown; no checkpoint).
scale_dead_stsrelay() { # n
	local n=$1 size=2048 d out fill du r1 p20 m20 sum_s list_s all_s hwm_sum hwm_list hwm_cli stop r2 p2 r3 p3 t0 queued
	d=$OUT/run/scale-dead-$n-stsrelay
	log "scale dead: stsrelay, filling $n messages offline"
	rm -rf "$d"
	mkdir -p "$d/data"
	sts_config "$d"
	out=$("$BT" fillqueue -dir "$d/data/queue" -n "$n" -size $size -domain down.bench.test 2>"$d.fill.err") ||
		die "fillqueue: $(tail -3 "$d.fill.err")"
	fill=$(kv "$out" fill_s)
	du=$(du -sb "$d/data/queue" | cut -f1)
	sts_start_ready "$d"
	r1=$READY
	log "scale dead stsrelay $n: fill=${fill}s du=$du restart=${r1}s; waiting 20 s"
	sleep 20
	p20=$("$BT" procstat -pids "$STS_PID")
	m20=$("$BT" metrics -url $SCALE_METRICS_URL -names "$SCALE_QMETRICS,go_memstats_heap_inuse_bytes,go_memstats_next_gc_bytes,go_memstats_heap_released_bytes,go_memstats_heap_idle_bytes" || true)
	queued=$(grep '"msg":"queue opened"' "$d/stsrelay.log" | head -1 | sed -n 's/.*"messages":\([0-9]*\).*/\1/p' || true)
	t0=$(now_ns)
	"$STSRELAY" queue summary -config "$d/stsrelay.toml" >"$d.summary" 2>&1 || log "queue summary failed: $(tail -2 "$d.summary")"
	sum_s=$(since_s "$t0")
	hwm_sum=$(kv "$("$BT" procstat -pids "$STS_PID")" vmhwm_kb)
	t0=$(now_ns)
	"$STSRELAY" queue list -config "$d/stsrelay.toml" >"$d.list" 2>"$d.list.err" || log "queue list failed: $(tail -2 "$d.list.err")"
	list_s=$(since_s "$t0")
	hwm_list=$(kv "$("$BT" procstat -pids "$STS_PID")" vmhwm_kb)
	t0=$(now_ns)
	"$STSRELAY" queue list -limit 0 -config "$d/stsrelay.toml" >/dev/null 2>"$d.listall.err" || log "queue list -limit 0 failed: $(tail -2 "$d.listall.err")"
	all_s=$(since_s "$t0")
	hwm_cli=$(kv "$("$BT" procstat -pids "$STS_PID")" vmhwm_kb)
	t0=$(now_ns)
	sts_stop
	stop=$(since_s "$t0")
	[ -f "$d/data/queue/index.ckpt" ] || log "scale dead: no index.ckpt after shutdown"
	sts_start_ready "$d"
	r2=$READY
	p2=$("$BT" procstat -pids "$STS_PID")
	sts_stop
	rm -f "$d/data/queue/index.ckpt"
	sts_start_ready "$d"
	r3=$READY
	p3=$("$BT" procstat -pids "$STS_PID")
	sts_stop
	scale_put dead stsrelay "$n" $size fill_s "$fill" queued "${queued:-?}" du_queue_bytes "$du" restart1_s "$r1" \
		vmrss20_kb "$(kv "$p20" vmrss_kb)" vmhwm20_kb "$(kv "$p20" vmhwm_kb)" pss20_kb "$(kv "$p20" pss_kb)" procs20 "$(kv "$p20" procs)" \
		rssanon20_kb "$(kv "$p20" rssanon_kb)" rssfile20_kb "$(kv "$p20" rssfile_kb)" \
		heap_inuse20_bytes "$(kv "$m20" go_memstats_heap_inuse_bytes)" next_gc20_bytes "$(kv "$m20" go_memstats_next_gc_bytes)" \
		heap_idle20_bytes "$(kv "$m20" go_memstats_heap_idle_bytes)" heap_released20_bytes "$(kv "$m20" go_memstats_heap_released_bytes)" \
		disk20_bytes "$(kv "$m20" stsrelay_queue_disk_bytes)" messages20 "$(kv "$m20" stsrelay_queue_messages)" \
		summary_s "$sum_s" list_s "$list_s" listall_s "$all_s" \
		vmhwm_summary_kb "$hwm_sum" vmhwm_list_kb "$hwm_list" vmhwm_cli_kb "$hwm_cli" stop_s "$stop" \
		restart2_s "$r2" vmrss_r2_kb "$(kv "$p2" vmrss_kb)" restart3_s "$r3" vmrss_r3_kb "$(kv "$p3" vmrss_kb)"
	local check
	check="fill_s=$fill,queued=${queued:-?},du_queue_bytes=$du,restart1_s=$r1,vmrss20_kb=$(kv "$p20" vmrss_kb),vmhwm20_kb=$(kv "$p20" vmhwm_kb),summary_s=$sum_s,list_s=$list_s,listall_s=$all_s,vmhwm_summary_kb=$hwm_sum,vmhwm_list_kb=$hwm_list,vmhwm_cli_kb=$hwm_cli,stop_s=$stop,restart2_s=$r2,restart3_s=$r3"
	scale_result stsrelay scale-dead $size - "$n" - - - - - - "$check"
	log "scale dead stsrelay $n: $check"
	rm -rf "$d/data" # up to 2+ GB
}

scale_dead_postfix() { # n
	local n=$1 size=2048 d t0 fill quiet pq du queued qs_s pq_s stop r pr p20 qmgr i list
	d=$OUT/run/scale-dead-$n-postfix
	log "scale dead: Postfix, queueing $n messages over SMTP (default_transport = smtp:[$DOWN_IP]:$MX_PORT)"
	pf_start "$d" accept 0
	t0=$(now_ns)
	smtp-source -d -s 20 -m "$n" -l $size -f $FROM -t rcpt@down.bench.test -M client.bench.test $SUB_PF
	fill=$(since_s "$t0")
	# Quiet: nothing left in incoming, active or maildrop (at most 120 s).
	t0=$(now_ns)
	for ((i = 0; i < 240; i++)); do
		[ "$(qfiles "$d/queue")" = 0 ] && break
		sleep 0.5
	done
	quiet=$(since_s "$t0")
	pq=$("$BT" procstat -list -pids "$PF_MASTER")
	list=$(kv "$pq" list)
	qmgr=$(tr ',' '\n' <<<"$list" | awk -F: '$1 == "qmgr" { s += $3 } END { print s + 0 }')
	du=$(du -sb "$d/queue" | cut -f1)
	queued=$(find "$d/queue/deferred" "$d/queue/active" "$d/queue/incoming" -type f | wc -l || true)
	log "scale dead postfix $n: fill=${fill}s quiet after ${quiet}s: $pq"
	t0=$(now_ns)
	qshape -c "$d/etc" deferred >"$d.qshape" 2>&1 || log "qshape failed: $(tail -2 "$d.qshape")"
	qs_s=$(since_s "$t0")
	t0=$(now_ns)
	postqueue -c "$d/etc" -p >/dev/null 2>"$d.postqueue.err" || log "postqueue -p failed: $(tail -2 "$d.postqueue.err")"
	pq_s=$(since_s "$t0")
	t0=$(now_ns)
	pf_stop
	stop=$(since_s "$t0")
	pf_start "$d" accept 0 keep
	r=$READY
	pr=$("$BT" procstat -pids "$PF_MASTER")
	sleep 20
	p20=$("$BT" procstat -pids "$PF_MASTER")
	pf_stop
	local names
	names=$(tr ',' '\n' <<<"$list" | awk -F: '{ c[$1]++; s[$1] += $3 } END { for (k in c) printf "%s×%d %.1f MB; ", k, c[k], s[k] / 1024 }' | sed 's/; $//')
	scale_put dead postfix "$n" $size fill_s "$fill" queued "$queued" du_queue_bytes "$du" quiet_wait_s "$quiet" \
		vmrss_quiet_kb "$(kv "$pq" vmrss_kb)" vmhwm_quiet_kb "$(kv "$pq" vmhwm_kb)" pss_quiet_kb "$(kv "$pq" pss_kb)" procs_quiet "$(kv "$pq" procs)" qmgr_rss_quiet_kb "$qmgr" \
		procs_quiet_list "$names" qshape_s "$qs_s" postqueue_s "$pq_s" stop_s "$stop" restart_s "$r" vmrss_r_kb "$(kv "$pr" vmrss_kb)" \
		vmrss20_kb "$(kv "$p20" vmrss_kb)" vmhwm20_kb "$(kv "$p20" vmhwm_kb)" pss20_kb "$(kv "$p20" pss_kb)" procs20 "$(kv "$p20" procs)"
	local check
	check="fill_s=$fill,queued=$queued,du_queue_bytes=$du,vmrss_quiet_kb=$(kv "$pq" vmrss_kb),qmgr_rss_quiet_kb=$qmgr,procs_quiet=$(kv "$pq" procs),qshape_s=$qs_s,postqueue_s=$pq_s,stop_s=$stop,restart_s=$r,vmrss20_kb=$(kv "$p20" vmrss_kb)"
	scale_result postfix scale-dead $size - "$n" - - - - - - "$check"
	log "scale dead postfix $n: $check"
	rm -rf "$d/queue"
}

if [[ " $MODES " == *" scale "* ]]; then
	for part in $SCALE_PARTS; do
		case $part in
		pin)
			for sys in $SCALE_SYSTEMS; do scale_pin "$sys"; done
			;;
		dead)
			if [[ " $SCALE_SYSTEMS " == *" stsrelay "* ]]; then
				for n in $SCALE_DEAD_NS; do scale_dead_stsrelay "$n"; done
			fi
			if [[ " $SCALE_SYSTEMS " == *" postfix "* ]] && [ "$SCALE_PF_DEAD_N" -gt 0 ]; then
				scale_dead_postfix "$SCALE_PF_DEAD_N"
			fi
			;;
		*) die "unknown SCALE_PARTS entry $part" ;;
		esac
	done
fi

# ---------------------------------------------------------------- fleet mode (issue #16)
# local: one relay on its disk queue; fleet1: one relay with [cluster] on a
# fresh 3-node JetStream cluster (bench/cmd/natscluster, one process);
# fleet3: three relays on it, the load split over them. Same messages and
# sessions in every case; plain sink; `benchtool load -lat -c` per relay,
# `benchtool waitcount` for the delivery side and the memory samples.
if [ "$QUICK" = 1 ]; then FLEET_NMSG=${FLEET_NMSG:-600}; else FLEET_NMSG=${FLEET_NMSG:-6000}; fi
FLEET_CONC=${FLEET_CONC:-12}
FLEET_SIZE=${FLEET_SIZE:-2048}
if [ "$QUICK" = 1 ] && [ -z "$REPS_SET" ]; then FLEET_REPS=${FLEET_REPS:-2}; else FLEET_REPS=${FLEET_REPS:-$REPS}; fi
FLEET_CASES=${FLEET_CASES:-"local fleet1 fleet3"}
FLEET_IPS=(127.0.0.10 127.0.0.12 127.0.0.13) # relay i: submission IP:2525, metrics IP:9464
NATS_PID=
NATS_URLS=
FLEET_PIDS=()
kvget() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p" | head -1; } # kvget "k=v k=v" KEY
nats_start() { # dir
	local d=$1 i
	rm -rf "$d"
	mkdir -p "$d"
	"$OUT/bin/natscluster" -n 3 -dir "$d" -ip 127.0.0.21 -ready "$d/urls" >"$d/stdout" 2>"$d/stderr" &
	NATS_PID=$!
	track $NATS_PID
	for ((i = 0; i < 1200; i++)); do
		if [ -s "$d/urls" ]; then NATS_URLS=$(cat "$d/urls"); return 0; fi
		kill -0 $NATS_PID 2>/dev/null || break
		sleep 0.05
	done
	die "natscluster did not start: $(tail -5 "$d/stderr")"
}
nats_stop() {
	[ -n "$NATS_PID" ] || return 0
	kill -TERM "$NATS_PID" 2>/dev/null || true
	wait "$NATS_PID" 2>/dev/null || true
	untrack "$NATS_PID"
	NATS_PID=
}
fleet_relay_start() { # dir index(0..2) [nats urls]
	local d=$1 i=$2 ip=${FLEET_IPS[$2]} t0 out
	rm -rf "$d"
	mkdir -p "$d/data"
	sts_config "$d"
	sed -i "s/127\.0\.0\.10:/$ip:/g" "$d/stsrelay.toml"
	if [ -n "${3:-}" ]; then
		cat >>"$d/stsrelay.toml" <<EOF

[cluster]
nats_urls = [$(sed 's/[^,]*/"&"/g; s/,/, /g' <<<"$3")]
node_name = "relay$((i + 1))"
replicas = 3
stream_prefix = "bench"
EOF
	fi
	t0=$(date +%s%N)
	"$STSRELAY" serve -config "$d/stsrelay.toml" >>"$d/stderr" 2>&1 &
	FLEET_PIDS+=($!)
	track $!
	out=$("$BT" waitbanner -addr "$ip:2525" -since "$t0" -timeout 2m) || die "stsrelay ($d) did not start: $(tail -5 "$d/stderr")"
	log "fleet: relay$((i + 1)) on $ip:2525 $out"
}
fleet_relays_stop() {
	local p
	for p in "${FLEET_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
	for p in "${FLEET_PIDS[@]}"; do
		wait "$p" 2>/dev/null || true
		untrack "$p"
	done
	FLEET_PIDS=()
}
# fleet_loads K KEY: KEY from each of the K loads' output, one a line
fleet_loads() {
	local i
	for ((i = 0; i < $1; i++)); do kvget "$(cat "$FLEET_D.load$i.out" 2>/dev/null)" "$2"; done
}

# fleet_case REP CASE: CASE is local, fleet1 or fleet3
fleet_case() {
	local rep=$1 sys=$2 n=$FLEET_NMSG conc=$FLEET_CONC size=$FLEET_SIZE d k i urls= wait_pid
	d=$OUT/run/fleet-$sys
	FLEET_D=$d
	rm -rf "$d" "$d".*
	mkdir -p "$d"
	case $sys in local | fleet1) k=1 ;; fleet3) k=3 ;; *) die "unknown fleet case $sys" ;; esac
	[ $((conc % k)) = 0 ] || die "FLEET_CONC=$conc is not a multiple of $k"
	log "fleet rep=$rep $sys: $n x $size B, $conc sessions over $k relay(s)"
	sink_start "$d.sinkc"
	if [ "$sys" != local ]; then
		nats_start "$d/nats" # fresh store directories every case
		urls=$NATS_URLS
	fi
	for ((i = 0; i < k; i++)); do fleet_relay_start "$d/relay$((i + 1))" $i "$urls"; done
	# The delivery side; the sink is fresh, so it counts from 0.
	"$BT" waitcount -count-sinkc "$d.sinkc" -base 0 -expect "$n" -pids "$(IFS=,; echo "${FLEET_PIDS[*]}")" \
		${NATS_PID:+-extra-pids $NATS_PID} -timeout 10m >"$d.wait.out" 2>"$d.wait.err" &
	wait_pid=$!
	track $wait_pid
	local lpids=() per=$((n / k)) m failed=0
	for ((i = 0; i < k; i++)); do
		m=$per
		[ $i = $((k - 1)) ] && m=$((n - per * (k - 1)))
		"$BT" load -lat -c $((conc / k)) -addr "${FLEET_IPS[$i]}:2525" -n "$m" -size "$size" -from $FROM -to rcpt@plain.bench.test \
			>"$d.load$i.out" 2>"$d.load$i.err" &
		lpids+=($!)
		track $!
	done
	for ((i = 0; i < k; i++)); do
		wait "${lpids[$i]}" || { failed=1; log "fleet $sys: load $i failed: $(tail -3 "$d.load$i.err")"; }
		untrack "${lpids[$i]}"
	done
	[ $failed = 1 ] && { kill -TERM $wait_pid 2>/dev/null || true; }
	wait $wait_pid || { failed=1; log "fleet $sys: delivery wait failed: $(tail -3 "$d.wait.err")"; }
	untrack $wait_pid
	# Before stopping: redeliveries (fleet cases).
	local redel=0 v
	if [ "$sys" != local ]; then
		for ((i = 0; i < k; i++)); do
			v=$(kvget "$("$BT" metrics -url "http://${FLEET_IPS[$i]}:9464/metrics" -names stsrelay_fleet_redeliveries_total || true)" stsrelay_fleet_redeliveries_total)
			[[ "$v" =~ ^[0-9]+$ ]] && redel=$((redel + v))
		done
	fi
	fleet_relays_stop
	nats_stop
	sink_stop
	local w dlog errs warns check
	w=$(cat "$d.wait.out" 2>/dev/null || true)
	dlog=$(cat "$d"/relay*/stsrelay.log | grep '"msg":"delivery"' | grep -c '"result":"delivered"' || true)
	errs=$(cat "$d"/relay*/stsrelay.log | grep -c '"level":"error"' || true)
	warns=$(cat "$d"/relay*/stsrelay.log | grep -c '"level":"warn"' || true)
	check="sink=$(kvget "$w" sink_final),delivered_log=$dlog,log_errors=$errs,log_warns=$warns"
	[ "$sys" != local ] && check+=",redeliveries=$redel,nats_peak_rss_kb=$(kvget "$w" extra_peak_rss_kb)"
	# Over the loads: the slowest accept, the median p50, the worst p99.
	local acc p50 p99 lmin lmax del drain
	acc=$(fleet_loads $k accept_s | sort -g | tail -1)
	p50=$(fleet_loads $k lat_p50_ms | sort -g | awk '{ v[NR] = $1 } END { if (NR) print v[int((NR + 1) / 2)] }')
	p99=$(fleet_loads $k lat_p99_ms | sort -g | tail -1)
	lmin=$(fleet_loads $k lat_min_ms | sort -g | head -1)
	lmax=$(fleet_loads $k lat_max_ms | sort -g | tail -1)
	del=$(kvget "$w" deliver_s)
	if [ $failed = 1 ]; then acc=- del=-; fi
	drain=$(awk -v a="${acc:--}" -v b="${del:--}" 'BEGIN { if (a != "-" && b != "-") printf "%.3f", b - a; else print "-" }')
	printf '%s\t%s\tfleet\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t-\t-\t-\t-\t-\t-\t-\n' "$rep" "$sys" "$size" "$conc" "$n" \
		"${acc:--}" "${del:--}" "$drain" "$(kvget "$w" peak_pss_kb)" "$(kvget "$w" peak_rss_kb)" "$(kvget "$w" max_procs)" \
		"${p50:--}" "${p99:--}" "${lmin:--}" "${lmax:--}" "$check" >>"$RESULTS"
	log "fleet rep=$rep $sys: accept_s=$acc (slowest load) p50=${p50}ms p99=${p99}ms $w $check"
	rm -rf "$d/nats" # the stores are not needed afterwards
}

if [[ " $MODES " == *" fleet "* ]]; then
	for rep in $(seq "$FLEET_REPS"); do
		cases=$FLEET_CASES
		if [ $((rep % 2)) = 0 ]; then cases=$(tr ' ' '\n' <<<"$cases" | tac | tr '\n' ' '); fi
		for c in $cases; do fleet_case "$rep" "$c"; done
	done
fi

# ---------------------------------------------------------------- report
T_END=$(date +%s)
{
	settings=""
	wanvars=
	[[ " $MODES " == *" wan "* ]] && wanvars="WAN_DELAYS WAN_SINKS WAN_NMSG WAN_NOCHUNK_SYSTEMS WAN_NOCHUNK_REPS WAN_HANDSHAKE STSRELAY_BIN"
	[[ " $MODES " == *" fleet "* ]] && wanvars+=" FLEET_NMSG FLEET_CONC FLEET_SIZE FLEET_REPS FLEET_CASES STSRELAY_BIN"
	[[ " $MODES " == *" scale "* ]] && wanvars+=" SCALE_PARTS SCALE_PIN_N SCALE_PIN_SIZE SCALE_DEAD_NS SCALE_PF_DEAD_N SCALE_SYSTEMS STSRELAY_BIN"
	vars="QUICK REPS SIZES CONCS MODES RESTART_N RESTART_SYSTEMS FSYNC NMSG"
	[ "$MODES" = scale ] && vars="QUICK MODES"
	[ "$MODES" = fleet ] && vars="QUICK MODES"
	for v in $vars $wanvars; do
		[ -n "${!v:-}" ] && settings+="$v=\"${!v}\" "
	done
	echo "Run: \`${settings}bench/run.sh\` on $(date -u +%Y-%m-%d), $((T_END - T_START)) s (build excluded)"
	echo "Machine: $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo), $(awk '/MemTotal/ {printf "%.0f GB", $2/1048576}' /proc/meminfo) RAM, $(uname -r), $(. /etc/os-release; echo "$PRETTY_NAME"), Postfix $(postconf -d -h mail_version), $(go version | awk '{print $3}')"
	echo
	"$BT" table -results "$RESULTS" -fsync "$FSYNC_TSV" -restart "$RESTART_TSV" -scale "$SCALE_TSV"
} | tee "$OUT/table.md"
log "done; results in $OUT"
