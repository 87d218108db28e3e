# Sourced (not run) by the measuring scripts (concurrency-check, floor-ab,
# socket-buffer-ab), after their `set -eu`: what each of them needs first.
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
