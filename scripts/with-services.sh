#!/usr/bin/env bash
# Run a command with PostgreSQL and Redis available on localhost; start whichever is not
# running, and stop what this script started when the command ends (even on failure).
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p var
started=()

cleanup() {
  for svc in "${started[@]:-}"; do
    case "$svc" in
      redis) redis-cli -h 127.0.0.1 -p 6379 shutdown nosave >/dev/null 2>&1 || true ;;
      postgres) pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main stop >/dev/null 2>&1 || true ;;
    esac
  done
}
trap cleanup EXIT

wait_for() {  # wait_for NAME COMMAND...: poll until COMMAND succeeds, up to 30 s
  local name=$1; shift
  for _ in $(seq 1 150); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "error: $name did not come up; see its log" >&2
  return 1
}

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "Starting PostgreSQL…"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start && started+=(postgres)
  wait_for PostgreSQL pg_isready -q -h 127.0.0.1 -p 5432 || exit 1
fi

if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "Starting Redis…"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --logfile "$PWD/var/redis.log" && started+=(redis)
  wait_for Redis redis-cli -h 127.0.0.1 -p 6379 ping || exit 1
fi

"$@"
