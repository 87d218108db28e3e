# Sourced (not run) by the measuring scripts (concurrency-check, config-ab,
# floor-ab, socket-buffer-ab), after their `set -eu`: what each of them needs first.
# Sets root (the repository), bin (the balancer to measure: PROTOBALANCE_BIN,
# else the plain release build from scripts/release-bin), work (a scratch
# directory) and pids (processes to stop: append each one started); on exit
# it stops them and removes work.

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${PROTOBALANCE_BIN:-$("$root/scripts/release-bin")}
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

# Waits until something listens on 127.0.0.1:PORT (5 s at most).
waitport() {
    for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.05; done
    echo "port $1 never opened"
    exit 1
}

# Gbit/s received in one iperf3 run of 4 s to PORT with STREAMS streams;
# further arguments go to iperf3.
iperf_gbps() {
    local port=$1 streams=$2
    shift 2
    iperf3 -c 127.0.0.1 -p "$port" -P "$streams" "$@" -t 4 -f g 2>&1 |
        awk '/receiver/ { v = $(NF - 2) } END { print v }'
}

# Starts nginx (one process) on 127.0.0.1:PORT serving /f1024.bin, 1 KiB.
start_nginx() {
    local port=$1
    [ -f "$work/www/f1024.bin" ] || { mkdir -p "$work/www"; head -c 1024 /dev/urandom >"$work/www/f1024.bin"; }
    cat >"$work/nginx$port.conf" <<EOC
daemon off;
master_process off;
pid $work/nginx$port.pid;
error_log $work/nginx$port.err warn;
events { worker_connections 4096; }
http {
    access_log off;
    server { listen 127.0.0.1:$port; root $work/www; keepalive_requests 10000000; }
}
EOC
    nginx -c "$work/nginx$port.conf" -e "$work/nginx$port.err" & pids+=($!)
}

# A balancer config with two services: "bulk" on 127.0.0.1:BULK to iperf3
# on IPERF, and "http" on 127.0.0.1:HTTP over the nginx nodes on the
# remaining ports; the admin API on ADMIN.
# Usage: balancer_toml ADMIN BULK HTTP IPERF NGINX...
balancer_toml() {
    local admin=$1 bulk=$2 http=$3 iperf=$4
    shift 4
    cat <<EOC
state_dir = ""
[admin]
listen = "127.0.0.1:$admin"
[[service]]
name = "bulk"
listen = ["127.0.0.1:$bulk"]
cluster = "iperf"
[[service]]
name = "http"
listen = ["127.0.0.1:$http"]
cluster = "nginx"
[[cluster]]
name = "iperf"
affinity = false
[[cluster.node]]
name = "iperf3"
address = "127.0.0.1:$iperf"
[[cluster]]
name = "nginx"
affinity = false
EOC
    for port in "$@"; do
        printf '[[cluster.node]]\nname = "nginx%s"\naddress = "127.0.0.1:%s"\n' "$port" "$port"
    done
}

# wrk's p50 latency in microseconds, one request in flight (-t1 -c1, 4 s).
p50_us() {
    wrk -t1 -c1 -d4 --latency "http://127.0.0.1:$1/f1024.bin" |
        awk '$1 == "50%" { v = $2; u = 1; if (v ~ /ms$/) u = 1000; if (v ~ /[0-9]s$/ && v !~ /[mu]s$/) u = 1000000; sub(/[a-z]+$/, "", v); print v * u }'
}

# Requests/s of 4 s of wrk -t2 -c64 to PORT; further arguments go to wrk.
wrk_rps() {
    local port=$1
    shift
    wrk -t2 -c64 -d4 "$@" "http://127.0.0.1:$port/f1024.bin" | awk '/Requests\/sec/ { print $2 }'
}

# One row of figures (a figure's name, then one value per column) to the
# screen, marked with the round $r, and to $work/table.
record() { echo "round $r: $*"; echo "$*" >>"$work/table"; }

# Prints the medians of TABLE (rows: a figure's name, then one value per
# column, the first column the reference) and each column's ratio to the
# first; the remaining arguments name the columns.
print_medians() {
    python3 - "$@" <<'EOP'
import statistics, sys
table, names = sys.argv[1], sys.argv[2:]
rows = {}
for line in open(table):
    name, *values = line.split()
    rows.setdefault(name, []).append([float(v) for v in values])
print(f"{'median':<8}" + "".join(f"{n:>12}" for n in names) + "".join(f"{n + '/' + names[0][:1]:>12}" for n in names[1:]))
for name, runs in rows.items():
    med = [statistics.median(col) for col in zip(*runs)]
    print(f"{name:<8}" + "".join(f"{m:>12.1f}" for m in med) + "".join(f"{m / med[0]:>12.2f}" for m in med[1:]))
EOP
}
