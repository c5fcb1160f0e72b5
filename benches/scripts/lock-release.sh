#!/usr/bin/env bash
# How soon a waiter blocked in pg_advisory_lock gets the lock after the holder's client is
# SIGKILLed, for a holder session that is idle, one running a statement, and one running a
# statement with client_connection_check_interval: the measurements behind ADR 0001's choice
# to keep the leader lock's session idle. Needs psql and python3; DATABASE_URL picks the server
# (default: postgres on 127.0.0.1:5432). TRIALS=N sets the trials per case (default 5).
set -euo pipefail
url=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
trials=${TRIALS:-5}
key=$((RANDOM * 32768 + RANDOM))
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# $1 label, $2 what the holder runs after taking the lock, $3 PGOPTIONS for the holder.
measure() {
  local samples=()
  for _ in $(seq "$trials"); do
    rm -f "$work/fifo" && mkfifo "$work/fifo"
    # In a subshell, so that the SIGKILL goes to psql alone and the shell reports no job.
    (PGOPTIONS="$3" psql "$url" -qAtX <"$work/fifo" >/dev/null 2>&1 || true) 2>/dev/null &
    local holder=$!
    exec 3>"$work/fifo"
    echo "SELECT pg_advisory_lock($key);" >&3
    echo "$2" >&3
    # Positioning, not a bound: the holder has the lock (and is inside its statement), then
    # the waiter is blocked behind it.
    sleep 0.5
    psql "$url" -qAtX -c "SELECT pg_advisory_lock($key); SELECT extract(epoch FROM clock_timestamp())" >"$work/waiter" &
    local waiter=$!
    sleep 0.3
    local killed
    killed=$(date +%s.%N)
    pkill -KILL -P "$holder" psql
    wait "$waiter"
    exec 3>&-
    { wait "$holder"; } 2>/dev/null || true
    samples+=("$(python3 -c "print(round(($(tail -n 1 "$work/waiter") - $killed) * 1000, 1))")")
  done
  printf '%-68s %s ms\n' "$1" "${samples[*]}"
}

echo "SIGKILL of the lock holder's client -> the waiter holds the lock ($trials trials each)"
measure "holder idle" "SELECT 1;" ""
measure "holder running pg_sleep(2) (1.2 s left at the kill)" "SELECT pg_sleep(2);" ""
measure "holder in pg_sleep(2), client_connection_check_interval=100ms" "SELECT pg_sleep(2);" "-c client_connection_check_interval=100ms"
